r"""Statistics of activation tensors, computed on the tensor's own device, in two stages.

**Stage 1, in the forward hook** (:func:`reduce`): a few reductions over the *whole* tensor and a
copy of a bounded sample of its values. No host sync (no ``.item()``, no ``.cpu()``, no
data-dependent Python branch), and nothing that aliases the activation is kept, so an in-place op
that runs later (``ReLU(inplace=True)``) cannot change what was measured.

For the :math:`n` values :math:`x_j` of the tensor, in float32 (float64 for float64 input):

.. math::

    \mu = \frac1n \sum_j x_j, \qquad
    S = \sum_j (x_j - \mu)^2, \qquad \sigma = \sqrt{S / n}\ \text{(population std)},
    \qquad \min_j x_j, \quad \max_j x_j

:math:`S` uses the two-pass algorithm (mean first, then squared deviations), which does not
cancel the way :math:`E[x^2] - E[x]^2` does when :math:`|\mu| \gg \sigma`. (``torch.var_mean``
would do too, but its Welford kernel is ~15x slower on CPU than ``mean`` + ``sub`` + ``dot``.)

The sample is every value when :math:`n \le` ``sample_size``, else the values at a fixed, uniformly
random set of positions (:func:`sample_positions`), drawn once per tensor size from a private
generator (the global RNG is never touched).

**Stage 2, at flush, batched over records** (:func:`sort_rows`, :func:`percentiles_sorted`,
:func:`counts_sorted`): the samples of one layer are stacked to ``(R, n)`` and sorted once; then

* percentile :math:`q`: linear interpolation between order statistics, NumPy's default:
  :math:`h = (n-1) q / 100`, value :math:`s_{\lfloor h\rfloor} + (h - \lfloor h\rfloor)
  (s_{\lfloor h\rfloor+1} - s_{\lfloor h\rfloor})`;
* histogram over fixed edges :math:`e_0 < \dots < e_B`: bins :math:`[e_k, e_{k+1})`, the last one
  closed, like ``numpy.histogram``; plus an underflow count (:math:`x < e_0`) and an overflow
  count (:math:`x > e_B`, NaN included), so the ``B + 2`` counts add up to :math:`n`;
* saturated count :math:`\#\{|x| > t\}` (NaN included) and non-positive count
  :math:`\#\{x \le 0\}` (the values a ReLU sets to exactly zero);

all by binary search (``searchsorted``) in the sorted rows, so one sort serves every statistic.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "Reduced",
    "reduce",
    "sample_positions",
    "sort_rows",
    "percentiles_sorted",
    "counts_sorted",
    "auto_edges",
    "fixed_edges",
    "to_host",
]


class Reduced(NamedTuple):
    """Stage-1 result for one activation: device tensors, nothing aliasing the activation."""

    mean: Tensor  # ()
    sq_dev: Tensor  # () sum of squared deviations from the mean, S
    min: Tensor  # ()
    max: Tensor  # ()
    sample: Tensor  # (k,) with k = min(numel, sample_size), a copy
    numel: int
    # Per channel (dim 1), when asked for and the tensor has one: mean (C,), var (C,), max (C,).
    channel: Optional[tuple[Tensor, Tensor, Tensor]] = None


def sample_positions(numel: int, size: int, seed: int, device: torch.device) -> Tensor:
    """``size`` distinct flat positions in ``[0, numel)``, uniformly at random, sorted (for locality).

    A pure function of its arguments: a private ``torch.Generator`` seeded with ``(seed, numel)``
    draws them, so the same tensor size gets the same positions on every call and in every run.
    """
    g = torch.Generator().manual_seed(seed * 1_000_003 + numel)
    pos = torch.randperm(numel, generator=g)[:size]
    return pos.sort().values.to(device)


def reduce(x: Tensor, positions: Optional[Tensor] = None, per_channel: bool = False) -> Reduced:
    """Stage 1: moments, range and a sample of ``x``, on ``x``'s device, without syncing.

    Args:
        x: the activation, any shape with ``numel() > 0``; integer, bool and half-precision input
            is measured in float32.
        positions: flat positions to sample (see :func:`sample_positions`), or ``None`` to take
            every value.
        per_channel: also reduce per channel (dim 1) when ``x`` has at least 2 dims.
    """
    x = x.detach()
    copied = x.dtype not in (torch.float32, torch.float64)
    if copied:
        x = x.float()
    mean = x.mean()
    d = (x - mean).reshape(-1)  # fresh tensor; reshape copies only for exotic strides
    sq_dev = torch.dot(d, d)
    mn, mx = torch.aminmax(x)
    if positions is not None:
        sample = torch.take(x, positions)  # a copy; reads x in logical (row-major) order
    else:
        sample = x.reshape(-1)
        if not copied:
            sample = sample.clone()  # never keep a view of the activation

    channel = None
    if per_channel and x.dim() >= 2:
        dims = [0, *range(2, x.dim())]
        c_mean = x.mean(dims)  # (C,)
        cd = x - c_mean.reshape(1, -1, *([1] * (x.dim() - 2)))  # (N, C, *)
        c_var = cd.square_().mean(dims)  # (C,), population variance, two-pass
        channel = (c_mean, c_var, x.amax(dims))
    return Reduced(mean, sq_dev, mn, mx, sample, x.numel(), channel)


def sort_rows(x: Tensor) -> Tensor:
    """Sort each row of ``(R, n)``, NaN last.

    On CPU this calls ``numpy.sort`` (the data is already on the host): in our measurements
    ``torch.sort`` on CPU was ~10x slower, which is most of the monitor's cost at ``every=1``.
    """
    if x.device.type == "cpu":
        return torch.from_numpy(np.sort(x.numpy(), axis=-1))
    return torch.sort(x, dim=-1).values


def _percentile_index(n: int, qs: Sequence[float]) -> tuple[list[int], list[int], list[float]]:
    lo, hi, frac = [], [], []
    for q in qs:
        h = (n - 1) * q / 100.0
        f = math.floor(h)
        lo.append(f)
        hi.append(min(f + 1, n - 1))
        frac.append(h - f)
    return lo, hi, frac


def percentiles_sorted(s: Tensor, qs: Sequence[float]) -> Tensor:
    """Percentiles ``qs`` (in [0, 100]) of each sorted row of ``s`` ``(R, n)`` -> ``(R, P)``.

    Linear interpolation, as ``numpy.percentile(method="linear")``; positions depend on ``n``
    only, so nothing is read back from the device.
    """
    lo, hi, frac = _percentile_index(s.shape[-1], qs)
    idx = torch.tensor(lo + hi, device=s.device)
    v = s.index_select(-1, idx)  # (R, 2P)
    a, b = v[..., : len(qs)], v[..., len(qs) :]
    w = torch.tensor(frac, dtype=s.dtype, device=s.device)
    return a + (b - a) * w


def counts_sorted(
    s: Tensor, edges: Optional[Tensor], threshold: float
) -> tuple[Optional[Tensor], Tensor, Tensor]:
    """Histogram with tails, saturated and non-positive counts of each sorted row of ``s``.

    Args:
        s: ``(R, n)``, each row sorted ascending.
        edges: ``(B + 1,)`` increasing, in ``s``'s dtype and device; ``None`` for no histogram.
        threshold: the saturation threshold ``t``.

    Returns:
        ``(hist, n_saturated, n_nonpositive)``: ``hist`` is ``(R, B + 2)`` int64 ordered
        ``[underflow, bin_0, ..., bin_{B-1}, overflow]`` (or ``None``); the others are ``(R,)``.
    """
    R, n = s.shape
    # searchsorted assumes a total order; NaN (sorted last) would break it: search as +inf, so NaN
    # counts as overflow and as saturated.
    s = torch.nan_to_num(s, nan=math.inf, posinf=math.inf, neginf=-math.inf)
    t = torch.tensor([-threshold], dtype=s.dtype, device=s.device)
    left = t if edges is None else torch.cat([edges[:-1], t])
    right = torch.tensor([threshold, 0.0], dtype=s.dtype, device=s.device)
    if edges is not None:
        right = torch.cat([edges[-1:], right])
    # #(x < v) for v in `left`, #(x <= v) for v in `right`
    lt = torch.searchsorted(s, left.expand(R, -1).contiguous())
    le = torch.searchsorted(s, right.expand(R, -1).contiguous(), right=True)
    n_saturated = lt[:, -1] + (n - le[:, -2])
    n_nonpositive = le[:, -1]
    if edges is None:
        return None, n_saturated, n_nonpositive
    below = torch.cat([lt[:, :-1], le[:, :1]], dim=1)  # #(x < e_k), k < B; #(x <= e_B)  (R, B+1)
    inner = below.diff(dim=1)  # (R, B)
    hist = torch.cat([below[:, :1], inner, n - le[:, :1]], dim=1)
    return hist, n_saturated, n_nonpositive


def _representable(edges: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    """Round edges to ``dtype`` (the comparisons happen there) and back to float64."""
    np_dtype = np.float64 if dtype == torch.float64 else np.float32
    return edges.astype(np_dtype).astype(np.float64)


def fixed_edges(lo: float, hi: float, bins: int, dtype: torch.dtype) -> np.ndarray:
    """``bins + 1`` evenly spaced edges from ``lo`` to ``hi``, exactly representable in ``dtype``."""
    e = _representable(np.linspace(lo, hi, bins + 1), dtype)
    if not np.all(np.diff(e) > 0):
        raise ValueError(
            f"hist_range: expected a range wide enough for {bins} distinct bins in {dtype}, got "
            f"({lo}, {hi}). Widen the range or use fewer bins."
        )
    return e


def auto_edges(sorted_row: np.ndarray, bins: int, pad: float, dtype: torch.dtype) -> np.ndarray:
    r"""Edges decided from one (first) measurement, then kept for the whole run.

    With :math:`w = p_{99} - p_1` of the sample, the range is
    :math:`[p_1 - \text{pad}\,w,\ p_{99} + \text{pad}\,w]`; percentiles rather than min/max so that a
    single outlier does not stretch every bin. A degenerate sample (constant, or non-finite) falls
    back to its min/max, then to a width of ``max(1e-6, 1e-4 |center|)`` around its median (or 0).
    """
    x = sorted_row[np.isfinite(sorted_row)]
    if x.size == 0:
        p1 = p99 = center = 0.0
    else:
        p1, center, p99 = np.percentile(x, [1.0, 50.0, 99.0])
        if not p99 > p1:
            p1, p99 = float(x[0]), float(x[-1])
    w = max(p99 - p1, 1e-6, 1e-4 * abs(float(center)))
    if not p99 > p1:
        p1, p99 = center - w / 2, center + w / 2
    return _representable(np.linspace(p1 - pad * w, p99 + pad * w, bins + 1), dtype)


def to_host(tensors: Sequence[Tensor]) -> list[np.ndarray]:
    """Move many small tensors to the host with one copy per (device, dtype) group."""
    out: list[Optional[np.ndarray]] = [None] * len(tensors)
    groups: dict[tuple, list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.device, t.dtype), []).append(i)
    for idx in groups.values():
        flat = torch.cat([tensors[i].reshape(-1) for i in idx]).cpu().numpy()
        start = 0
        for i in idx:
            size = tensors[i].numel()
            out[i] = flat[start : start + size].reshape(tuple(tensors[i].shape))
            start += size
    return out  # type: ignore[return-value]
