"""Reading shards: the webdataset pipelines that turn shard files into chunks of samples.

Owns the named records that travel through a pipeline (`StoredChunk`: numpy arrays as
stored; `Chunk`: tensors as the model sees them), the stages (verify a shard, decode its
tar members, cut the stream, shuffle chunks, mix samples, normalise), and the two
pipelines built from them: `read_split` (an exact, in-order pass) and `training_stream`
(resampled shards, shuffled). Stages are module-level functions and objects bound with
functools.partial, because DataLoader workers pickle them; each reader works in numpy
(see `_Normalize` for why).
"""

from __future__ import annotations

import functools
import io
import random
import sys
import warnings
from collections.abc import Iterable, Iterator
from itertools import islice
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from moe_dist.data.shards.manifest import (_MEMBER, _SKIPPED, ShardInfo, ShardSet, ShardWarning, _record_dtype,
                                           _ShardFault, _verified_bytes, _warn_skipped_shard, _webdataset)

BLOCK = 512  # samples a training reader hands to the training process at a time
CHUNK_SHUFFLE = 64  # stored chunks each training reader shuffles over
SAMPLE_SHUFFLE = 4096  # samples each training reader mixes over (at least 8 chunks' worth)
_NPY_MAGIC = b"\x93NUMPY"


class StoredChunk(NamedTuple):
    """Consecutive or shuffled samples inside a reader, as numpy arrays, inputs as stored.

    Named tuples rather than dataclasses: a DataLoader worker's `Chunk` crosses the process
    boundary and comes back rebuilt as a `Chunk` (default_convert keeps named tuples), and
    code that unpacks ``x, y, idx, cluster`` keeps working."""

    inputs: np.ndarray  # uint8 [n, C, H, W] images or float32 [n, D] synthetic inputs
    labels: np.ndarray  # int64 [n]
    indices: np.ndarray  # int64 [n]: split indices
    clusters: np.ndarray | None  # int64 [n] (synthetic data) or None

    @property
    def num_samples(self) -> int:
        return len(self.labels)

    def head(self, n: int) -> StoredChunk:
        return StoredChunk(*(None if a is None else a[:n] for a in self))

    def take(self, rows: np.ndarray) -> StoredChunk:
        return StoredChunk(*(None if a is None else a.take(rows, axis=0) for a in self))


class Chunk(NamedTuple):
    """What a pipeline hands on: samples as the model sees them."""

    inputs: torch.Tensor  # float32 [n, ...], normalised
    labels: torch.Tensor  # int64 [n]
    indices: torch.Tensor  # int64 [n]: split indices
    clusters: torch.Tensor | None  # int64 [n] (synthetic data) or None

    @property
    def num_samples(self) -> int:
        return len(self.labels)


# ------------------------------------------------------------------------------- decoding


class _ShardBytes(io.BytesIO):
    """A verified shard in memory; prints as its path, so tar errors name the file."""

    def __init__(self, data: bytes, path: Path):
        super().__init__(data)
        self.path = path

    def __repr__(self) -> str:
        return str(self.path)


class _ChunkDecoder:
    """``%08d.chunk.npy`` member -> a `StoredChunk`, checked against the manifest.

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

    # Kept over numpy.load(io.BytesIO(blob), allow_pickle=False), measured slower: it re-parses
    # every header (literal_eval) and copies the records twice, field by field: 111-174 us per
    # 256-sample Fashion-MNIST chunk vs 27-51 us here, and 15-25% fewer samples/s in a reader's
    # epoch (bench_pipeline's webdataset w0 side, A/B in one process, three runs at load 1.5-4.5).
    def _records_start(self, blob: bytes) -> tuple[int, tuple[int, ...]]:
        """Where the records start in a .npy blob, and the array's shape (numpy's own header
        parser reads the header; only its length is found here)."""
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

    def _records(self, blob: bytes, n: int) -> np.ndarray:
        """The member's record array, viewed in place: `n` records of the manifest's dtype."""
        start, shape = self._records_start(blob)
        if shape != (n,):
            raise ValueError(f"holds {shape[0]} samples, its place in the shard implies {n}")
        if len(blob) - start != n * self.dtype.itemsize:
            raise ValueError("wrong number of bytes")
        return np.frombuffer(blob, self.dtype, count=n, offset=start)

    def __call__(self, fname: str, blob: bytes, info: ShardInfo) -> StoredChunk:
        key, _, ext = fname.partition(".")
        if ext != _MEMBER or not key.isdigit():
            raise ValueError(f"not a %08d.{_MEMBER} member")
        first = int(key)
        offset = first - info.first_index
        if not 0 <= offset < info.num_samples or offset % self.chunk_size:
            raise ValueError(f"no chunk of this shard (chunk size {self.chunk_size}) starts at index {first}")
        n = min(self.chunk_size, info.num_samples - offset)
        records = self._records(blob, n)
        index = np.arange(first, first + n, dtype=np.int64)
        if not np.array_equal(records["index"], index):
            raise ValueError(f"its indices are not {first}..{first + n - 1}")
        labels = records["label"]
        if labels.min() < 0 or labels.max() >= self.num_classes:
            raise ValueError(f"a label outside 0..{self.num_classes - 1}")
        cluster = records["cluster"].copy() if "cluster" in self.dtype.names else None
        return StoredChunk(records["input"].copy(), labels.copy(), index, cluster)


def _warn_and_continue(exn: Exception) -> bool:
    """webdataset handler: count and report a tar or decoding error, skip, go on."""
    _SKIPPED["errors"] += 1
    if _SKIPPED["errors"] <= 5 or _SKIPPED["errors"] % 1000 == 0:  # counted, without flooding the log
        what = "; ".join(dict.fromkeys(str(a) for a in exn.args if a is not None)) or type(exn).__name__
        warnings.warn(f"skipped unreadable shard data: {what}; this process has skipped "
                      f"{_SKIPPED['errors']} tar/chunk error(s)", ShardWarning, stacklevel=2)
    return True


def _shard_chunks(data: bytes, info: ShardInfo, decode: _ChunkDecoder) -> Iterator[StoredChunk]:
    """The chunks of one verified shard, in stored order (webdataset's tar reader). A member
    that fails decoding or repeats a chunk is skipped, and a broken tar stream ends the shard,
    each with a counted warning."""
    from webdataset.tariterators import tar_file_iterator

    firsts: set[int] = set()  # a chunk seen twice would give its samples twice in an exact pass
    try:
        for member in tar_file_iterator(_ShardBytes(data, info.path), handler=_warn_and_continue):
            try:
                chunk = decode(member["fname"], member["data"], info)
                if int(chunk.indices[0]) in firsts:
                    raise ValueError("a second copy of a chunk")
            except Exception as exn:  # a malformed chunk, whatever the fault: skip it, counted
                _warn_and_continue(ValueError(f"{info.path} member {member['fname']}: "
                                              f"{type(exn).__name__}: {exn}"))
                continue
            firsts.add(int(chunk.indices[0]))
            yield chunk
    except Exception as exn:  # the tar stream itself broke
        _warn_and_continue(ValueError(f"{type(exn).__name__}: {exn} @ {info.path}"))


def _read_chunks(src: Iterator[dict], shards: dict[str, ShardInfo], decode: _ChunkDecoder) -> Iterator[StoredChunk]:
    """Shard urls -> their chunks, in shard order. A shard that fails verification is
    skipped with a counted warning; a shard read to its end must give its manifest's sample
    count (tarfile ends an archive silently at a truncated header)."""
    for item in src:
        info = shards[item["url"]]
        try:
            data = _verified_bytes(info)
        except _ShardFault as fault:
            _warn_skipped_shard(info, str(fault))
            continue
        count = 0
        for chunk in _shard_chunks(data, info, decode):
            count += chunk.num_samples
            yield chunk
        if count != info.num_samples:
            lost = info.num_samples - count
            _SKIPPED["samples"] += lost
            warnings.warn(f"shard {info.path} gave {count} of its {info.num_samples} samples (truncated or "
                          f"corrupt): {lost} samples lost; this process has skipped {_SKIPPED['samples']} "
                          f"samples", ShardWarning, stacklevel=2)


def _read_stage(shard_set: ShardSet, split: str):
    return functools.partial(_read_chunks, shards={str(s.path): s for s in shard_set.shards(split)},
                             decode=_ChunkDecoder(shard_set.manifest))


# ------------------------------------------------------------------------------- cutting and shuffling


def _take_samples(src: Iterator[StoredChunk], n: int) -> Iterator[StoredChunk]:
    """The first `n` samples of the stream (the last chunk cut); reads no chunk beyond them."""
    for chunk in src if n > 0 else ():
        if chunk.num_samples > n:
            chunk = chunk.head(n)
        n -= chunk.num_samples
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


def _shuffled_chunks(src: Iterator[StoredChunk], epoch_seed: int, rank: int) -> Iterator[StoredChunk]:
    """Chunks shuffled in a buffer of CHUNK_SHUFFLE (webdataset's shuffle)."""
    rng = random.Random(_reader_seed(epoch_seed, rank, 0))
    return _webdataset().shuffle(CHUNK_SHUFFLE, initial=CHUNK_SHUFFLE, rng=rng)(src)


# Kept from profiling: vectorised per chunk, over 100,000 samples/s (README) vs about 4,000 per sample (format v1).
def _mixed(src: Iterable[StoredChunk], buffer: int, block: int, epoch_seed: int, rank: int
           ) -> Iterator[StoredChunk]:
    """Samples shuffled in a buffer, vectorised: once `buffer` + `block` samples wait, a
    block of `block` of them, drawn uniformly (one random permutation), is handed on.

    The samples are appended to a storage of twice that size by slice copies and leave by
    one gather per block; when the storage is full, the waiting samples are gathered to its
    front: each sample is copied about three times, never by a per-sample operation. At the
    end the rest leave in random order.
    """
    rng = np.random.default_rng(_reader_seed(epoch_seed, rank, 1))
    capacity = 2 * (buffer + block)
    storage: StoredChunk | None = None
    end = 0  # the storage's rows [0, end) are written
    waiting = np.empty(0, dtype=np.int64)  # rows not handed on yet, in random order
    for chunk in map(StoredChunk._make, src):  # plain 4-tuples are taken too
        if storage is None:
            storage = StoredChunk(*(None if a is None else np.empty((capacity, *a.shape[1:]), a.dtype)
                                    for a in chunk))
        pos, n = 0, chunk.num_samples
        while pos < n:
            if end == capacity:  # gather the waiting rows to the front of a fresh storage
                end = len(waiting)
                storage = StoredChunk(*(None if a is None else _with_front(a, waiting) for a in storage))
                waiting = np.arange(end)
            take = min(capacity - end, n - pos)
            for stored, a in zip(storage, chunk):  # field by field: one slice copy each
                if stored is not None:
                    stored[end:end + take] = a[pos:pos + take]
            waiting = np.concatenate([waiting, np.arange(end, end + take)])
            end, pos = end + take, pos + take
            while len(waiting) >= buffer + block:
                waiting = rng.permutation(waiting)
                drawn, waiting = waiting[:block], waiting[block:]
                yield storage.take(drawn)
    waiting = rng.permutation(waiting)
    for start in range(0, len(waiting), block):
        yield storage.take(waiting[start:start + block])


def _with_front(a: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """A fresh array like `a` whose first len(rows) rows are a[rows]."""
    fresh = np.empty_like(a)
    a.take(rows, axis=0, out=fresh[:len(rows)], mode="clip")  # clip: unbuffered out; rows are valid
    return fresh


# ------------------------------------------------------------------------------- normalising


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


def _normalized(src: Iterator[StoredChunk], normalize: _Normalize) -> Iterator[Chunk]:
    for chunk in src:
        yield Chunk(normalize(chunk.inputs), torch.from_numpy(chunk.labels), torch.from_numpy(chunk.indices),
                    None if chunk.clusters is None else torch.from_numpy(chunk.clusters))


# ------------------------------------------------------------------------------- pipelines


def _split_by_rank(src: Iterator, rank: int, world_size: int) -> Iterator:
    """webdataset.split_by_node's rule with an explicit rank (it reads RANK or the default
    process group, which a test or a forked worker need not have)."""
    return islice(src, rank, None, world_size)


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


def training_stream(shard_set: ShardSet, split: str, normalization: str, *, draws: int, samples: int,
                    epoch_seed: int, rank: int, num_workers: int) -> Iterator[Chunk]:
    """This rank's stream of one training epoch: each reader (DataLoader worker, or this
    process) draws `draws` shards with replacement, takes its first `samples` samples,
    shuffles chunks then samples, and hands on blocks of BLOCK samples (workers take turns)."""
    wds = _webdataset()
    pipeline = wds.DataPipeline(
        wds.ResampledShards([str(s.path) for s in shard_set.good_shards(split)], nshards=draws, seed=epoch_seed,
                            deterministic=True, worker_seed=functools.partial(_stream_seed, rank)),
        _read_stage(shard_set, split),
        functools.partial(_take_samples, n=samples),  # before the shuffles: no chunk decoded in vain
        functools.partial(_shuffled_chunks, epoch_seed=epoch_seed, rank=rank),
        functools.partial(_mixed, buffer=max(SAMPLE_SHUFFLE, 8 * shard_set.chunk_size), block=BLOCK,
                          epoch_seed=epoch_seed, rank=rank),
        functools.partial(_normalized, normalize=_Normalize(shard_set.manifest, normalization)))
    return _iterate(pipeline, num_workers)
