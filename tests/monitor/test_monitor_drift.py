"""Drift measures against SciPy, brute force and closed forms on known distributions."""

import math

import numpy as np
import pytest
from scipy import stats as sps
from scipy.spatial.distance import jensenshannon

from covshift.monitor import drift
from covshift.monitor.records import MonitorRecords


def _hist(values, edges):
    inner = np.histogram(values, edges)[0]
    return np.concatenate([[(values < edges[0]).sum()], inner, [(values > edges[-1]).sum()]])


def test_mean_shift_and_log_std_ratio_on_known_values():
    mean = np.array([0.0, 1.0, 1.0, 3.0])
    std = np.array([1.0, 1.0, 7.0 ** 0.5, 1.0])
    prev = drift.mean_shift(mean, std, "previous")
    assert math.isnan(prev[0])
    np.testing.assert_allclose(prev[1:], [1.0, 0.0, 2.0 / 2.0])  # pooled std sqrt((7 + 1) / 2) = 2
    np.testing.assert_allclose(drift.mean_shift(mean, std, "first"), [0.0, 1.0, 1.0 / 2.0, 3.0])
    np.testing.assert_allclose(drift.log_std_ratio(std, "first"), np.log(std))
    np.testing.assert_allclose(drift.log_std_ratio(std)[1:], np.log(std[1:] / std[:-1]))
    # broadcasts over channels: (T, C)
    assert drift.mean_shift(np.zeros((3, 4)), np.ones((3, 4)), "first").shape == (3, 4)
    with pytest.raises(ValueError, match="reference"):
        drift.mean_shift(mean, std, "last")


def test_js_divergence_equals_squared_scipy_distance():
    rng = np.random.default_rng(0)
    counts = rng.integers(0, 20, size=(5, 12)).astype(float)
    counts[2, :4] = 0  # zero bins: 0 log 0 = 0
    for base in (2.0, math.e):
        got = drift.js_divergence(counts, "previous", base=base)
        want = [jensenshannon(counts[t - 1], counts[t], base=base) ** 2 for t in range(1, 5)]
        np.testing.assert_allclose(got[1:], want, rtol=1e-10)
        assert math.isnan(got[0])
    first = drift.js_divergence(counts, "first")
    assert first[0] == 0.0
    assert drift.histogram_js([1, 0], [0, 1]) == pytest.approx(1.0)  # disjoint: 1 bit


def _brute_w1(edges, cp, cq, rp, rq, n=400_001):
    # integrate |F_p - F_q| on a fine grid, with the same piecewise-uniform model
    lo = min(rp[0], rq[0], edges[0]) - 1
    hi = max(rp[1], rq[1], edges[-1]) + 1
    x = np.linspace(lo, hi, n)

    def cdf(c, r):
        knots = np.concatenate([[min(r[0], edges[0])], edges, [max(r[1], edges[-1])]])
        cum = np.concatenate([[0], np.cumsum(c) / np.sum(c)])
        return np.interp(x, knots, cum)

    y = np.abs(cdf(cp, rp) - cdf(cq, rq))
    return float(np.sum((y[1:] + y[:-1]) / 2 * np.diff(x)))  # trapezoid rule


def test_histogram_w1_equals_brute_force_integration():
    rng = np.random.default_rng(1)
    edges = np.linspace(-2, 3, 11)
    for _ in range(5):
        cp, cq = rng.integers(1, 30, 12), rng.integers(1, 30, 12)
        rp, rq = (-4.0 + rng.random(), 5.0 * rng.random() + 3), (-2.5, 3.5)
        got = drift.histogram_w1(edges, cp, cq, rp, rq)
        assert got == pytest.approx(_brute_w1(edges, cp, cq, rp, rq), rel=1e-6, abs=1e-9)
    assert drift.histogram_w1(edges, cp, cp, rp, rp) == 0.0
    assert math.isnan(drift.histogram_w1(edges, np.zeros(12), cp))


def test_histogram_w1_point_masses_are_exact():
    # all mass in one narrow bin vs another: W1 = distance between bin centres
    edges = np.array([0.0, 1.0, 2.0, 3.0])
    p, q = np.array([0, 1, 0, 0, 0]), np.array([0, 0, 0, 1, 0])
    assert drift.histogram_w1(edges, p, q) == pytest.approx(2.0)
    # tail mass without a range sits on the edge (a point mass)
    p, q = np.array([1, 0, 0, 0, 0]), np.array([0, 0, 0, 0, 1])
    assert drift.histogram_w1(edges, p, q) == pytest.approx(3.0)


@pytest.mark.parametrize("m2, s2", [(0.5, 1.0), (-0.3, 1.5), (0.0, 0.6)])
def test_w1_of_two_gaussians_matches_scipy_and_closed_form(m2, s2):
    rng = np.random.default_rng(2)
    a = rng.normal(0.0, 1.0, 200_000)
    b = rng.normal(m2, s2, 200_000)
    edges = np.linspace(-6, 6, 241)  # bin width 0.05; almost no mass in the tails
    got = drift.histogram_w1(edges, _hist(a, edges), _hist(b, edges), (a.min(), a.max()), (b.min(), b.max()))
    # W1 = E|dm + ds Z| for N(0,1) vs N(m2,s2): the mean of a folded normal
    dm, ds = m2, abs(s2 - 1.0)
    closed = dm * (1 - 2 * sps.norm.cdf(-dm / ds)) + ds * math.sqrt(2 / math.pi) * math.exp(-dm**2 / (2 * ds**2)) if ds else abs(dm)
    assert got == pytest.approx(sps.wasserstein_distance(a, b), abs=0.01)
    assert got == pytest.approx(closed, abs=0.01)


def test_sequences_and_layer_drift_on_records():
    rng = np.random.default_rng(3)
    edges = np.linspace(-3, 5, 33)
    rec = MonitorRecords(["a"])
    params = [(0.0, 1.0), (0.5, 1.0), (0.5, 2.0)]
    for step, (m, s) in zip((0, 10, 20), params):
        v = rng.normal(m, s, 50_000)
        names = ["mean", "std", "min", "max", "numel"]
        rec.add("a", [step], names, [[v.mean(), v.std(), v.min(), v.max(), v.size]], counts=_hist(v, edges)[None], edges=edges)
    d = drift.layer_drift(rec, "a", "first")
    assert list(d["steps"]) == [0, 10, 20]
    np.testing.assert_allclose(d["mean_shift"], [0, 0.5, 0.5 / math.sqrt(2.5)], atol=0.02)
    np.testing.assert_allclose(d["log_std_ratio"], [0, 0, math.log(2)], atol=0.02)
    assert d["w1"][0] == 0 and d["w1"][1] == pytest.approx(0.5, abs=0.03)
    assert d["js"][0] == 0 and 0 < d["js"][1] < d["js"][2] < 1
    h = rec.histograms("a")
    np.testing.assert_allclose(
        d["w1"], drift.wasserstein1(h.edges, h.counts, rec.series("a", "min")[1], rec.series("a", "max")[1], "first")
    )
    rows = drift.drift_table(rec)
    assert {r["stat"] for r in rows} == {"mean_shift", "log_std_ratio", "w1", "js"} and len(rows) == 12
