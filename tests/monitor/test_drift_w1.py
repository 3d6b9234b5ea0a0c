"""histogram_w1 (knot-based CDFs) against two brute-force references: the dense segment-by-segment
CDF sum it replaced, and a numerical integral of |F_p - F_q| on a fine grid."""

from __future__ import annotations

import math

import numpy as np
import pytest

from covshift.monitor.drift import histogram_w1, wasserstein1


def _segments(edges, counts, lo, hi):
    e0, eB = float(edges[0]), float(edges[-1])
    lo = e0 if lo is None or not math.isfinite(lo) else min(lo, e0)
    hi = eB if hi is None or not math.isfinite(hi) else max(hi, eB)
    m = np.asarray(counts, np.float64)
    return np.concatenate([[lo], edges]), np.concatenate([edges, [hi]]), m / m.sum()


def _dense_cdf(x, a, b, m, right):
    # every segment's contribution at every point: O(points x segments)
    width = b - a
    with np.errstate(divide="ignore", invalid="ignore"):
        frac = np.clip((x[:, None] - a) / np.where(width > 0, width, 1), 0, 1)
    step = (x[:, None] >= a) if right else (x[:, None] > a)
    return (np.where(width > 0, frac, step) * m).sum(axis=1)


def _w1_dense(edges, cp, cq, rp, rq):
    P, Q = _segments(edges, cp, *rp), _segments(edges, cq, *rq)
    grid = np.unique(np.concatenate([P[0], P[1], Q[0], Q[1]]))
    if grid.size < 2:
        return 0.0
    d0 = _dense_cdf(grid[:-1], *P, right=True) - _dense_cdf(grid[:-1], *Q, right=True)
    d1 = _dense_cdf(grid[1:], *P, right=False) - _dense_cdf(grid[1:], *Q, right=False)
    h = np.diff(grid)
    with np.errstate(divide="ignore", invalid="ignore"):
        crossing = (d0**2 + d1**2) / (2 * (np.abs(d0) + np.abs(d1)))
    return float((np.where(d0 * d1 >= 0, (np.abs(d0) + np.abs(d1)) / 2, crossing) * h).sum())


def _w1_numeric(edges, cp, cq, rp, rq, n=400_001):
    P, Q = _segments(edges, cp, *rp), _segments(edges, cq, *rq)
    lo, hi = min(P[0][0], Q[0][0]), max(P[1][-1], Q[1][-1])
    x = np.linspace(lo, hi, n)
    d = np.abs(_dense_cdf(x, *P, right=True) - _dense_cdf(x, *Q, right=True))
    return float(np.sum((d[1:] + d[:-1]) / 2 * np.diff(x)))


def _case(rng, B):
    edges = np.sort(rng.uniform(-3, 3, B + 1))
    cp, cq = rng.integers(0, 5, B + 2).astype(float), rng.integers(0, 5, B + 2).astype(float)
    cp[rng.integers(0, B + 2)] += 1  # never empty
    cq[rng.integers(0, B + 2)] += 1
    choices = [(None, None), (edges[0] - 1.5, edges[-1] + 0.5), (edges[0], edges[-1]), (math.nan, math.inf), (edges[0] + 0.3, edges[-1] - 0.2)]
    return edges, cp, cq, choices[rng.integers(len(choices))], choices[rng.integers(len(choices))]


@pytest.mark.parametrize("seed", range(40))
def test_matches_the_dense_formula(seed):
    rng = np.random.default_rng(seed)
    edges, cp, cq, rp, rq = _case(rng, int(rng.integers(1, 12)))
    assert histogram_w1(edges, cp, cq, rp, rq) == pytest.approx(_w1_dense(edges, cp, cq, rp, rq), rel=1e-12, abs=1e-14)


@pytest.mark.parametrize("seed", range(6))
def test_matches_a_numerical_integral(seed):
    rng = np.random.default_rng(100 + seed)
    edges, cp, cq, rp, rq = _case(rng, 6)
    assert histogram_w1(edges, cp, cq, rp, rq) == pytest.approx(_w1_numeric(edges, cp, cq, rp, rq), abs=2e-5)


def test_hand_derived_values():
    edges = np.array([0.0, 1.0, 2.0])
    # all mass in bin [0, 1) against all in [1, 2): uniform on each, W1 = 1
    assert histogram_w1(edges, [0, 1, 0, 0], [0, 0, 1, 0]) == pytest.approx(1.0)
    # point masses on the outer edges (no ranges): underflow at 0, overflow at 2: W1 = 2
    assert histogram_w1(edges, [1, 0, 0, 0], [0, 0, 0, 1]) == pytest.approx(2.0)
    # underflow spread on [-1, 0] against the point mass at 0: W1 = 1/2
    assert histogram_w1(edges, [1, 0, 0, 0], [1, 0, 0, 0], (-1.0, 2.0), (None, None)) == pytest.approx(0.5)
    assert histogram_w1(edges, [3, 1, 4, 1], [3, 1, 4, 1]) == 0.0
    assert math.isnan(histogram_w1(edges, [0, 0, 0, 0], [1, 0, 0, 0]))


def test_wasserstein1_series_uses_the_pairwise_distance():
    rng = np.random.default_rng(7)
    edges = np.linspace(-1, 1, 9)
    counts = rng.integers(0, 9, (5, 10)).astype(float) + 1
    lo, hi = np.full(5, -2.0), np.full(5, 2.0)
    got = wasserstein1(edges, counts, lo, hi, reference="first")
    assert got[0] == 0.0  # the first record against itself
    for t in range(1, 5):
        assert got[t] == pytest.approx(_w1_dense(edges, counts[0], counts[t], (-2.0, 2.0), (-2.0, 2.0)), rel=1e-12)
