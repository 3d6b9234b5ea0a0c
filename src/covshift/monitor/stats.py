r"""Statistics of activation tensors, computed on the tensor's own device, in two stages.

**Stage 1, in the forward hook** (:func:`reduce`): a copy of a bounded sample of the values, and,
when the sample is not the whole tensor, a few reductions over the *whole* tensor. No host sync
(no ``.item()``, no ``.cpu()``, no data-dependent Python branch), and nothing that aliases the
activation is kept, so an in-place op that runs later (``ReLU(inplace=True)``) cannot change what
was measured.

For the :math:`n` values :math:`x_j` of the tensor, in float32 (float64 for float64 input):

.. math::

    \mu = \frac1n \sum_j x_j, \qquad
    S = \sum_j (x_j - \mu)^2, \qquad \sigma = \sqrt{S / n}\ \text{(population std)},
    \qquad \min_j x_j, \quad \max_j x_j

:math:`S` uses the two-pass algorithm (mean first, then squared deviations), which does not
cancel the way :math:`E[x^2] - E[x]^2` does when :math:`|\mu| \gg \sigma`. (``torch.var_mean``
would do too, but its Welford kernel is ~15x slower on CPU than ``mean`` + ``sub`` + ``dot``.)

The sample is every value when :math:`n \le` ``sample_size``: then the hook only copies the
tensor, and the moments are computed at flush from the copies, batched over records (on CPU a
PyTorch op costs a few microseconds whatever its size, so fewer ops per hook is what makes
``every=1`` affordable on small layers). Otherwise the sample is the values at a fixed, uniformly
random set of positions (:func:`sample_positions`), drawn once per tensor size from a private
generator (the global RNG is never touched), and the moments are reduced in the hook.

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

import functools
import math
from typing import NamedTuple, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "Reduced",
    "reduce",
    "sample_positions",
    "moments_sorted",
    "sort_rows",
    "percentiles_sorted",
    "search_probes",
    "search_sorted",
    "counts_from_search",
    "counts_sorted",
    "auto_edges",
    "fixed_edges",
    "to_host",
]


class Reduced(NamedTuple):
    """Stage-1 result for one activation: device tensors, nothing aliasing the activation."""

    # Whole-tensor moments and range, each (); None when `sample` is every value (computed at
    # flush from the sample, see `moments_sorted`).
    mean: Optional[Tensor]
    sq_dev: Optional[Tensor]  # sum of squared deviations from the mean, S
    min: Optional[Tensor]
    max: Optional[Tensor]
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
    """Stage 1: a sample of ``x`` (and its moments and range if subsampled), without syncing.

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
    mean = sq_dev = mn = mx = None
    if positions is None:
        sample = x.reshape(-1)
        if not copied:
            sample = sample.clone()  # never keep a view of the activation
    else:
        sample = torch.take(x, positions)  # a copy; reads x in logical (row-major) order
        mean = x.mean()
        d = (x - mean).reshape(-1)  # fresh tensor; reshape copies only for exotic strides
        sq_dev = torch.dot(d, d)
        mn, mx = torch.aminmax(x)

    channel = None
    if per_channel and x.dim() >= 2:
        dims = [0, *range(2, x.dim())]
        c_mean = x.mean(dims)  # (C,)
        cd = x - c_mean.reshape(1, -1, *([1] * (x.dim() - 2)))  # (N, C, *)
        c_var = cd.square_().mean(dims)  # (C,), population variance, two-pass
        channel = (c_mean, c_var, x.amax(dims))
    return Reduced(mean, sq_dev, mn, mx, sample, x.numel(), channel)


def moments_sorted(s: Tensor, inplace: bool = False) -> Tensor:
    """``(R, 4)``: mean, S, min, max of each sorted row of ``s`` ``(R, n)`` (two-pass S).

    ``inplace`` overwrites ``s`` (with its squared deviations) instead of allocating two more
    ``(R, n)`` tensors: call it last.
    """
    mean = s.mean(dim=1, keepdim=True)  # (R, 1)
    ends = s[:, [0, -1]]  # (R, 2) min, max: a copy (advanced indexing)
    d = s.sub_(mean) if inplace else s - mean
    sq_dev = d.square_().sum(dim=1)  # (R,)
    return torch.cat([mean, sq_dev[:, None], ends], dim=1)


def sort_rows(x: Tensor, inplace: bool = False) -> Tensor:
    """Sort each row of ``(R, n)``, NaN last; ``inplace`` reuses ``x``'s memory.

    On CPU this calls ``numpy.sort`` (the data is already on the host): in our measurements
    ``torch.sort`` on CPU was ~10x slower, which is most of the monitor's cost at ``every=1``.
    """
    if x.device.type == "cpu":
        if inplace and x.is_contiguous():
            x.numpy().sort(axis=-1)
            return x
        return torch.from_numpy(np.sort(x.numpy(), axis=-1))
    return torch.sort(x, dim=-1).values


@functools.lru_cache(maxsize=256)
def _percentile_index(
    n: int, qs: tuple[float, ...], dtype: torch.dtype, device: torch.device
) -> tuple[Tensor, Tensor]:
    # positions depend on n only: (2P,) indices [floor h..., floor h + 1...] and (P,) weights
    lo, hi, frac = [], [], []
    for q in qs:
        h = (n - 1) * q / 100.0
        f = math.floor(h)
        lo.append(f)
        hi.append(min(f + 1, n - 1))
        frac.append(h - f)
    return torch.tensor(lo + hi, device=device), torch.tensor(frac, dtype=dtype, device=device)


def percentiles_sorted(s: Tensor, qs: Sequence[float]) -> Tensor:
    """Percentiles ``qs`` (in [0, 100]) of each sorted row of ``s`` ``(R, n)`` -> ``(R, P)``.

    Linear interpolation, as ``numpy.percentile(method="linear")``; positions depend on ``n``
    only, so nothing is read back from the device.
    """
    idx, w = _percentile_index(s.shape[-1], tuple(qs), s.dtype, s.device)
    v = s.index_select(-1, idx)  # (R, 2P)
    a, b = v[..., : len(qs)], v[..., len(qs) :]
    return a + (b - a) * w


def search_probes(edges: Optional[np.ndarray], threshold: float, dtype: torch.dtype) -> np.ndarray:
    r"""The values :func:`counts_sorted` searches for, in ``dtype``, as float64.

    ``[e_0, ..., e_{B-1}, e_B^+, -t, t^+, 0^+]`` (without the edges when ``edges`` is None), where
    ``v^+`` is the next representable value above ``v``: a left-side search counts
    :math:`\#\{x < v\}`, and :math:`\#\{x \le v\} = \#\{x < v^+\}`.
    """
    np_dtype = np.float64 if dtype == torch.float64 else np.float32
    up = lambda v: np.nextafter(np.asarray(v, np_dtype), np_dtype(np.inf))  # noqa: E731
    tail = [np.asarray([-threshold], np_dtype), up([threshold, 0.0])]
    if edges is not None:
        e = np.asarray(edges, np_dtype)
        tail = [e[:-1], up(e[-1:])] + tail
    return np.concatenate(tail).astype(np.float64)


def search_sorted(s: Tensor, probes: Tensor) -> Tensor:
    r"""``(R, P)`` int64: :math:`\#\{x < v\}` in each sorted row of ``s`` for each probe ``v``.

    Args:
        s: ``(R, n)``, each row sorted ascending (NaN last).
        probes: :func:`search_probes` as a tensor in ``s``'s dtype and device.
    """
    # searchsorted needs a total order, and torch's treats NaN as smaller than anything: search
    # NaN as +inf, so it lands in the overflow and saturated counts. NaN sorts last, so the last
    # column tells whether there is any (at flush time a sync is acceptable; NaN is rare).
    if bool(torch.isnan(s[:, -1]).any()):
        s = torch.nan_to_num(s, nan=math.inf, posinf=math.inf, neginf=-math.inf)
    return torch.searchsorted(s, probes.expand(s.shape[0], -1).contiguous())


def counts_from_search(
    below: np.ndarray, n: int, bins: Optional[int]
) -> tuple[Optional[np.ndarray], np.ndarray, np.ndarray]:
    r"""Histogram with tails, saturated and non-positive counts from :func:`search_sorted`.

    Args:
        below: ``(R, P)`` counts :math:`\#\{x < v\}` for the probes of :func:`search_probes`.
        n: values per row.
        bins: ``B``, the number of bins between the edges; ``None`` if the probes have no edges.

    Returns:
        ``(hist, n_saturated, n_nonpositive)``: ``hist`` is ``(R, B + 2)`` ordered
        ``[underflow, bin_0, ..., bin_{B-1}, overflow]`` (or ``None``); the others are ``(R,)``.
    """
    n_saturated = below[:, -3] + (n - below[:, -2])
    n_nonpositive = below[:, -1]
    if bins is None:
        return None, n_saturated, n_nonpositive
    e = below[:, : bins + 1]  # #(x < e_k) for k < B, then #(x <= e_B)   (R, B + 1)
    hist = np.concatenate([e[:, :1], np.diff(e, axis=1), n - e[:, -1:]], axis=1)
    return hist, n_saturated, n_nonpositive


def counts_sorted(
    s: Tensor, probes: Tensor, bins: Optional[int]
) -> tuple[Optional[np.ndarray], np.ndarray, np.ndarray]:
    """:func:`search_sorted` then :func:`counts_from_search` (moving the searches to the host)."""
    below = search_sorted(s, probes).cpu().numpy()
    return counts_from_search(below, s.shape[1], bins)


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
