"""Recorded measurements on the host, and their views: tidy table, series, histograms, channels.

The same class serves a live :class:`~covshift.monitor.ActivationMonitor` and a run read back from
disk by :func:`covshift.monitor.load`, so a report is built the same way from either.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import numpy as np

__all__ = ["MonitorRecords", "Histograms", "ChannelStats"]


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
class _Record:
    step: int
    scalars: dict[str, float]
    counts: Optional[np.ndarray] = None  # (B + 2,)
    channel_mean: Optional[np.ndarray] = None  # (C,)
    channel_std: Optional[np.ndarray] = None  # (C,)


class MonitorRecords:
    """All measurements of a monitored run, by layer and step.

    A "layer" is one measured point: a watched module (``"fc1.act"``), its k-th extra call in one
    forward (``"fc1.act#1"``), one of its channels (``"fc1.act[17]"``), or any of these on the probe
    batch (``"fc1.act@probe"``).
    """

    def __init__(self, layers: Iterable[str] = ()) -> None:
        self._declared: list[str] = list(dict.fromkeys(layers))
        self._records: dict[str, list[_Record]] = {}
        self._edges: dict[str, np.ndarray] = {}
        self._order: list[tuple[str, int]] = []  # (layer, index) in insertion order, for table()

    # -- writing ---------------------------------------------------------------------------
    def add(
        self,
        step: int,
        layer: str,
        scalars: dict[str, float],
        *,
        counts: Optional[np.ndarray] = None,
        edges: Optional[np.ndarray] = None,
        channel_mean: Optional[np.ndarray] = None,
        channel_std: Optional[np.ndarray] = None,
    ) -> None:
        """Append one measurement. ``edges`` must be given with the first ``counts`` of a layer."""
        if counts is not None:
            if edges is not None:
                self._edges.setdefault(layer, np.asarray(edges, dtype=np.float64))
            assert layer in self._edges, "histogram counts recorded before the layer's edges"
        recs = self._records.setdefault(layer, [])
        recs.append(_Record(int(step), dict(scalars), counts, channel_mean, channel_std))
        self._order.append((layer, len(recs) - 1))

    def declare(self, layers: Iterable[str]) -> None:
        """Put ``layers`` first in :attr:`layers` (in this order), before the others seen."""
        self._declared = list(dict.fromkeys([*layers, *self.layers]))

    def attach_histograms(
        self, layer: str, steps: Sequence[int], counts: np.ndarray, edges: np.ndarray
    ) -> None:
        """Set the histograms of existing records (reading a run back); unknown steps are skipped."""
        by_step = {r.step: r for r in self._records.get(layer, ())}
        self._edges.setdefault(layer, np.asarray(edges, dtype=np.float64))
        for step, c in zip(steps, counts):
            rec = by_step.get(int(step))
            if rec is not None:
                rec.counts = np.asarray(c, dtype=np.int64)

    # -- reading ---------------------------------------------------------------------------
    @property
    def layers(self) -> list[str]:
        """Every layer name: the declared ones first (watched modules, channel extras, probe
        variants), then any seen while recording (extra calls), in first-seen order."""
        declared = set(self._declared)
        seen = [n for n in self._records if n not in declared]
        return self._declared + seen

    def _get(self, layer: str) -> list[_Record]:
        if layer in self._records:
            return self._records[layer]
        if layer in self._declared:
            return []
        shown = ", ".join(repr(n) for n in self.layers) or "(none yet)"
        raise ValueError(f"layer: expected one of the recorded layers, got {layer!r}. Layers: {shown}.")

    def steps(self, layer: str) -> np.ndarray:
        """``(T,)`` steps at which ``layer`` was recorded."""
        return np.array([r.step for r in self._get(layer)], dtype=np.int64)

    def stats(self, layer: str) -> list[str]:
        """Names of the scalar statistics recorded for ``layer``."""
        names: dict[str, None] = {}
        for r in self._get(layer):
            names.update(dict.fromkeys(r.scalars))
        return list(names)

    def series(self, layer: str, stat: str) -> tuple[np.ndarray, np.ndarray]:
        """``(steps (T,), values (T,))`` of one scalar statistic of one layer.

        ``stat`` is a scalar name (``"mean"``, ``"p15"``, ``"frac_saturated"``, ...) or, with
        ``per_channel=True``, ``"channel_mean[c]"`` / ``"channel_std[c]"``.
        """
        recs = self._get(layer)
        if stat.startswith(("channel_mean[", "channel_std[")) and stat.endswith("]"):
            kind, c = stat[:-1].split("[")
            arr = [(r.step, getattr(r, kind)) for r in recs if getattr(r, kind) is not None]
            steps = np.array([s for s, _ in arr], dtype=np.int64)
            return steps, np.array([a[int(c)] for _, a in arr], dtype=np.float64)
        pairs = [(r.step, r.scalars[stat]) for r in recs if stat in r.scalars]
        if recs and not pairs:
            raise ValueError(
                f"stat: expected one of {self.stats(layer)} for layer {layer!r}, got {stat!r}."
            )
        return (
            np.array([s for s, _ in pairs], dtype=np.int64),
            np.array([v for _, v in pairs], dtype=np.float64),
        )

    def histograms(self, layer: str) -> Histograms:
        """The layer's histograms over time on its fixed edges (see :class:`Histograms`)."""
        recs = [r for r in self._get(layer) if r.counts is not None]
        edges = self._edges.get(layer, np.zeros(0))
        width = len(edges) + 1 if len(edges) else 0  # B + 2 counts for B + 1 edges
        return Histograms(
            steps=np.array([r.step for r in recs], dtype=np.int64),
            edges=edges,
            counts=np.array([r.counts for r in recs], dtype=np.int64).reshape(len(recs), width),
            numel=np.array([r.scalars.get("numel", np.nan) for r in recs]).astype(np.int64),
        )

    def channel_stats(self, layer: str) -> ChannelStats:
        """Per-channel mean and std over time (recorded with ``per_channel=True``)."""
        recs = [r for r in self._get(layer) if r.channel_mean is not None]
        if not recs:
            return ChannelStats(np.zeros(0, np.int64), np.zeros((0, 0)), np.zeros((0, 0)))
        return ChannelStats(
            steps=np.array([r.step for r in recs], dtype=np.int64),
            mean=np.stack([r.channel_mean for r in recs]).astype(np.float64),
            std=np.stack([r.channel_std for r in recs]).astype(np.float64),
        )

    def table(
        self, layers: Optional[Sequence[str]] = None, stats: Optional[Sequence[str]] = None
    ) -> list[dict]:
        """Tidy rows ``{"step", "layer", "stat", "value"}``, one per scalar, in recording order.

        Per-channel values appear as stats ``"channel_mean[c]"`` and ``"channel_std[c]"``.
        ``layers`` / ``stats`` keep only those (``pandas.DataFrame(mon.table())`` works as is).
        """
        keep_l = None if layers is None else set(layers)
        keep_s = None if stats is None else set(stats)
        rows: list[dict] = []
        for layer, i in self._order:
            if keep_l is not None and layer not in keep_l:
                continue
            r = self._records[layer][i]
            items = list(r.scalars.items())
            for kind, arr in (("channel_mean", r.channel_mean), ("channel_std", r.channel_std)):
                if arr is not None:
                    items += [(f"{kind}[{c}]", float(v)) for c, v in enumerate(arr)]
            rows += [
                {"step": r.step, "layer": layer, "stat": k, "value": float(v)}
                for k, v in items
                if keep_s is None or k in keep_s
            ]
        return rows

    def histogram_layers(self) -> list[str]:
        """Layers that have at least one histogram."""
        return [n for n in self.layers if any(r.counts is not None for r in self._records.get(n, ()))]

    def __len__(self) -> int:
        return len(self._order)

    def __repr__(self) -> str:
        return f"MonitorRecords({len(self.layers)} layers, {len(self)} records)"
