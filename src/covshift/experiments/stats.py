r"""Means and 95% intervals over seeds (Student t), the numbers every claim and table reports.

For :math:`n` values :math:`v_1..v_n` (one per seed) the estimate is the sample mean
:math:`\bar v` with the two-sided Student-t interval

.. math::  \bar v \pm t_{0.975,\,n-1}\, s / \sqrt{n}, \qquad s^2 = \tfrac{1}{n-1}\sum_i (v_i - \bar v)^2 .

A difference between two arms is paired by seed (the arms share the seed's data order and
initial weights), so its interval is the t interval of the per-seed differences. With one seed
there is no interval (``lo`` and ``hi`` are ``None``).

A metric with a feasible range (an accuracy in ``[0, 1]``, a norm at least 0) gets its interval
clipped to that range, ``[max(lo, a), min(hi, b)]``: the t interval is symmetric about the mean and
can reach past a bound the values cannot (0.99, 1.0, 1.0 gives an upper end of 1.006). The mean
is not changed; the estimate says that it was clipped (``clipped``, and the unclipped ends in
``raw``), and the report marks it. The t quantile is computed here (bisection
on the CDF, integrated numerically) so that numpy is the only dependency; the tests check it
against ``scipy.stats.t``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

__all__ = ["Estimate", "estimate", "t_quantile", "CI_METHOD", "CLIPPED_MARK"]

CLIPPED_MARK = "\u2020"  # a dagger after an interval clipped to its metric's range
CI_METHOD = f"mean over seeds, 95% Student-t interval (clipped to the metric's possible range where it reaches past it, marked {CLIPPED_MARK})"


def _t_cdf(x: float, df: int) -> float:
    """P(T <= x) for x >= 0: 1/2 plus the integral of the density from 0 to x (Simpson, 2,000 panels)."""
    logc = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    t = np.linspace(0.0, x, 2001)
    pdf = np.exp(logc - (df + 1) / 2 * np.log1p(t * t / df))
    h = x / 2000
    return 0.5 + h / 3 * (pdf[0] + pdf[-1] + 4 * pdf[1:-1:2].sum() + 2 * pdf[2:-1:2].sum())


def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile (``0.5 <= p < 1``) of Student's t with ``df`` degrees of freedom."""
    if not 0.5 <= p < 1 or df < 1:
        raise ValueError(f"t_quantile needs 0.5 <= p < 1 and df >= 1, got p={p}, df={df}")
    lo, hi = 0.0, 1.0
    while _t_cdf(hi, df) < p:  # the t(1) 0.975 quantile is 12.7: a few doublings
        lo, hi = hi, 2 * hi
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _t_cdf(mid, df) < p else (lo, mid)
    return (lo + hi) / 2


@dataclass(frozen=True)
class Estimate:
    """A mean over seeds with its 95% interval (``lo``/``hi`` are ``None`` for a single value)."""

    mean: float
    lo: Optional[float]
    hi: Optional[float]
    n: int
    values: tuple[float, ...] = field(default=(), repr=False)
    raw: Optional[tuple[float, float]] = None  # the interval before clipping, when clip() changed it

    @property
    def has_interval(self) -> bool:
        return self.lo is not None

    @property
    def clipped(self) -> bool:
        return self.raw is not None

    def clip(self, bounds: Optional[tuple[float, float]]) -> "Estimate":
        """This estimate with its interval clipped to ``bounds = (a, b)`` (``None``: unchanged); the
        mean and values are kept, and ``raw`` holds the interval before, if clipping changed it."""
        if bounds is None or not self.has_interval:
            return self
        a, b = bounds
        lo, hi = min(max(self.lo, a), b), max(min(self.hi, b), a)
        if (lo, hi) == (self.lo, self.hi):
            return self
        return Estimate(self.mean, lo, hi, self.n, self.values, self.raw or (self.lo, self.hi))

    def format(self, digits: int = 4, scale: float = 1.0) -> str:
        """``"0.9712 [0.9688, 0.9736]"``; ``"0.9712 (1 seed)"`` without an interval."""
        if not math.isfinite(self.mean):
            return "n/a"
        m = f"{self.mean * scale:.{digits}f}"
        if not self.has_interval:
            return f"{m} (1 seed)" if self.n == 1 else m
        mark = CLIPPED_MARK if self.clipped else ""
        return f"{m} [{self.lo * scale:.{digits}f}, {self.hi * scale:.{digits}f}]{mark}"

    def to_dict(self) -> dict:
        d = {"mean": self.mean, "ci95": [self.lo, self.hi] if self.has_interval else None, "n": self.n, "values": list(self.values)}
        if self.clipped:
            d["ci95_unclipped"] = list(self.raw)
        return d


def estimate(values: Sequence[float], level: float = 0.95, bounds: Optional[tuple[float, float]] = None) -> Estimate:
    """Mean and Student-t interval of the finite ``values`` (NaN and None are dropped), the interval
    clipped to ``bounds`` (the values' possible range) when given."""
    v = np.array([x for x in values if x is not None and math.isfinite(x)], dtype=float)
    if len(v) == 0:
        return Estimate(math.nan, None, None, 0, ())
    if bounds is not None:
        a, b = bounds
        slack = 1e-6 * max(1.0, abs(a) if math.isfinite(a) else 1.0, abs(b) if math.isfinite(b) else 1.0)  # rounding, e.g. a cosine of 1 + 1e-8
        out = v[(v < a - slack) | (v > b + slack)]
        if len(out):
            raise ValueError(f"values {out.tolist()} lie outside their declared range [{a:g}, {b:g}]; the metric's bounds are wrong, or so is its computation")
        v = np.clip(v, a, b)  # within the rounding slack: onto the range, so the mean is inside it too
    mean = float(v.mean())
    if len(v) == 1:
        return Estimate(mean, None, None, 1, tuple(v.tolist()))
    half = t_quantile(0.5 + level / 2, len(v) - 1) * float(v.std(ddof=1)) / math.sqrt(len(v))
    return Estimate(mean, mean - half, mean + half, len(v), tuple(v.tolist())).clip(bounds)
