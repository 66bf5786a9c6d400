"""MNIST and Fashion-MNIST in their original IDX format, read without torchvision.

torchvision cannot be imported next to the CPU build of torch on the build machines
(docs/design.md, "Environment facts"), so the IDX format is parsed here directly. Every file is
checked against the release's md5 before use, and its header is validated so that a
truncated or corrupt file is a one-line `DataError` rather than a numpy traceback.

This module also holds the small file helpers that `cifar.py` shares: md5 hashing and the
"dataset missing" message.
"""

from __future__ import annotations

import gzip
import hashlib
import math
import os
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from moe_dist.errors import DataError

# IDX element types (http://yann.lecun.com/exdb/mnist/, "THE IDX FILE FORMAT").
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}

# mnist10k (docs/design.md, "Environment facts"): the 10,000 real MNIST test images, split in
# file order into 8,000 for training and the last 2,000 for testing.
MNIST10K_NUM_TRAIN = 8_000

# (images uint8 [N, H, W] or [N, C, H, W], labels int64 [N]) of one split.
ImagesLabels = tuple[torch.Tensor, torch.Tensor]


def md5_hex(data: bytes) -> str:
    """The md5 of `data` as lowercase hex, the form release READMEs and `md5sum` print."""
    return hashlib.md5(data).hexdigest()


def read_bytes(path: Path) -> bytes:
    """The contents of `path`; an unreadable file is a `DataError` that names it."""
    try:
        return path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from exc


def missing_data_error(dataset: str, wanted: str, searched: Sequence[Path], target: Path) -> DataError:
    """The one-line error for absent files: where we looked, where files go, how to fetch them."""
    places = ", ".join(str(p) for p in searched)
    return DataError(
        f"{dataset}: {wanted} not found in {places}; put the files in {target} "
        f"(set MOE_DIST_DATA to choose the data root), or on a machine with network run "
        f"`pip install moe_dist[vision]` then `moe-dist data download {dataset}`"
    )


@dataclass(frozen=True)
class KnownChecksums:
    """Release md5s of one IDX file: of the `.gz` as published, and of the IDX bytes inside.

    The decompressed md5 matters because a repackaged `.gz` (Debian recompresses
    Fashion-MNIST, see its README) holds the same data under a different archive md5.
    """

    gz_md5s: frozenset[str]
    raw_md5: str | None = None


@dataclass(frozen=True)
class IdxSource:
    """One IDX dataset: where its files conventionally live and their release checksums."""

    title: str
    subdirs: tuple[str, ...]  # searched under the data root, before the root itself
    checksums: dict[str, KnownChecksums]
    class_names: tuple[str, ...]


MNIST = IdxSource(
    title="MNIST",
    subdirs=("mnist-t10k", "MNIST/raw"),
    checksums={
        # .gz md5s are torchvision's (the mnist-t10k README says they are the same files);
        # the decompressed t10k md5s were computed from those verified archives.
        "train-images-idx3-ubyte": KnownChecksums(frozenset({"f68b3c2dcbeaaa9fbdd348bbdeb94873"})),
        "train-labels-idx1-ubyte": KnownChecksums(frozenset({"d53e105ee54ea40749a09fcbcd1e9432"})),
        "t10k-images-idx3-ubyte": KnownChecksums(
            frozenset({"9fb629c4189551a2d022fa330f9573f3"}), "2646ac647ad5339dbf082846283269ea"
        ),
        "t10k-labels-idx1-ubyte": KnownChecksums(
            frozenset({"ec29112dd5afa0611ce80d1b7f02629c"}), "27ae3e4e09519cfbb04c329615203637"
        ),
    },
    class_names=tuple(str(d) for d in range(10)),
)

FASHION_MNIST = IdxSource(
    title="Fashion-MNIST",
    subdirs=("fashion-mnist", "FashionMNIST/raw"),
    checksums={
        # Upstream .gz md5s (what torchvision downloads) and the md5s of the decompressed
        # files, which hold for any recompression.
        "train-images-idx3-ubyte": KnownChecksums(
            frozenset({"8d4fb7e6c68d591d4c3dfef9ec88bf0d"}), "f4a8712d7a061bf5bd6d2ca38dc4d50a"
        ),
        "train-labels-idx1-ubyte": KnownChecksums(
            frozenset({"25c81989df183df01b3e8a0aad5dffbe"}), "9018921c3c673c538a1fc5bad174d6f9"
        ),
        "t10k-images-idx3-ubyte": KnownChecksums(
            frozenset({"bef4ecab320f06d8554ea6380940ec79"}), "8181f5470baa50b63fa0f6fddb340f0a"
        ),
        "t10k-labels-idx1-ubyte": KnownChecksums(
            frozenset({"bb300cfdad3c16e7a12a480ee83cd310"}), "15d484375f8d13e6eb1aabb0c3f46965"
        ),
    },
    class_names=("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                 "Sneaker", "Bag", "Ankle boot"),
)

# Files whose checksum already passed in this process, keyed by (real path, inode, size,
# mtime): re-hashing 47 MB on every load is waste, but each file is hashed once per process.
_VERIFIED: set[tuple[str, int, int, int]] = set()


def _cache_key(path: Path) -> tuple[str, int, int, int]:
    # Taken before the file is read, so a change made while it is hashed gets a new key.
    try:
        st = path.stat()
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from exc
    return (os.path.realpath(path), st.st_ino, st.st_size, st.st_mtime_ns)


def _gunzip(blob: bytes) -> bytes | None:
    """The decompressed bytes, or None for a damaged archive (the caller names the file)."""
    try:
        return gzip.decompress(blob)
    except (OSError, EOFError, zlib.error):
        return None


def _verified_idx_bytes(path: Path, known: KnownChecksums | None) -> bytes:
    """The IDX bytes of `path` (decompressed if `.gz`), after checking the release md5.

    A `.gz` passes if its own md5 is a release md5, or else if its decompressed bytes match
    the release's IDX md5. A raw file passes on the IDX md5; where none is known (raw MNIST
    training files: only torchvision's `.gz` md5s are published) only the header checks in
    `parse_idx` guard it.
    """
    key = _cache_key(path)
    blob = read_bytes(path)
    is_gz = path.name.endswith(".gz")
    data = _gunzip(blob) if is_gz else blob
    if known is not None and key not in _VERIFIED:
        actual = md5_hex(blob)
        gz_ok = is_gz and actual in known.gz_md5s
        unverifiable = not is_gz and known.raw_md5 is None
        if not (gz_ok or unverifiable or (data is not None and md5_hex(data) == known.raw_md5)):
            expected = sorted(known.gz_md5s) if is_gz else []
            if known.raw_md5 is not None:
                expected.append(f"{known.raw_md5} (decompressed IDX)")
            raise DataError(
                f"checksum mismatch for {path}: md5 {actual}, expected {' or '.join(expected)}; "
                f"the file is corrupt or not the release, replace it"
            )
        _VERIFIED.add(key)
    if data is None:
        raise DataError(f"{path} is not a valid gzip file (truncated or corrupt)")
    return data


def parse_idx(path: Path, data: bytes) -> np.ndarray:
    """Decode IDX bytes, checking magic, dimensions and length before numpy touches them."""
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise DataError(f"{path} is not an IDX file (bad magic number {data[:4].hex()})")
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    ndim = data[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(data) < header:
        raise DataError(f"{path}: IDX header truncated or with 0 dimensions ({len(data)} bytes)")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    expected = header + math.prod(dims) * dtype.itemsize
    if len(data) != expected:
        raise DataError(
            f"{path}: IDX dimensions {list(dims)} need {expected} bytes but the file has "
            f"{len(data)} (truncated or corrupt)"
        )
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(dims)


def read_idx(path: Path, known: KnownChecksums | None = None) -> np.ndarray:
    """Read one IDX file (`.gz` or raw); `known` checksums are enforced when given."""
    return parse_idx(path, _verified_idx_bytes(path, known))


def _search_dirs(source: IdxSource, root: Path) -> list[Path]:
    return [root / sub for sub in source.subdirs] + [root]


def find_file(basename: str, dirs: Sequence[Path]) -> Path | None:
    """The first `<dir>/<basename>.gz` or `<dir>/<basename>` that exists, in `dirs` order."""
    for d in dirs:
        for candidate in (d / f"{basename}.gz", d / basename):
            if candidate.is_file():
                return candidate
    return None


def has_idx_split(source: IdxSource, root: Path, split: str) -> bool:
    """Whether both files of `split` ("train" or "t10k") of `source` are present under root."""
    dirs = _search_dirs(source, root)
    return all(
        find_file(f"{split}-{kind}", dirs) is not None
        for kind in ("images-idx3-ubyte", "labels-idx1-ubyte")
    )


def load_idx_split(source: IdxSource, root: Path, split: str, dataset: str) -> ImagesLabels:
    """Images uint8 [N, H, W] and labels int64 [N] of `split` ("train" or "t10k").

    `dataset` is the name the user asked for; missing-file messages tell how to fetch it.
    """
    dirs = _search_dirs(source, root)
    arrays = []
    for kind, ndim in (("images-idx3-ubyte", 3), ("labels-idx1-ubyte", 1)):
        basename = f"{split}-{kind}"
        path = find_file(basename, dirs)
        if path is None:
            raise missing_data_error(dataset, f"{source.title} {basename}[.gz]", dirs, dirs[1])
        array = read_idx(path, source.checksums.get(basename))
        if array.ndim != ndim or array.dtype != np.uint8:
            raise DataError(f"{path}: expected {ndim}-d uint8 IDX data, got {array.ndim}-d {array.dtype}")
        arrays.append((path, array))
    (images_path, images), (labels_path, labels) = arrays
    if len(images) != len(labels):
        raise DataError(f"{images_path} has {len(images)} images but {labels_path} has {len(labels)} labels")
    if len(labels) and int(labels.max()) >= len(source.class_names):
        raise DataError(f"{labels_path}: label {int(labels.max())} outside 0..{len(source.class_names) - 1}")
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


def load_mnist10k(root: Path, dataset: str) -> tuple[ImagesLabels, ImagesLabels]:
    """The mnist10k split of the real MNIST test set: first 8,000 train, last 2,000 test."""
    images, labels = load_idx_split(MNIST, root, "t10k", dataset)
    n = MNIST10K_NUM_TRAIN
    return (images[:n], labels[:n]), (images[n:], labels[n:])
