"""Each claim function on small hand-built results: one giving held, one did not hold, one could not be evaluated.

The fake run has only what the claim functions read: arms with roles, sweep points, units with a seed
and a ``status["result"]``, the config, and ``paired``/``estimate`` over seeds (the real ones'
arithmetic, from :mod:`covshift.experiments.stats`).
"""

import math
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest

from covshift.experiments.declaration import Arm, Role, Verdict
from covshift.experiments.papers import lr_sweep
from covshift.experiments.stats import estimate


@dataclass
class FakeUnit:
    seed: int
    result: dict
    extra: dict = field(default_factory=dict)

    @property
    def status(self):
        return {"result": self.result}


class FakeRun:
    def __init__(self, arms, units, config):
        self.arms, self._units, self.config = arms, units, config  # units: {(arm, point): [FakeUnit]}

    def first(self, role):
        return next((a for a in self.arms if a.role is role), None)

    def points(self):
        seen = []
        for (_, p) in self._units:
            if p not in seen:
                seen.append(p)
        return seen

    def units_of(self, arm, point=None):
        if point is None:
            point = self.points()[0]
        return self._units.get((arm, point), [])

    def per_seed(self, fn, arm, point=None):
        return {u.seed: fn(u) for u in self.units_of(arm, point)}

    def estimate(self, fn, arm, point=None):
        return estimate(list(self.per_seed(fn, arm, point).values()))

    def paired(self, fn, a, b, point=None, op="difference"):
        va, vb = self.per_seed(fn, a, point), self.per_seed(fn, b, point)
        f = (lambda x, y: x - y) if op == "difference" else (lambda x, y: math.log(x / y))
        return estimate([f(va[s], vb[s]) for s in sorted(set(va) & set(vb)) if va[s] is not None and vb[s] is not None])


NONE = Arm("none", Role.BASELINE, "plain", {"norm": "none"})
BN = Arm("bn", Role.TREATMENT, "BN", {"norm": "bn"})


# --- lr-sweep --------------------------------------------------------------------------------------


def _lr_run(trained_bn, trained_none, seeds=3, diverged_above=math.inf):
    """``trained_*``: {rate: trains at every seed}; a rate that does not train ends at chance (0.1) or,
    above ``diverged_above``, diverged."""
    units = {}
    for arm, trained in ((BN, trained_bn), (NONE, trained_none)):
        for lr, ok in trained.items():
            div = not ok and lr > diverged_above
            units[(arm.name, (("lr", lr),))] = [
                FakeUnit(s, {"lr": lr, "diverged": div, "test_acc": 0.95 if ok else 0.1}) for s in range(seeds)
            ]
    return FakeRun([NONE, BN], units, SimpleNamespace(trains_threshold=0.5))


GRID = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)


def _upto(largest):
    return {lr: lr <= largest for lr in GRID}


def test_bracket_is_largest_trained_and_next_rate():
    assert lr_sweep.bracket(_upto(0.3)) == (0.3, 1.0)
    assert lr_sweep.bracket(_upto(10.0)) == (10.0, math.inf)
    assert lr_sweep.bracket({0.1: False, 1.0: False}) == (None, math.inf)
    assert lr_sweep.bracket({0.1: True, 0.3: False, 1.0: True, 3.0: False}) == (1.0, 3.0)  # not monotone: the largest


@pytest.mark.parametrize(
    "bn, plain, verdict",
    [
        (3.0, 0.1, Verdict.HELD),  # lowest possible ratio 3 / 0.3 = 10
        (1.0, 0.3, Verdict.NOT_HELD),  # highest possible 3 / 0.3 = 10, not attained
        (3.0, 0.3, Verdict.NOT_EVALUATED),  # (3 / 1, 10 / 0.3) = (3, 33) contains 10: the grid-bound case of the review
        (10.0, 0.01, Verdict.HELD),  # BN at the grid's top: its bracket is open above, the lowest ratio 10 / 0.03
    ],
)
def test_larger_rates_claim_from_the_brackets(bn, plain, verdict):
    r = lr_sweep.claim_larger_rates(_lr_run(_upto(bn), _upto(plain)), 10.0)
    assert r.verdict is verdict
    assert (r.reason != "") == (verdict is Verdict.NOT_EVALUATED)


def test_larger_rates_claim_without_a_trained_rate_is_not_evaluated():
    r = lr_sweep.claim_larger_rates(_lr_run(_upto(3.0), {lr: False for lr in GRID}), 10.0)
    assert r.verdict is Verdict.NOT_EVALUATED and "plain" in r.reason


def test_outcomes_count_failed_to_train_apart_from_diverged():
    run = _lr_run(_upto(1.0), _upto(0.1), diverged_above=1.0)
    rows = {lr: c for lr, c, n in lr_sweep.outcome_counts(run, "none")}
    O = lr_sweep.Outcome
    assert rows[0.1] == {O.TRAINED: 3, O.FAILED: 0, O.DIVERGED: 0}
    assert rows[0.3] == {O.TRAINED: 0, O.FAILED: 3, O.DIVERGED: 0}  # ended at chance, finite loss
    assert rows[3.0] == {O.TRAINED: 0, O.FAILED: 0, O.DIVERGED: 3}
    text = " ".join(lr_sweep.findings(run))
    assert "failed to train at 0.3 (3/3), 1 (3/3)" in text and "diverged at 3 (3/3), 10 (3/3)" in text


def test_best_accuracy_claim_held_not_held_not_evaluated():
    def run(acc_bn, acc_none):
        units = {("bn", (("lr", 0.1),)): [FakeUnit(s, {"test_acc": a, "diverged": False}) for s, a in enumerate(acc_bn)],
                 ("none", (("lr", 0.1),)): [FakeUnit(s, {"test_acc": a, "diverged": False}) for s, a in enumerate(acc_none)]}
        return FakeRun([NONE, BN], units, SimpleNamespace(trains_threshold=0.5))

    assert lr_sweep.claim_best_accuracy(run([0.97, 0.971, 0.969], [0.95, 0.951, 0.949]), 0.005).verdict is Verdict.HELD
    assert lr_sweep.claim_best_accuracy(run([0.90, 0.901, 0.899], [0.95, 0.951, 0.949]), 0.005).verdict is Verdict.NOT_HELD
    assert lr_sweep.claim_best_accuracy(run([], []), 0.005).verdict is Verdict.NOT_EVALUATED
