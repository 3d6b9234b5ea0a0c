"""A monitored run on disk: scalars as JSON Lines, histograms as npz, optional TensorBoard events.

Layout of a run directory::

    meta.json         config, watched layers, format version        (written atomically at attach)
    monitor.jsonl     one line per (step, layer) measurement         (appended and flushed as it goes)
    histograms.npz    every histogram so far, on fixed edges         (rewritten atomically)
    events.out.tfevents.*                                            (with tensorboard=True)

A line of ``monitor.jsonl``::

    {"step": 10, "layer": "fc1.act#1", "module": "fc1.act", "call": 1, "channel": null,
     "probe": false, "mean": 0.01, "std": 1.2, "min": -4.1, "max": 3.9, "p1": -2.8, "p15": -1.2,
     ..., "frac_saturated": 0.01, "frac_zero": 0.5, "frac_nonfinite": 0.0, "numel": 6000}

``layer`` is the display string of the record key; ``module``, ``call``, ``channel`` and ``probe``
are its fields, from which :func:`load` rebuilds the key (the string is never parsed). With
``per_channel=True`` also ``"frac_dead"`` and the lists ``"channel_mean"``, ``"channel_std"``.
Statistics that do not exist (the mean of a record without finite values) are written as ``NaN``,
which Python's ``json`` and pandas read. A run killed mid-write loses at most its last, partial
line, which :func:`load` skips with a warning (a corrupt line elsewhere is an error).

``histograms.npz`` holds ``layers`` (display strings), the key fields ``key_module``,
``key_call``, ``key_channel`` (-1: none) and ``key_probe``, and for the i-th layer ``steps_i``
``(T,)``, ``edges_i`` ``(B + 1,)``, ``counts_i`` ``(T, B + 2)`` and ``numel_i`` ``(T,)``.
"""

from __future__ import annotations

import functools
import json
import math
import os
from io import BytesIO
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Optional, Union

import numpy as np

from covshift._io import JsonlWriter, atomic_write_bytes, atomic_write_json, read_jsonl
from covshift.monitor.records import MonitorRecords, RecordKey

if TYPE_CHECKING:
    from covshift.monitor.flush import RecordBatch

__all__ = [
    "JSONL_NAME",
    "NPZ_NAME",
    "META_NAME",
    "FORMAT",
    "JsonlWriter",
    "TensorBoardWriter",
    "batch_lines",
    "key_fields",
    "write_json_atomic",
    "write_histograms",
    "prepare_log_dir",
    "load",
]

JSONL_NAME = "monitor.jsonl"
NPZ_NAME = "histograms.npz"
META_NAME = "meta.json"
FORMAT = "covshift.monitor/2"

PathLike = Union[str, os.PathLike]


_KEY_FIELDS = ("module", "call", "channel", "probe")


def key_fields(key: RecordKey) -> dict:
    """The fields of a record key, as stored in a line of ``monitor.jsonl``."""
    return {"module": key.module, "call": key.call, "channel": key.channel, "probe": key.probe}


def _numbers(values: list) -> list[str]:
    """``json.dumps``'s spelling of each float, from one ``repr`` of the whole list (C speed)."""
    text = repr(values)[1:-1]
    if "n" in text:  # nan / inf (no other float repr holds an "n")
        text = text.replace("nan", "NaN").replace("inf", "Infinity")
    return text.split(", ") if text else []


class _Literal(str):
    """A JSON spelling that ``%r`` writes as it is (``NaN``, ``Infinity``, ``-Infinity``)."""

    def __repr__(self) -> str:
        return str(self)


_NAN, _INF, _NINF = _Literal("NaN"), _Literal("Infinity"), _Literal("-Infinity")


def _json_float(v: float) -> object:
    """``v``, or for a non-finite ``v`` an object whose ``repr`` is its ``json.dumps`` spelling."""
    if v != v:
        return _NAN
    if v in (math.inf, -math.inf):
        return _INF if v > 0 else _NINF
    return v


@functools.lru_cache(maxsize=4096)  # a few per watched layer, for the whole process
def _template(key: RecordKey, names: tuple[str, ...]) -> str:
    """A ``%``-template of one line of ``key`` with scalars ``names``: ``%d`` for the step and
    ``numel``, ``%r`` (``json.dumps``'s spelling of a finite float) for the others."""
    pre = json.dumps({"layer": str(key), **key_fields(key)})[1:-1].replace("%", "%%")
    body = ", ".join(json.dumps(n).replace("%", "%%") + (": %d" if n == "numel" else ": %r") for n in names)
    return '{"step": %d, ' + pre + ", " + body


def batch_lines(batch: "RecordBatch") -> list[str]:
    """One encoded JSON line per row of a flush, in recording order (see the module docstring).

    Encoded here rather than by ``json.dumps`` per row: one ``%``-template per key (the key's
    fields and the statistic names, built once per process), filled by one ``%`` per row (the floats
    by ``repr``, which is ``json.dumps``'s spelling of a finite float; rows holding a non-finite
    value swap it for its ``NaN`` / ``Infinity`` spelling first). At ``every=1`` this runs for
    every layer at every step. The result is what ``json.dumps`` writes for the same dict
    (tested), and :func:`load` reads it back with ``json``.
    """
    out = []
    names = batch.names
    dead = names.index("frac_dead") if "frac_dead" in names else -1
    finite = np.isfinite(batch.values)
    if dead >= 0:  # rows without channel statistics do not write their (NaN) frac_dead column
        finite[[c is None for c in batch.channel_mean], dead] = True
    row_ok = finite.all(axis=1).tolist()
    rows = batch.values.tolist()
    steps = batch.steps.tolist()
    for i, key in enumerate(batch.keys):
        has_c = batch.channel_mean[i] is not None
        row_names = batch.row_names(i)
        t = _template(key, row_names)
        row = rows[i]
        if row_names is not names:
            del row[dead]
        if not row_ok[i]:
            row = [_json_float(v) for v in row]
        line = t % (steps[i], *row)
        if has_c:
            cm = ", ".join(_numbers(batch.channel_mean[i].tolist()))  # type: ignore[union-attr]
            cs = ", ".join(_numbers(batch.channel_std[i].tolist()))  # type: ignore[union-attr]
            line += f', "channel_mean": [{cm}], "channel_std": [{cs}]'
        out.append(line + "}\n")
    return out


def write_json_atomic(path: PathLike, obj: object) -> None:
    atomic_write_json(path, obj)


def write_histograms(path: PathLike, records: MonitorRecords) -> None:
    """Write every histogram of ``records`` to one npz file, atomically."""
    arrays: dict[str, np.ndarray] = {}
    keys = records.histogram_keys()
    arrays["layers"] = np.array([str(k) for k in keys], dtype=str)
    arrays["key_module"] = np.array([k.module for k in keys], dtype=str)
    arrays["key_call"] = np.array([k.call for k in keys], dtype=np.int64)
    arrays["key_channel"] = np.array([-1 if k.channel is None else k.channel for k in keys], dtype=np.int64)
    arrays["key_probe"] = np.array([k.probe for k in keys], dtype=bool)
    for i, key in enumerate(keys):
        h = records.histograms(key)
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
        mean, std = scalars["mean"], scalars["std"]
        lo, hi = float(scalars["min"]), float(scalars["max"])
        n = int(np.asarray(counts).sum())  # the finite sample values the counts hold
        if not (np.isfinite(lo) and np.isfinite(hi)) or n == 0:
            return
        # Bucket i covers (limit_{i-1}, limit_i]: underflow ends at edges[0], bin k at
        # edges[k+1], overflow at the max (nudged so the limits stay increasing).
        limits = np.concatenate([edges, [max(hi, np.nextafter(edges[-1], np.inf))]])
        self._w.add_histogram_raw(
            f"{layer}/histogram",
            min=min(lo, float(edges[0])),
            max=float(limits[-1]),
            num=n,
            sum=float(mean * n),
            sum_squares=float(n * (std * std + mean * mean)),
            bucket_limits=limits.tolist(),
            bucket_counts=np.asarray(counts).tolist(),
            global_step=step,
        )

    def write_batch(self, batch: "RecordBatch") -> None:
        """Every row of one flush."""
        for i, key in enumerate(batch.keys):
            self.write(int(batch.steps[i]), str(key), batch.scalars(i), batch.hist[i], batch.edges[key])

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
    A truncated last line (a run killed mid-write) is skipped with a warning that names the file
    and line; a corrupt line before it raises :class:`covshift._io.JsonlError`.
    """
    d = Path(log_dir)
    jsonl = d / JSONL_NAME
    if not jsonl.exists():
        raise FileNotFoundError(
            f"log_dir: expected a monitor run with {JSONL_NAME}, got {str(d)!r} without it. "
            "Pass the log_dir given to ActivationMonitor."
        )
    meta = json.loads((d / META_NAME).read_text()) if (d / META_NAME).exists() else {}
    declared = [_key_from(k) for k in meta.get("keys", [])] or [RecordKey(n) for n in meta.get("layers", [])]
    records = MonitorRecords(declared)

    # Group the lines into one chunk per record key and set of columns.
    chunks: dict[tuple, list] = {}
    for row in read_jsonl(jsonl):
        step, layer = row.pop("step"), row.pop("layer")
        fields = {f: row.pop(f) for f in _KEY_FIELDS if f in row}
        # format 1 stored the display string only: it becomes the key's module name, unparsed
        key = _key_from(fields) if len(fields) == len(_KEY_FIELDS) else RecordKey(layer)
        cm, cs = row.pop("channel_mean", None), row.pop("channel_std", None)
        chunks.setdefault((key, tuple(row), cm is not None), []).append((step, list(row.values()), cm, cs))
    for (key, names, has_channels), rows in chunks.items():
        records.add(
            key,
            [r[0] for r in rows],
            names,
            np.array([r[1] for r in rows], dtype=np.float64),
            channel_mean=np.array([r[2] for r in rows]) if has_channels else None,
            channel_std=np.array([r[3] for r in rows]) if has_channels else None,
        )

    npz = d / NPZ_NAME
    if npz.exists():
        with np.load(npz) as z:
            names = z["layers"].tolist()
            if "key_module" in z:
                keys = [
                    RecordKey(str(m), int(c), None if int(ch) < 0 else int(ch), bool(p))
                    for m, c, ch, p in zip(z["key_module"], z["key_call"], z["key_channel"], z["key_probe"])
                ]
            else:
                keys = [RecordKey(str(n)) for n in names]
            for i, key in enumerate(keys):
                records.attach_histograms(key, z[f"steps_{i}"], z[f"counts_{i}"], z[f"edges_{i}"])
    return records


def _key_from(fields: dict) -> RecordKey:
    ch = fields.get("channel")
    return RecordKey(str(fields["module"]), int(fields.get("call", 0)), None if ch is None else int(ch), bool(fields.get("probe", False)))
