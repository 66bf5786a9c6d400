"""CIFAR-100 in the "python version" pickle format (docs/papers.md A.3, "CIFAR-100"), without torchvision.

Unpickling runs code chosen by whoever wrote the file, so no byte is unpickled before its
md5 matches either the official release or an `MD5SUMS` manifest written next to the
files by `write_cifar100_fixture` (the build machines have no network and no CIFAR-100,
docs/design.md "Environment facts", so tests generate small files in the true format). The
bytes that are hashed are the bytes that are unpickled: this check is never cached.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moe_dist.data.idx import ImagesLabels, md5_hex, missing_data_error, read_bytes
from moe_dist.errors import DataError

CIFAR100_DIRNAME = "cifar-100-python"
MANIFEST_NAME = "MD5SUMS"
NUM_FINE_CLASSES = 100
_NUM_COARSE_CLASSES = 20

# md5s of the files inside the official cifar-100-python.tar.gz (torchvision's table).
RELEASE_MD5 = {
    "train": "16019d7e3df5f24257cddd939b257f8d",
    "test": "f0ef6b0ae62326f3e7ffdfab6717acfc",
    "meta": "7973b15100ade9c7d40fb424638fde48",
}


def _read_manifest(path: Path) -> dict[str, str]:
    """`md5sum`-style lines ("<md5>  <name>", optional '*' before binary names) as name -> md5."""
    if not path.is_file():
        return {}
    entries = {}
    for line in read_bytes(path).decode("utf-8", errors="replace").splitlines():
        fields = line.strip().split(maxsplit=1)
        if len(fields) == 2:
            entries[fields[1].lstrip("*")] = fields[0].lower()
    return entries


def _load_verified_pickle(path: Path) -> dict[bytes, Any]:
    """Unpickle `path` only after its md5 matches the release or the folder's MD5SUMS."""
    blob = read_bytes(path)
    actual = md5_hex(blob)
    listed = _read_manifest(path.parent / MANIFEST_NAME).get(path.name)
    if actual not in (RELEASE_MD5[path.name], listed):
        expected = f"{RELEASE_MD5[path.name]} (release)" + (
            f" or {listed} ({MANIFEST_NAME})" if listed else f", and {MANIFEST_NAME} lists no other"
        )
        raise DataError(
            f"checksum mismatch for {path}: md5 {actual}, expected {expected}; "
            f"refusing to unpickle it, replace the file"
        )
    try:
        content = pickle.loads(blob, encoding="bytes")
    except Exception as exc:  # a verified but malformed pickle can fail in many ways
        raise DataError(f"{path}: cannot unpickle ({type(exc).__name__}: {exc})") from exc
    if not isinstance(content, dict):
        raise DataError(f"{path}: expected a dict, found {type(content).__name__}")
    return content


def _split_arrays(path: Path) -> ImagesLabels:
    """Images uint8 [N, 3, 32, 32] and fine labels int64 [N] from one split file."""
    content = _load_verified_pickle(path)
    data, labels = content.get(b"data"), content.get(b"fine_labels")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DataError(f"{path}: b'data' must be a uint8 array [N, 3072]")
    labels_N = np.asarray(labels, dtype=np.int64) if isinstance(labels, list) else None
    if labels_N is None or labels_N.shape != (len(data),):
        raise DataError(f"{path}: b'fine_labels' must be a list of {len(data)} ints")
    if len(labels_N) and (labels_N.min() < 0 or labels_N.max() >= NUM_FINE_CLASSES):
        raise DataError(f"{path}: fine labels outside 0..{NUM_FINE_CLASSES - 1}")
    # Rows are 1024 red, then green, then blue values, each row-major 32x32.
    return torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()), torch.from_numpy(labels_N)


def find_cifar100(root: Path) -> Path | None:
    """The folder holding train/test/meta: `<root>/cifar-100-python` or root itself."""
    for folder in (root / CIFAR100_DIRNAME, root):
        if all((folder / name).is_file() for name in RELEASE_MD5):
            return folder
    return None


def load_cifar100(root: Path) -> tuple[ImagesLabels, ImagesLabels, list[str]]:
    """(train images, labels), (test images, labels) and the 100 fine class names."""
    folder = find_cifar100(root)
    if folder is None:
        raise missing_data_error(
            "cifar100", "CIFAR-100 python files (train, test, meta)",
            [root / CIFAR100_DIRNAME, root], root / CIFAR100_DIRNAME,
        )
    names = _load_verified_pickle(folder / "meta").get(b"fine_label_names")
    if not isinstance(names, list) or len(names) != NUM_FINE_CLASSES:
        raise DataError(f"{folder / 'meta'}: b'fine_label_names' must list {NUM_FINE_CLASSES} names")
    class_names = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    return _split_arrays(folder / "train"), _split_arrays(folder / "test"), class_names


def write_cifar100_fixture(root: str | Path, n_train: int, n_test: int, seed: int) -> Path:
    """Write a tiny random CIFAR-100 in the release's pickle format under `<root>/cifar-100-python`.

    Also writes the `MD5SUMS` manifest that makes `load_cifar100` accept these non-release
    files. Returns the folder.
    """
    folder = Path(root) / CIFAR100_DIRNAME
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    contents: dict[str, dict[bytes, Any]] = {}
    for split, n in (("train", n_train), ("test", n_test)):
        fine = rng.integers(0, NUM_FINE_CLASSES, size=n)
        contents[split] = {
            b"filenames": [f"{split}_{i:05d}.png".encode() for i in range(n)],
            b"batch_label": f"{split} fixture seed {seed}".encode(),
            b"fine_labels": fine.tolist(),
            b"coarse_labels": (fine % _NUM_COARSE_CLASSES).tolist(),
            b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
        }
    contents["meta"] = {
        b"fine_label_names": [f"fine_{i:02d}".encode() for i in range(NUM_FINE_CLASSES)],
        b"coarse_label_names": [f"coarse_{i:02d}".encode() for i in range(_NUM_COARSE_CLASSES)],
    }
    manifest = []
    for name, content in contents.items():
        blob = pickle.dumps(content)
        (folder / name).write_bytes(blob)
        manifest.append(f"{md5_hex(blob)}  {name}\n")
    (folder / MANIFEST_NAME).write_text("".join(manifest))
    return folder
