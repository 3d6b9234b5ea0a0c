r"""Distributional internal covariate shift: how much a layer's input distribution moves.

Pure functions of the recorded summaries (no torch, no state). Each sequence function takes arrays
indexed by checkpoint, ``(T, ...)``, and returns ``(T, ...)`` aligned with the steps, comparing
checkpoint :math:`t` with a reference :math:`r`:

* ``reference="previous"``: :math:`r = t - 1` (consecutive checkpoints); element 0 is NaN;
* ``reference="first"``: :math:`r = 0` (drift since the first checkpoint); element 0 is 0.

The measures, for distributions :math:`P_r, P_t` with means :math:`\mu` and stds :math:`\sigma`:

.. math::

    \text{mean shift} = \frac{\mu_t - \mu_r}{\sqrt{(\sigma_r^2 + \sigma_t^2)/2}}, \qquad
    \text{log std ratio} = \ln\frac{\sigma_t}{\sigma_r}

.. math::

    W_1(P_r, P_t) = \int_{-\infty}^{\infty} |F_r(x) - F_t(x)|\,dx, \qquad
    \mathrm{JS}(p, q) = \tfrac12 \mathrm{KL}(p\,\|\,m) + \tfrac12 \mathrm{KL}(q\,\|\,m),\ m = \tfrac{p+q}2

The mean shift uses the pooled std, so it is symmetric and reads like Cohen's d. :math:`W_1` is in
the activation's units; it is computed exactly between the *histogram* distributions: each bin's
mass spread uniformly over the bin, the underflow mass over ``[min, edges[0]]`` and the overflow
mass over ``[edges[-1], max]`` (with the recorded min and max). It approximates the true
:math:`W_1` to within about a bin width when little mass falls in the tails; uniform tails
overstate the spread of real ones, which thin out (a wider ``hist_range`` fixes that). JS is over the ``B + 2`` fixed-edge bins, tails
included, with logarithms in base 2 by default, so :math:`0 \le \mathrm{JS} \le 1`. (SciPy's
``jensenshannon`` returns the JS *distance*, the square root of this divergence.)
"""

from __future__ import annotations

import math
from typing import Literal, Optional, Sequence

import numpy as np

__all__ = [
    "Reference",
    "mean_shift",
    "log_std_ratio",
    "wasserstein1",
    "js_divergence",
    "histogram_w1",
    "histogram_js",
    "layer_drift",
    "drift_table",
]

Reference = Literal["previous", "first"]


def _reference(x: np.ndarray, reference: Reference) -> np.ndarray:
    """The reference value for every checkpoint: ``x[t-1]`` (NaN at 0) or ``x[0]``."""
    if reference == "first":
        return np.broadcast_to(x[:1], x.shape)
    if reference == "previous":
        ref = np.full(x.shape, np.nan)
        ref[1:] = x[:-1]
        return ref
    raise ValueError(
        f"reference: expected 'previous' (consecutive checkpoints) or 'first', got {reference!r}."
    )


def mean_shift(mean: np.ndarray, std: np.ndarray, reference: Reference = "previous") -> np.ndarray:
    """Shift of the mean in units of the pooled std, ``(T, ...)`` from ``mean``, ``std`` ``(T, ...)``."""
    mean, std = np.asarray(mean, np.float64), np.asarray(std, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        pooled = np.sqrt((std**2 + _reference(std, reference) ** 2) / 2)
        return (mean - _reference(mean, reference)) / pooled


def log_std_ratio(std: np.ndarray, reference: Reference = "previous") -> np.ndarray:
    """Natural log of ``std[t] / std[ref]``, ``(T, ...)``."""
    std = np.asarray(std, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.log(std / _reference(std, reference))


def _ranges(edges: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Where the tail masses end: ``lo <= e_0`` and ``hi >= e_B``, an unknown (non-finite) end at the edge."""
    lo = np.where(np.isfinite(lo), np.minimum(lo, edges[0]), edges[0])
    hi = np.where(np.isfinite(hi), np.maximum(hi, edges[-1]), edges[-1])
    return lo, hi


def _cdf(g: np.ndarray, edges: np.ndarray, p: np.ndarray, lo: np.ndarray, hi: np.ndarray, right: bool) -> np.ndarray:
    """CDF of piecewise-uniform histograms at points ``g`` ``(T, G)``: right limits, or left limits.

    Row ``t`` has normalized masses ``p[t]`` ``(B + 2,)`` (underflow, B bins, overflow): each bin's
    mass uniform on it, the underflow's on ``[lo_t, e_0]``, the overflow's on ``[e_B, hi_t]``; a
    tail whose range has no width is a point mass on the edge (where the two limits differ).
    """
    B = len(edges) - 1
    under, bins, over = p[:, :1], p[:, 1:-1], p[:, -1:]
    below = under + np.concatenate([np.zeros_like(under), np.cumsum(bins, axis=1)[:, :-1]], axis=1)  # (T, B): mass below e_k
    side = "right" if right else "left"
    k = np.clip(np.searchsorted(edges, g, side=side) - 1, 0, B - 1)  # e_k <= g < e_k+1 (right), e_k < g <= e_k+1 (left)
    rows = np.arange(g.shape[0])[:, None]
    e_k, w_k = edges[k], np.diff(edges)[k]
    inner = below[rows, k] + bins[rows, k] * np.clip((g - e_k) / w_k, 0.0, 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        tail_lo = under * np.clip((g - lo) / (edges[0] - lo), 0.0, 1.0)
        tail_hi = (1.0 - over) + over * np.clip((g - edges[-1]) / (hi - edges[-1]), 0.0, 1.0)
    if right:
        return np.select([g >= hi, g >= edges[-1], g >= edges[0], g >= lo], [1.0, tail_hi, inner, tail_lo], 0.0)
    return np.select([g > hi, g > edges[-1], g > edges[0], g > lo], [1.0, tail_hi, inner, tail_lo], 0.0)


def _w1_pairs(edges, counts_p, counts_q, lo_p, hi_p, lo_q, hi_q) -> np.ndarray:
    """:func:`histogram_w1` of ``T`` pairs at once: counts ``(T, B + 2)``, ranges ``(T,)``."""
    cp, cq = np.asarray(counts_p, np.float64), np.asarray(counts_q, np.float64)
    sp, sq = cp.sum(axis=1, keepdims=True), cq.sum(axis=1, keepdims=True)
    empty = (sp[:, 0] <= 0) | (sq[:, 0] <= 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        p, q = np.where(sp > 0, cp / sp, 0.0), np.where(sq > 0, cq / sq, 0.0)
    lo_p, hi_p = _ranges(edges, lo_p, hi_p)
    lo_q, hi_q = _ranges(edges, lo_q, hi_q)
    T = cp.shape[0]
    # Every knot of either CDF (a repeated point only adds an interval of zero width): on each open
    # interval between consecutive grid points both CDFs are linear, so |F_p - F_q| integrates exactly
    # from its values just inside both ends.
    grid = np.sort(np.concatenate([np.broadcast_to(edges, (T, len(edges))), np.stack([lo_p, hi_p, lo_q, hi_q], axis=1)], axis=1), axis=1)
    a, b = grid[:, :-1], grid[:, 1:]
    d0 = _cdf(a, edges, p, lo_p[:, None], hi_p[:, None], True) - _cdf(a, edges, q, lo_q[:, None], hi_q[:, None], True)
    d1 = _cdf(b, edges, p, lo_p[:, None], hi_p[:, None], False) - _cdf(b, edges, q, lo_q[:, None], hi_q[:, None], False)
    h = b - a
    with np.errstate(divide="ignore", invalid="ignore"):
        crossing = (d0**2 + d1**2) / (2 * (np.abs(d0) + np.abs(d1)))  # |d| over an interval where d changes sign
    area = np.where(h > 0, np.where(d0 * d1 >= 0, (np.abs(d0) + np.abs(d1)) / 2, crossing) * h, 0.0)
    return np.where(empty, np.nan, area.sum(axis=1))


def histogram_w1(
    edges: np.ndarray,
    counts_p: np.ndarray,
    counts_q: np.ndarray,
    range_p: Optional[tuple[float, float]] = None,
    range_q: Optional[tuple[float, float]] = None,
) -> float:
    """Exact 1-Wasserstein distance between two histograms on the same edges.

    Args:
        edges: ``(B + 1,)``; counts_p, counts_q: ``(B + 2,)`` with underflow and overflow first/last.
        range_p, range_q: ``(min, max)`` of each distribution, over which the tail masses are
            spread uniformly; ``None`` (or non-finite) puts the tail mass on the outer edge.

    Returns:
        :math:`\\int |F_p - F_q| dx` for the piecewise-uniform distributions; NaN if a histogram is
        empty.
    """
    edges = np.asarray(edges, np.float64)
    # one pair: each range as (1,) arrays, a missing end as NaN (then the tail sits on the edge)
    (lp, hp), (lq, hq) = [np.array([math.nan if v is None else v for v in (r or (None, None))], np.float64)[:, None]
                          for r in (range_p, range_q)]
    return float(_w1_pairs(edges, np.asarray(counts_p)[None], np.asarray(counts_q)[None], lp, hp, lq, hq)[0])


def histogram_js(counts_p: np.ndarray, counts_q: np.ndarray, base: float = 2.0) -> np.ndarray:
    """Jensen-Shannon divergence of histograms over their last axis (normalized here), in ``base``.

    ``0 log 0 = 0``; NaN where a histogram is empty. Broadcasts over leading axes.
    """
    p = np.asarray(counts_p, np.float64)
    q = np.asarray(counts_q, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        p = p / p.sum(axis=-1, keepdims=True)
        q = q / q.sum(axis=-1, keepdims=True)
        m = (p + q) / 2
        kl_p = np.where(p > 0, p * np.log(p / m), 0.0).sum(axis=-1)
        kl_q = np.where(q > 0, q * np.log(q / m), 0.0).sum(axis=-1)
    return (kl_p + kl_q) / 2 / math.log(base)


def js_divergence(counts: np.ndarray, reference: Reference = "previous", base: float = 2.0) -> np.ndarray:
    """JS divergence of each checkpoint's histogram ``counts`` ``(T, B + 2)`` from its reference."""
    counts = np.asarray(counts, np.float64)
    return histogram_js(counts, _reference(counts, reference), base)


def wasserstein1(
    edges: np.ndarray,
    counts: np.ndarray,
    minimum: Optional[np.ndarray] = None,
    maximum: Optional[np.ndarray] = None,
    reference: Reference = "previous",
) -> np.ndarray:
    """:func:`histogram_w1` of each checkpoint from its reference, ``(T,)``.

    Args:
        edges: ``(B + 1,)``; counts: ``(T, B + 2)``; minimum, maximum: ``(T,)`` recorded min and
            max (where the tail masses end), or ``None``.
    """
    counts = np.asarray(counts, np.float64)
    T = counts.shape[0]
    lo = np.full(T, np.nan) if minimum is None else np.asarray(minimum, np.float64)
    hi = np.full(T, np.nan) if maximum is None else np.asarray(maximum, np.float64)
    _reference(lo, reference)  # validates `reference`
    out = np.full(T, np.nan)
    edges = np.asarray(edges, np.float64)
    t = np.arange(1, T) if reference == "previous" else np.arange(T)  # rows with a reference
    if len(t):
        r = t - 1 if reference == "previous" else np.zeros_like(t)
        out[t] = _w1_pairs(edges, counts[r], counts[t], lo[r], hi[r], lo[t], hi[t])
    return out


def layer_drift(records, layer: str, reference: Reference = "previous") -> dict[str, np.ndarray]:
    """All four drift measures of one recorded layer, aligned with its steps.

    Args:
        records: an :class:`~covshift.monitor.ActivationMonitor` or the
            :class:`~covshift.monitor.MonitorRecords` of :func:`covshift.monitor.load` (anything
            with ``series`` and ``histograms``).
        layer: a layer name from ``records.layers``.

    Returns:
        ``{"steps", "mean_shift", "log_std_ratio", "w1", "js"}``, each ``(T,)``. The histogram
        measures are NaN at steps that have no histogram (possible in a run read back after a
        crash, whose npz lags its JSON Lines).
    """
    steps, mean = records.series(layer, "mean")
    _, std = records.series(layer, "std")
    _, lo = records.series(layer, "min")
    _, hi = records.series(layer, "max")
    h = records.histograms(layer)
    w1 = np.full(len(steps), np.nan)
    js = np.full(len(steps), np.nan)
    if len(h.steps):
        at = np.searchsorted(steps, h.steps)  # rows of the histogram steps among all steps
        w1[at] = wasserstein1(h.edges, h.counts, lo[at], hi[at], reference)
        js[at] = js_divergence(h.counts, reference)
    return {
        "steps": steps,
        "mean_shift": mean_shift(mean, std, reference),
        "log_std_ratio": log_std_ratio(std, reference),
        "w1": w1,
        "js": js,
    }


def drift_table(
    records, layers: Optional[Sequence[str]] = None, reference: Reference = "previous"
) -> list[dict]:
    """Tidy rows ``{"step", "layer", "stat", "value"}`` of :func:`layer_drift` for many layers."""
    rows: list[dict] = []
    for layer in records.layers if layers is None else layers:
        d = layer_drift(records, layer, reference)
        for stat in ("mean_shift", "log_std_ratio", "w1", "js"):
            rows += [
                {"step": int(s), "layer": layer, "stat": stat, "value": float(v)}
                for s, v in zip(d["steps"], d[stat])
            ]
    return rows
