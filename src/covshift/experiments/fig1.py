"""``fig1``: Ioffe & Szegedy 2015, Figure 1 (Section 4.1), declared.

An MNIST MLP, 784-100-100-100-10 with sigmoids, trained with and without BatchNorm before every
sigmoid, 50,000 steps of 60 examples. Measured: (a) test accuracy over training; (b, c) the
15/50/85th percentiles of one sigmoid's input in the last hidden layer; the drift of every
layer's input distribution; and beside it the gradient ICS of Santurkar et al. (2018,
Definition 2.1) of every layer's weights.

Panels (b) and (c) show the same unit in both networks, chosen by one rule: both networks start
from the same weights (one generator draws every weight in the same order), the recorded units
are ranked in each network by how far their median input moved from the first record to the
last, and the unit with the median sum of ranks over the two networks is shown ("typical": it
drifted neither the most nor the least in either network). With several seeds the panels show
the first seed.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np

from covshift.experiments.config import ExperimentConfig
from covshift.experiments.declaration import COSINE, NON_NEGATIVE, PROBABILITY, Arm, Claim, ClaimResult, Experiment, FigureSpec, Layer, Metric, Role, Verdict
from covshift.experiments.registry import register

__all__ = ["FIG1", "typical_unit", "steps_to_target", "last_layer"]

EARLY_STEP = 1000  # "ahead early": test accuracy at this step


def _layers(cfg: ExperimentConfig) -> tuple[Layer, ...]:
    n = len(cfg.hidden)
    return tuple(
        Layer(f"hidden{i}.act", f"input to the {cfg.activation}, hidden layer {i}", record_units=(i == n), weights=f"hidden{i}.linear")
        for i in range(1, n + 1)
    )


def last_layer(run) -> Layer:
    return run.layers[-1]


# --- per-unit numbers ---------------------------------------------------------------------------


def final_acc(u) -> Optional[float]:
    return u.final("test_acc")


def best_acc(u) -> Optional[float]:
    _, v = u.series("test_acc")
    return float(v.max()) if len(v) else None


def acc_at(step: int):
    def at(u) -> Optional[float]:
        s, v = u.series("test_acc")
        i = np.nonzero(s == step)[0]
        return float(v[i[0]]) if len(i) else None

    return at


def _baseline_unit(u):
    base = u.run.experiment.first(Role.BASELINE)
    same = [b for b in u.run.units_of(base.name, u.unit.point) if b.seed == u.seed]
    return same[0] if same else None


def steps_to_target(u) -> tuple[Optional[int], Optional[int]]:
    """(step, grid resolution) at which ``u`` first reaches the baseline's final accuracy (same seed)."""
    from covshift.experiments.results import steps_to_reach

    b = _baseline_unit(u)
    target = final_acc(b) if b is not None else None
    if target is None:
        return None, None
    return steps_to_reach(*u.series("test_acc"), target)


def _steps(u) -> Optional[float]:
    s, _ = steps_to_target(u)
    return None if s is None else float(s)


def _resolution(u) -> Optional[float]:
    _, r = steps_to_target(u)
    return None if r is None else float(r)


def layer_drift_last(u, metric: str = "w1") -> Optional[float]:
    """Drift of the last hidden layer's input from its first record to its last, on the training
    batches (training mode: BN normalizes with the batch's statistics, as in training).

    Not on the probe batch: the probe is measured in inference mode, where BN uses its running
    statistics, and those start at (0, 1) rather than at statistics of any data; the first probe
    records of a BN network therefore show the un-normalized input, and a first-to-last drift
    would measure the running averages warming up, not the network changing.
    """
    d = u.drift(u.run.layers[-1].module)
    return float(d[metric][-1]) if d is not None and len(d["steps"]) else None


def ics_mean(layer_index: int, stat: str):
    """Mean over training of a layer's gradient ICS (``l2_diff`` or ``cosine``)."""

    def f(u) -> Optional[float]:
        weights = u.run.layers[layer_index].weights
        vals = [r[stat] for r in u.records("gradient_ics") if r["layer"] == weights and r[stat] is not None and math.isfinite(r[stat])]
        return float(np.mean(vals)) if vals else None

    return f


# --- the typical unit of panels (b) and (c) --------------------------------------------------------


def typical_unit(run, seed: Optional[int] = None) -> Optional[int]:
    """The unit index shown in panels (b) and (c): the median sum of per-network ranks of
    |p50(last) - p50(first)| over the recorded units (ties: the lower index)."""
    layer = last_layer(run).module
    seed = run.seeds()[0] if seed is None else seed
    candidates = list(run.config.units)
    moves = []
    for arm in run.arms:
        us = [u for u in run.units_of(arm.name) if u.seed == seed]
        if not us:
            continue
        m = []
        for c in candidates:
            key = us[0].monitor_key(layer, c, probe=True) or us[0].monitor_key(layer, c)
            if key is None:
                m.append(math.nan)
                continue
            _, p50 = us[0].monitor.series(key, "p50")
            m.append(abs(p50[-1] - p50[0]) if len(p50) else math.nan)
        moves.append(m)
    if not moves:
        return None
    arr = np.array(moves)  # (networks, units)
    ok = ~np.isnan(arr).any(0)
    if not ok.any():
        return None
    idx = np.array(candidates)[ok]
    ranks = arr[:, ok].argsort(1).argsort(1).sum(0)
    order = np.lexsort((idx, ranks))
    return int(idx[order[(len(order) - 1) // 2]])


# --- claims ---------------------------------------------------------------------------------------


def _treat_base(run):
    t, b = run.first(Role.TREATMENT), run.first(Role.BASELINE)
    return t, b


def _missing(what: str) -> ClaimResult:
    return ClaimResult(Verdict.NOT_EVALUATED, f"{what}: not measured", reason=f"the run has no {what}")


def claim_higher_accuracy(run, tolerance: float) -> ClaimResult:
    from covshift.experiments.results import verdict_greater

    t, b = _treat_base(run)
    if not (t and b):
        return _missing("pair of networks")
    d = run.paired(final_acc, t.name, b.name)
    return verdict_greater(d, tolerance, f"final test accuracy, {t.label} minus {b.label}")


def claim_ahead_early(run, tolerance: float) -> ClaimResult:
    from covshift.experiments.results import verdict_greater

    t, b = _treat_base(run)
    if not (t and b):
        return _missing("pair of networks")
    d = run.paired(acc_at(EARLY_STEP), t.name, b.name)
    if d.n == 0:
        return ClaimResult(Verdict.NOT_EVALUATED, "", reason=f"no test accuracy recorded at step {EARLY_STEP:,} (a shorter run, or an evaluation grid that skips it)")
    return verdict_greater(d, tolerance, f"test accuracy at step {EARLY_STEP:,}, {t.label} minus {b.label}")


def claim_fewer_steps(run, tolerance: float) -> ClaimResult:
    from covshift.experiments.results import verdict_greater

    t, b = _treat_base(run)
    if not (t and b):
        return _missing("pair of networks")
    d = run.paired(_steps, b.name, t.name, op="log_ratio")
    res = [r for r in run.per_seed(_resolution, t.name).values() if r is not None]
    if all((_steps(u) or 0) == 0 for u in run.units_of(b.name)):
        return ClaimResult(Verdict.NOT_EVALUATED, "", reason=f"{b.label} never improved on its accuracy at step 0, so its final accuracy is no target to reach")
    if d.n == 0:
        reached = [s for s in run.per_seed(_steps, t.name).values() if s is not None]
        if not reached and run.per_seed(final_acc, t.name):
            return ClaimResult(Verdict.NOT_HELD, f"{t.label} never reached {b.label}'s final test accuracy", {})
        return ClaimResult(Verdict.NOT_EVALUATED, "", reason="steps to the target could not be measured")
    v = verdict_greater(d, math.log(1 + tolerance), f"log speed-up (steps of {b.label} / steps of {t.label} to {b.label}'s final accuracy)", 3)
    speed = f"speed-up {math.exp(d.mean):.1f}x" + (f" [{math.exp(d.lo):.1f}x, {math.exp(d.hi):.1f}x]" if d.has_interval else "")
    grid = f"; evaluation grid at {t.label}'s crossing: {int(max(res))} steps" if res else ""
    return ClaimResult(v.verdict, f"{speed}{grid}. {v.summary}", v.numbers)


def claim_stable_distribution(run, tolerance: float) -> ClaimResult:
    from covshift.experiments.results import verdict_greater

    t, b = _treat_base(run)
    if not (t and b):
        return _missing("pair of networks")
    d = run.paired(layer_drift_last, b.name, t.name, op="log_ratio")
    if d.n == 0:
        return _missing("monitor record of the last hidden layer")
    w_b, w_t = run.estimate(layer_drift_last, b.name), run.estimate(layer_drift_last, t.name)
    v = verdict_greater(d, tolerance, f"log ratio of the last layer's input drift (1-Wasserstein, first to last record), {b.label} / {t.label}", 3)
    return ClaimResult(v.verdict, f"W1 drift {w_b.format(3)} {b.label} vs {w_t.format(3)} {t.label}. {v.summary}", {**v.numbers, f"W1 drift {b.label}": w_b, f"W1 drift {t.label}": w_t})


# --- figures and findings (drawn by plots.py from the declaration's arms and layers) ---------------


def _figure1(run):
    from covshift.experiments import plots

    return plots.figure1(run, typical_unit(run))


def _heatmaps(run):
    from covshift.experiments import plots

    return plots.heatmaps(run)


def _drift(run):
    from covshift.experiments import plots

    return plots.drift_figure(run)


def _ics(run):
    from covshift.experiments import plots

    return plots.gradient_ics_figure(run)


def findings(run) -> list[str]:
    """What the drift and gradient-ICS figures show, in numbers."""
    t, b = _treat_base(run)
    if not (t and b):
        return []
    out = []
    n = len(run.layers)
    cos_t = run.estimate(ics_mean(n - 1, "cosine"), t.name)
    cos_b = run.estimate(ics_mean(n - 1, "cosine"), b.name)
    l2_t = run.estimate(ics_mean(n - 1, "l2_diff"), t.name)
    l2_b = run.estimate(ics_mean(n - 1, "l2_diff"), b.name)
    k = typical_unit(run)
    layer = last_layer(run)
    bands = []
    for arm in (b, t):
        us = run.units_of(arm.name)
        key = (us[0].monitor_key(layer.module, k, probe=True) or us[0].monitor_key(layer.module, k)) if us and k is not None else None
        if key is None:
            continue
        _, p15 = us[0].monitor.series(key, "p15")
        _, p85 = us[0].monitor.series(key, "p85")
        if len(p15):
            bands.append(f"{arm.label} from [{p15[0]:.2f}, {p85[0]:.2f}] at the first record to [{p15[-1]:.2f}, {p85[-1]:.2f}] at the last")
    if bands:
        out.append(f"Panels (b, c), unit {k} of the last hidden layer (seed {run.seeds()[0]}): the 15-85th percentile band of its input goes " + "; ".join(bands) + ".")
    if cos_t.n and cos_b.n:
        more = cos_t.mean < cos_b.mean
        out.append(
            f"Gradient ICS (Santurkar et al. 2018) of the last hidden layer's weights, averaged over training: the cosine between the "
            f"gradient before and after the earlier layers' update is {cos_t.format(3)} {t.label} and {cos_b.format(3)} {b.label}, the "
            f"l2 difference {l2_t.format(4)} and {l2_b.format(4)}. By this measure the shift is {'larger' if more else 'not larger'} "
            f"{t.label} than {b.label}: "
            + ("the network whose layer inputs are normalized still sees its gradients move under the earlier layers' updates, so "
               "the paper's notion of ICS (distributions) and Santurkar's (gradients) disagree here." if more else
               "here the two notions of ICS agree in direction.")
        )
    return out


FIG1 = register(
    Experiment(
        name="fig1",
        version=2,
        summary="MNIST MLP (3x100 sigmoid) with and without BatchNorm: test accuracy, the drift of every layer's input, and gradient ICS",
        paper="Ioffe & Szegedy 2015, Figure 1",
        question="Does BN make the network train faster and to a higher accuracy, and keep its layers' input distributions stable?",
        config=ExperimentConfig(),
        arms=(
            Arm("no-bn", Role.BASELINE, "without BN", {"norm": "none"}, color="#d1495b"),
            Arm("bn", Role.TREATMENT, "with BN", {"norm": "bn"}, color="#00798c"),
        ),
        layers=_layers,
        metrics=(
            Metric("final_test_acc", "final test accuracy", final_acc, bounds=PROBABILITY),
            Metric("best_test_acc", "best test accuracy", best_acc, bounds=PROBABILITY),
            Metric("test_acc_at_1000", f"test accuracy at step {EARLY_STEP:,}", acc_at(EARLY_STEP), bounds=PROBABILITY),
            Metric("steps_to_target", "steps to the baseline's final accuracy", _steps, digits=0, bounds=NON_NEGATIVE),
            Metric("steps_to_target_grid", "evaluation grid there (steps)", _resolution, digits=0, bounds=NON_NEGATIVE),
            Metric("last_layer_w1_drift", "last layer's input drift (W1, first to last)", layer_drift_last, digits=3, bounds=NON_NEGATIVE),
            Metric("last_layer_ics_cosine", "gradient ICS cosine, last layer (mean over training)", ics_mean(-1, "cosine"), digits=3, bounds=COSINE),
        ),
        claims=(
            Claim(
                "higher-accuracy",
                "The batch-normalized network enjoys the higher test accuracy.",
                "Ioffe & Szegedy 2015, Section 4.1, Figure 1(a)",
                claim_higher_accuracy,
                tolerance=0.0,
                tolerance_text="BN's final test accuracy minus no-BN's, paired by seed: the 95% interval above 0",
            ),
            Claim(
                "ahead-early",
                "Batch Normalization ... accelerates the training of deep networks (the BN network is ahead early in training).",
                "Ioffe & Szegedy 2015, Abstract and Figure 1(a)",
                claim_ahead_early,
                tolerance=0.0,
                tolerance_text=f"test accuracy at step {EARLY_STEP:,}, BN minus no-BN: the 95% interval above 0",
            ),
            Claim(
                "fewer-steps",
                "Batch Normalization achieves the same accuracy with 14 times fewer training steps (on ImageNet).",
                "Ioffe & Szegedy 2015, Abstract",
                claim_fewer_steps,
                tolerance=0.0,
                tolerance_text="steps to no-BN's final accuracy, no-BN / BN: the 95% interval of the log ratio above 0 (faster at all, not 14x)",
            ),
            Claim(
                "stable-distribution",
                "The distribution in the original network changes significantly over time, both in its mean and the variance ... "
                "In contrast, the distributions in the batch-normalized network are much more stable as training progresses.",
                "Ioffe & Szegedy 2015, Section 4.1, Figure 1(b, c)",
                claim_stable_distribution,
                tolerance=0.0,
                tolerance_text="1-Wasserstein drift of the last layer's sigmoid input (training batches, first to last record), no-BN / BN: "
                "the 95% interval of the log ratio above 0",
            ),
        ),
        figures=(
            FigureSpec(
                "figure1.png",
                "Figure 1, reproduced. (a) Test accuracy over training (mean over seeds, with its 95% band). (b, c) The 15th, 50th "
                "and 85th percentiles of the input to one typical sigmoid of the last hidden layer, without and with BN, on one "
                "y-axis, on a fixed probe batch of held-out digits (the same unit in both networks, chosen by the rule in the "
                "notes; first seed).",
                _figure1,
            ),
            FigureSpec(
                "heatmaps.png",
                "The distribution of every watched layer's input over training (first seed): each column is one recorded "
                "step's histogram (fixed bin edges for the whole run); colour is the count on a log scale.",
                _heatmaps,
            ),
            FigureSpec(
                "drift.png",
                "The paper's ICS: drift of each layer's input distribution from its first record, by four measures (mean over seeds "
                "with its 95% band). Colour is the layer; columns are the networks.",
                _drift,
            ),
            FigureSpec(
                "gradient_ics.png",
                "Santurkar et al.'s ICS (Definition 2.1): for each layer's weights, the l2 difference and the cosine between the "
                "gradient before and after the earlier layers take this step's update, on the step's batch, at the monitor's "
                "checkpoints (mean over seeds with its 95% band; ideal: 0 and 1).",
                _ics,
            ),
        ),
        findings=findings,
        notes=(
            "Optimizer, learning rate and initial std are not in the paper: plain SGD, lr 0.1, N(0, 0.05^2) weights, biases 0.",
            "Grayscale pixels in [0, 1] instead of binarized ones.",
            "The speed-up is measured to the no-BN network's final accuracy on MNIST, not to Inception's 72.2% on ImageNet (14x).",
            "Panels (b, c): the same unit index in both networks (identical initial weights), the one whose median input moved "
            "the median amount over both networks (median sum of ranks); percentiles on a fixed probe batch of the first 1,000 "
            "test digits, in inference mode.",
            "Drift is measured on the training batches (training mode). With BN the probe batch, measured in inference mode, "
            "starts with BN's running statistics at their initial (0, 1), so its first records show the un-normalized input until "
            "the running averages converge (the first few hundred steps of panel c).",
            "Test accuracy is evaluated every 100 steps during the first 10% of training and every 500 steps after; the grid "
            "resolution is reported beside every steps-to-target number.",
        ),
    )
)
