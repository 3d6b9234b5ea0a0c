"""Recorded measurements on the host, and their views: tidy table, series, histograms, channels.

The same class serves a live :class:`~covshift.monitor.ActivationMonitor` and a run read back from
disk by :func:`covshift.monitor.load`, so a report is built the same way from either.

Storage is columnar: per layer, a list of NumPy chunks (one per flush) that the views concatenate
on demand, so a long run at ``every=1`` keeps a few arrays per layer rather than millions of
Python objects.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable, Optional, Sequence, Union

import numpy as np

if TYPE_CHECKING:
    from covshift.monitor.flush import RecordBatch

__all__ = ["RecordKey", "MonitorRecords", "Histograms", "ChannelStats"]


@dataclass(frozen=True)
class RecordKey:
    """The identity of one measured point: which module, which call, which channel, which batch.

    Shown as a string (``str(key)``), e.g. ``"hidden3.act#1[17]@probe"``: the module name, ``#k``
    for its k-th extra call in one forward, ``[c]`` for one channel (dim 1) recorded on its own,
    ``@probe`` on the fixed probe batch. The string is for display and lookup only; it is never
    parsed back (files store the fields).
    """

    module: str  # qualified module name, as in model.named_modules()
    call: int = 0  # 0 for the first call of the module in one forward, k for the k-th extra one
    channel: Optional[int] = None  # one channel / unit recorded on its own, else None
    probe: bool = False  # measured on the fixed probe batch

    def __str__(self) -> str:
        call = f"#{self.call}" if self.call else ""
        channel = "" if self.channel is None else f"[{self.channel}]"
        return f"{self.module}{call}{channel}{'@probe' if self.probe else ''}"


@dataclass(frozen=True)
class Histograms:
    """Histograms of one layer over time, on fixed edges.

    Attributes:
        steps: ``(T,)`` training steps.
        edges: ``(B + 1,)`` bin edges, the same at every step.
        counts: ``(T, B + 2)`` counts ``[underflow (< edges[0]), bin_0, ..., bin_{B-1},
            overflow (> edges[-1], NaN included)]``; bins are ``[e_k, e_{k+1})``, the last closed.
            They count the measured sample, so each row adds up to ``min(numel, sample_size)``.
        numel: ``(T,)`` number of values in the activation.
    """

    steps: np.ndarray
    edges: np.ndarray
    counts: np.ndarray
    numel: np.ndarray

    def fractions(self) -> np.ndarray:
        """``counts`` normalized to sum to 1 per step, ``(T, B + 2)``."""
        total = self.counts.sum(axis=1, keepdims=True)
        return self.counts / np.where(total == 0, 1, total)


@dataclass(frozen=True)
class ChannelStats:
    """Per-channel (dim 1) statistics of one layer over time (``per_channel=True``).

    Attributes:
        steps: ``(T,)``; mean, std: ``(T, C)``, population std over every value of the channel.
    """

    steps: np.ndarray
    mean: np.ndarray
    std: np.ndarray


@dataclass
class _Chunk:
    steps: np.ndarray  # (R,) int64
    names: tuple[str, ...]  # S scalar names
    values: np.ndarray  # (R, S) float64
    counts: Optional[np.ndarray] = None  # (R, B + 2) int64
    channel_mean: Optional[np.ndarray] = None  # (R, C)
    channel_std: Optional[np.ndarray] = None  # (R, C)


@dataclass
class _Layer:
    chunks: list[_Chunk] = field(default_factory=list)
    edges: Optional[np.ndarray] = None


Layer = Union[str, RecordKey]  # a record key, or its display string (looked up, never parsed)


def as_key(layer: Layer) -> RecordKey:
    """``layer`` as a key; a string becomes the key of a module of that name (no parsing)."""
    return layer if isinstance(layer, RecordKey) else RecordKey(str(layer))


class MonitorRecords:
    """All measurements of a monitored run, by record key and step.

    A record key (:class:`RecordKey`) is one measured point: a watched module (``"fc1.act"``), its
    k-th extra call in one forward (``"fc1.act#1"``), one of its channels (``"fc1.act[17]"``), or
    any of these on the probe batch (``"fc1.act@probe"``). Every view takes the key or its string.
    """

    def __init__(self, layers: Iterable[Layer] = ()) -> None:
        self._declared: list[RecordKey] = list(dict.fromkeys(as_key(k) for k in layers))
        self._layers: dict[RecordKey, _Layer] = {}
        self._names: dict[str, RecordKey] = {str(k): k for k in self._declared}

    # -- writing ---------------------------------------------------------------------------
    def declare(self, layers: Iterable[Layer]) -> None:
        """Put ``layers`` first in :attr:`keys` (in this order), before the others seen."""
        keys = [as_key(k) for k in layers]
        self._declared = list(dict.fromkeys([*keys, *self.keys]))
        self._names.update({str(k): k for k in keys})

    def add_batch(self, batch: "RecordBatch") -> None:
        """Append every row of one flush (:class:`covshift.monitor.flush.RecordBatch`)."""
        rows: dict[RecordKey, list[int]] = {}
        for i, key in enumerate(batch.keys):
            rows.setdefault(key, []).append(i)
        for key, idx in rows.items():
            names = batch.row_names(idx[0])
            cols = [batch.names.index(n) for n in names]
            has_c = batch.channel_mean[idx[0]] is not None
            self.add(
                key, batch.steps[idx], names, batch.values[np.ix_(idx, cols)],
                counts=batch.hist[idx], edges=batch.edges[key],
                channel_mean=np.stack([batch.channel_mean[i] for i in idx]) if has_c else None,  # type: ignore[misc]
                channel_std=np.stack([batch.channel_std[i] for i in idx]) if has_c else None,  # type: ignore[misc]
            )

    def add(
        self,
        layer: Layer,
        steps: Sequence[int],
        names: Sequence[str],
        values: np.ndarray,
        *,
        counts: Optional[np.ndarray] = None,
        edges: Optional[np.ndarray] = None,
        channel_mean: Optional[np.ndarray] = None,
        channel_std: Optional[np.ndarray] = None,
    ) -> None:
        """Append ``R`` measurements of one layer.

        Args:
            steps: ``(R,)``; names: the ``S`` scalar names; values: ``(R, S)``.
            counts: ``(R, B + 2)`` histograms, with ``edges`` ``(B + 1,)`` (fixed per layer: only
                the first edges given are kept).
            channel_mean, channel_std: ``(R, C)``.
        """
        key = as_key(layer)
        self._names.setdefault(str(key), key)
        lay = self._layers.setdefault(key, _Layer())
        if edges is not None and lay.edges is None:
            lay.edges = np.asarray(edges, dtype=np.float64)
        assert counts is None or lay.edges is not None, "histogram counts without edges"
        values = np.asarray(values, dtype=np.float64).reshape(len(steps), len(names))
        lay.chunks.append(
            _Chunk(
                np.asarray(steps, dtype=np.int64), tuple(names), values,
                None if counts is None else np.asarray(counts, dtype=np.int64),
                None if channel_mean is None else np.asarray(channel_mean, dtype=np.float64),
                None if channel_std is None else np.asarray(channel_std, dtype=np.float64),
            )
        )

    def attach_histograms(
        self, layer: Layer, steps: Sequence[int], counts: np.ndarray, edges: np.ndarray
    ) -> None:
        """Set the histograms of existing measurements (reading a run back); unknown steps skipped."""
        lay = self._layers.get(self._key(layer))
        if lay is None:
            return
        lay.edges = np.asarray(edges, dtype=np.float64)
        row = {int(s): c for s, c in zip(steps, np.asarray(counts, dtype=np.int64))}
        width = len(lay.edges) + 1
        for ch in lay.chunks:
            found = [int(s) in row for s in ch.steps]
            if any(found):
                ch.counts = np.stack([row.get(int(s), np.full(width, -1)) for s in ch.steps])

    # -- reading ---------------------------------------------------------------------------
    @property
    def keys(self) -> list[RecordKey]:
        """Every record key: the declared ones first (watched modules, channel extras, probe
        variants), then any seen while recording (extra calls), in first-seen order."""
        declared = set(self._declared)
        return self._declared + [k for k in self._layers if k not in declared]

    @property
    def layers(self) -> list[str]:
        """The display strings of :attr:`keys` (``"hidden3.act#1[17]@probe"``), in the same order."""
        return [str(k) for k in self.keys]

    def select(
        self,
        module: Optional[str] = None,
        *,
        call: Optional[int] = None,
        channel: Union[None, bool, int] = None,
        probe: Optional[bool] = None,
    ) -> list[RecordKey]:
        """The keys matching every given field, in :attr:`keys` order.

        ``channel=True`` keeps the single-channel records, ``False`` the whole-layer ones, an int
        that channel; ``probe=True`` / ``False`` the probe-batch / training-batch records.
        """
        out = []
        for k in self.keys:
            if module is not None and k.module != module:
                continue
            if call is not None and k.call != call:
                continue
            if channel is True and k.channel is None or channel is False and k.channel is not None:
                continue
            if not isinstance(channel, bool) and channel is not None and k.channel != channel:
                continue
            if probe is not None and k.probe != probe:
                continue
            out.append(k)
        return out

    def _key(self, layer: Layer) -> RecordKey:
        if isinstance(layer, RecordKey):
            return layer
        return self._names.get(layer, RecordKey(str(layer)))

    def _get(self, layer: Layer) -> list[_Chunk]:
        key = self._key(layer)
        if key in self._layers:
            return self._layers[key].chunks
        if key in self._declared:
            return []
        shown = ", ".join(repr(n) for n in self.layers) or "(none yet)"
        raise ValueError(f"layer: expected one of the recorded layers, got {str(layer)!r}. Layers: {shown}.")

    def steps(self, layer: Layer) -> np.ndarray:
        """``(T,)`` steps at which ``layer`` was recorded."""
        chunks = self._get(layer)
        return np.concatenate([c.steps for c in chunks]) if chunks else np.zeros(0, np.int64)

    def stats(self, layer: Layer) -> list[str]:
        """Names of the scalar statistics recorded for ``layer``."""
        names: dict[str, None] = {}
        for c in self._get(layer):
            names.update(dict.fromkeys(c.names))
        return list(names)

    def series(self, layer: Layer, stat: str) -> tuple[np.ndarray, np.ndarray]:
        """``(steps (T,), values (T,))`` of one scalar statistic of one layer.

        ``stat`` is a scalar name (``"mean"``, ``"p15"``, ``"frac_saturated"``, ...) or, with
        ``per_channel=True``, ``"channel_mean[c]"`` / ``"channel_std[c]"``.
        """
        chunks = self._get(layer)
        if stat.startswith(("channel_mean[", "channel_std[")) and stat.endswith("]"):
            kind, c = stat[:-1].split("[")
            parts = [(ch.steps, getattr(ch, kind)[:, int(c)]) for ch in chunks if getattr(ch, kind) is not None]
        else:
            parts = [(ch.steps, ch.values[:, ch.names.index(stat)]) for ch in chunks if stat in ch.names]
            if chunks and not parts:
                raise ValueError(
                    f"stat: expected one of {self.stats(layer)} for layer {str(layer)!r}, got {stat!r}."
                )
        if not parts:
            return np.zeros(0, np.int64), np.zeros(0)
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def histograms(self, layer: Layer) -> Histograms:
        """The layer's histograms over time on its fixed edges (see :class:`Histograms`)."""
        chunks = [c for c in self._get(layer) if c.counts is not None]
        lay = self._layers.get(self._key(layer))
        edges = lay.edges if lay is not None and lay.edges is not None else np.zeros(0)
        if not chunks:
            return Histograms(np.zeros(0, np.int64), edges, np.zeros((0, max(len(edges) + 1, 0)), np.int64), np.zeros(0, np.int64))
        steps = np.concatenate([c.steps for c in chunks])
        counts = np.concatenate([c.counts for c in chunks])  # type: ignore[misc]
        numel = np.concatenate(
            [c.values[:, c.names.index("numel")] if "numel" in c.names else c.counts.sum(1) for c in chunks]  # type: ignore[union-attr]
        ).astype(np.int64)
        keep = counts[:, 0] >= 0  # rows of steps whose histogram was never written (-1)
        return Histograms(steps[keep], edges, counts[keep], numel[keep])

    def channel_stats(self, layer: Layer) -> ChannelStats:
        """Per-channel mean and std over time (recorded with ``per_channel=True``)."""
        chunks = [c for c in self._get(layer) if c.channel_mean is not None]
        if not chunks:
            return ChannelStats(np.zeros(0, np.int64), np.zeros((0, 0)), np.zeros((0, 0)))
        return ChannelStats(
            steps=np.concatenate([c.steps for c in chunks]),
            mean=np.concatenate([c.channel_mean for c in chunks]),  # type: ignore[misc]
            std=np.concatenate([c.channel_std for c in chunks]),  # type: ignore[misc]
        )

    def table(
        self, layers: Optional[Sequence[Layer]] = None, stats: Optional[Sequence[str]] = None
    ) -> list[dict]:
        """Tidy rows ``{"step", "layer", "stat", "value"}``, one per scalar, by step then layer.

        Per-channel values appear as stats ``"channel_mean[c]"`` and ``"channel_std[c]"``.
        ``layers`` / ``stats`` keep only those (``pandas.DataFrame(mon.table())`` works as is).
        """
        keep_s = None if stats is None else set(stats)
        order = {k: i for i, k in enumerate(self.keys)}
        per_record = []  # (step, layer rank, layer, [(stat, value), ...])
        for layer in self.keys if layers is None else [self._key(n) for n in layers]:
            for ch in self._get(layer):
                names = list(ch.names)
                for j, step in enumerate(ch.steps.tolist()):
                    items = list(zip(names, ch.values[j].tolist()))
                    for kind in ("channel_mean", "channel_std"):
                        arr = getattr(ch, kind)
                        if arr is not None:
                            items += [(f"{kind}[{c}]", v) for c, v in enumerate(arr[j].tolist())]
                    per_record.append((step, order.get(layer, len(order)), str(layer), items))
        per_record.sort(key=lambda r: (r[0], r[1]))
        return [
            {"step": step, "layer": layer, "stat": k, "value": float(v)}
            for step, _, layer, items in per_record
            for k, v in items
            if keep_s is None or k in keep_s
        ]

    def histogram_keys(self) -> list[RecordKey]:
        """Keys that have at least one histogram."""
        return [k for k in self.keys if len(self.histograms(k).steps)]

    def histogram_layers(self) -> list[str]:
        """Display strings of :meth:`histogram_keys`."""
        return [str(k) for k in self.histogram_keys()]

    def __len__(self) -> int:
        return sum(len(c.steps) for lay in self._layers.values() for c in lay.chunks)

    def __repr__(self) -> str:
        return f"MonitorRecords({len(self.layers)} layers, {len(self)} records)"
