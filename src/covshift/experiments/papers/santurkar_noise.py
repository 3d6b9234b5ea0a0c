"""``santurkar-noise``: does BN work by reducing internal covariate shift? (Santurkar et al. 2018, section 2.1, Figs. 2-3, 5).

Three networks, the same 784-100-100-100-10 ReLU MLP (He-initialized) trained on MNIST with plain
SGD from the same initial weights and batches: without normalization, with BatchNorm before every
ReLU, and with "noisy BN" (:class:`covshift.nn.NoisyBatchNorm1d`): BatchNorm followed by i.i.d.
noise on every activation of every sample, of non-zero mean and non-unit variance, whose
distribution is re-drawn at every step (per channel and step: mean ~ U(-0.5, 0.5), std ~
U(0.5, 1.0); see that class for the reasons). Measured by the toolbox's training loop:

* test accuracy over training;
* each hidden layer's input distribution to the ReLU, recorded by the activation monitor at every
  step (``monitor_every=1``) on the training batch, the layer as a whole and 8 single units per layer
  one by one; the *instability* of a network is defined per step: the mean over those units and over
  every pair of records one step apart of the absolute standardized mean shift
  :math:`|\\mu_{t+1} - \\mu_t| / \\bar\\sigma` (:func:`step_shifts`; scale-free, so a BN network's
  unit-variance inputs and a plain network's are compared on the same footing). Only pairs one step
  apart count, so the measure does not depend on the recording interval: between records N steps
  apart a plain network's slow drift accumulates while noise re-drawn every step does not (an earlier
  between-records definition gave noisy BN 1.49x the plain network's instability at N = 1 and 0.86x
  at N = 100);
* gradient ICS (Santurkar et al.'s Definition 2.1, :func:`covshift.monitor.gradient_ics`) of every
  hidden layer's weights every ``ics_every`` steps, as the l2 difference and the cosine.

Single units, not whole layers: the noise's mean is drawn per channel with mean 0 over channels, so a
whole layer's pooled distribution hardly moves while every unit's jumps at every step; the paper's
Figure 2 shows single activations.

Choices (not from the paper, which uses VGG on CIFAR-10): the noise ranges above; lr 0.1, 3,000
steps of 60 examples; activation records every step, gradient ICS every 100 steps; a noisy network
"trains about as well as BN" when its final test accuracy is at most one point below BN's (95%
interval, paired by seed), and "better in terms of training" than the plain network when its final
training loss is lower. Claim (i) is judged only when claim (ii), its premise, held. Claim (iii) is
a non-inferiority test: margin ln 1.25 on the log l2 ratio, 0.05 on the cosine difference (chosen
before the run: a quarter smaller ICS, or a cosine 0.05 closer to 1, would count as "BN reduces ICS").
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import numpy as np

from covshift.experiments.config import ExperimentConfig
from covshift.experiments.declaration import Arm, Claim, ClaimResult, Experiment, FigureSpec, Layer, Metric, Role, Verdict
from covshift.experiments.papers.common import COSINE, HE_INIT, NON_NEGATIVE, PROBABILITY, he_mlp, not_evaluated
from covshift.experiments.papers.plotting import arm_color, new_figure
from covshift.experiments.registry import register
from covshift.experiments.stats import Estimate

__all__ = ["SANTURKAR_NOISE", "instability", "step_shifts", "ics_mean", "non_inferior", "COSINE_MARGIN"]


def _layers(cfg: ExperimentConfig) -> tuple[Layer, ...]:
    return tuple(
        Layer(f"hidden{i}.act", f"input to the ReLU, hidden layer {i}", record_units=True, weights=f"hidden{i}.linear")
        for i in range(1, len(cfg.hidden) + 1)
    )


def _unit_keys(u):
    """The monitor keys of every single unit recorded in every declared layer."""
    keys = []
    for layer in u.run.layers:
        for c in u.run.config.units:
            k = u.monitor_key(layer.module, c)
            if k is not None:
                keys.append(k)
    return keys


def step_shifts(steps: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """``|mu_{t+1} - mu_t| / sigma_bar`` for every pair of records exactly one step apart (``t``, ``t + 1``).

    ``sigma_bar`` is the pooled std of the two records (:func:`covshift.monitor.drift.mean_shift`).
    Pairs further apart are left out, so the measure is a per-step change whatever the recording
    interval: between records 100 steps apart a plain network's slow drift adds up while noise
    re-drawn every step does not, and a ratio of such shifts would depend on the interval.
    """
    from covshift.monitor.drift import mean_shift

    d = np.abs(mean_shift(mean, std, "previous"))
    one = np.zeros(len(steps), dtype=bool)
    one[1:] = np.diff(np.asarray(steps)) == 1
    d = d[one]
    return d[np.isfinite(d)]


def _instability(u, keys) -> Optional[float]:
    mon, vals = u.monitor, []
    if mon is None:
        return None
    for key in keys:
        steps, mean = mon.series(key, "mean")
        _, std = mon.series(key, "std")
        vals.extend(step_shifts(steps, mean, std).tolist())
    return float(np.mean(vals)) if vals else None


def instability(u) -> Optional[float]:
    """Per-step instability: the mean over recorded single units and over every pair of records one
    step apart of ``|mu_{t+1} - mu_t| / sigma_bar`` (:func:`step_shifts`); ``None`` without such pairs
    (records every ``--monitor-every 1`` step are needed)."""
    return _instability(u, _unit_keys(u))


def layer_instability(u) -> Optional[float]:
    """:func:`instability` of the whole layers (every unit pooled), for comparison."""
    return _instability(u, [k for k in (u.monitor_key(layer.module) for layer in u.run.layers) if k is not None])


def findings(run) -> list[str]:
    parts = []
    for arm in run.arms:
        e = run.estimate(layer_instability, arm.name)
        if e.n:
            parts.append(f"{arm.label} {e.format(4)}")
    if not parts:
        return []
    return [
        "Whole-layer instability (the same measure on each hidden layer's pooled distribution, all units together): "
        + ", ".join(parts) + ". The noise's mean is drawn per channel around 0, so it largely averages out over a layer's "
        "units; the claim is judged on single units, as the paper's Figure 2 shows single activations."
    ]


def ics_mean(stat: str):
    """Mean over training and over every hidden layer but the first (whose G' is G) of a gradient-ICS statistic."""

    def f(u) -> Optional[float]:
        layers = [l.weights for l in u.run.layers[1:]]
        v = [r[stat] for r in u.records("gradient_ics") if r["layer"] in layers and r[stat] is not None and math.isfinite(r[stat])]
        return float(np.mean(v)) if v else None

    return f


def _final_acc(u) -> Optional[float]:
    return u.final("test_acc")


def _final_train_loss(u) -> Optional[float]:
    return u.final("train_loss")


def _arms(run):
    return run.first(Role.BASELINE), run.first(Role.TREATMENT), run.first(Role.VARIANT)


def _one_sided(d: Estimate, bound: str) -> float:
    """The interval's ``"lo"`` or ``"hi"`` end (the value itself with one seed)."""
    if not d.has_interval:
        return d.mean
    return d.lo if bound == "lo" else d.hi


def claim_trains(run, tolerance: float) -> ClaimResult:
    """Claim (i), judged only when its premise, claim (ii), held.

    The paper's point is that noisy BN trains well *although* its layer inputs are less stable than a
    plain network's; without that premise "noisy BN trains about as well as BN" says nothing about
    ICS, so the verdict is "could not be evaluated" unless (ii) held. Judged on the final test accuracy
    (BN minus noisy BN at most ``tolerance``, upper end of the 95% interval; noisy BN minus no
    normalization above 0) and on training ("performs better in terms of training"): noisy BN's
    final training loss (mean over the last checkpoint interval) below the plain network's,
    ``log(loss none / loss noisy)`` above 0.
    """
    from covshift.experiments.results import verdict_greater

    none, bn, noisy = _arms(run)
    if not (none and bn and noisy):
        return not_evaluated("the run lacks one of the three networks")
    gap = run.paired(_final_acc, bn.name, noisy.name)  # BN minus noisy BN
    gain = run.paired(_final_acc, noisy.name, none.name)  # noisy BN minus none
    loss = run.paired(_final_train_loss, none.name, noisy.name, op="log_ratio")  # log(none / noisy)
    if gap.n == 0 or gain.n == 0:
        return not_evaluated("no final test accuracy")
    if loss.n == 0:
        return not_evaluated("no final training loss")
    close = _one_sided(gap, "hi") <= tolerance
    better = verdict_greater(gain, 0.0, f"final test accuracy, {noisy.label} minus {none.label}")
    trains = verdict_greater(loss, 0.0, f"log(final training loss {none.label} / {noisy.label})", 3)
    text = (
        f"final test accuracy, {bn.label} minus {noisy.label} = {gap.format(4)} (the claim needs it at most {tolerance:g}); "
        f"{better.summary}; {trains.summary}"
    )
    numbers = {f"{bn.label} - {noisy.label}": gap, **better.numbers, **trains.numbers}
    premise = claim_less_stable(run, 0.0)
    if premise.verdict is not Verdict.HELD:
        return ClaimResult(Verdict.NOT_EVALUATED, text, numbers, reason=(
            f"the claim is conditional on its premise, claim (ii) ({noisy.label}'s inputs less stable than {none.label}'s), "
            f"which {premise.verdict.value}; measured: {text}"
        ))
    ok = close and better.verdict is Verdict.HELD and trains.verdict is Verdict.HELD
    return ClaimResult(Verdict.HELD if ok else Verdict.NOT_HELD, f"(given claim (ii), which held) {text}", numbers)


def claim_less_stable(run, tolerance: float) -> ClaimResult:
    from covshift.experiments.results import verdict_greater

    none, _, noisy = _arms(run)
    if not (none and noisy):
        return not_evaluated("the run lacks the noisy-BN or the plain network")
    d = run.paired(instability, noisy.name, none.name, op="log_ratio")
    if d.n == 0:
        return not_evaluated("no single-unit monitor records one step apart (instability is per step: it needs --monitor-every 1)")
    v = verdict_greater(d, tolerance, f"log per-step instability (mean |standardized mean shift| between consecutive steps), {noisy.label} / {none.label}", 3)
    return ClaimResult(v.verdict, f"{noisy.label} is {math.exp(d.mean):.3g}x as unstable per step as {none.label}. {v.summary}", v.numbers)


COSINE_MARGIN = 0.05  # non-inferiority margin of the cosine claim: BN's mean cosine may exceed the plain network's by at most this


def non_inferior(d: Estimate, margin: float, direction: str) -> Verdict:
    """Non-inferiority of ``d`` with margin ``margin`` (95% interval; the value alone with one seed).

    ``direction="not smaller"``: held when ``lo >= -margin``, did not hold when ``hi < -margin``;
    ``"not larger"``: held when ``hi <= margin``, did not hold when ``lo > margin``; otherwise the
    interval straddles the margin and the data cannot tell (too few seeds or too much spread).
    """
    lo, hi = _one_sided(d, "lo"), _one_sided(d, "hi")
    if direction == "not smaller":
        return Verdict.HELD if lo >= -margin else Verdict.NOT_HELD if hi < -margin else Verdict.NOT_EVALUATED
    if direction == "not larger":
        return Verdict.HELD if hi <= margin else Verdict.NOT_HELD if lo > margin else Verdict.NOT_EVALUATED
    raise ValueError(f"direction must be 'not smaller' or 'not larger', got {direction!r}")


def claim_gradient_ics(run, tolerance: float) -> ClaimResult:
    """Claim (iii) as non-inferiority, not as "no significant difference" (which holds by lack of power).

    ``tolerance`` is the margin ``delta`` on ``log(l2 ICS BN / l2 ICS none)``: held when the interval's
    lower end is at least ``-delta`` (BN's l2 ICS is not smaller by more than a factor ``e^delta``), did
    not hold when its upper end is below ``-delta``; mirrored for the cosine, whose margin is
    :data:`COSINE_MARGIN` (BN's cosine not larger by more than that). Both must hold; either not holding
    is "did not hold"; otherwise "could not be evaluated".
    """
    none, bn, _ = _arms(run)
    if not (none and bn):
        return not_evaluated("the run lacks the BN or the plain network")
    l2 = run.paired(ics_mean("l2_diff"), bn.name, none.name, op="log_ratio")
    cos = run.paired(ics_mean("cosine"), bn.name, none.name)
    if l2.n == 0 or cos.n == 0:
        return not_evaluated("no gradient-ICS records (--ics-every 0?)")
    v1, v2 = non_inferior(l2, tolerance, "not smaller"), non_inferior(cos, COSINE_MARGIN, "not larger")
    text = (f"log(l2 gradient ICS {bn.label} / {none.label}) = {l2.format(3)}, cosine {bn.label} minus {none.label} = "
            f"{cos.format(4)} (means over training and hidden layers 2+, paired by seed, 95% intervals); non-inferiority: "
            f"held if the first interval's lower end >= -{tolerance:.3g} and the second's upper end <= {COSINE_MARGIN:g}, "
            f"did not hold if the first's upper end < -{tolerance:.3g} or the second's lower end > {COSINE_MARGIN:g}")
    numbers = {"log l2 ratio": l2, "cosine difference": cos}
    if Verdict.NOT_HELD in (v1, v2):
        return ClaimResult(Verdict.NOT_HELD, text, numbers)
    if v1 is Verdict.HELD and v2 is Verdict.HELD:
        return ClaimResult(Verdict.HELD, text, numbers)
    return ClaimResult(Verdict.NOT_EVALUATED, text, numbers, reason=f"an interval straddles its margin (too little power to tell): {text}")


# --- figures --------------------------------------------------------------------------------------


def _figure_accuracy_and_drift(run):
    fig, axes = new_figure(3)
    for arm in run.arms:
        c = arm_color(run, arm)
        curve = run.curve(lambda u: u.series("test_acc"), arm.name)
        if curve is not None:
            axes[0].plot(curve.steps, curve.mean, color=c, label=arm.label)
            axes[0].fill_between(curve.steps, curve.lo, curve.hi, color=c, alpha=0.2, lw=0)
        us = run.units_of(arm.name)
        if not us or us[0].monitor is None:
            continue
        u, mon = us[0], us[0].monitor
        last = run.layers[-1].module
        key = u.monitor_key(last, run.config.units[0])
        if key is not None:  # one unit's input distribution over training: the paper's Figure 2
            s, p15 = mon.series(key, "p15")
            _, p50 = mon.series(key, "p50")
            _, p85 = mon.series(key, "p85")
            axes[1].plot(s, p50, color=c, label=arm.label)
            axes[1].fill_between(s, p15, p85, color=c, alpha=0.25, lw=0)
        from covshift.monitor.drift import mean_shift

        shifts = []
        for k in _unit_keys(u):
            s, mean = mon.series(k, "mean")
            _, std = mon.series(k, "std")
            shifts.append(np.abs(mean_shift(mean, std, "previous")))
        if shifts:
            axes[2].plot(s[1:], np.nanmean(np.stack(shifts)[:, 1:], 0), color=c, label=arm.label)  # record 0 has no previous
    axes[0].set_title("test accuracy (mean over seeds, 95% band)", fontsize=10)
    axes[1].set_title(f"one unit, hidden layer {len(run.layers)}: 15/50/85th pct (seed {run.seeds()[0]})", fontsize=10)
    axes[2].set_title(f"instability: |mean shift| between consecutive steps (seed {run.seeds()[0]})", fontsize=10)
    axes[2].set_yscale("log")
    for ax in axes:
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _figure_ics(run):
    fig, axes = new_figure(2)
    for arm in run.arms:
        c = arm_color(run, arm)
        for ax, stat in zip(axes, ("l2_diff", "cosine")):
            for j, layer in enumerate(run.layers[1:]):
                def series(u, layer=layer, stat=stat):
                    rows = [r for r in u.records("gradient_ics") if r["layer"] == layer.weights and r[stat] is not None]
                    return np.array([r["step"] for r in rows]), np.array([r[stat] for r in rows], dtype=float)

                curve = run.curve(series, arm.name)
                if curve is not None:
                    ax.plot(curve.steps, curve.mean, color=c, ls=("-", "--", ":")[j % 3], label=f"{arm.label}, {layer.weights}")
    axes[0].set_title("gradient ICS: ||G - G'||")
    axes[0].set_yscale("log")
    axes[1].set_title("gradient ICS: cos(G, G')")
    for ax in axes:
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    return fig


SANTURKAR_NOISE = register(
    Experiment(
        name="santurkar-noise",
        version=1,
        summary="an MNIST ReLU MLP without normalization, with BN and with noisy BN: accuracy, input-distribution drift, gradient ICS",
        paper="Santurkar et al. 2018, section 2.1, Figures 2, 3 and 5",
        question="If noise makes BN's layer inputs less stable than a plain network's, does BN still train well, and does BN reduce gradient ICS?",
        config=ExperimentConfig(
            activation="relu", steps=3000, batch_size=60, lr=0.1, eval_every=500, eval_every_early=100, early_fraction=0.1,
            monitor_every=1, ics_every=100, probe_size=0, seeds=(0, 1, 2),
        ),
        arms=(
            Arm("none", Role.BASELINE, "no normalization", {"norm": "none"}, color="#d1495b"),
            Arm("bn", Role.TREATMENT, "BatchNorm", {"norm": "bn"}, color="#00798c"),
            Arm("noisy-bn", Role.VARIANT, "noisy BN", {"norm": "noisy-bn"}, color="#edae49"),
        ),
        layers=_layers,
        build_model=he_mlp,
        # the toolbox's training loop reads every field; he_mlp draws He weights, so init_std is unused
        reads=frozenset(f.name for f in dataclasses.fields(ExperimentConfig)) - {"init_std"},
        instead={"init_std": HE_INIT},
        findings=findings,
        metrics=(
            Metric("final_test_acc", "final test accuracy", _final_acc, bounds=PROBABILITY),
            Metric("instability", "per-step instability: mean |standardized mean shift| of single units between consecutive steps", instability, digits=4,
                   bounds=NON_NEGATIVE),
            Metric("ics_l2", "gradient ICS l2 (mean over training, layers 2+)", ics_mean("l2_diff"), digits=4, bounds=NON_NEGATIVE),
            Metric("ics_cosine", "gradient ICS cosine (mean over training, layers 2+)", ics_mean("cosine"), digits=4, bounds=COSINE),
        ),
        claims=(
            Claim(
                "noisy-trains",
                "The performance difference between models with BatchNorm layers and 'noisy' BatchNorm layers is almost "
                "non-existent. Also, both these networks perform much better than standard networks.",
                "Santurkar et al. 2018, section 2.1, Figure 2",
                claim_trains,
                tolerance=0.01,
                tolerance_text="judged only if claim (ii) held (its premise); BN minus noisy BN final accuracy at most 0.01 (upper end "
                "of the 95% interval), noisy BN minus no normalization above 0, and noisy BN's final training loss below no normalization's",
            ),
            Claim(
                "noisy-less-stable",
                "The noisy BatchNorm network has qualitatively less stable distributions than even the standard, non-BatchNorm "
                "network, yet it still performs better in terms of training.",
                "Santurkar et al. 2018, section 2.1, Figure 2",
                claim_less_stable,
                tolerance=0.0,
                tolerance_text="log(per-step instability noisy BN / no normalization), paired by seed: the 95% interval above 0",
            ),
            Claim(
                "gradient-ics",
                "Models with BatchNorm often exhibit an increase in ICS (even for deep linear networks) ... the addition of "
                "BatchNorm layers does not necessarily reduce ICS (by Definition 2.1).",
                "Santurkar et al. 2018, section 2.2, Figure 5",
                claim_gradient_ics,
                tolerance=math.log(1.25),
                tolerance_text="non-inferiority, paired by seed: log(l2 ICS BN / none) interval's lower end >= -ln 1.25 (BN's l2 ICS "
                "not smaller by more than 25%), and cosine BN minus none interval's upper end <= 0.05",
            ),
        ),
        figures=(
            FigureSpec("noise.png", "Figures 2 and 3, reproduced: test accuracy (mean over seeds with its 95% band); the 15th, 50th "
                       "and 85th percentiles of one unit's input to the ReLU in the last hidden layer on the training batches; and "
                       "the per-step instability (absolute standardized mean shift between consecutive steps, mean over the 24 "
                       "recorded units).", _figure_accuracy_and_drift),
            FigureSpec("gradient_ics.png", "Figure 5, reproduced: gradient ICS (Definition 2.1) of hidden layers 2 and 3, l2 "
                       "difference and cosine, every 100 steps (mean over seeds).", _figure_ics),
        ),
        notes=(
            "MNIST and a 784-100-100-100-10 ReLU MLP instead of VGG on CIFAR-10; He initialization; plain SGD, lr 0.1, 3,000 "
            "steps of 60 examples.",
            "Noise of covshift's choosing (the paper's appendix values were not available): per step and channel, mean "
            "~ U(-0.5, 0.5) and std ~ U(0.5, 1.0), added after BN to every activation of every sample, off at inference.",
            "Distribution stability is measured on the training batches at every step (the noise acts in training only), "
            "on 8 single units per hidden layer, as the change between consecutive steps (so it does not depend on the "
            "recording interval).",
            "Claim (i) is conditional on claim (ii), its premise; claim (iii) is judged as non-inferiority with margins "
            "ln 1.25 (l2) and 0.05 (cosine), so that a wide interval gives 'could not be evaluated' rather than 'held'.",
        ),
    )
)
