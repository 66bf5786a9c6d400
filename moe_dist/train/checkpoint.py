"""Atomic, checksummed checkpoints: a crash or kill never corrupts the last good one.

Layout: ``checkpoints/epoch_0007.pt`` files (7 epochs done; a run preempted mid-epoch
writes ``epoch_0007_step_00000123.pt``, which sorts between epochs 7 and 8) and
``checkpoints/latest.json``, which names the newest file with its sha256. A checkpoint is
written to a temporary file, fsynced and renamed; only then is ``latest.json`` replaced the
same way. Loading verifies the sha256 before ``torch.load(weights_only=True)`` ever sees the
bytes.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from moe_dist.errors import CheckpointError

LATEST = "latest.json"
TEMPORARY_GLOB = ".*.tmp"  # atomic_write's temporary files


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, fsync it, rename it over ``path``:
    a reader (or a kill at any instant) sees the old file or the new one, never a part.
    A kill leaves at most a ``.NAME.*.tmp`` file, which :func:`remove_stale_temporaries` clears."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete the temporary files a killed atomic_write left in ``folder``; returns them.
    Call only when no other process writes there (a run's start, before any rank writes)."""
    stale = sorted(Path(folder).glob(TEMPORARY_GLOB)) if Path(folder).is_dir() else []
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def save_checkpoint(ckpt_dir: str | Path, epoch: int, payload: dict[str, Any], keep: int = 2,
                    step: int | None = None) -> Path:
    """Write ``epoch_{epoch:04d}.pt`` (mid-epoch, with ``step``: ``epoch_{epoch:04d}_step_{step:08d}.pt``)
    atomically, point latest.json at it, prune old ones."""
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save(payload, buf)
    data = buf.getvalue()
    path = ckpt_dir / (f"epoch_{epoch:04d}.pt" if step is None else f"epoch_{epoch:04d}_step_{step:08d}.pt")
    atomic_write(path, data)
    meta = {"file": path.name, "epoch": epoch, "sha256": sha256_bytes(data), "bytes": len(data)}
    if step is not None:
        meta["step"] = step
    atomic_write(ckpt_dir / LATEST, json.dumps(meta, indent=1).encode())
    for old in sorted(ckpt_dir.glob("epoch_*.pt"))[:-keep]:
        if old != path:
            old.unlink(missing_ok=True)
    return path


def latest_checkpoint(ckpt_dir: str | Path) -> dict[str, Any] | None:
    """The metadata in latest.json, or None when the run has no checkpoint yet."""
    pointer = Path(ckpt_dir) / LATEST
    if not pointer.exists():
        return None
    try:
        meta = json.loads(pointer.read_text())
        _ = meta["file"], meta["sha256"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise CheckpointError(f"{pointer} is not a valid checkpoint pointer") from None
    return meta


def load_checkpoint(ckpt_dir: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any] | None:
    """Load the latest checkpoint after verifying its sha256; None when there is none."""
    meta = latest_checkpoint(ckpt_dir)
    if meta is None:
        return None
    path = Path(ckpt_dir) / meta["file"]
    if not path.exists():
        raise CheckpointError(f"{path} named by {LATEST} is missing")
    data = path.read_bytes()
    digest = sha256_bytes(data)
    if digest != meta["sha256"]:
        raise CheckpointError(f"{path} is corrupt or was modified: sha256 {digest[:12]}... "
                              f"!= {meta['sha256'][:12]}... recorded in {LATEST}")
    try:
        return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as exc:  # a checksummed file that still fails to unpickle is a bug or an attack
        raise CheckpointError(f"{path} could not be loaded: {' '.join(str(exc).split())[:200]}") from None
