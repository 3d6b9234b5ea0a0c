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


def _segments(
    edges: np.ndarray, counts: np.ndarray, lo: Optional[float], hi: Optional[float]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Histogram as mass on segments ``[a_j, b_j]`` (``a_j == b_j``: a point mass)."""
    e0, eB = float(edges[0]), float(edges[-1])
    lo = e0 if lo is None or not math.isfinite(lo) else min(lo, e0)
    hi = eB if hi is None or not math.isfinite(hi) else max(hi, eB)
    a = np.concatenate([[lo], edges])
    b = np.concatenate([edges, [hi]])
    m = np.asarray(counts, np.float64)
    return a, b, m / m.sum()


def _cdf(x: np.ndarray, a: np.ndarray, b: np.ndarray, m: np.ndarray, right: bool) -> np.ndarray:
    """CDF at ``x`` of masses ``m`` uniform on ``[a, b]``; at a point mass, the right or left limit."""
    width = b - a
    with np.errstate(divide="ignore", invalid="ignore"):
        frac = np.clip((x[:, None] - a) / np.where(width > 0, width, 1), 0, 1)
    step = (x[:, None] >= a) if right else (x[:, None] > a)
    return (np.where(width > 0, frac, step) * m).sum(axis=1)


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
    if np.sum(counts_p) <= 0 or np.sum(counts_q) <= 0:
        return math.nan
    P = _segments(edges, counts_p, *(range_p or (None, None)))
    Q = _segments(edges, counts_q, *(range_q or (None, None)))
    grid = np.unique(np.concatenate([P[0], P[1], Q[0], Q[1]]))
    if grid.size < 2:
        return 0.0
    # On each open interval between grid points both CDFs are linear; take the difference just
    # inside both ends and integrate its absolute value exactly.
    d0 = _cdf(grid[:-1], *P, right=True) - _cdf(grid[:-1], *Q, right=True)
    d1 = _cdf(grid[1:], *P, right=False) - _cdf(grid[1:], *Q, right=False)
    h = np.diff(grid)
    same = d0 * d1 >= 0
    with np.errstate(divide="ignore", invalid="ignore"):
        crossing = (d0**2 + d1**2) / (2 * (np.abs(d0) + np.abs(d1)))
    area = np.where(same, (np.abs(d0) + np.abs(d1)) / 2, crossing) * h
    return float(area.sum())


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
    for t in range(T):
        r = t - 1 if reference == "previous" else 0
        if r >= 0:
            out[t] = histogram_w1(edges, counts[r], counts[t], (lo[r], hi[r]), (lo[t], hi[t]))
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
