"""A monitored run on disk: scalars as JSON Lines, histograms as npz, optional TensorBoard events.

Layout of a run directory::

    meta.json         config, watched layers, format version        (written atomically at attach)
    monitor.jsonl     one line per (step, layer) measurement         (appended and flushed as it goes)
    histograms.npz    every histogram so far, on fixed edges         (rewritten atomically)
    events.out.tfevents.*                                            (with tensorboard=True)

A line of ``monitor.jsonl``::

    {"step": 10, "layer": "fc1.act", "mean": 0.01, "std": 1.2, "min": -4.1, "max": 3.9,
     "p1": -2.8, "p15": -1.2, ..., "frac_saturated": 0.01, "frac_zero": 0.5, "numel": 6000}

(with ``per_channel=True`` also ``"frac_dead"`` and the lists ``"channel_mean"``,
``"channel_std"``). Non-finite values are written as ``NaN`` / ``Infinity``, which Python's
``json`` and pandas read. A run killed mid-write loses at most its last, partial line.

``histograms.npz`` holds ``layers`` (names) and, for the i-th layer, ``steps_i`` ``(T,)``,
``edges_i`` ``(B + 1,)``, ``counts_i`` ``(T, B + 2)`` and ``numel_i`` ``(T,)``.
"""

from __future__ import annotations

import json
import os
import warnings
from io import BytesIO
from pathlib import Path
from typing import Literal, Optional, Union

import numpy as np

from covshift._io import atomic_write_bytes, atomic_write_json
from covshift.monitor.records import MonitorRecords

__all__ = [
    "JSONL_NAME",
    "NPZ_NAME",
    "META_NAME",
    "FORMAT",
    "JsonlWriter",
    "TensorBoardWriter",
    "record_line",
    "write_json_atomic",
    "write_histograms",
    "prepare_log_dir",
    "load",
]

JSONL_NAME = "monitor.jsonl"
NPZ_NAME = "histograms.npz"
META_NAME = "meta.json"
FORMAT = "covshift.monitor/1"

PathLike = Union[str, os.PathLike]


def record_line(
    step: int,
    layer: str,
    scalars: dict[str, float],
    channel_mean: Optional[np.ndarray] = None,
    channel_std: Optional[np.ndarray] = None,
) -> str:
    """One JSON line (with its newline) for one measurement."""
    d: dict = {"step": int(step), "layer": layer}
    d.update((k, float(v)) for k, v in scalars.items())
    if "numel" in d:
        d["numel"] = int(d["numel"])
    if channel_mean is not None:
        d["channel_mean"] = [float(v) for v in channel_mean]
        d["channel_std"] = [float(v) for v in channel_std]  # type: ignore[union-attr]
    return json.dumps(d) + "\n"


class JsonlWriter:
    """Appends lines and flushes them to the OS at once, so an interrupted run keeps them."""

    def __init__(self, path: PathLike) -> None:
        self.path = Path(path)
        self._f = None

    def write(self, lines: list[str]) -> None:
        if not lines:
            return
        if self._f is None:
            self._f = open(self.path, "a", encoding="utf-8")
        self._f.write("".join(lines))
        self._f.flush()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


def write_json_atomic(path: PathLike, obj: object) -> None:
    atomic_write_json(path, obj)


def write_histograms(path: PathLike, records: MonitorRecords) -> None:
    """Write every histogram of ``records`` to one npz file, atomically."""
    arrays: dict[str, np.ndarray] = {}
    names = records.histogram_layers()
    arrays["layers"] = np.array(names, dtype=str)
    for i, name in enumerate(names):
        h = records.histograms(name)
        arrays[f"steps_{i}"] = h.steps
        arrays[f"edges_{i}"] = h.edges
        # counts of a sample of at most 2**24 values fit in int32: half the bytes of int64
        arrays[f"counts_{i}"] = h.counts.astype(np.int32)
        arrays[f"numel_{i}"] = h.numel
    buf = BytesIO()
    np.savez_compressed(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())


class TensorBoardWriter:
    """Scalars per layer (``"<layer>/<stat>"``) and histograms (``"<layer>/histogram"``) written
    with ``add_histogram_raw`` from the counts already computed; no raw tensor is copied."""

    def __init__(self, log_dir: PathLike) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:  # tensorboard is an optional dependency
            raise ImportError(
                "tensorboard=True needs the tensorboard package, which is not installed. "
                "Install it with: pip install 'covshift[tensorboard]'."
            ) from e
        self._w = SummaryWriter(log_dir=str(log_dir))

    def write(
        self,
        step: int,
        layer: str,
        scalars: dict[str, float],
        counts: Optional[np.ndarray],
        edges: Optional[np.ndarray],
    ) -> None:
        for k, v in scalars.items():
            self._w.add_scalar(f"{layer}/{k}", float(v), global_step=step)
        if counts is None or edges is None:
            return
        mean, std, n = scalars["mean"], scalars["std"], scalars["numel"]
        lo, hi = float(scalars["min"]), float(scalars["max"])
        if not (np.isfinite(lo) and np.isfinite(hi)):
            return
        # Bucket i covers (limit_{i-1}, limit_i]: underflow ends at edges[0], bin k at
        # edges[k+1], overflow at the max (nudged so the limits stay increasing).
        limits = np.concatenate([edges, [max(hi, np.nextafter(edges[-1], np.inf))]])
        self._w.add_histogram_raw(
            f"{layer}/histogram",
            min=min(lo, float(edges[0])),
            max=float(limits[-1]),
            num=int(n),
            sum=float(mean * n),
            sum_squares=float(n * (std * std + mean * mean)),
            bucket_limits=limits.tolist(),
            bucket_counts=np.asarray(counts).tolist(),
            global_step=step,
        )

    def flush(self) -> None:
        self._w.flush()

    def close(self) -> None:
        self._w.close()


def prepare_log_dir(
    log_dir: PathLike, if_exists: Literal["error", "overwrite", "append"]
) -> Optional[MonitorRecords]:
    """Create ``log_dir``; deal with an earlier run there. Returns it (for ``"append"``) or None."""
    d = Path(log_dir)
    d.mkdir(parents=True, exist_ok=True)
    ours = [d / JSONL_NAME, d / NPZ_NAME, d / META_NAME]
    if not any(p.exists() for p in ours):
        return None
    if if_exists == "error":
        raise ValueError(
            f"log_dir: expected a directory without a monitor run, got {str(d)!r}, which has one. "
            "Pick a new log_dir, or pass if_exists='overwrite' (delete it) or 'append' (continue it)."
        )
    if if_exists == "overwrite":
        for p in ours:
            p.unlink(missing_ok=True)
        return None
    if if_exists == "append":
        return load(d)
    raise ValueError(
        f"if_exists: expected 'error', 'overwrite' or 'append', got {if_exists!r}. Pick one of them."
    )


def load(log_dir: PathLike) -> MonitorRecords:
    """Read a run directory written by an :class:`~covshift.monitor.ActivationMonitor`.

    Returns the same views as the live monitor (``.layers``, ``.table()``, ``.series()``,
    ``.histograms()``, ``.channel_stats()``), so a report can be rebuilt without retraining.
    A truncated last line (a run killed mid-write) is skipped with a warning.
    """
    d = Path(log_dir)
    jsonl = d / JSONL_NAME
    if not jsonl.exists():
        raise FileNotFoundError(
            f"log_dir: expected a monitor run with {JSONL_NAME}, got {str(d)!r} without it. "
            "Pass the log_dir given to ActivationMonitor."
        )
    declared: list[str] = []
    if (d / META_NAME).exists():
        declared = json.loads((d / META_NAME).read_text()).get("layers", [])
    records = MonitorRecords(declared)

    # Group the lines into one chunk per layer and set of columns.
    chunks: dict[tuple, list] = {}
    lines = jsonl.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                warnings.warn(f"{jsonl}: skipped a truncated last line (interrupted write).")
                continue
            raise
        step, layer = row.pop("step"), row.pop("layer")
        cm, cs = row.pop("channel_mean", None), row.pop("channel_std", None)
        key = (layer, tuple(row), cm is not None)
        chunks.setdefault(key, []).append((step, list(row.values()), cm, cs))
    for (layer, names, has_channels), rows in chunks.items():
        records.add(
            layer,
            [r[0] for r in rows],
            names,
            np.array([r[1] for r in rows], dtype=np.float64),
            channel_mean=np.array([r[2] for r in rows]) if has_channels else None,
            channel_std=np.array([r[3] for r in rows]) if has_channels else None,
        )

    npz = d / NPZ_NAME
    if npz.exists():
        with np.load(npz) as z:
            for i, name in enumerate(z["layers"].tolist()):
                records.attach_histograms(name, z[f"steps_{i}"], z[f"counts_{i}"], z[f"edges_{i}"])
    return records
