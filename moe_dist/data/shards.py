"""Datasets as webdataset tar shards: write, verify, stream (`data.format=webdataset`).

A shard folder, written by ``moe-dist data shards NAME --out DIR --shard-size N
--chunk-size K``, holds ``train-000000.tar ...``, ``test-000000.tar ...`` (samples in split
order, N per shard) and ``manifest.json``: format version 2, the dataset's name, classes,
input shape and dtype, the chunk size K, the normalisation constants that rebuild the
in-memory inputs, and per shard its file, first index, sample count, chunk count, byte count
and sha256. A tar member is a *chunk* of up to K consecutive samples of one shard (chunks
start every K samples from the shard's first; the shard's last one may be shorter),
``%08d.chunk.npy`` (the key is the split index of its first sample): a .npy record array
with the fields ``input`` (the image as uint8 [C, H, W], exactly as in the source files;
synthetic data: the float32 [200] input), ``label``, ``index`` and, for synthetic data,
``cluster`` (int64). Per-sample tar members (format version 1) made tar parsing, decoding
and per-sample shuffling the cost of reading (about 4,000 samples/s); a chunk is parsed,
checked and copied with one vectorised operation per field. Normalising a stored image
gives bit for bit the tensor `load_dataset` gives. A version-1 folder is refused with a
one-line message to rewrite it.

Reading (design.md, "Environment facts": shards that split unevenly over ranks give ranks
different batch counts, which hangs data-parallel training):

* Training (`ShardBatches`): every rank streams from *resampled* shards
  (`webdataset.ResampledShards`) and takes exactly ceil(N / global batch) batches per epoch,
  its share of each global batch sized as `TensorBatches` sizes it, so ranks stay in step
  whatever the shard count. Node and worker splitting of a random stream: each (rank,
  DataLoader worker) draws shards and shuffles from its own seed, a function of (run seed,
  epoch, rank, worker), so the stream is deterministic and no two readers repeat each
  other. Each reader shuffles in two stages: the chunks of the shards it draws in a buffer
  of CHUNK_SHUFFLE chunks (`webdataset.shuffle`; 64 chunks of 256 samples are 16,384
  samples, more than a shard of 10,000), then the samples of those chunks in a buffer of
  max(SAMPLE_SHUFFLE, 8 K) samples, from which each block of BLOCK samples it hands on is
  drawn uniformly with one random permutation (`_mixed`). A batch thus holds samples of
  many chunks and, once the reader has passed its first shard, of several shards. The
  training process assembles the batches from the readers' blocks.
  N counts the samples of the shards that pass verification; ranks that disagree on it
  (node-local copies, one damaged) all stop with an error rather than fall out of step.
* Exact passes (`read_split`): the shard list split by rank (the rule of
  `webdataset.split_by_node`, with the rank passed explicitly), then by worker
  (`webdataset.split_by_worker`), each shard read once: every sample exactly once across
  ranks and workers. Evaluation reads the test shards this way into memory once and batches
  them with `TensorBatches`, so metrics stay exact (paper-spec A.7) and equal the memory
  path's; the training split is materialised the same way only when the whole-set
  evaluation (or a synthetic cluster table) needs it.
* Corruption: every shard is checked against the manifest (size, sha256) when a split is
  opened and again each time it is read; the bytes hashed are the bytes parsed. A shard
  that fails is skipped with a `ShardWarning` naming the file and counting the shards and
  samples skipped; tar or decoding errors that still occur skip the chunk with a counted
  warning too, a chunk must sit where the chunk size puts it and hold the indices its key
  promises (never twice), and a shard read to its end must yield its manifest's sample
  count (tarfile ends an archive quietly at a truncated header). Training streams draw a
  bounded number of shards, so a stream that runs dry is an error, never a hang.

`webdataset` is imported only here and only when shards are written or read (extra
``moe_dist[webdataset]``).
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import math
import os
import random
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moe_dist.data import synthetic
from moe_dist.data.registry import _PAPER_STATS, Dataset, Split, load_dataset
from moe_dist.errors import DataError

MANIFEST_NAME = "manifest.json"
FORMAT = "moe_dist webdataset shards"
VERSION = 2  # 1: one tar member per sample (refused: rewrite the shards)
SPLITS = ("train", "test")
DEFAULT_CHUNK_SIZE = 256  # samples per tar member (`moe-dist data shards --chunk-size`)
BLOCK = 512  # samples a training reader hands to the training process at a time
CHUNK_SHUFFLE = 64  # stored chunks each training reader shuffles over
SAMPLE_SHUFFLE = 4096  # samples each training reader mixes over (at least 8 chunks' worth)
_EPOCH_SEED_STRIDE = 1_000_003  # as TensorBatches: keeps (seed, epoch) pairs apart
_NPY_MAGIC = b"\x93NUMPY"
_MEMBER = "chunk.npy"

# (inputs float32 [n, ...], labels int64 [n], split indices int64 [n], clusters int64 [n] or None)
Chunk = tuple[torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None"]
# The same inside a reader, as numpy arrays and with the inputs as stored (uint8 or float32).
_Records = tuple[np.ndarray, np.ndarray, np.ndarray, "np.ndarray | None"]


class ShardWarning(UserWarning):
    """A shard or chunk was skipped (corrupt, truncated, unreadable); the data seen shrank."""


def _webdataset():
    try:
        import webdataset
    except ImportError as exc:
        raise DataError('data.format=webdataset and `moe-dist data shards` need the webdataset package: '
                        'pip install -e ".[webdataset]"') from exc
    return webdataset


def _make_shards_hint(root: Path | str) -> str:
    return f"make shards with `moe-dist data shards NAME --out {root} --shard-size N`"


# ------------------------------------------------------------------------------- writing


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


def _record_dtype(input_dtype: str, input_shape: tuple[int, ...], has_cluster: bool) -> np.dtype:
    """One sample of a chunk: input, label, index (and cluster)."""
    fields = [("input", np.dtype(input_dtype).str, tuple(input_shape)), ("label", "<i8"), ("index", "<i8")]
    return np.dtype(fields + ([("cluster", "<i8")] if has_cluster else []))


def _records(inputs: np.ndarray, labels: torch.Tensor, cluster: torch.Tensor | None) -> np.ndarray:
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


def write_shards(name: str, out: str | Path, shard_size: int, *, chunk_size: int = DEFAULT_CHUNK_SIZE,
                 root: str = "", setting: str = "s1", data_seed: int | None = None, train_size: int = 0,
                 test_size: int = 0) -> dict[str, Any]:
    """Write dataset `name` (as `load_dataset` reads it from `root`) to tar shards of
    `shard_size` samples, in tar members of `chunk_size` samples, under `out`, then
    `manifest.json`; return the manifest.

    Shards are reproducible (fixed tar metadata): writing twice gives the same sha256s.
    The manifest is written last, so an interrupted run leaves a folder readers refuse.
    """
    wds = _webdataset()
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

    splits: dict[str, Any] = {}
    for split_name, split in (("train", data.train), ("test", data.test)):
        records = _records(_stored_inputs(split.x, name), split.y, split.cluster)
        shards = []
        for number, start in enumerate(range(0, len(records), shard_size)):
            stop = min(start + shard_size, len(records))
            path = out / f"{split_name}-{number:06d}.tar"
            partial_path = path.with_name(path.name + ".partial")
            firsts = range(start, stop, chunk_size)
            with open(partial_path, "wb") as f, wds.TarWriter(f, encoder=False, mtime=0, user="moe_dist",
                                                                group="moe_dist") as writer:
                for first in firsts:
                    writer.write({"__key__": f"{first:08d}", _MEMBER: _npy(records[first:min(first + chunk_size,
                                                                                              stop)])})
            os.replace(partial_path, path)
            shards.append({"file": path.name, "first_index": start, "num_samples": stop - start,
                           "num_chunks": len(firsts), "num_bytes": path.stat().st_size, "sha256": _sha256(path)})
        splits[split_name] = {"num_samples": len(records), "shards": shards}

    images = name != "synthetic"
    manifest = {
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
        "normalization": ({"divisor": 255.0, "paper_mean": list(_PAPER_STATS[name][0]),
                           "paper_std": list(_PAPER_STATS[name][1])} if images else {}),
        "augment": data.augment,
        "notes": data.notes,
        "source": {"setting": setting if not images else None,
                   "data_seed": (synthetic.SETTINGS[setting].seed if data_seed is None else data_seed)
                   if not images else None,
                   "train_size": train_size, "test_size": test_size},
        "member": {"__key__": "split index of the chunk's first sample, %08d; chunks start every "
                              "chunk_size samples from the shard's first_index",
                   _MEMBER: "up to chunk_size consecutive samples as one .npy record array: input "
                            "(input_dtype, input_shape), label, index" + ("" if images else ", cluster")
                            + " (int64)"},
        "splits": splits,
    }
    partial_manifest = out / (MANIFEST_NAME + ".partial")
    partial_manifest.write_text(json.dumps(manifest, indent=1))
    os.replace(partial_manifest, out / MANIFEST_NAME)
    return manifest


# ------------------------------------------------------------------------------- verification


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


# Skips seen by this process (each DataLoader worker counts its own): warnings carry them.
_SKIPPED = {"shards": 0, "samples": 0, "errors": 0}


def _verified_bytes(info: ShardInfo) -> bytes:
    """The shard's bytes, after its size and sha256 match the manifest."""
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


def _warn_and_continue(exn: Exception) -> bool:
    """webdataset handler: count and report a tar or decoding error, skip, go on."""
    _SKIPPED["errors"] += 1
    if _SKIPPED["errors"] <= 5 or _SKIPPED["errors"] % 1000 == 0:  # counted, without flooding the log
        what = "; ".join(dict.fromkeys(str(a) for a in exn.args if a is not None)) or type(exn).__name__
        warnings.warn(f"skipped unreadable shard data: {what}; this process has skipped "
                      f"{_SKIPPED['errors']} tar/chunk error(s)", ShardWarning, stacklevel=2)
    return True


class ShardSet:
    """A shard folder: its manifest, and which of its shards pass verification."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        manifest_path = self.root / MANIFEST_NAME
        if not self.root.is_dir():
            raise DataError(f"data.root={root}: no such folder for data.format=webdataset; {_make_shards_hint(root)}")
        if not manifest_path.is_file():
            raise DataError(f"data.root={root} has no {MANIFEST_NAME} (not a finished shard folder); "
                            f"{_make_shards_hint(root)}")
        try:
            self.manifest = json.loads(manifest_path.read_text())
            version = self.manifest.get("version")
            if self.manifest.get("format") == FORMAT and isinstance(version, int) and version < VERSION:
                raise _OldFormat(version)
            if self.manifest.get("format") != FORMAT or version != VERSION:
                raise ValueError(f"format {self.manifest.get('format')!r} version {version}")
            self.chunk_size = int(self.manifest["chunk_size"])
            if self.chunk_size <= 0:
                raise ValueError(f"chunk_size {self.chunk_size}")
            self._shards = {
                split: [ShardInfo(self.root / s["file"], int(s["first_index"]), int(s["num_samples"]),
                                  int(s["num_bytes"]), str(s["sha256"]), int(s["num_chunks"]))
                        for s in self.manifest["splits"][split]["shards"]]
                for split in SPLITS}
        except _OldFormat as old:
            raise DataError(f"{root} holds shards of format version {old.args[0]} (one tar member per sample), "
                            f"this moe_dist reads version {VERSION} (chunks of samples): rewrite them with "
                            f"`moe-dist data shards {self.manifest.get('dataset', 'NAME')} --out {root}`") from None
        except (ValueError, KeyError, TypeError) as exc:
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


# ------------------------------------------------------------------------------- pipeline stages
# Module-level functions and objects bound with functools.partial: DataLoader workers pickle them.


class _ShardBytes(io.BytesIO):
    """A verified shard in memory; prints as its path, so tar errors name the file."""

    def __init__(self, data: bytes, path: Path):
        super().__init__(data)
        self.path = path

    def __repr__(self) -> str:
        return str(self.path)


class _ChunkDecoder:
    """``%08d.chunk.npy`` member -> its fields as arrays, checked against the manifest.

    Each distinct .npy header is parsed once (a split has at most two: full chunks and
    short ones), then the record array is viewed in place and each field copied out with one
    operation: no per-sample Python. A chunk must start where the chunk size puts one in its
    shard, hold exactly the samples up to the next start, and carry their indices.
    """

    def __init__(self, manifest: dict[str, Any]):
        self.dtype = _record_dtype(manifest["input_dtype"], tuple(manifest["input_shape"]),
                                   bool(manifest["has_cluster"]))
        self.chunk_size = int(manifest["chunk_size"])
        self.num_classes = int(manifest["num_classes"])
        self.headers: dict[bytes, tuple[int, ...]] = {}

    def _records_start(self, blob: bytes) -> tuple[int, tuple[int, ...]]:
        """Where the records start in a .npy blob, and the array's shape."""
        if blob[:6] != _NPY_MAGIC or len(blob) < 10:
            raise ValueError("not a .npy file")
        size_bytes = 2 if blob[6] == 1 else 4
        start = 8 + size_bytes + int.from_bytes(blob[8:8 + size_bytes], "little")
        header = blob[:start]
        shape = self.headers.get(header)
        if shape is None:
            f = io.BytesIO(header)
            read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                           (2, 0): np.lib.format.read_array_header_2_0}.get(np.lib.format.read_magic(f))
            if read_header is None:
                raise ValueError("unsupported .npy version")
            shape, fortran_order, dtype = read_header(f)
            if dtype != self.dtype or fortran_order or len(shape) != 1:
                raise ValueError(f"holds {dtype} {shape}, the manifest implies {self.dtype} (n,)")
            self.headers[header] = shape = tuple(shape)
        return start, shape

    def __call__(self, fname: str, blob: bytes, info: ShardInfo) -> _Records:
        key, _, ext = fname.partition(".")
        if ext != _MEMBER or not key.isdigit():
            raise ValueError(f"not a %08d.{_MEMBER} member")
        first = int(key)
        offset = first - info.first_index
        if not 0 <= offset < info.num_samples or offset % self.chunk_size:
            raise ValueError(f"no chunk of this shard (chunk size {self.chunk_size}) starts at index {first}")
        n = min(self.chunk_size, info.num_samples - offset)
        start, shape = self._records_start(blob)
        if shape != (n,):
            raise ValueError(f"holds {shape[0]} samples, its place in the shard implies {n}")
        if len(blob) - start != n * self.dtype.itemsize:
            raise ValueError("wrong number of bytes")
        records = np.frombuffer(blob, self.dtype, count=n, offset=start)
        index = np.arange(first, first + n, dtype=np.int64)
        if not np.array_equal(records["index"], index):
            raise ValueError(f"its indices are not {first}..{first + n - 1}")
        labels = records["label"]
        if labels.min() < 0 or labels.max() >= self.num_classes:
            raise ValueError(f"a label outside 0..{self.num_classes - 1}")
        cluster = records["cluster"].copy() if "cluster" in self.dtype.names else None
        return records["input"].copy(), labels.copy(), index, cluster


def _read_chunks(src: Iterator[dict], shards: dict[str, ShardInfo], decode: _ChunkDecoder) -> Iterator[_Records]:
    """Shard urls -> their chunks, in shard order (webdataset's tar reader). A shard that
    fails verification, a tar error and a chunk that fails decoding are skipped with a
    counted warning; a shard read to its end must give its manifest's sample count (tarfile
    ends an archive silently at a truncated header)."""
    from webdataset.tariterators import tar_file_iterator

    for item in src:
        info = shards[item["url"]]
        try:
            data = _verified_bytes(info)
        except _ShardFault as fault:
            _warn_skipped_shard(info, str(fault))
            continue
        firsts: set[int] = set()
        count = 0
        try:
            for member in tar_file_iterator(_ShardBytes(data, info.path), handler=_warn_and_continue):
                try:
                    chunk = decode(member["fname"], member["data"], info)
                    if int(chunk[2][0]) in firsts:
                        raise ValueError("a second copy of a chunk")
                except Exception as exn:  # a malformed chunk, whatever the fault: skip it, counted
                    _warn_and_continue(ValueError(f"{info.path} member {member['fname']}: "
                                                  f"{type(exn).__name__}: {exn}"))
                    continue
                firsts.add(int(chunk[2][0]))
                count += len(chunk[1])
                yield chunk
        except Exception as exn:  # the tar stream itself broke
            _warn_and_continue(ValueError(f"{type(exn).__name__}: {exn} @ {info.path}"))
        if count != info.num_samples:
            lost = info.num_samples - count
            _SKIPPED["samples"] += lost
            warnings.warn(f"shard {info.path} gave {count} of its {info.num_samples} samples (truncated or "
                          f"corrupt): {lost} samples lost; this process has skipped {_SKIPPED['samples']} "
                          f"samples", ShardWarning, stacklevel=2)


def _take_samples(src: Iterator[_Records], n: int) -> Iterator[_Records]:
    """The first `n` samples of the stream (the last chunk cut); reads no chunk beyond them."""
    for chunk in src if n > 0 else ():
        if len(chunk[1]) > n:
            chunk = tuple(None if t is None else t[:n] for t in chunk)
        n -= len(chunk[1])
        yield chunk
        if n <= 0:
            return


def _worker_id() -> int:
    info = torch.utils.data.get_worker_info()
    return 0 if info is None else info.id


def _stream_seed(rank: int) -> int:
    """ResampledShards' worker_seed: distinct per (rank, DataLoader worker)."""
    return rank * 65_537 + _worker_id()


def _reader_seed(epoch_seed: int, rank: int, stage: int) -> int:
    """A shuffle stage's seed, per (run seed, epoch, rank, worker, stage), in the worker."""
    return _webdataset().utils.make_seed(epoch_seed, rank, _worker_id(), stage)


def _shuffled_chunks(src: Iterator[_Records], epoch_seed: int, rank: int) -> Iterator[_Records]:
    """Chunks shuffled in a buffer of CHUNK_SHUFFLE (webdataset's shuffle)."""
    rng = random.Random(_reader_seed(epoch_seed, rank, 0))
    return _webdataset().shuffle(CHUNK_SHUFFLE, initial=CHUNK_SHUFFLE, rng=rng)(src)


def _mixed(src: Iterator[_Records], buffer: int, block: int, epoch_seed: int, rank: int) -> Iterator[_Records]:
    """Samples shuffled in a buffer, vectorised: once `buffer` + `block` samples wait, a
    block of `block` of them, drawn uniformly (one random permutation), is handed on.

    The samples are appended to a storage of twice that size by slice copies and leave by
    one gather per block; when the storage is full, the waiting samples are gathered to its
    front: each sample is copied about three times, never by a per-sample operation. At the
    end the rest leave in random order.
    """
    rng = np.random.default_rng(_reader_seed(epoch_seed, rank, 1))
    capacity = 2 * (buffer + block)
    storage: list[np.ndarray | None] = []
    end = 0  # the storage's rows [0, end) are written
    waiting = np.empty(0, dtype=np.int64)  # rows not handed on yet, in random order
    for chunk in src:
        if not storage:
            storage = [None if a is None else np.empty((capacity, *a.shape[1:]), a.dtype) for a in chunk]
        pos, n = 0, len(chunk[1])
        while pos < n:
            if end == capacity:  # gather the waiting rows to the front of a fresh storage
                end = len(waiting)
                storage = [None if a is None else _with_front(a, waiting) for a in storage]
                waiting = np.arange(end)
            take = min(capacity - end, n - pos)
            for stored, a in zip(storage, chunk):
                if stored is not None:
                    stored[end:end + take] = a[pos:pos + take]
            waiting = np.concatenate([waiting, np.arange(end, end + take)])
            end, pos = end + take, pos + take
            while len(waiting) >= buffer + block:
                waiting = rng.permutation(waiting)
                drawn, waiting = waiting[:block], waiting[block:]
                yield tuple(None if a is None else a.take(drawn, axis=0) for a in storage)
    waiting = rng.permutation(waiting)
    for start in range(0, len(waiting), block):
        yield tuple(None if a is None else a.take(waiting[start:start + block], axis=0) for a in storage)


def _with_front(a: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """A fresh array like `a` whose first len(rows) rows are a[rows]."""
    fresh = np.empty_like(a)
    a.take(rows, axis=0, out=fresh[:len(rows)], mode="clip")  # clip: unbuffered out; rows are valid
    return fresh


class _Normalize:
    """Stored inputs -> model inputs, bit for bit those of `load_dataset`: uint8 images by a
    lookup in a per-channel table of the 256 byte values, computed once with load_dataset's
    own operations (x / 255, then the normalisation); float32 inputs as stored. In numpy
    (single-threaded), like the rest of a reader: torch's intra-op threads cost 20x on a
    loaded machine (a parallel region waits for descheduled threads)."""

    def __init__(self, manifest: dict[str, Any], normalization: str):
        self.table = None
        if manifest["input_dtype"] == "uint8":
            stats = manifest["normalization"]
            channels = manifest["input_shape"][0]
            x = torch.arange(256, dtype=torch.uint8).expand(channels, 256).float().div_(255.0)
            if normalization == "half":
                x.sub_(0.5).div_(0.5)
            elif normalization != "none":
                mean, std = (torch.tensor(stats[key], dtype=torch.float32).view(-1, 1)
                             for key in ("paper_mean", "paper_std"))
                x.sub_(mean).div_(std)
            self.table = x.numpy()  # [C, 256]

    def __call__(self, stored: np.ndarray) -> torch.Tensor:
        if self.table is None:
            return torch.from_numpy(stored)
        out = np.empty(stored.shape, np.float32)
        for c, table in enumerate(self.table):
            table.take(stored[:, c], out=out[:, c], mode="clip")  # clip: unbuffered out; bytes < 256
        return torch.from_numpy(out)


def _normalized(src: Iterator[_Records], normalize: _Normalize) -> Iterator[Chunk]:
    for x, y, index, cluster in src:
        yield normalize(x), torch.from_numpy(y), torch.from_numpy(index), (
            None if cluster is None else torch.from_numpy(cluster))


def _split_by_rank(src: Iterator, rank: int, world_size: int) -> Iterator:
    """webdataset.split_by_node's rule with an explicit rank (it reads RANK or the default
    process group, which a test or a forked worker need not have)."""
    return islice(src, rank, None, world_size)


def _read_stage(shard_set: ShardSet, split: str):
    return functools.partial(_read_chunks, shards={str(s.path): s for s in shard_set.shards(split)},
                             decode=_ChunkDecoder(shard_set.manifest))


# ------------------------------------------------------------------------------- splits and batches


class ShardSplit(Split):
    """One split of a shard folder. ``len()`` counts the samples of its verified shards;
    ``x``, ``y`` and ``cluster`` read them once, in order, into memory on first use (rows
    in index order, without the skipped shards' samples)."""

    def __init__(self, shard_set: ShardSet, split: str, normalization: str = "paper",
                 device: torch.device | str = "cpu", num_workers: int = 0):
        self.shard_set, self.split_name, self.normalization = shard_set, split, normalization
        self.device = torch.device(device)
        self.num_workers = num_workers
        self._table: Split | None = None

    def __repr__(self) -> str:
        return f"ShardSplit({self.shard_set.root}, {self.split_name!r}, {len(self)} samples)"

    def __len__(self) -> int:
        return sum(s.num_samples for s in self.shard_set.good_shards(self.split_name))

    @property
    def has_cluster(self) -> bool:
        return bool(self.shard_set.manifest["has_cluster"])

    @property
    def x(self) -> torch.Tensor:  # type: ignore[override]
        return self.materialize().x

    @property
    def y(self) -> torch.Tensor:  # type: ignore[override]
        return self.materialize().y

    @property
    def cluster(self) -> torch.Tensor | None:  # type: ignore[override]
        return self.materialize().cluster if self.has_cluster else None

    def to(self, device: torch.device | str) -> "ShardSplit":
        moved = ShardSplit(self.shard_set, self.split_name, self.normalization, device, self.num_workers)
        moved._table = self._table.to(device) if self._table is not None else None
        return moved

    def select_classes(self, classes: list[int] | tuple[int, ...]) -> Split:
        return self.materialize().select_classes(classes)

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        """Split indices -> rows of this split (they differ only after skipped shards)."""
        good = self.shard_set.good_shards(self.split_name)
        if len(good) == len(self.shard_set.shards(self.split_name)):
            return index
        starts = torch.tensor([s.first_index for s in good])
        before = starts - torch.tensor([0] + [s.num_samples for s in good[:-1]]).cumsum(0)  # skipped before each
        shard = torch.searchsorted(starts, index.cpu(), right=True) - 1
        return (index.cpu() - before[shard]).to(index.device)

    def materialize(self) -> Split:
        """The whole split in memory: one exact, in-order pass over the verified shards."""
        if self._table is None:
            chunks = list(read_split(self.shard_set, self.split_name, self.normalization,
                                     num_workers=self.num_workers))
            if not chunks:
                raise DataError(f"{self.shard_set.root}: no sample of the {self.split_name} split could be read")
            x, y, index = (torch.cat([c[i] for c in chunks]) for i in range(3))
            order = index.argsort()
            expected = torch.cat([torch.arange(s.first_index, s.first_index + s.num_samples)
                                  for s in self.shard_set.good_shards(self.split_name)])
            if not torch.equal(index[order], expected):
                raise DataError(f"{self.shard_set.root}: the {self.split_name} shards hold {len(index)} samples "
                                f"but their manifest entries promise {len(expected)} (indices differ); "
                                f"re-create them with `moe-dist data shards`")
            cluster = torch.cat([c[3] for c in chunks])[order] if self.has_cluster else None
            self._table = Split(x[order], y[order], cluster).to(self.device)
        return self._table

    def batches(self, batch_size: int, seed: int, *, rank: int = 0, world_size: int = 1,
                num_workers: int | None = None) -> "ShardBatches":
        return ShardBatches(self, batch_size, seed, rank=rank, world_size=world_size,
                            num_workers=self.num_workers if num_workers is None else num_workers)


def _iterate(pipeline, num_workers: int) -> Iterator[Chunk]:
    if num_workers == 0:
        return iter(pipeline)
    # Fork on Linux (DataLoader's usual default there) even in a process started by spawn,
    # which would otherwise start each epoch's workers by re-importing torch (seconds each).
    context = "fork" if sys.platform.startswith("linux") else None
    loader = torch.utils.data.DataLoader(pipeline, batch_size=None, num_workers=num_workers, prefetch_factor=4,
                                         persistent_workers=False, multiprocessing_context=context)
    return iter(loader)


def read_split(shard_set: ShardSet, split: str, normalization: str = "paper", *, rank: int = 0,
               world_size: int = 1, num_workers: int = 0) -> Iterator[Chunk]:
    """One exact pass, no resampling: the verified shards split by rank, then by worker;
    together the ranks' passes hold every sample of those shards exactly once. Chunks as
    stored (up to the manifest's chunk_size samples), in shard order within one reader
    (workers interleave)."""
    wds = _webdataset()
    urls = [str(s.path) for s in shard_set.good_shards(split)]
    pipeline = wds.DataPipeline(wds.SimpleShardList(urls),
                                functools.partial(_split_by_rank, rank=rank, world_size=world_size),
                                wds.split_by_worker, _read_stage(shard_set, split),
                                functools.partial(_normalized, normalize=_Normalize(shard_set.manifest, normalization)))
    return _iterate(pipeline, num_workers)


class ShardBatches:
    """Training batches streamed from resampled shards, this rank's share (the interface of
    `TensorBatches`): ``len()`` = ceil(N / batch_size) batches per epoch on every rank, the
    global batches sized as TensorBatches sizes them (the last one may be smaller), each
    rank's share sized by the same contiguous split. Epoch e is a pure function of (seed, e,
    rank, num_workers). Samples are drawn with replacement at the shard level, so one epoch
    need not visit every sample (webdataset's resampled mode); each reader shuffles chunks,
    then samples (module docstring) and hands on blocks of BLOCK samples."""

    def __init__(self, split: ShardSplit, batch_size: int, seed: int, *, rank: int = 0, world_size: int = 1,
                 num_workers: int = 0):
        if batch_size <= 0:
            raise DataError(f"batch_size must be positive, got {batch_size}")
        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} outside 0..{world_size - 1} (world_size {world_size})")
        self.split = split
        self.num_samples = len(split)
        _same_on_every_rank(self.num_samples, split.device, world_size, f"{split.shard_set.root} {split.split_name}")
        self.batch_size = min(batch_size, self.num_samples) or 1
        self.seed, self.rank, self.world_size, self.num_workers = seed, rank, world_size, num_workers
        m = split.shard_set.manifest
        self._empty_x = torch.empty(0, *m["input_shape"], dtype=torch.float32)

    def __len__(self) -> int:
        return math.ceil(self.num_samples / self.batch_size)

    def share_sizes(self) -> list[int]:
        """This rank's number of samples in each batch of an epoch (TensorBatches' split)."""
        sizes = []
        for b in range(len(self)):
            global_size = min(self.batch_size, self.num_samples - b * self.batch_size)
            base, extra = divmod(global_size, self.world_size)
            sizes.append(base + (self.rank < extra))
        return sizes

    def _stream(self, epoch: int, total: int) -> Iterator[Chunk]:
        """At least `total` samples of this rank's stream for `epoch`, in blocks of BLOCK
        (DataLoader workers take turns, a block each)."""
        wds = _webdataset()
        shard_set = self.split.shard_set
        good = shard_set.good_shards(self.split.split_name)
        workers = max(self.num_workers, 1)
        # Whole blocks from every worker in turn: each worker's quota covers its turns.
        per_worker = math.ceil(total / (BLOCK * workers)) * BLOCK
        # Enough shard draws to fill the quota from the smallest shard, twice over (shards
        # that fail while being read are skipped), and never unbounded.
        draws = 2 * math.ceil(per_worker / min(s.num_samples for s in good)) + 8
        epoch_seed = self.seed * _EPOCH_SEED_STRIDE + epoch
        pipeline = wds.DataPipeline(
            wds.ResampledShards([str(s.path) for s in good], nshards=draws, seed=epoch_seed, deterministic=True,
                                worker_seed=functools.partial(_stream_seed, self.rank)),
            _read_stage(shard_set, self.split.split_name),
            functools.partial(_take_samples, n=per_worker),  # before the shuffles: no chunk decoded in vain
            functools.partial(_shuffled_chunks, epoch_seed=epoch_seed, rank=self.rank),
            functools.partial(_mixed, buffer=max(SAMPLE_SHUFFLE, 8 * shard_set.chunk_size), block=BLOCK,
                              epoch_seed=epoch_seed, rank=self.rank),
            functools.partial(_normalized, normalize=_Normalize(shard_set.manifest, self.split.normalization)))
        return _iterate(pipeline, self.num_workers)

    def batches(self, epoch: int,
                start_batch: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Yield (x, y, idx) for batches start_batch.. of `epoch` on the split's device; idx
        are rows of ``self.split`` (the samples' indices when no shard was skipped)."""
        sizes = self.share_sizes()
        total = sum(sizes)
        stream = self._stream(epoch, total) if total else iter(())
        pending: list[Chunk] = []
        have = 0
        device = self.split.device
        for b, size in enumerate(sizes):
            while have < size:
                chunk = next(stream, None)
                if chunk is None:
                    raise DataError(f"{self.split.shard_set.root}: the {self.split.split_name} stream ran dry after "
                                    f"{b} of {len(sizes)} batches of epoch {epoch} (shards failing while read; "
                                    f"see the warnings)")
                pending.append(chunk)
                have += len(chunk[1])
            if len(pending) == 1:
                x, y, index = pending[0][:3]
            elif pending:
                x, y, index = (torch.cat([c[i] for c in pending]) for i in range(3))
            else:  # an empty share (a global batch smaller than world_size)
                x, y, index = self._empty_x, torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.int64)
            rest = have - size
            pending = [(x[size:], y[size:], index[size:], None)] if rest else []
            have = rest
            if b >= start_batch:
                yield (x[:size].to(device), y[:size].to(device), self.split.rows(index[:size]).to(device))
        del stream  # stops the workers of a DataLoader


def _same_on_every_rank(count: int, device: torch.device, world_size: int, what: str) -> None:
    """Batch counts come from the verified sample count: ranks that verified different
    shards (node-local copies) would fall out of step, so all of them stop here instead."""
    import torch.distributed as dist

    if world_size == 1 or not (dist.is_available() and dist.is_initialized()):
        return
    bounds = torch.tensor([count, -count], dtype=torch.int64, device=device)
    dist.all_reduce(bounds, op=dist.ReduceOp.MIN)
    if int(bounds[0]) != -int(bounds[1]):
        raise DataError(f"{what}: ranks verified different numbers of samples ({int(bounds[0])} to "
                        f"{-int(bounds[1])}); every rank must read the same shards")


def load_shards(root: str, name: str, *, normalization: str = "paper", setting: str = "s1",
                data_seed: int = -1, num_workers: int = 0) -> Dataset:
    """The Dataset of a shard folder: a streamed training `ShardSplit` and the test split
    read into memory (exact evaluation)."""
    _webdataset()
    shard_set = ShardSet(root)
    shard_set.check_matches(name, setting, data_seed)
    m = shard_set.manifest
    train = ShardSplit(shard_set, "train", normalization, num_workers=num_workers)
    test = ShardSplit(shard_set, "test", normalization, num_workers=num_workers).materialize()
    return Dataset(name, train, test, num_classes=int(m["num_classes"]), input_shape=tuple(m["input_shape"]),
                   class_names=list(m["class_names"]), augment=m["augment"],
                   notes=f"webdataset shards in {root}" + (f"; {m['notes']}" if m["notes"] else ""))
