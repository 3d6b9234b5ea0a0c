r"""Global statistics under ``torch.distributed``: merge each rank's flush into the whole batch's.

A flush holds ``L`` records (:class:`~covshift.monitor.flush.LayerStats`), the same rows in the same
order on every rank. :func:`merge_across_ranks` packs every field of every row into **one float64
tensor** and all-gathers it (one collective per flush, never one per hook), then every rank merges
the ``W`` gathered copies with the pure functions below, so every rank holds the same result:

* counts add; mean and :math:`M_2 = \sum (x - \mu)^2` combine by Chan, Golub & LeVeque's pairwise
  formula, folded over the ranks (:func:`merge_moments`):

  .. math::

      n = n_a + n_b,\quad \delta = \mu_b - \mu_a,\quad \mu = \mu_a + \delta\, n_b / n,\quad
      M_2 = M_{2,a} + M_{2,b} + \delta^2\, n_a n_b / n;

  a rank whose count is 0 contributes nothing (its mean and :math:`M_2` are ignored, whatever they
  hold), and a row whose total count is 0 gets mean 0 and :math:`M_2` 0. The result is the count,
  mean and variance of the concatenated batch, to float64 rounding;
* minima and maxima take the min and the max (:func:`merge_extrema`; +inf / -inf for empty ranks);
* histogram, saturated, non-positive and non-finite counts add (the edges are the same on every
  rank), exactly;
* **percentiles come from the gathered samples**: each row's sample values of all ranks are
  concatenated (:func:`merge_samples`), and the flush computes percentiles from that merged sample.
  When every rank's sample holds all of its finite values (activations of at most
  ``MonitorConfig.sample_size`` values per rank) the merged sample *is* the global batch, so the
  percentiles and the histogram equal a single process's on the concatenated batch, exactly. When
  ranks subsample, each rank's values enter in proportion to its sample size rather than its count
  (equal shards, DDP's usual case, weigh equally and are unbiased), and a percentile has the
  sampling error of a uniform sample of size :math:`K`: a standard deviation of about
  :math:`\sqrt{q(1-q)/K}` in quantile level (0.4 percentile points at the median for
  :math:`K = 16384`).

The alternative, percentiles from the merged histogram (:func:`percentiles_from_histogram`,
linear interpolation inside a bin), needs no samples on the wire; its error is at most one bin
width inside the edges, and up to the tail's width (edge to min or max) in the tails. It is offered
as a pure function; the flush uses the samples.

Every rank must call :func:`merge_across_ranks` at the same flush with rows built in the same
order; a row mismatch (different keys or steps, different histogram widths or channel counts) is
detected from the gathered headers and raises the same error on every rank, after the collective,
so no rank hangs. That check is certain only without ``sample_width`` (the widths, with the
headers, are gathered first): with it, ranks whose rows differ in number send buffers of different
sizes, and the backend fails first, in its own words (gloo aborts the process with "Received data
size doesn't match expected size").
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from covshift.monitor.flush import LayerStats

__all__ = [
    "merge_across_ranks",
    "merge_moments",
    "merge_extrema",
    "merge_samples",
    "percentiles_from_histogram",
    "pack",
    "unpack",
]

_F64 = torch.float64
_I64 = torch.int64
_MAGIC = 20251201.0  # the first value of every packed buffer: a layout check
_HEADER = 7  # magic, L, B + 2, sum of channels, K, has channels, checksum of keys and steps


# -- pure merges over a leading rank axis ------------------------------------------------------------
def merge_moments(count: Tensor, mean: Tensor, m2: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    r"""Chan's merge of ``W`` parts, folded pairwise: ``(W, ...)`` -> ``(...)``.

    Args:
        count: ``(W, ...)`` value counts :math:`n_r` (any numeric dtype; exact in float64 up to
            :math:`2^{53}`).
        mean, m2: ``(W, ...)`` means :math:`\mu_r` and :math:`M_{2,r} = \sum (x - \mu_r)^2`; entries
            of parts with :math:`n_r = 0` are ignored (they may be NaN).

    Returns:
        ``(n, mean, m2)`` of the union: ``n`` in ``count``'s dtype, the others float64; mean and
        m2 are 0 where ``n == 0``.
    """
    n = torch.zeros(count.shape[1:], dtype=_F64, device=count.device)
    mu = torch.zeros_like(n)
    s = torch.zeros_like(n)
    for r in range(count.shape[0]):
        nb = count[r].to(_F64)
        has = nb > 0
        mb = torch.where(has, mean[r].to(_F64), 0.0)
        sb = torch.where(has, m2[r].to(_F64), 0.0)
        tot = n + nb
        safe = torch.where(tot > 0, tot, 1.0)
        delta = mb - mu
        mu = torch.where(has, mu + delta * nb / safe, mu)
        s = torch.where(has, s + sb + delta * delta * n * nb / safe, s)
        n = tot
    return count.sum(0), mu, s


def merge_extrema(mins: Tensor, maxs: Tensor) -> tuple[Tensor, Tensor]:
    """``(W, ...)`` minima and maxima -> their min and max (NaN-free by the LayerStats contract)."""
    return mins.amin(0), maxs.amax(0)


def merge_samples(sample: Tensor, sample_count: Tensor) -> tuple[Tensor, Tensor]:
    """Concatenate each row's valid sample values over the ranks.

    Args:
        sample: ``(W, L, K)``: row ``l`` of rank ``r`` holds ``sample_count[r, l]`` values first,
            then padding.
        sample_count: ``(W, L)`` int64.

    Returns:
        ``(merged (L, K'), counts (L,))`` with ``K' = max(1, max_l sum_r sample_count[r, l])``: each row's
        values (rank 0's, then rank 1's, ...) first, then NaN padding.
    """
    w, L, k = sample.shape
    counts = sample_count.sum(0)  # (L,)
    width = max(int(counts.max()) if L else 0, 1)  # at least one (NaN) column, as a flush makes
    valid = torch.arange(k, device=sample.device)[None, None, :] < sample_count[:, :, None]  # (W, L, K)
    rows = valid.permute(1, 0, 2).reshape(L, w * k)  # (L, W*K), rank-major within a row
    vals = sample.permute(1, 0, 2).reshape(L, w * k)
    # position of each valid value in its merged row: the number of valid values before it
    pos = rows.long().cumsum(1) - 1
    merged = torch.full((L, width), float("nan"), dtype=sample.dtype, device=sample.device)
    r_idx = torch.arange(L, device=sample.device)[:, None].expand(L, w * k)
    merged[r_idx[rows], pos[rows]] = vals[rows]
    return merged, counts


def percentiles_from_histogram(
    hist: Tensor, edges: Tensor, qs: Sequence[float], min: Tensor, max: Tensor
) -> Tensor:
    r"""Percentiles from fixed-edge histogram counts, by linear interpolation inside a bin.

    The counts ``(L, B + 2)`` are ``[underflow, bin_0, ..., bin_{B-1}, overflow]`` on ``edges``
    ``(B + 1,)``; the underflow spans ``[min, e_0]`` and the overflow ``[e_B, max]``. Percentile
    :math:`q` is the point where the piecewise-linear CDF through the bin boundaries reaches
    :math:`q\,n/100`. Within the edges its error against the exact percentile is at most one bin
    width (both lie in the same bin); in a tail, at most the tail's width. A row with no values gives
    NaN. Returns ``(L, P)`` float64.
    """
    hist = hist.to(_F64)
    L = hist.shape[0]
    e = edges.to(_F64, copy=False).to(hist.device)
    lo = torch.minimum(min.to(_F64), e[0])
    hi = torch.maximum(max.to(_F64), e[-1])
    bounds = torch.cat([lo[:, None], e.expand(L, -1), hi[:, None]], dim=1)  # (L, B + 3)
    cdf = torch.cat([torch.zeros(L, 1, dtype=_F64, device=hist.device), hist.cumsum(1)], dim=1)  # (L, B + 3)
    n = cdf[:, -1:]
    target = torch.tensor([q / 100.0 for q in qs], dtype=_F64, device=hist.device)[None, :] * n  # (L, P)
    # the first boundary where the CDF reaches the target, and interpolation in the bin before it
    j = torch.searchsorted(cdf.contiguous(), target.contiguous(), side="left").clamp(1, cdf.shape[1] - 1)
    c0, c1 = cdf.gather(1, j - 1), cdf.gather(1, j)
    b0, b1 = bounds.gather(1, j - 1), bounds.gather(1, j)
    frac = torch.where(c1 > c0, (target - c0) / (c1 - c0).clamp_min(1e-300), 0.0)
    out = b0 + frac * (b1 - b0)
    # no percentile lies outside the data: empty tails (or bins) would otherwise pull q=0 to e_0
    out = torch.minimum(torch.maximum(out, min.to(_F64)[:, None]), max.to(_F64)[:, None])
    return torch.where(n > 0, out, torch.nan)


# -- one buffer per rank -----------------------------------------------------------------------------
def _checksum(stats: LayerStats) -> float:
    text = "\n".join(f"{k!r}@{int(s)}" for k, s in zip(stats.keys, stats.steps.tolist()))
    return float(zlib.crc32(text.encode()))


def _header(stats: LayerStats, k: int) -> Tensor:
    b2 = stats.hist.shape[1] if stats.hist.dim() == 2 else 0
    has_ch = stats.channel_sizes is not None
    ctot = int(stats.channel_sizes.sum()) if has_ch else 0
    return torch.tensor([_MAGIC, len(stats), b2, ctot, k, float(has_ch), _checksum(stats)], dtype=_F64)


def pack(stats: LayerStats, sample_width: Optional[int] = None) -> Tensor:
    """Every field of ``stats`` in one float64 vector (header first), samples padded to ``sample_width``.

    Counts are exact in float64 (below :math:`2^{53}`), float32 samples too. Layout: header
    ``[magic, L, B+2, sum C, K, has channels, checksum]``, then per row ``count, mean, m2, min, max,
    n_nonfinite, n_saturated, n_nonpositive, sample_count`` (9 L), ``hist`` (L (B+2)), then, with
    channels, ``channel_sizes, channel_count`` (2 L) and ``channel_mean, channel_m2, channel_max``
    (3 sum C), and last ``sample`` (L K, NaN padding).
    """
    L = len(stats)
    dev = stats.count.device
    k_local = stats.sample.shape[1] if stats.sample.dim() == 2 else 0
    k = k_local if sample_width is None else int(sample_width)
    if k < k_local:
        raise ValueError(
            f"sample_width: expected at least the sample width of this rank's records ({k_local}), "
            f"got {k}. Pass the monitor's sample_size."
        )
    header = _header(stats, k).to(dev)
    has_ch = stats.channel_sizes is not None
    rows = torch.stack(
        [stats.count, stats.mean, stats.m2, stats.min, stats.max, stats.n_nonfinite,
         stats.n_saturated, stats.n_nonpositive, stats.sample_count]
    ).to(dev, _F64).reshape(-1) if L else torch.zeros(0, dtype=_F64, device=dev)
    parts = [header, rows, stats.hist.to(dev, _F64).reshape(-1)]
    if has_ch:
        parts += [stats.channel_sizes.to(dev, _F64), stats.channel_count.to(dev, _F64)]
        parts += [getattr(stats, f).to(dev, _F64).reshape(-1) for f in ("channel_mean", "channel_m2", "channel_max")]
    sample = torch.full((L, k), float("nan"), dtype=_F64, device=dev)
    if k_local:
        sample[:, :k_local] = stats.sample.to(dev, _F64)
    parts.append(sample.reshape(-1))
    return torch.cat(parts)


def unpack(buf: Tensor, like: LayerStats) -> LayerStats:
    """The inverse of :func:`pack` for ``(W, size)`` gathered buffers: a LayerStats whose tensors have
    a leading ``W`` axis (``keys`` and ``steps`` from ``like``), in ``like``'s dtypes."""
    w = buf.shape[0]
    head = buf[:, :_HEADER]
    L, b2, ctot, k, has_ch = (int(v) for v in head[0, 1:6].tolist())
    at = _HEADER

    def take(n: int, shape: tuple) -> Tensor:
        nonlocal at
        out = buf[:, at : at + n].reshape(w, *shape)
        at += n
        return out

    rows = take(9 * L, (9, L))
    hist = take(L * b2, (L, b2))
    ch = {}
    if has_ch:
        ch["channel_sizes"] = take(L, (L,)).to(_I64)
        ch["channel_count"] = take(L, (L,)).to(_I64)
        for f in ("channel_mean", "channel_m2", "channel_max"):
            ch[f] = take(ctot, (ctot,))
    sample = take(L * k, (L, k)).to(like.sample.dtype)
    ints = lambda t: t.to(_I64)  # noqa: E731
    return LayerStats(
        keys=like.keys, steps=like.steps,
        count=ints(rows[:, 0]), mean=rows[:, 1], m2=rows[:, 2], min=rows[:, 3], max=rows[:, 4],
        n_nonfinite=ints(rows[:, 5]), hist=ints(hist), n_saturated=ints(rows[:, 6]),
        n_nonpositive=ints(rows[:, 7]), sample=sample, sample_count=ints(rows[:, 8]), **ch,
    )


def _check_headers(heads: Tensor) -> None:
    """Raise the same error on every rank when the ranks' rows do not correspond."""
    h = heads.tolist()
    names = ["layout", "rows", "histogram width", "channels", None, "per-channel statistics", "keys/steps"]
    bad = [names[i] for i in range(_HEADER) if names[i] and any(r[i] != h[0][i] for r in h)]
    if bad:
        raise RuntimeError(
            f"merge_across_ranks: expected the same records on every rank (same modules, steps and "
            f"order), got ranks that differ in {', '.join(bad)}: headers {h}. Every rank must watch "
            "the same layers with the same MonitorConfig and flush at the same steps."
        )


def merge_across_ranks(
    batch_stats: LayerStats, group: Optional["dist.ProcessGroup"] = None, *, sample_width: Optional[int] = None
) -> LayerStats:
    """Merge the ranks' statistics of the same records into the statistics of the whole batch.

    Collective: every rank of ``group`` must call it with its own ``batch_stats`` (rows in the same
    order; a rank that saw no values gives rows with ``count == 0``). Every rank returns the same
    merged :class:`LayerStats`, on ``batch_stats``'s device.

    Args:
        batch_stats: this rank's records.
        group: the process group (default the world).
        sample_width: the widest sample any rank can have (``MonitorConfig.sample_size``). Given,
            the merge is exactly one ``all_gather``; omitted, one tiny ``all_gather`` of the ranks'
            sample widths comes first, and the samples travel at the widest rank's width only.

    Raises:
        RuntimeError: no process group is initialized, or the ranks' rows do not correspond.
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "merge_across_ranks: expected an initialized torch.distributed process group, got none. "
            "Call torch.distributed.init_process_group first, or use per-rank statistics."
        )
    world = dist.get_world_size(group)
    dev = batch_stats.count.device
    # gloo reduces host tensors; NCCL (and others) the device's
    comm = torch.device("cpu") if dist.get_backend(group) == "gloo" else dev
    if sample_width is None:  # agree on the width first (and check the rows before the big gather)
        head = _header(batch_stats, batch_stats.sample.shape[1] if batch_stats.sample.dim() == 2 else 0).to(comm)
        heads = [torch.empty_like(head) for _ in range(world)]
        dist.all_gather(heads, head, group=group)
        heads = torch.stack(heads)
        _check_headers(heads)
        sample_width = int(heads[:, 4].max())
    mine = pack(batch_stats, sample_width).to(comm)
    gathered = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(gathered, mine, group=group)
    buf = torch.stack(gathered)  # (W, size)
    _check_headers(buf[:, :_HEADER])
    parts = unpack(buf, batch_stats)
    return _merge(parts, batch_stats, dev)


def _merge(p: LayerStats, like: LayerStats, dev: torch.device) -> LayerStats:
    count, mean, m2 = merge_moments(p.count, p.mean, p.m2)
    mn, mx = merge_extrema(torch.where(p.count > 0, p.min, torch.inf), torch.where(p.count > 0, p.max, -torch.inf))
    sample, sample_count = merge_samples(p.sample, p.sample_count)
    ch = {}
    if p.channel_sizes is not None:
        sizes = p.channel_sizes[0]
        per_ch = p.channel_count.repeat_interleave(sizes, dim=1)  # (W, sum C): values per channel
        cn, cm, cs = merge_moments(per_ch, p.channel_mean, p.channel_m2)
        cx = torch.where(per_ch > 0, p.channel_max, -torch.inf).amax(0)
        ch = dict(channel_sizes=sizes, channel_count=p.channel_count.sum(0), channel_mean=cm, channel_m2=cs, channel_max=cx)
        ch = {k: v.to(dev) for k, v in ch.items()}
    out = LayerStats(
        keys=list(like.keys), steps=like.steps.clone(),
        count=count, mean=mean, m2=m2, min=mn, max=mx,
        n_nonfinite=p.n_nonfinite.sum(0), hist=p.hist.sum(0), n_saturated=p.n_saturated.sum(0),
        n_nonpositive=p.n_nonpositive.sum(0), sample=sample, sample_count=sample_count, **ch,
    )
    for f in dataclasses.fields(LayerStats):
        v = getattr(out, f.name)
        if isinstance(v, Tensor) and f.name != "steps":
            setattr(out, f.name, v.to(dev))
    return out
