"""Each claim function on small hand-built results: one giving held, one did not hold, one could not be evaluated.

The fake run has only what the claim functions read: arms with roles, sweep points, units with a seed
and a ``status["result"]``, the config, and ``paired``/``estimate`` over seeds (the real ones'
arithmetic, from :mod:`covshift.experiments.stats`).
"""

import math
from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np
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


# --- santurkar-noise -------------------------------------------------------------------------------

from covshift.experiments.papers import santurkar_noise as sn  # noqa: E402

NOISY = Arm("noisy-bn", Role.VARIANT, "noisy", {"norm": "noisy-bn"})


def test_step_shifts_use_only_records_one_step_apart():
    steps = np.array([0, 1, 2, 100, 101, 300])
    mean = np.array([0.0, 1.0, 1.5, 9.0, 9.5, 50.0])
    std = np.ones(6)
    # pairs (0,1), (1,2), (100,101); the jumps 2->100 and 101->300 are not per-step changes
    assert sn.step_shifts(steps, mean, std).tolist() == pytest.approx([1.0, 0.5, 0.5])
    assert sn.step_shifts(np.array([0, 100, 200]), mean[:3], std[:3]).size == 0


def test_step_shifts_do_not_depend_on_the_recording_interval():
    # A slow drift (0.01 per step) and noise redrawn every step: the between-records measure grew with the
    # interval for the drift and not for the noise; the per-step one is the same whatever is recorded.
    rng = np.random.default_rng(0)
    t = np.arange(2000)
    drift, noise = 0.01 * t, rng.normal(0, 0.3, len(t))
    for series in (drift, noise):
        every1 = sn.step_shifts(t, series, np.ones(len(t))).mean()
        windows = np.concatenate([t[i : i + 2] for i in range(0, 2000, 100)])  # records t, t+1 every 100 steps
        sparse = sn.step_shifts(windows, series[windows], np.ones(len(windows))).mean()
        assert sparse == pytest.approx(every1, rel=0.25)


@pytest.mark.parametrize(
    "lo_hi, direction, margin, verdict",
    [
        ((-0.1, 0.3), "not smaller", 0.2, Verdict.HELD),
        ((-0.6, -0.3), "not smaller", 0.2, Verdict.NOT_HELD),
        ((-0.6, 0.1), "not smaller", 0.2, Verdict.NOT_EVALUATED),  # the review's case: no power, not 'held'
        ((-0.3, 0.04), "not larger", 0.05, Verdict.HELD),
        ((0.06, 0.2), "not larger", 0.05, Verdict.NOT_HELD),
        ((-0.14, 0.32), "not larger", 0.05, Verdict.NOT_EVALUATED),
    ],
)
def test_non_inferiority_verdicts(lo_hi, direction, margin, verdict):
    from covshift.experiments.stats import Estimate

    d = Estimate(sum(lo_hi) / 2, lo_hi[0], lo_hi[1], 3)
    assert sn.non_inferior(d, margin, direction) is verdict


def _ics_run(l2_bn, l2_none, cos_bn, cos_none):
    layers = [SimpleNamespace(weights=f"hidden{i}.linear") for i in (1, 2, 3)]
    units = {}
    for arm, l2s, coss in ((BN, l2_bn, cos_bn), (NONE, l2_none, cos_none)):
        us = []
        for s, (l2, c) in enumerate(zip(l2s, coss)):
            rows = [{"layer": f"hidden{i}.linear", "step": 0, "l2_diff": l2, "cosine": c} for i in (2, 3)]
            u = FakeUnit(s, {})
            u.records = lambda name, rows=rows: rows
            us.append(u)
        units[(arm.name, ())] = us
    run = FakeRun([NONE, BN], units, SimpleNamespace())
    run.layers = layers
    for us in units.values():
        for u in us:
            u.run = run
    return run


def test_gradient_ics_claim_held_not_held_not_evaluated():
    delta = math.log(1.25)
    same = [0.9, 0.91, 0.89]
    held = _ics_run([1.0, 1.05, 0.98], [1.0, 1.0, 1.0], same, same)
    assert sn.claim_gradient_ics(held, delta).verdict is Verdict.HELD
    smaller = _ics_run([0.5, 0.52, 0.49], [1.0, 1.0, 1.0], same, same)  # BN's ICS halved: BN does reduce it
    assert sn.claim_gradient_ics(smaller, delta).verdict is Verdict.NOT_HELD
    noisy = _ics_run([0.4, 1.6, 0.9], [1.0, 1.0, 1.0], same, same)  # no power
    r = sn.claim_gradient_ics(noisy, delta)
    assert r.verdict is Verdict.NOT_EVALUATED and "straddles" in r.reason


def _noise_run(acc, loss, inst, monkeypatch):
    """``acc``/``loss``/``inst``: {arm: per-seed values} of final accuracy, final training loss, instability."""
    units = {}
    for arm in (NONE, BN, NOISY):
        units[(arm.name, ())] = [
            FakeUnit(s, {}, {"test_acc": acc[arm.name][s], "train_loss": loss[arm.name][s], "inst": inst[arm.name][s]})
            for s in range(3)
        ]
    for us in units.values():
        for u in us:
            u.final = lambda key, u=u: u.extra[key]
    monkeypatch.setattr(sn, "instability", lambda u: u.extra["inst"])
    return FakeRun([NONE, BN, NOISY], units, SimpleNamespace())


GOOD_ACC = {"none": [0.90, 0.91, 0.90], "bn": [0.97, 0.972, 0.971], "noisy-bn": [0.968, 0.97, 0.969]}
GOOD_LOSS = {"none": [0.3, 0.31, 0.29], "bn": [0.05, 0.05, 0.05], "noisy-bn": [0.1, 0.11, 0.1]}
UNSTABLE = {"none": [0.01, 0.011, 0.012], "bn": [0.01, 0.01, 0.01], "noisy-bn": [0.5, 0.55, 0.52]}
STABLE = {"none": [0.5, 0.55, 0.52], "bn": [0.01, 0.01, 0.01], "noisy-bn": [0.01, 0.011, 0.012]}


def test_less_stable_claim_held_not_held_not_evaluated(monkeypatch):
    assert sn.claim_less_stable(_noise_run(GOOD_ACC, GOOD_LOSS, UNSTABLE, monkeypatch), 0.0).verdict is Verdict.HELD
    assert sn.claim_less_stable(_noise_run(GOOD_ACC, GOOD_LOSS, STABLE, monkeypatch), 0.0).verdict is Verdict.NOT_HELD
    none_ = {k: [None] * 3 for k in UNSTABLE}
    r = sn.claim_less_stable(_noise_run(GOOD_ACC, GOOD_LOSS, none_, monkeypatch), 0.0)
    assert r.verdict is Verdict.NOT_EVALUATED and "--monitor-every 1" in r.reason


def test_trains_claim_is_conditional_on_the_premise_and_judged_on_training_loss(monkeypatch):
    assert sn.claim_trains(_noise_run(GOOD_ACC, GOOD_LOSS, UNSTABLE, monkeypatch), 0.01).verdict is Verdict.HELD
    bad_acc = {**GOOD_ACC, "noisy-bn": [0.80, 0.81, 0.80]}
    assert sn.claim_trains(_noise_run(bad_acc, GOOD_LOSS, UNSTABLE, monkeypatch), 0.01).verdict is Verdict.NOT_HELD
    bad_loss = {**GOOD_LOSS, "noisy-bn": [0.6, 0.61, 0.6]}  # accuracy fine, but trains worse than the plain network
    assert sn.claim_trains(_noise_run(GOOD_ACC, bad_loss, UNSTABLE, monkeypatch), 0.01).verdict is Verdict.NOT_HELD
    r = sn.claim_trains(_noise_run(GOOD_ACC, GOOD_LOSS, STABLE, monkeypatch), 0.01)  # premise (ii) did not hold
    assert r.verdict is Verdict.NOT_EVALUATED and "premise" in r.reason


@pytest.mark.slow
def test_noise_step_equals_training_steps_after_a_unit(tmp_path):
    """Gradient ICS's extra forwards and the evaluations must not advance the noise's step counter."""
    import dataclasses

    from covshift.experiments.declaration import Unit
    from covshift.experiments.executors import run_unit
    from covshift.nn.noisy_batchnorm import NoisyBatchNorm1d

    built = []

    def build(cfg, data):
        built.append(sn.he_mlp(cfg, data))
        return built[-1]

    exp = dataclasses.replace(sn.SANTURKAR_NOISE, build_model=build)
    config = dataclasses.replace(exp.config, steps=25, hidden=(16, 16, 16), monitor_every=1, ics_every=5, eval_every=10,
                                 eval_every_early=10, units=(0,), seeds=(0,), progress=False)
    unit = Unit("noisy-bn", 0)
    status = run_unit(exp, exp.unit_config(config, unit), unit, tmp_path)
    assert status["status"] == "complete"
    noisy = [m for m in built[0].modules() if isinstance(m, NoisyBatchNorm1d)]
    assert len(noisy) == 3 and [int(m.noise_step) for m in noisy] == [25, 25, 25]


# --- depth -----------------------------------------------------------------------------------------

from covshift.experiments.papers import depth as dp  # noqa: E402
from covshift.experiments.stats import Estimate  # noqa: E402


@pytest.mark.parametrize(
    "plain, verdict",
    [
        ((-0.004, 0.006), Verdict.HELD),
        ((0.02, 0.03), Verdict.NOT_HELD),  # plain explodes too, though at a tenth of BN's rate: not 'flat'
        ((0.0044, 0.0109), Verdict.NOT_EVALUATED),  # straddles the bound
    ],
)
def test_linear_growth_needs_an_absolutely_flat_plain_slope(plain, verdict):
    bn = Estimate(0.19, 0.185, 0.195, 3)
    sb = Estimate(sum(plain) / 2, plain[0], plain[1], 3)
    assert dp.linear_growth_verdict(bn, 0.99, sb, 0.9, 0.01) is verdict
    assert dp.linear_growth_verdict(bn, 0.5, Estimate(0.0, -0.001, 0.001, 3), 0.9, 0.01) is Verdict.NOT_HELD  # not linear


def _depth_run(ranks):
    """``ranks``: {arm: {depth: per-seed numerical ranks}}."""
    units = {}
    for arm, by_depth in ranks.items():
        for d, vals in by_depth.items():
            units[(arm, (("depth", d),))] = [FakeUnit(s, {"depth": d, "numerical_rank": v}) for s, v in enumerate(vals)]
    return FakeRun([NONE, BN], units, SimpleNamespace())


def test_rank_claim_judges_the_trend_with_depth():
    collapse = {"none": {4: [120, 121, 119], 128: [56, 57, 55]}, "bn": {4: [128, 128, 128], 128: [127, 128, 126]}}
    assert dp.claim_rank(_depth_run(collapse), 0.0).verdict is Verdict.HELD
    # BN higher at the deepest depth, but it was already so at depth 4 and nothing falls with depth: no collapse shown
    level = {"none": {4: [56, 57, 55], 128: [60, 61, 60]}, "bn": {4: [128, 128, 128], 128: [128, 128, 128]}}
    assert dp.claim_rank(_depth_run(level), 0.0).verdict is Verdict.NOT_HELD
    both = {"none": {4: [120, 121, 119], 128: [56, 57, 55]}, "bn": {4: [128, 128, 128], 128: [50, 51, 49]}}  # BN falls more
    assert dp.claim_rank(_depth_run(both), 0.0).verdict is Verdict.NOT_HELD
    spread = {"none": {4: [120, 80, 119], 128: [56, 121, 55]}, "bn": {4: [128, 128, 128], 128: [128, 128, 128]}}
    assert dp.claim_rank(_depth_run(spread), 0.0).verdict is Verdict.NOT_EVALUATED
    assert dp.claim_rank(_depth_run({"none": {4: [1]}, "bn": {4: [1]}}), 0.0).verdict is Verdict.NOT_EVALUATED


# --- batch-size ------------------------------------------------------------------------------------

from covshift.experiments.papers import batch_size as bs  # noqa: E402

BS_ARMS = [Arm("bn", Role.BASELINE, "BN", {"norm": "bn"}), Arm("renorm", Role.TREATMENT, "BRN", {"norm": "renorm"}),
           Arm("group", Role.VARIANT, "GN", {"norm": "group"})]


def _bs_run(errors, converged_error=0.02):
    """``errors``: {arm: {batch: per-seed test errors}}."""
    units = {}
    for arm, by_batch in errors.items():
        for b, vals in by_batch.items():
            units[(arm, (("batch_size", b),))] = [FakeUnit(s, {"test_error": v}) for s, v in enumerate(vals)]
    return FakeRun(BS_ARMS, units, SimpleNamespace(converged_error=converged_error, samples=4000))


def _e(x):
    return [x - 0.001, x, x + 0.001]


def test_batch_size_claims_held_not_held_and_not_evaluated_far_from_convergence():
    wu_he = {"bn": {2: _e(0.03), 32: _e(0.01)}, "renorm": {2: _e(0.015), 32: _e(0.01)}, "group": {2: _e(0.012), 32: _e(0.011)}}
    assert bs.claim_bn_degrades(_bs_run(wu_he), 0.02).verdict is Verdict.HELD
    assert bs.claim_renorm_beats_bn(_bs_run(wu_he), 0.0).verdict is Verdict.HELD
    flat = {"bn": {2: _e(0.011), 32: _e(0.012)}, "renorm": {2: _e(0.013), 32: _e(0.01)}, "group": {2: _e(0.012), 32: _e(0.011)}}
    assert bs.claim_bn_degrades(_bs_run(flat), 0.02).verdict is Verdict.NOT_HELD
    assert bs.claim_renorm_beats_bn(_bs_run(flat), 0.0).verdict is Verdict.NOT_HELD
    short = {"bn": {2: _e(0.063), 32: _e(0.088)}, "renorm": {2: _e(0.063), 32: _e(0.084)}, "group": {2: _e(0.06), 32: _e(0.084)}}
    for claim, tol in ((bs.claim_bn_degrades, 0.02), (bs.claim_renorm_beats_bn, 0.0)):
        r = claim(_bs_run(short), tol)
        assert r.verdict is Verdict.NOT_EVALUATED and "convergence" in r.reason
