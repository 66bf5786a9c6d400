"""Atomic, checksummed checkpoints: a crash or kill never corrupts the last good one.

Layout: ``checkpoints/epoch_0007.pt`` files (7 epochs done; a run preempted mid-epoch
writes ``epoch_0007_step_00000123.pt``, which sorts between epochs 7 and 8) and
``checkpoints/latest.json``, which names the newest file with its sha256; each checkpoint
also has its own ``NAME.sha256``. A checkpoint is written to a temporary file, fsynced and
renamed, then its checksum file, and only then is ``latest.json`` replaced the same way.
Loading verifies the sha256 before ``torch.load(weights_only=True)`` ever sees the bytes, and
falls back to the newest older checkpoint that verifies when the newest is damaged or gone.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

from moe_dist.errors import CheckpointError

LATEST = "latest.json"
TEMPORARY_GLOB = ".*.tmp"  # atomic_write's temporary files
SUM_SUFFIX = ".sha256"  # each checkpoint's checksum file


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


def _name(epoch: int, step: int | None) -> str:
    return f"epoch_{epoch:04d}.pt" if step is None else f"epoch_{epoch:04d}_step_{step:08d}.pt"


def save_checkpoint(ckpt_dir: str | Path, epoch: int, payload: dict[str, Any], keep: int = 2,
                    step: int | None = None) -> Path:
    """Write ``epoch_{epoch:04d}.pt`` (mid-epoch, with ``step``: ``epoch_{epoch:04d}_step_{step:08d}.pt``)
    atomically, then its checksum file ``NAME.sha256`` (``sha256sum -c`` format), then point
    latest.json at it; prune old ones. Every kept checkpoint can thus be verified on its own,
    so resumption can fall back to an older one when the newest is damaged."""
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save(payload, buf)
    data = buf.getvalue()
    path = ckpt_dir / _name(epoch, step)
    digest = sha256_bytes(data)
    atomic_write(path, data)
    atomic_write(path.with_name(path.name + SUM_SUFFIX), f"{digest}  {path.name}\n".encode())
    meta = {"file": path.name, "epoch": epoch, "sha256": digest, "bytes": len(data)}
    if step is not None:
        meta["step"] = step
    atomic_write(ckpt_dir / LATEST, json.dumps(meta, indent=1).encode())
    for old in sorted(ckpt_dir.glob("epoch_*.pt"))[:-keep]:
        if old != path:
            old.unlink(missing_ok=True)
            old.with_name(old.name + SUM_SUFFIX).unlink(missing_ok=True)
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


def checkpoint_files(ckpt_dir: str | Path) -> list[Path]:
    """The checkpoint files in ``ckpt_dir``, newest first (names sort by epoch, then step)."""
    folder = Path(ckpt_dir)
    return sorted(folder.glob("epoch_*.pt"), reverse=True) if folder.is_dir() else []


def _recorded_sha256(path: Path, pointer: dict[str, Any] | None) -> str | None:
    """The checksum recorded for ``path``: its .sha256 file, else latest.json's entry."""
    sidecar = path.with_name(path.name + SUM_SUFFIX)
    if sidecar.is_file():
        return sidecar.read_text().split()[0] if sidecar.read_text().strip() else None
    if pointer is not None and pointer.get("file") == path.name:
        return pointer.get("sha256")
    return None


def _load_verified(path: Path, expected: str | None, map_location: Any) -> dict[str, Any]:
    """Verify ``path`` against ``expected`` before ``torch.load`` ever sees the bytes."""
    if expected is None:
        raise CheckpointError(f"{path.name} has no recorded sha256 ({path.name}{SUM_SUFFIX} or {LATEST})")
    data = path.read_bytes()
    digest = sha256_bytes(data)
    if digest != expected:
        raise CheckpointError(f"{path} is corrupt or was modified: sha256 {digest[:12]}... "
                              f"!= {expected[:12]}... recorded for it")
    try:
        return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as exc:  # a checksummed file that still fails to unpickle is a bug or an attack
        raise CheckpointError(f"{path} could not be loaded: {' '.join(str(exc).split())[:200]}") from None


def load_checkpoint(ckpt_dir: str | Path, map_location: str | torch.device = "cpu",
                    on_skip: Callable[[str], None] | None = None) -> dict[str, Any] | None:
    """The newest checkpoint that verifies (sha256 checked before unpickling); None when the
    folder holds none. A damaged newer one is skipped, and ``on_skip`` gets one line saying
    which and why; when none verifies, CheckpointError lists every reason."""
    try:
        pointer = latest_checkpoint(ckpt_dir)
    except CheckpointError as exc:
        pointer = None
        if on_skip is not None:
            on_skip(f"{exc}; checking each checkpoint against its own {SUM_SUFFIX} file")
    if pointer is not None and not (Path(ckpt_dir) / pointer["file"]).exists() and on_skip is not None:
        on_skip(f"{pointer['file']} named by {LATEST} is missing")
    reasons = []
    for path in checkpoint_files(ckpt_dir):
        try:
            payload = _load_verified(path, _recorded_sha256(path, pointer), map_location)
        except CheckpointError as exc:
            reasons.append(str(exc))
            continue
        for reason in reasons:
            if on_skip is not None:
                on_skip(f"skipped {reason}; resuming from {path.name}")
        return payload
    if reasons:
        raise CheckpointError(f"no checkpoint in {ckpt_dir} verifies: {'; '.join(reasons)}")
    if pointer is not None:
        raise CheckpointError(f"{Path(ckpt_dir) / pointer['file']} named by {LATEST} is missing")
    return None
