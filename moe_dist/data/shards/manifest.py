"""The shard folder's manifest and its verification.

Owns the on-disk format's names (format string and version, file and member names, the
chunk record dtype the manifest implies), `ShardInfo` (one shard's manifest entry),
`ShardSet` (a folder: its manifest, the version check, which shards pass size and sha256
verification), the skip counters and `ShardWarning` through which every stage reports what
it dropped, and the import of the optional webdataset package.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from moe_dist.data import synthetic
from moe_dist.errors import DataError

MANIFEST_NAME = "manifest.json"
FORMAT = "moe_dist webdataset shards"
VERSION = 2  # 1: one tar member per sample (refused: rewrite the shards)
SPLITS = ("train", "test")
DEFAULT_CHUNK_SIZE = 256  # samples per tar member (`moe-dist data shards --chunk-size`)
_MEMBER = "chunk.npy"

# Skips seen by this process (each DataLoader worker counts its own): warnings carry them.
_SKIPPED = {"shards": 0, "samples": 0, "errors": 0}


class ShardWarning(UserWarning):
    """A shard or chunk was skipped (corrupt, truncated, unreadable); the data seen shrank."""


def _webdataset():
    """The optional package, imported only when shards are written or read, so that the
    memory path never needs it."""
    try:
        import webdataset
    except ImportError as exc:
        raise DataError('data.format=webdataset and `moe-dist data shards` need the webdataset package: '
                        'pip install -e ".[webdataset]"') from exc
    return webdataset


def _make_shards_hint(root: Path | str) -> str:
    return f"make shards with `moe-dist data shards NAME --out {root} --shard-size N`"


def _record_dtype(input_dtype: str, input_shape: tuple[int, ...], has_cluster: bool) -> np.dtype:
    """One sample of a chunk: input, label, index (and cluster)."""
    fields = [("input", np.dtype(input_dtype).str, tuple(input_shape)), ("label", "<i8"), ("index", "<i8")]
    return np.dtype(fields + ([("cluster", "<i8")] if has_cluster else []))


@dataclass(frozen=True)
class ShardInfo:
    """One shard as the manifest describes it."""

    path: Path
    first_index: int
    num_samples: int
    num_bytes: int
    sha256: str
    num_chunks: int


class _OldFormat(Exception):
    """The manifest of an earlier format version (its number)."""


class _ShardFault(Exception):
    """Why a shard's bytes do not match its manifest entry (one phrase)."""


def _verified_bytes(info: ShardInfo) -> bytes:
    """The shard's bytes, after its size and sha256 match the manifest. The reader parses
    these very bytes, so what was hashed is what is read."""
    try:
        data = info.path.read_bytes()
    except OSError as exc:
        raise _ShardFault(f"unreadable ({exc.strerror or exc})") from None
    if len(data) != info.num_bytes:
        what = "truncated" if len(data) < info.num_bytes else "too long"
        raise _ShardFault(f"{what}: {len(data):,} bytes, manifest says {info.num_bytes:,}")
    if hashlib.sha256(data).hexdigest() != info.sha256:
        raise _ShardFault("sha256 mismatch (corrupt)")
    return data


def _warn_skipped_shard(info: ShardInfo, reason: str) -> None:
    _SKIPPED["shards"] += 1
    _SKIPPED["samples"] += info.num_samples
    warnings.warn(f"skipped shard {info.path} ({info.num_samples} samples): {reason}; this process has "
                  f"skipped {_SKIPPED['shards']} shard(s), {_SKIPPED['samples']} samples",
                  ShardWarning, stacklevel=2)


def _check_is_shard_folder(root: Path, display_root: str | Path) -> None:
    """A folder with a manifest.json, or a one-line hint on how to make one."""
    if not root.is_dir():
        raise DataError(f"data.root={display_root}: no such folder for data.format=webdataset; "
                        f"{_make_shards_hint(display_root)}")
    if not (root / MANIFEST_NAME).is_file():
        raise DataError(f"data.root={display_root} has no {MANIFEST_NAME} (not a finished shard folder); "
                        f"{_make_shards_hint(display_root)}")


def _parse_manifest(root: Path, manifest: dict[str, Any]) -> tuple[int, dict[str, list[ShardInfo]]]:
    """(chunk size, shards per split); ValueError, KeyError or TypeError when malformed,
    `_OldFormat` for an earlier version (which gets its own message: rewrite, not make)."""
    version = manifest.get("version")
    if manifest.get("format") == FORMAT and isinstance(version, int) and version < VERSION:
        raise _OldFormat(version)
    if manifest.get("format") != FORMAT or version != VERSION:
        raise ValueError(f"format {manifest.get('format')!r} version {version}")
    chunk_size = int(manifest["chunk_size"])
    if chunk_size <= 0:
        raise ValueError(f"chunk_size {chunk_size}")
    shards = {split: [ShardInfo(root / s["file"], int(s["first_index"]), int(s["num_samples"]),
                                int(s["num_bytes"]), str(s["sha256"]), int(s["num_chunks"]))
                      for s in manifest["splits"][split]["shards"]]
              for split in SPLITS}
    return chunk_size, shards


class ShardSet:
    """A shard folder: its manifest, and which of its shards pass verification."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        manifest_path = self.root / MANIFEST_NAME
        _check_is_shard_folder(self.root, root)
        try:
            self.manifest = json.loads(manifest_path.read_text())
            self.chunk_size, self._shards = _parse_manifest(self.root, self.manifest)
        except _OldFormat as old:
            raise DataError(f"{root} holds shards of format version {old.args[0]} (one tar member per sample), "
                            f"this moe_dist reads version {VERSION} (chunks of samples): rewrite them with "
                            f"`moe-dist data shards {self.manifest.get('dataset', 'NAME')} --out {root}`") from None
        except (ValueError, KeyError, TypeError) as exc:  # json.JSONDecodeError is a ValueError
            raise DataError(f"{manifest_path}: not a moe_dist shard manifest ({exc}); "
                            f"{_make_shards_hint(root)}") from None
        self.name: str = self.manifest["dataset"]
        self.input_shape = tuple(self.manifest["input_shape"])
        self._good: dict[str, list[ShardInfo]] = {}

    def shards(self, split: str) -> list[ShardInfo]:
        return list(self._shards[split])

    def num_written(self, split: str) -> int:
        return sum(s.num_samples for s in self._shards[split])

    def good_shards(self, split: str) -> list[ShardInfo]:
        """The shards of `split` whose size and sha256 match the manifest (checked once per
        ShardSet); the others are reported in one counted `ShardWarning`."""
        if split not in self._good:
            good, bad = [], []
            for info in self._shards[split]:
                try:
                    _verified_bytes(info)
                    good.append(info)
                except _ShardFault as fault:
                    bad.append(f"{info.path.name} ({fault})")
            if bad:
                lost = self.num_written(split) - sum(s.num_samples for s in good)
                warnings.warn(f"{self.root}: skipping {len(bad)} of {len(self._shards[split])} {split} shards "
                              f"({lost} of {self.num_written(split)} samples) that fail verification: "
                              f"{', '.join(bad)}; re-create them with `moe-dist data shards`",
                              ShardWarning, stacklevel=2)
            if not good:
                raise DataError(f"{self.root}: no {split} shard passes verification; {_make_shards_hint(self.root)}")
            self._good[split] = good
        return self._good[split]

    def check_matches(self, name: str, setting: str, data_seed: int) -> None:
        """The config must name the dataset the shards hold (and the same synthetic data)."""
        if name != self.name:
            raise DataError(f"data.root={self.root} holds {self.name} shards but data.name={name!r}")
        if name == "synthetic":
            src = self.manifest["source"]
            seed = synthetic.SETTINGS[setting].seed if data_seed < 0 else data_seed
            if (src["setting"], src["data_seed"]) != (setting, seed):
                raise DataError(f"data.root={self.root} holds synthetic setting {src['setting']} seed "
                                f"{src['data_seed']}, but the config asks for setting {setting} seed {seed}")
