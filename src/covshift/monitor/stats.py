r"""Statistics of activation tensors, computed on the tensor's own device, in two stages.

**Non-finite values.** NaN, +inf and -inf are counted (``frac_nonfinite``, over every value of the
activation) and left out of every other statistic: mean, std, min, max, percentiles, histograms
and the fractions are over the *finite* values (of the whole tensor for the moments, of the sample
for the rest). A record whose values are all non-finite has NaN statistics and an empty histogram.

**Stage 1, in the forward hook** (:func:`reduce`): a copy of a bounded sample of the values, and,
when the sample is not the whole tensor, the moments of the *whole* tensor (:func:`moments`). No
host sync (no ``.item()``, no ``.cpu()``, no data-dependent Python branch), and nothing that
aliases the activation is kept, so an in-place op that runs later (``ReLU(inplace=True)``) cannot
change what was measured.

For the :math:`n` finite values :math:`x_j` (accumulated in float64):

.. math::

    \mu = \frac1n \sum_j x_j, \qquad
    M_2 = \sum_j (x_j - \mu)^2, \qquad \sigma = \sqrt{M_2 / n}\ \text{(population std)},
    \qquad \min_j x_j, \quad \max_j x_j

:math:`M_2` is two-pass (mean first, then squared deviations) within chunks of 4096 values, and
the chunks merge with Chan et al.'s formula, which does not cancel the way
:math:`E[x^2] - E[x]^2` does when :math:`|\mu| \gg \sigma`.

The sample is every value when :math:`n \le` ``sample_size``: then the hook only copies the tensor,
and the moments come at flush from the copies, batched over records (on CPU a PyTorch op costs a
few microseconds whatever its size, so fewer ops per hook is what makes ``every=1`` affordable on
small layers). Otherwise the sample is the values at a fixed, uniformly random set of positions
(:func:`sample_positions`), drawn once per tensor size from a private generator (the global RNG is
never touched).

**Stage 2, at flush, batched over records** (:func:`rows`, :func:`percentiles_`): the samples of
one layer are stacked to ``(R, K)``, and in one pass per row

* histogram over fixed edges :math:`e_0 < \dots < e_B`: bins :math:`[e_k, e_{k+1})`, the last one
  closed, like ``numpy.histogram``; plus an underflow count (:math:`x < e_0`) and an overflow
  count (:math:`x > e_B`), so the ``B + 2`` counts add up to the finite sample values;
* saturated count :math:`\#\{|x| > t\}` and non-positive count :math:`\#\{x \le 0\}` (the values
  a ReLU sets to exactly zero);
* the finite values, compacted to the front of the row;

then percentile :math:`q` of the :math:`k` finite values by selection (no full sort), with NumPy's
default linear interpolation: :math:`h = (k-1) q / 100`, value :math:`s_{\lfloor h\rfloor} +
(h - \lfloor h\rfloor) (s_{\lfloor h\rfloor+1} - s_{\lfloor h\rfloor})` for the order statistics
:math:`s`.

**Two implementations of each op.** On CPU, the fused kernels of ``covshift/csrc/monitor_stats.cpp``
(built on first use by :func:`covshift.ops.build.load_library`; one pass over the data, no
temporaries); elsewhere, or when the extension cannot be built, the pure-torch reference code here
(``*_reference``), which gives the same counts, minima, maxima and percentiles, and the same moments
to rounding.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator, NamedTuple, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "Reduced",
    "reduce",
    "sample_positions",
    "moments",
    "moments_reference",
    "rows",
    "rows_reference",
    "percentiles_",
    "percentiles_reference",
    "record",
    "record_reference",
    "extension",
    "use_extension",
    "fused_available",
    "record_op",
    "channel_moments",
    "auto_edges",
    "fixed_edges",
    "to_host",
]

_LIBRARY = "covshift_monitor"
_ext_state: dict[str, object] = {}


def extension():
    """The :class:`covshift.ops.build.Extension` record of the fused kernels (built on first call)."""
    ext = _ext_state.get("ext")
    if ext is None:
        from covshift.ops import build

        ext = _ext_state["ext"] = build.load_library(_LIBRARY, build.CSRC / "monitor_stats.cpp", probe="rows")
    return ext


@contextlib.contextmanager
def use_extension(flag: Optional[bool]) -> Iterator[None]:
    """Within this block, ops called without ``use_extension=`` use this default (``None``: the
    C++ kernels where they apply; ``False``: the reference code; ``True``: insist on the kernels).
    For tests and benchmarks; not thread-safe."""
    old = _ext_state.get("default")
    _ext_state["default"] = flag
    try:
        yield
    finally:
        _ext_state["default"] = old


_FUSED_DTYPES = (torch.float32, torch.float64)


def _fused(t: Tensor, use_extension: Optional[bool]) -> bool:
    """Whether to call the C++ kernels for ``t``: CPU float32/float64, and the extension loaded.

    ``use_extension=True`` insists (and raises if it cannot), ``False`` forces the reference code.
    """
    if use_extension is None:
        use_extension = _ext_state.get("default")  # type: ignore[assignment]
    if use_extension is False:
        return False
    # attribute reads only (is_cpu, not device.type): the monitor's hook asks this for every record
    ok = t.is_cpu and t.dtype in _FUSED_DTYPES
    if use_extension is None:
        return ok and extension().loaded  # type: ignore[attr-defined]
    ext = extension()
    if not (ok and ext.loaded):  # type: ignore[attr-defined]
        raise RuntimeError(
            f"use_extension=True: expected a CPU float32/float64 tensor and the built extension, got "
            f"{t.device} {t.dtype} and {'a loaded extension' if ext.loaded else ext.error}."  # type: ignore[attr-defined]
        )
    return True


class Reduced(NamedTuple):
    """Stage-1 result for one activation: device tensors, nothing aliasing the activation."""

    # (6,) float64 [n_finite, mean, M2, min, max, n_nonfinite] of the whole tensor; None when
    # `sample` is every value (then computed at flush from the sample, by `rows`).
    moments: Optional[Tensor]
    sample: Tensor  # (k,) with k = min(numel, sample_size), a copy, in float32 or float64
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


def moments_reference(x: Tensor) -> Tensor:
    """``(6,)`` float64 ``[n, mean, M2, min, max, n_nonfinite]`` over the finite values of ``x``."""
    x = x.reshape(-1)
    fin = torch.isfinite(x)
    n = fin.sum(dtype=torch.float64)
    mean = torch.where(fin, x, 0).sum(dtype=torch.float64) / n.clamp_min(1)
    d = torch.where(fin, x.double() - mean, 0)
    m2 = torch.dot(d, d)
    inf = torch.tensor(math.inf, dtype=x.dtype, device=x.device)
    mn = torch.where(fin, x, inf).amin().double() if x.numel() else inf.double()
    mx = torch.where(fin, x, -inf).amax().double() if x.numel() else -inf.double()
    return torch.stack([n, mean, m2, mn, mx, x.numel() - n])


def moments(x: Tensor, positions: Optional[Tensor] = None, *, use_extension: Optional[bool] = None) -> tuple[Tensor, Optional[Tensor]]:
    """Stage-1 moments of the whole of ``x`` (see :func:`moments_reference`), and ``x.flatten()[positions]``."""
    if _fused(x, use_extension):
        return torch.ops.covshift_monitor.moments(x, positions)
    sample = None if positions is None else torch.take(x, positions)
    return moments_reference(x), sample


def reduce(
    x: Tensor, positions: Optional[Tensor] = None, per_channel: bool = False, *, use_extension: Optional[bool] = None
) -> Reduced:
    """Stage 1: a sample of ``x`` (and its moments if subsampled), without syncing.

    Args:
        x: the activation, any shape; integer, bool and half-precision input is measured in float32.
        positions: flat positions to sample (see :func:`sample_positions`), or ``None`` to take
            every value.
        per_channel: also reduce per channel (dim 1) when ``x`` has at least 2 dims.
        use_extension: ``None`` (the C++ kernels when they apply), ``True`` (insist), ``False``.
    """
    x = x.detach()
    copied = x.dtype not in (torch.float32, torch.float64)
    if copied:
        x = x.float()
    mom = None
    if positions is None:
        sample = x.reshape(-1)
        if not copied:
            sample = sample.clone()  # never keep a view of the activation
    else:
        mom, sample = moments(x, positions, use_extension=use_extension)

    channel = channel_moments(x) if per_channel else None
    return Reduced(mom, sample, x.numel(), channel)


def channel_moments(x: Tensor) -> Optional[tuple[Tensor, Tensor, Tensor]]:
    """Per channel (dim 1) of ``x`` ``(N, C, *)``: mean ``(C,)``, population variance (two-pass)
    and max, over every value (a channel holding a NaN has NaN statistics); None below 2 dims."""
    if x.dim() < 2:
        return None
    x = x.detach()
    if x.dtype not in (torch.float32, torch.float64):
        x = x.float()
    dims = [0, *range(2, x.dim())]
    c_mean = x.mean(dims)  # (C,)
    cd = x - c_mean.reshape(1, -1, *([1] * (x.dim() - 2)))  # (N, C, *)
    c_var = cd.square_().mean(dims)  # (C,)
    # amax of an empty batch (an empty shard under reduce="global") raises: -inf is the max of nothing
    c_max = x.amax(dims) if x.shape[0] else torch.full((x.shape[1],), -math.inf, dtype=x.dtype, device=x.device)
    return c_mean, c_var, c_max


def fused_available(x: Tensor) -> bool:
    """Whether the C++ kernels will serve ``x`` (CPU float32/float64, extension built, not disabled)."""
    return _fused(x, None)


def record_op():
    """``torch.ops.covshift_monitor.record.default``, looked up once (call after :func:`fused_available`)."""
    op = _ext_state.get("record_op")
    if op is None:
        op = _ext_state["record_op"] = torch.ops.covshift_monitor.record.default
    return op


def rows_reference(
    sample: Tensor, valid: Optional[Tensor], edges: Tensor, threshold: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per row of ``sample`` ``(R, K)``, over its first ``valid[r]`` entries: see :func:`rows`."""
    R, K = sample.shape
    B = edges.numel() - 1
    dev = sample.device
    if valid is None:
        valid = torch.full((R,), K, dtype=torch.int64, device=dev)
    fin = torch.isfinite(sample) & (torch.arange(K, device=dev) < valid.to(dev)[:, None])
    n = fin.sum(1, dtype=torch.float64)
    x64 = sample.double()
    mean = torch.where(fin, x64, 0).sum(1) / n.clamp_min(1)
    d = torch.where(fin, x64 - mean[:, None], 0)
    m2 = (d * d).sum(1)
    inf = torch.tensor(math.inf, dtype=sample.dtype, device=dev)
    mn = torch.where(fin, sample, inf).amin(1).double() if K else torch.full((R,), math.inf, dtype=torch.float64, device=dev)
    mx = torch.where(fin, sample, -inf).amax(1).double() if K else torch.full((R,), -math.inf, dtype=torch.float64, device=dev)
    n_valid = valid.to(dev).clamp(0, K).double()
    mom = torch.stack([n, mean, m2, mn, mx, n_valid - n], dim=1)

    e = edges.to(dev, torch.float64)
    idx = torch.bucketize(x64, e, right=True)  # 0: < e_0; k + 1: [e_k, e_{k+1}); B + 1: >= e_B
    idx = torch.where(x64 == e[-1], B, idx)  # the last bin is closed
    idx = torch.where(fin, idx, B + 2)  # non-finite and padding: a column that is dropped
    hist = torch.zeros(R, B + 3, dtype=torch.int64, device=dev)
    hist.scatter_add_(1, idx, torch.ones_like(idx))
    sat = (fin & (x64.abs() > threshold)).sum(1)
    nonpos = (fin & (sample <= 0)).sum(1)
    order = torch.sort((~fin).to(torch.uint8), dim=1, stable=True).indices  # finite first, in order
    compact = torch.gather(sample, 1, order)
    compact = torch.where(torch.arange(K, device=dev) < n[:, None], compact, math.nan)
    return mom, hist[:, : B + 2], torch.stack([sat, nonpos], dim=1), compact


def rows(
    sample: Tensor, valid: Optional[Tensor], edges: Tensor, threshold: float, *, use_extension: Optional[bool] = None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Stage 2 for stacked samples ``(R, K)``; each row's first ``valid[r]`` entries count (all if None).

    Returns:
        ``(moments, hist, flags, compact)``: ``(R, 6)`` float64 moments as :func:`moments_reference`
        over the finite values; ``(R, B + 2)`` int64 histograms of the finite values on ``edges``
        ``(B + 1,)`` with tails; ``(R, 2)`` int64 ``[#{|x| > threshold}, #{x <= 0}]`` of the finite
        values; ``(R, K)`` the finite values first, in their order, then NaN.
    """
    if _fused(sample, use_extension):
        return torch.ops.covshift_monitor.rows(sample, valid, edges.to(torch.float64), float(threshold))
    return rows_reference(sample, valid, edges, threshold)


def percentiles_reference(compact: Tensor, n: Tensor, qs: Sequence[float]) -> Tensor:
    """``(R, P)`` float64 percentiles of the first ``n[r]`` (finite) values of each row; sorts ``compact`` in place."""
    R, K = compact.shape
    dev = compact.device
    compact.copy_(torch.sort(torch.where(torch.arange(K, device=dev) < n.to(dev)[:, None], compact, math.nan), dim=1).values)
    n = n.to(dev, torch.int64)
    q = torch.tensor([float(v) for v in qs], dtype=torch.float64, device=dev)
    h = (n - 1).double()[:, None] * q / 100.0  # (R, P)
    lo = torch.floor(h)
    frac = h - lo
    lo = lo.long().clamp(0, max(K - 1, 0))
    hi = torch.minimum(lo + 1, (n - 1).clamp_min(0)[:, None])
    if K == 0:
        return torch.full((R, len(q)), math.nan, dtype=torch.float64, device=dev)
    a = torch.gather(compact, 1, lo).double()
    c = torch.gather(compact, 1, hi).double()
    out = a + (c - a) * frac
    return torch.where((n > 0)[:, None], out, math.nan)


def percentiles_(compact: Tensor, n: Tensor, qs: Sequence[float], *, use_extension: Optional[bool] = None) -> Tensor:
    """Percentiles ``qs`` (in [0, 100]) of the first ``n[r]`` values of each row of ``compact`` ``(R, K)``.

    The values must be finite (as :func:`rows` leaves them). Linear interpolation, as
    ``numpy.percentile(method="linear")``; ``compact`` is permuted in place; NaN where ``n == 0``.
    """
    if _fused(compact, use_extension) and compact.is_contiguous():
        return torch.ops.covshift_monitor.percentiles_(compact, n, [float(q) for q in qs])
    return percentiles_reference(compact, n, qs)


def record_reference(
    x: Tensor, positions: Optional[Tensor], edges: Tensor, threshold: float, qs: Sequence[float]
) -> Tensor:
    """``(9 + B + 2 + P,)`` float64: see :func:`record` (composed from the other reference ops)."""
    x = x.detach().reshape(-1)
    mom = moments_reference(x)
    sample = x if positions is None else torch.take(x, positions)
    _, hist, flags, compact = rows_reference(sample[None], None, edges, threshold)
    k = torch.isfinite(sample).sum(dtype=torch.int64)[None]
    pct = percentiles_reference(compact, k, qs)
    return torch.cat([mom, flags[0].double(), k.double(), hist[0].double(), pct[0]])


def record(
    x: Tensor,
    positions: Optional[Tensor],
    edges: Tensor,
    threshold: float,
    qs: Sequence[float],
    *,
    use_extension: Optional[bool] = None,
) -> Tensor:
    """Every statistic of one record in one call, from the activation itself (no copy kept).

    For a key whose histogram edges are fixed, the hook calls this instead of keeping a sample.

    Returns:
        ``(9 + B + 2 + P,)`` float64: ``[n, mean, M2, min, max, n_nonfinite]`` over the finite
        values of the whole of ``x``; ``[n_saturated, n_nonpositive, k]`` over the ``k`` finite
        values of the sample (``x.flatten()[positions]``, or every value); their histogram on
        ``edges`` with tails (``B + 2``); their percentiles ``qs`` (``P``, NaN when ``k == 0``).
    """
    if _fused(x, use_extension):
        return torch.ops.covshift_monitor.record(x, positions, edges, float(threshold), [float(q) for q in qs])
    return record_reference(x, positions, edges, threshold, qs)


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
