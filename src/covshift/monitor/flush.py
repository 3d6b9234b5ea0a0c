r"""The flush: stage-2 statistics of the pending stage-1 results, as one typed batch for the writers.

Three pure steps, called by :class:`~covshift.monitor.ActivationMonitor` every ``flush_every``
recorded steps:

1. :func:`decide_edges`: fixed histogram edges for record keys seen for the first time (from the
   user's ``hist_range``, else from the first record's sample: one host copy per key per run);
2. :func:`layer_stats`: the stage-1 results of many records -> :class:`LayerStats`, sufficient
   statistics that merge exactly across processes (:mod:`covshift.monitor.distributed`), computed
   on the records' device by the kernels of :mod:`covshift.monitor.stats`, grouped by key;
3. :func:`finish`: :class:`LayerStats` -> :class:`RecordBatch`: percentiles by selection from the
   sample, one copy to the host, and the scalar statistics, ready for the writers (JSON Lines, npz,
   TensorBoard) and for :class:`~covshift.monitor.MonitorRecords`.

The fast path skips steps 2 and 3 for most records: once a key's edges are fixed, and when
statistics stay per rank, the hook computes the whole record at once (:func:`stats.record`, one
fused C++ call that reads the activation and keeps no copy), and :func:`finish_rows` only moves
the rows to the host. Both paths give the same numbers (tested).

Meaning of the statistics: see :mod:`covshift.monitor.stats` (non-finite values are counted in
``frac_nonfinite`` and left out of every other statistic).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Mapping, NamedTuple, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from covshift.monitor import stats
from covshift.monitor.config import MonitorConfig
from covshift.monitor.hooks import _one_cpu_thread
from covshift.monitor.records import RecordKey

__all__ = [
    "Pending", "LayerStats", "RecordBatch", "Edges", "stat_names", "decide_edges", "layer_stats",
    "finish", "finish_rows", "concat", "flush_pending",
]


class Pending(NamedTuple):
    """One measured activation waiting for the flush: a stage-1 result, or a finished row."""

    step: int
    key: RecordKey
    reduced: Optional[stats.Reduced]  # a sample (and moments) for stage 2, or None when `row` is set
    row: Optional[Tensor] = None  # (9 + B + 2 + P,) from stats.record: every statistic, computed in the hook
    channel: Optional[tuple[Tensor, Tensor, Tensor]] = None  # with `row`: per-channel mean, var, max
    numel: int = 0  # with `row`: values in the activation


# NOTE: covshift.monitor.distributed.merge_across_ranks (engineer A2) depends on this definition:
# its fields, shapes, dtypes and meaning. Change it only together with that function.
@dataclasses.dataclass
class LayerStats:
    r"""Mergeable statistics of ``L`` records (one row per recorded activation), on one device.

    Every row is a sufficient statistic that merges exactly across processes: counts add, means
    and squared deviations combine by Chan et al.'s formula

    .. math::

        n = n_a + n_b,\quad \delta = \mu_b - \mu_a,\quad \mu = \mu_a + \delta\,n_b/n,\quad
        M_2 = M_{2,a} + M_{2,b} + \delta^2 n_a n_b / n,

    minima and maxima take the min / max, histograms add bin by bin, and the percentile samples are
    concatenated (percentiles are computed after the merge, from the merged sample).

    Non-finite values (NaN, +inf, -inf) are counted in ``n_nonfinite`` and excluded from every
    other field: mean, M2, min, max, histogram, saturated and non-positive counts and the sample are
    over the finite values only.

    Rows correspond across ranks: every rank builds them in the same order (the same modules
    recorded at the same steps; an empty activation still gives a row, with ``count == 0``), and
    ``keys`` / ``steps`` are identical on every rank. Tensors live on the statistics' device
    (where the activations were); integer counts are int64, moments float64.

    Fields:
        keys: ``L`` record identities (host objects, not tensors).
        steps: ``(L,)`` int64, training step of each row (host tensor).
        count: ``(L,)`` int64, number of finite values :math:`n`.
        mean: ``(L,)`` float64, mean of the finite values (0 when ``count == 0``).
        m2: ``(L,)`` float64, :math:`M_2 = \sum (x - \mu)^2` over the finite values.
        min, max: ``(L,)`` float64, over the finite values (+inf / -inf when ``count == 0``).
        n_nonfinite: ``(L,)`` int64, number of NaN and infinite values (so numel = count + n_nonfinite).
        hist: ``(L, B + 2)`` int64, histogram of the finite *sample* values on the layer's fixed
            edges: ``[underflow (< e_0), bin_0, ..., bin_{B-1}, overflow (> e_B)]``; the edges are the
            same on every rank (decided once, by rank 0, under ``reduce="global"``).
        n_saturated: ``(L,)`` int64, finite sample values with :math:`|x| > t`.
        n_nonpositive: ``(L,)`` int64, finite sample values :math:`\le 0`.
        sample: ``(L, K)`` float32 or float64: row ``l`` holds its ``sample_count[l]`` finite sample
            values first (in no guaranteed order), then NaN padding. The merge may widen ``K``
            (concatenating ranks' samples), keeping this layout.
        sample_count: ``(L,)`` int64, valid entries of each sample row; ``hist`` rows sum to it.
        channel_sizes: ``(L,)`` int64, channels ``C_l`` of each row's per-channel statistics (0 for
            rows without); ``None`` when no row has them.
        channel_count: ``(L,)`` int64, values per channel (the same for every channel of a row).
        channel_mean, channel_m2, channel_max: ``(sum_l C_l,)`` float64, the rows' per-channel mean,
            M2 and max concatenated in row order (over every value: a channel holding a NaN has a
            NaN mean).
    """

    keys: list[RecordKey]
    steps: Tensor
    count: Tensor
    mean: Tensor
    m2: Tensor
    min: Tensor
    max: Tensor
    n_nonfinite: Tensor
    hist: Tensor
    n_saturated: Tensor
    n_nonpositive: Tensor
    sample: Tensor
    sample_count: Tensor
    channel_sizes: Optional[Tensor] = None
    channel_count: Optional[Tensor] = None
    channel_mean: Optional[Tensor] = None
    channel_m2: Optional[Tensor] = None
    channel_max: Optional[Tensor] = None

    def __len__(self) -> int:
        return len(self.keys)


def stat_names(percentiles: Sequence[float], channels: bool) -> tuple[str, ...]:
    """Names of the scalar statistics of one record, in the order of :attr:`RecordBatch.values`."""
    base = ["mean", "std", "min", "max", *(f"p{q:g}" for q in percentiles)]
    base += ["frac_saturated", "frac_zero", "frac_nonfinite"]
    return tuple(base + (["frac_dead"] if channels else []) + ["numel"])


@functools.lru_cache(maxsize=64)
def _without_dead(names: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(n for n in names if n != "frac_dead")


@dataclasses.dataclass(frozen=True)
class RecordBatch:
    """The records of one flush on the host, in recording order: what every writer consumes.

    Attributes:
        keys: ``L`` record identities; steps: ``(L,)`` int64.
        names: the ``S`` scalar names (:func:`stat_names`); values: ``(L, S)`` float64. Rows
            without per-channel statistics have NaN in ``frac_dead`` (see :meth:`scalars`).
        hist: ``(L, B + 2)`` int64 histogram counts with tails; edges: each key's ``(B + 1,)`` edges.
        channel_mean, channel_std: per row, ``(C,)`` float64 arrays, or None.
    """

    keys: list[RecordKey]
    steps: np.ndarray
    names: tuple[str, ...]
    values: np.ndarray
    hist: np.ndarray
    edges: Mapping[RecordKey, np.ndarray]
    channel_mean: list[Optional[np.ndarray]]
    channel_std: list[Optional[np.ndarray]]

    def __len__(self) -> int:
        return len(self.keys)

    def row_names(self, i: int) -> tuple[str, ...]:
        """The scalar names that row ``i`` really has (``frac_dead`` only with channel statistics):
        :attr:`names` itself, or one shared tuple without ``frac_dead``."""
        if self.channel_mean[i] is None and "frac_dead" in self.names:
            return _without_dead(self.names)
        return self.names

    def scalars(self, i: int) -> dict[str, float]:
        """Row ``i`` as ``{name: value}``."""
        names = self.row_names(i)
        return {n: float(v) for n, v in zip(self.names, self.values[i].tolist()) if n in names}


def decide_edges(
    pending: Sequence[Pending],
    known: Mapping[RecordKey, np.ndarray],
    config: MonitorConfig,
) -> dict[RecordKey, np.ndarray]:
    """Fixed edges for the keys of ``pending`` not in ``known``: from ``config.hist_range`` for the
    key's module, else :func:`stats.auto_edges` of the first record's finite sample values."""
    rng = config.hist_range
    new: dict[RecordKey, np.ndarray] = {}
    firsts: dict[RecordKey, stats.Reduced] = {}
    for p in pending:
        if p.key in known or p.key in new or p.key in firsts:
            continue
        user = rng.get(p.key.module) if isinstance(rng, Mapping) else rng
        if user is not None:
            new[p.key] = stats.fixed_edges(user[0], user[1], config.hist_bins, p.reduced.sample.dtype)
        else:
            firsts[p.key] = p.reduced
    if firsts:
        host = stats.to_host([r.sample for r in firsts.values()])
        for (key, r), s in zip(firsts.items(), host):
            new[key] = stats.auto_edges(np.sort(s[np.isfinite(s)]), config.hist_bins, config.hist_pad, r.sample.dtype)
    return new


def layer_stats(
    pending: Sequence[Pending],
    edges: Mapping[RecordKey, np.ndarray],
    config: MonitorConfig,
    *,
    use_extension: Optional[bool] = None,
) -> LayerStats:
    """Stage 2 on the device: one :class:`LayerStats` row per pending record.

    Records of one key with the same sample size, dtype and kind (moments from the hook, or from the
    sample when the sample is every value) are stacked and reduced by one :func:`stats.rows` call;
    the rows come grouped so (a deterministic order, the same on every rank that recorded the
    same records), and :func:`finish` restores the recording order (by step).
    """
    if not pending:
        raise ValueError("layer_stats: expected at least one pending record, got none.")
    groups: dict[tuple, list[int]] = {}
    for i, p in enumerate(pending):
        r = p.reduced
        groups.setdefault((p.key, r.sample.numel(), r.sample.dtype, r.moments is None), []).append(i)
    dtype = torch.float64 if any(p.reduced.sample.dtype == torch.float64 for p in pending) else torch.float32
    width = max(p.reduced.sample.numel() for p in pending)
    device = pending[0].reduced.sample.device

    order: list[int] = []
    moms, hists, flags, samples, counts = [], [], [], [], []
    for (key, k, _, exact), idx in groups.items():
        recs = [pending[i].reduced for i in idx]
        s = torch.stack([r.sample for r in recs])  # (R, k), our own copies
        e = torch.as_tensor(edges[key], dtype=torch.float64, device=device)
        mom, hist, fl, compact = stats.rows(s, None, e, config.saturation_threshold, use_extension=use_extension)
        counts.append(mom[:, 0])  # finite sample values
        if not exact:  # moments of the whole tensor, from the hook
            mom = torch.stack([r.moments for r in recs])  # type: ignore[misc]
        if compact.dtype != dtype or k != width:
            pad = torch.full((len(idx), width), math.nan, dtype=dtype, device=device)
            pad[:, :k] = compact
            compact = pad
        order += idx
        moms.append(mom)
        hists.append(hist)
        flags.append(fl)
        samples.append(compact)
    # Rows in group order (deterministic, so the same on every rank); finish() puts them back in
    # recording order on the host.
    one = len(moms) == 1
    mom = moms[0] if one else torch.cat(moms)
    fl = flags[0] if one else torch.cat(flags)
    out = LayerStats(
        keys=[pending[i].key for i in order],
        steps=torch.tensor([pending[i].step for i in order], dtype=torch.int64),
        count=mom[:, 0].to(torch.int64),
        mean=mom[:, 1],
        m2=mom[:, 2],
        min=mom[:, 3],
        max=mom[:, 4],
        n_nonfinite=mom[:, 5].to(torch.int64),
        hist=hists[0] if one else torch.cat(hists),
        n_saturated=fl[:, 0],
        n_nonpositive=fl[:, 1],
        sample=samples[0] if one else torch.cat(samples),
        sample_count=(counts[0] if one else torch.cat(counts)).to(torch.int64),
    )
    pending = [pending[i] for i in order]
    if any(p.reduced.channel is not None for p in pending):
        sizes, cnt, cm, cm2, cx = [], [], [], [], []
        for p in pending:
            ch = p.reduced.channel
            c = 0 if ch is None else ch[0].numel()
            sizes.append(c)
            per = p.reduced.numel // c if c else 0
            cnt.append(per)
            if ch is not None:
                cm.append(ch[0].double())
                cm2.append(ch[1].double() * per)
                cx.append(ch[2].double())
        out.channel_sizes = torch.tensor(sizes, dtype=torch.int64)
        out.channel_count = torch.tensor(cnt, dtype=torch.int64)
        out.channel_mean, out.channel_m2, out.channel_max = torch.cat(cm), torch.cat(cm2), torch.cat(cx)
    return out


def finish(
    ls: LayerStats,
    edges: Mapping[RecordKey, np.ndarray],
    config: MonitorConfig,
    *,
    use_extension: Optional[bool] = None,
) -> RecordBatch:
    r"""Percentiles from the sample, one host copy, and the scalar statistics of each row.

    With :math:`n` finite values of :math:`N` in the activation and :math:`k` finite sample values:
    ``mean`` :math:`= \mu`, ``std`` :math:`= \sqrt{M_2/n}`, ``min``, ``max`` (NaN when
    :math:`n = 0`), percentiles of the :math:`k` values, ``frac_saturated`` and ``frac_zero`` over
    the :math:`k` values, ``frac_nonfinite`` :math:`= (N - n)/N`, ``numel`` :math:`= N`, and with
    per-channel statistics ``frac_dead``, the fraction of channels whose max is :math:`\le 0`.
    ``ls.sample`` is permuted in place.
    """
    sample = ls.sample if ls.sample.is_contiguous() else ls.sample.contiguous()
    pct = stats.percentiles_(sample, ls.sample_count, config.percentiles, use_extension=use_extension)
    tensors = [ls.count, ls.mean, ls.m2, ls.min, ls.max, ls.n_nonfinite, ls.hist, ls.n_saturated,
               ls.n_nonpositive, ls.sample_count, pct]
    has_channels = ls.channel_sizes is not None
    if has_channels:
        tensors += [ls.channel_count, ls.channel_mean, ls.channel_m2, ls.channel_max]
    host = stats.to_host(tensors)
    channels = None
    if has_channels:
        channels = (ls.channel_sizes.tolist(), *host[11:])  # type: ignore[union-attr]
    return _assemble(list(ls.keys), ls.steps.numpy(), edges, config, *host[:11], channels=channels)


def finish_rows(
    pending: Sequence[Pending], edges: Mapping[RecordKey, np.ndarray], config: MonitorConfig
) -> RecordBatch:
    """The records measured whole in the hook (:func:`stats.record` rows) as a :class:`RecordBatch`.

    The same statistics as :func:`finish` (see there), from ``(9 + B + 2 + P,)`` rows: one stack,
    one host copy, then column arithmetic on the ``(L, 9 + B + 2 + P)`` array.
    """
    B = config.hist_bins
    rows = [p.row for p in pending]
    with_c = [p for p in pending if p.channel is not None]
    tensors = [torch.stack(rows) if len(rows) > 1 else rows[0][None]]  # (L, 9 + B + 2 + P)
    if with_c:
        tensors += [torch.cat([p.channel[k].double() for p in with_c]) for k in range(3)]  # type: ignore[index]
    host = stats.to_host(tensors)
    r = host[0]
    channels = None
    if with_c:
        sizes = [0 if p.channel is None else p.channel[0].numel() for p in pending]
        per = np.array([p.numel // c if c else 0 for p, c in zip(pending, sizes)], dtype=np.int64)
        cm, cv, cx = host[1:]
        per_flat = np.repeat(per[np.array(sizes) > 0], [c for c in sizes if c])
        channels = (sizes, per, cm, cv * per_flat, cx)
    return _assemble(
        [p.key for p in pending], np.fromiter([p.step for p in pending], np.int64, len(pending)), edges, config,
        r[:, 0], r[:, 1], r[:, 2], r[:, 3], r[:, 4], r[:, 5], r[:, 9 : 11 + B], r[:, 6], r[:, 7], r[:, 8],
        r[:, 11 + B :], channels=channels,
    )


def concat(batches: Sequence[RecordBatch]) -> RecordBatch:
    """One batch from several of the same flush, ordered by step (stable)."""
    if len(batches) == 1:
        return batches[0]
    names = max((b.names for b in batches), key=len)  # with frac_dead if any has it
    values = []
    for b in batches:
        v = b.values
        if b.names != names:  # insert the missing frac_dead column (NaN)
            v = np.insert(v, names.index("frac_dead"), np.nan, axis=1)
        values.append(v)
    steps = np.concatenate([b.steps for b in batches])
    o = np.argsort(steps, kind="stable")
    ol = o.tolist()
    keys = [k for b in batches for k in b.keys]
    cm = [c for b in batches for c in b.channel_mean]
    cs = [c for b in batches for c in b.channel_std]
    edges: dict[RecordKey, np.ndarray] = {}
    for b in batches:
        edges.update(b.edges)
    return RecordBatch(
        keys=[keys[i] for i in ol], steps=steps[o], names=names, values=np.concatenate(values)[o],
        hist=np.concatenate([b.hist for b in batches])[o], edges=edges,
        channel_mean=[cm[i] for i in ol], channel_std=[cs[i] for i in ol],
    )


def _assemble(
    keys: list[RecordKey],
    steps: np.ndarray,
    edges: Mapping[RecordKey, np.ndarray],
    config: MonitorConfig,
    count, mean, m2, mn, mx, nonfinite, hist, sat, nonpos, scount, pct_h,
    *,
    channels: Optional[tuple] = None,
) -> RecordBatch:
    """Host arrays ``(L, ...)`` of the sufficient statistics -> the scalar statistics, by step.

    Vectorized over the ``L`` rows (a flush holds ``flush_every`` steps of every watched layer):
    the columns are written into one ``(L, S)`` array.
    """
    L = len(keys)
    names = stat_names(config.percentiles, channels is not None)
    P = len(config.percentiles)
    values = np.empty((L, len(names)), dtype=np.float64)
    n = np.asarray(count, dtype=np.float64)
    k = np.asarray(scount, dtype=np.float64)
    nonfinite = np.asarray(nonfinite, dtype=np.float64)
    numel = n + nonfinite
    with np.errstate(divide="ignore", invalid="ignore"):
        empty = n == 0
        values[:, 0] = mean
        np.divide(np.maximum(m2, 0), n, out=values[:, 1])
        np.sqrt(values[:, 1], out=values[:, 1])
        values[:, 2] = mn
        values[:, 3] = mx
        if empty.any():
            values[empty, :4] = np.nan
        values[:, 4 : 4 + P] = pct_h
        np.divide(sat, k, out=values[:, 4 + P])
        np.divide(nonpos, k, out=values[:, 5 + P])
        np.divide(nonfinite, numel, out=values[:, 6 + P])
        if not numel.all():
            values[numel == 0, 6 + P] = np.nan
    values[:, -1] = numel
    c_mean: list[Optional[np.ndarray]] = [None] * L
    c_std: list[Optional[np.ndarray]] = [None] * L
    if channels is not None:
        sizes, per, cm, cm2, cx = channels
        dead = values[:, 7 + P]
        dead[:] = np.nan
        start = 0
        for i, c in enumerate(sizes):
            if c:
                sl = slice(start, start + c)
                c_mean[i] = cm[sl]
                c_std[i] = np.sqrt(np.maximum(cm2[sl], 0) / max(int(per[i]), 1))
                dead[i] = float((cx[sl] <= 0).mean())
                start += c
    steps = np.asarray(steps, dtype=np.int64)
    hist = np.asarray(hist).astype(np.int64)
    used = {key: edges[key] for key in dict.fromkeys(keys)}
    if L > 1 and not (steps[1:] >= steps[:-1]).all():  # recording order: by step, then as grouped
        o = np.argsort(steps, kind="stable")
        ol = o.tolist()
        keys, steps, values, hist = [keys[i] for i in ol], steps[o], values[o], hist[o]
        c_mean, c_std = [c_mean[i] for i in ol], [c_std[i] for i in ol]
    return RecordBatch(
        keys=list(keys), steps=steps, names=names, values=values, hist=hist, edges=used,
        channel_mean=c_mean, channel_std=c_std,
    )


class Edges(dict):
    """The fixed histogram edges of each record key (``{key: (B + 1,) float64}``), with a cache of
    them as CPU tensors (:attr:`tensors`) for the hook's fast path."""

    def __init__(self, *args: object) -> None:
        super().__init__(*args)
        self.tensors: dict[RecordKey, Tensor] = {k: torch.as_tensor(v, dtype=torch.float64) for k, v in self.items()}

    def add(self, new: Mapping[RecordKey, np.ndarray]) -> None:
        for k, v in new.items():
            self[k] = v
            self.tensors[k] = torch.as_tensor(v, dtype=torch.float64)


def flush_pending(
    pending: Sequence[Pending],
    edges: Edges,
    config: MonitorConfig,
    *,
    distributed: bool = False,
    group: object = None,
) -> Optional[RecordBatch]:
    """One flush: the pending records -> one :class:`RecordBatch` (None when there are none).

    Per rank: records measured whole in the hook go through :func:`finish_rows`; the others
    through :func:`decide_edges`, :func:`layer_stats` and :func:`finish`. With ``distributed``
    (``reduce="global"``): every rank must call this with the same records in the same order;
    new keys take rank 0's edges (one broadcast, once per key in the run), then one collective,
    :func:`covshift.monitor.distributed.merge_across_ranks`, and every rank gets the merged batch.
    ``edges`` gains the new keys' edges.
    """
    if not pending:
        return None
    if not distributed and all(p.row is not None for p in pending):
        # Only host arithmetic and one stack: no intra-op threads to set (setting them costs more
        # than this whole flush on a 2-core machine, and wakes the pool at the next forward).
        return finish_rows(pending, edges, config)
    with _one_cpu_thread():
        if distributed:
            import torch.distributed as dist

            from covshift.monitor.distributed import merge_across_ranks

            new = decide_edges(pending, edges, config)
            if new or any(p.key not in edges for p in pending):
                box = [new]
                src = 0 if group is None else dist.get_global_rank(group, 0)  # type: ignore[arg-type]
                dist.broadcast_object_list(box, src=src, group=group)  # type: ignore[arg-type]
                new = box[0]
            edges.add(new)
            ls = layer_stats(pending, edges, config)
            ls = merge_across_ranks(ls, group=group, sample_width=config.sample_size)  # type: ignore[arg-type]
            return finish(ls, edges, config)
        slow = [p for p in pending if p.row is None]
        fast = [p for p in pending if p.row is not None]
        parts = []
        if slow:
            edges.add(decide_edges(slow, edges, config))
            parts.append(finish(layer_stats(slow, edges, config), edges, config))
        if fast:
            parts.append(finish_rows(fast, edges, config))
        return concat(parts)
