"""Means and Student-t intervals over seeds, checked against scipy and hand-computed numbers."""

import math

import numpy as np
import pytest
from scipy import stats as sps

from covshift.experiments.results import steps_to_reach
from covshift.experiments.stats import estimate, t_quantile


@pytest.mark.parametrize("df", [1, 2, 3, 4, 9, 30, 200])
@pytest.mark.parametrize("p", [0.975, 0.95, 0.5])
def test_t_quantile_matches_scipy(df, p):
    assert t_quantile(p, df) == pytest.approx(sps.t.ppf(p, df), rel=1e-6, abs=1e-9)


def test_interval_by_hand():
    # values 1, 2, 3: mean 2, s = 1, t(0.975, 2) = 4.302653, half-width 4.302653 / sqrt(3)
    e = estimate([1.0, 2.0, 3.0])
    half = 4.302652729911275 / math.sqrt(3)
    assert (e.n, e.mean) == (3, 2.0)
    assert e.lo == pytest.approx(2 - half, rel=1e-6) and e.hi == pytest.approx(2 + half, rel=1e-6)


def test_interval_matches_scipy_on_random_values():
    v = np.random.default_rng(0).normal(size=5)
    lo, hi = sps.t.interval(0.95, 4, loc=v.mean(), scale=sps.sem(v))
    e = estimate(v.tolist())
    assert e.lo == pytest.approx(lo, rel=1e-6) and e.hi == pytest.approx(hi, rel=1e-6)


def test_one_value_has_no_interval_and_nans_are_dropped():
    e = estimate([0.5, float("nan"), None])
    assert (e.n, e.mean, e.lo, e.hi) == (1, 0.5, None, None)
    assert e.format(2) == "0.50 (1 seed)"
    assert estimate([]).n == 0 and estimate([]).format() == "n/a"
    assert estimate([1.0, 3.0]).format(1).startswith("2.0 [")


def test_steps_to_reach_reports_the_grid_resolution():
    steps = np.array([0, 100, 200, 300, 800, 1300])
    acc = np.array([0.1, 0.5, 0.7, 0.8, 0.9, 0.95])
    assert steps_to_reach(steps, acc, 0.7) == (200, 100)  # crossed in (100, 200]
    assert steps_to_reach(steps, acc, 0.85) == (800, 500)  # crossed in (300, 800]
    assert steps_to_reach(steps, acc, 0.05) == (0, 0)
    assert steps_to_reach(steps, acc, 0.99) == (None, None)


def test_interval_is_clipped_to_bounds_and_says_so():
    v = [0.99, 1.0, 1.0]
    raw = estimate(v)
    assert raw.hi > 1.0 and not raw.clipped  # the symmetric t interval reaches past 1
    e = estimate(v, bounds=(0.0, 1.0))
    assert (e.mean, e.lo, e.hi, e.n) == (raw.mean, raw.lo, 1.0, 3) and e.clipped and e.raw == (raw.lo, raw.hi)
    assert e.to_dict()["ci95"] == [raw.lo, 1.0] and e.to_dict()["ci95_unclipped"] == [raw.lo, raw.hi]
    assert e.format(3).endswith("1.000]\u2020") and not raw.format(3).endswith("\u2020")
    inside = estimate([0.4, 0.5, 0.6], bounds=(0.0, 1.0))  # an interval inside the range is untouched
    assert not inside.clipped and "ci95_unclipped" not in inside.to_dict() and inside == estimate([0.4, 0.5, 0.6])
    low = estimate([0.0, 0.0, 0.3], bounds=(0.0, math.inf))
    assert low.lo == 0.0 and low.hi == estimate([0.0, 0.0, 0.3]).hi
    one = estimate([1.0], bounds=(0.0, 1.0))  # one value: no interval, nothing to clip
    assert one.lo is None and not one.clipped


def test_values_outside_their_declared_range_are_an_error():
    with pytest.raises(ValueError, match=r"outside their declared range \[0, 1\]"):
        estimate([0.5, 1.2], bounds=(0.0, 1.0))
    assert estimate([1.0 + 1e-9, 0.9], bounds=(0.0, 1.0)).hi <= 1.0  # rounding slack: a cosine of 1 + 1e-9
