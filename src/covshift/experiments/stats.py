r"""Means and 95% intervals over seeds (Student t), the numbers every claim and table reports.

For :math:`n` values :math:`v_1..v_n` (one per seed) the estimate is the sample mean
:math:`\bar v` with the two-sided Student-t interval

.. math::  \bar v \pm t_{0.975,\,n-1}\, s / \sqrt{n}, \qquad s^2 = \tfrac{1}{n-1}\sum_i (v_i - \bar v)^2 .

A difference between two arms is paired by seed (the arms share the seed's data order and
initial weights), so its interval is the t interval of the per-seed differences. With one seed
there is no interval (``lo`` and ``hi`` are ``None``). The t quantile is computed here (bisection
on the CDF, integrated numerically) so that numpy is the only dependency; the tests check it
against ``scipy.stats.t``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

__all__ = ["Estimate", "estimate", "t_quantile", "CI_METHOD"]

CI_METHOD = "mean over seeds, 95% Student-t interval"


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

    @property
    def has_interval(self) -> bool:
        return self.lo is not None

    def format(self, digits: int = 4, scale: float = 1.0) -> str:
        """``"0.9712 [0.9688, 0.9736]"``; ``"0.9712 (1 seed)"`` without an interval."""
        if not math.isfinite(self.mean):
            return "n/a"
        m = f"{self.mean * scale:.{digits}f}"
        if not self.has_interval:
            return f"{m} (1 seed)" if self.n == 1 else m
        return f"{m} [{self.lo * scale:.{digits}f}, {self.hi * scale:.{digits}f}]"

    def to_dict(self) -> dict:
        return {"mean": self.mean, "ci95": [self.lo, self.hi] if self.has_interval else None, "n": self.n, "values": list(self.values)}


def estimate(values: Sequence[float], level: float = 0.95) -> Estimate:
    """Mean and Student-t interval of the finite ``values`` (NaN and None are dropped)."""
    v = np.array([x for x in values if x is not None and math.isfinite(x)], dtype=float)
    if len(v) == 0:
        return Estimate(math.nan, None, None, 0, ())
    mean = float(v.mean())
    if len(v) == 1:
        return Estimate(mean, None, None, 1, tuple(v.tolist()))
    half = t_quantile(0.5 + level / 2, len(v) - 1) * float(v.std(ddof=1)) / math.sqrt(len(v))
    return Estimate(mean, mean - half, mean + half, len(v), tuple(v.tolist()))
