"""Writing a dataset as tar shards (`moe-dist data shards`): `write_shards`.

Owns the conversion of a loaded split to stored records (uint8 images exactly as in the
source files, float32 synthetic inputs), the cutting into shards of N samples and tar
members of K-sample chunks, and the manifest written last. Shards and manifest are written
under a ``.partial`` name and renamed, so an interrupted run leaves nothing a reader takes
for finished.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moe_dist.data import synthetic
from moe_dist.data.registry import _PAPER_STATS, Dataset, load_dataset
from moe_dist.data.shards.manifest import (_MEMBER, DEFAULT_CHUNK_SIZE, FORMAT, MANIFEST_NAME, VERSION,
                                           _record_dtype, _webdataset)
from moe_dist.errors import DataError


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _stored_inputs(x: torch.Tensor, name: str) -> np.ndarray:
    """What a shard stores: images as the source's uint8 (exactly recovered from the [0, 1]
    floats of ``normalization="none"``), synthetic inputs as float32."""
    if name == "synthetic":
        return x.numpy().astype(np.float32, copy=False)
    u8 = x.mul(255).round_().to(torch.uint8)
    if not torch.equal(u8.float().div_(255.0), x):
        raise DataError(f"{name}: inputs are not 8-bit images; cannot store them as uint8")
    return u8.numpy()


def _record_array(inputs: np.ndarray, labels: torch.Tensor, cluster: torch.Tensor | None) -> np.ndarray:
    """The split as one record array, in index order."""
    records = np.zeros(len(inputs), dtype=_record_dtype(inputs.dtype.str, inputs.shape[1:], cluster is not None))
    records["input"], records["label"], records["index"] = inputs, labels.numpy(), np.arange(len(inputs))
    if cluster is not None:
        records["cluster"] = cluster.numpy()
    return records


def _npy(records: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, records, allow_pickle=False)
    return buf.getvalue()


def _write_shard(path: Path, records: np.ndarray, start: int, stop: int, chunk_size: int) -> dict[str, Any]:
    """Samples start..stop of the split as one shard of chunks; its manifest entry."""
    wds = _webdataset()
    partial_path = path.with_name(path.name + ".partial")
    firsts = range(start, stop, chunk_size)
    # Fixed tar metadata (mtime, owner): writing twice gives the same bytes, hence the same sha256s.
    with open(partial_path, "wb") as f, wds.TarWriter(f, encoder=False, mtime=0, user="moe_dist",
                                                        group="moe_dist") as writer:
        for first in firsts:
            writer.write({"__key__": f"{first:08d}", _MEMBER: _npy(records[first:min(first + chunk_size, stop)])})
    os.replace(partial_path, path)
    return {"file": path.name, "first_index": start, "num_samples": stop - start, "num_chunks": len(firsts),
            "num_bytes": path.stat().st_size, "sha256": _sha256(path)}


def _write_split(out: Path, split_name: str, records: np.ndarray, shard_size: int,
                 chunk_size: int) -> dict[str, Any]:
    """One split as shards of `shard_size` samples; its manifest entry."""
    shards = [_write_shard(out / f"{split_name}-{number:06d}.tar", records, start,
                           min(start + shard_size, len(records)), chunk_size)
              for number, start in enumerate(range(0, len(records), shard_size))]
    return {"num_samples": len(records), "shards": shards}


def _manifest(name: str, data: Dataset, chunk_size: int, splits: dict[str, Any], source: dict[str, Any]
              ) -> dict[str, Any]:
    images = name != "synthetic"
    mean, std = _PAPER_STATS[name] if images else ((), ())
    return {
        "format": FORMAT,
        "version": VERSION,
        "dataset": name,
        "num_classes": data.num_classes,
        "class_names": data.class_names,
        "input_shape": list(data.input_shape),
        "input_dtype": "uint8" if images else "float32",
        "has_cluster": data.train.cluster is not None,
        "chunk_size": chunk_size,
        # uint8 images: x / 255, then data.normalization: paper ((x - mean) / std, these
        # constants), half ((x - 0.5) / 0.5) or none; float32 inputs are used as stored.
        "normalization": {"divisor": 255.0, "paper_mean": list(mean), "paper_std": list(std)} if images else {},
        "augment": data.augment,
        "notes": data.notes,
        "source": source,
        "member": {"__key__": "split index of the chunk's first sample, %08d; chunks start every "
                              "chunk_size samples from the shard's first_index",
                   _MEMBER: "up to chunk_size consecutive samples as one .npy record array: input "
                            "(input_dtype, input_shape), label, index" + ("" if images else ", cluster")
                            + " (int64)"},
        "splits": splits,
    }


def write_shards(name: str, out: str | Path, shard_size: int, *, chunk_size: int = DEFAULT_CHUNK_SIZE,
                 root: str = "", setting: str = "s1", data_seed: int | None = None, train_size: int = 0,
                 test_size: int = 0) -> dict[str, Any]:
    """Write dataset `name` (as `load_dataset` reads it from `root`) to tar shards of
    `shard_size` samples, in tar members of `chunk_size` samples, under `out`, then
    `manifest.json`; return the manifest.

    Shards are reproducible (fixed tar metadata): writing twice gives the same sha256s.
    The manifest is written last, so an interrupted run leaves a folder readers refuse.
    """
    _webdataset()
    if shard_size <= 0:
        raise DataError(f"--shard-size must be positive, got {shard_size}")
    if chunk_size <= 0:
        raise DataError(f"--chunk-size must be positive, got {chunk_size}")
    data = load_dataset(name, root, setting=setting, data_seed=data_seed, train_size=train_size,
                        test_size=test_size, normalization="none")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST_NAME).unlink(missing_ok=True)
    for old in [*out.glob("train-*.tar"), *out.glob("test-*.tar")]:
        old.unlink()  # shards of an earlier write with another shard size

    splits = {split_name: _write_split(out, split_name, _record_array(_stored_inputs(split.x, name), split.y,
                                                                       split.cluster), shard_size, chunk_size)
              for split_name, split in (("train", data.train), ("test", data.test))}
    images = name != "synthetic"
    source = {"setting": setting if not images else None,
              "data_seed": (synthetic.SETTINGS[setting].seed if data_seed is None else data_seed)
              if not images else None,
              "train_size": train_size, "test_size": test_size}
    manifest = _manifest(name, data, chunk_size, splits, source)
    partial_manifest = out / (MANIFEST_NAME + ".partial")
    partial_manifest.write_text(json.dumps(manifest, indent=1))
    os.replace(partial_manifest, out / MANIFEST_NAME)
    return manifest
