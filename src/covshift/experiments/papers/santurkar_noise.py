"""``santurkar-noise``: does BN work by reducing internal covariate shift? (Santurkar et al. 2018, section 2.1, Figs. 2-3, 5).

Three networks, the same 784-100-100-100-10 ReLU MLP (He-initialized) trained on MNIST with plain
SGD from the same initial weights and batches: without normalization, with BatchNorm before every
ReLU, and with "noisy BN" (:class:`covshift.nn.NoisyBatchNorm1d`): BatchNorm followed by i.i.d.
noise on every activation of every sample, of non-zero mean and non-unit variance, whose
distribution is re-drawn at every step (per channel and step: mean ~ U(-0.5, 0.5), std ~
U(0.5, 1.0); see that class for the reasons). Measured by the toolbox's training loop:

* test accuracy over training;
* each hidden layer's input distribution to the ReLU, recorded by the activation monitor every
  ``monitor_every`` steps on the training batch, the layer as a whole and 8 single units per layer
  one by one; the *instability* of a network is the mean over those units and over consecutive
  records of the absolute standardized mean shift :math:`|\\Delta\\mu| / \\bar\\sigma`
  (:func:`covshift.monitor.drift.mean_shift`; scale-free, so a BN network's unit-variance inputs and a
  plain network's are compared on the same footing);
* gradient ICS (Santurkar et al.'s Definition 2.1, :func:`covshift.monitor.gradient_ics`) of every
  hidden layer's weights every ``ics_every`` steps, as the l2 difference and the cosine.

Single units, not whole layers: the noise's mean is drawn per channel with mean 0 over channels, so a
whole layer's pooled distribution hardly moves while every unit's jumps at every step; the paper's
Figure 2 shows single activations.

Choices (not from the paper, which uses VGG on CIFAR-10): the noise ranges above; lr 0.1, 3,000
steps of 60 examples; measurements every 100 steps; a noisy network "trains about as well as BN"
when its final test accuracy is at most one point below BN's (95% interval, paired by seed).
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np

from covshift.experiments.config import ExperimentConfig
from covshift.experiments.declaration import Arm, Claim, ClaimResult, Experiment, FigureSpec, Layer, Metric, Role, Verdict
from covshift.experiments.papers.common import he_mlp, not_evaluated
from covshift.experiments.papers.plotting import arm_color, new_figure
from covshift.experiments.registry import register
from covshift.experiments.stats import Estimate

__all__ = ["SANTURKAR_NOISE", "instability", "ics_mean"]


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


def instability(u) -> Optional[float]:
    """Mean over recorded units and consecutive records of ``|mean shift|`` (pooled-std units)."""
    from covshift.monitor.drift import mean_shift

    mon, vals = u.monitor, []
    if mon is None:
        return None
    for key in _unit_keys(u):
        _, mean = mon.series(key, "mean")
        _, std = mon.series(key, "std")
        d = np.abs(mean_shift(mean, std, "previous"))[1:]
        vals.extend(d[np.isfinite(d)].tolist())
    return float(np.mean(vals)) if vals else None


def layer_instability(u) -> Optional[float]:
    """:func:`instability` of the whole layers (every unit pooled), for comparison."""
    from covshift.monitor.drift import mean_shift

    mon, vals = u.monitor, []
    if mon is None:
        return None
    for layer in u.run.layers:
        key = u.monitor_key(layer.module)
        if key is None:
            continue
        _, mean = mon.series(key, "mean")
        _, std = mon.series(key, "std")
        d = np.abs(mean_shift(mean, std, "previous"))[1:]
        vals.extend(d[np.isfinite(d)].tolist())
    return float(np.mean(vals)) if vals else None


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


def _arms(run):
    return run.first(Role.BASELINE), run.first(Role.TREATMENT), run.first(Role.VARIANT)


def claim_trains(run, tolerance: float) -> ClaimResult:
    from covshift.experiments.results import verdict_greater

    none, bn, noisy = _arms(run)
    if not (none and bn and noisy):
        return not_evaluated("the run lacks one of the three networks")
    gap = run.paired(_final_acc, bn.name, noisy.name)  # BN minus noisy BN
    gain = run.paired(_final_acc, noisy.name, none.name)  # noisy BN minus none
    if gap.n == 0 or gain.n == 0:
        return not_evaluated("no final test accuracy")
    close = (gap.hi if gap.has_interval else gap.mean) <= tolerance
    better = verdict_greater(gain, 0.0, f"final test accuracy, {noisy.label} minus {none.label}")
    ok = close and better.verdict is Verdict.HELD
    text = (
        f"final test accuracy, {bn.label} minus {noisy.label} = {gap.format(4)} (the claim needs it at most {tolerance:g}); "
        f"{better.summary}"
    )
    return ClaimResult(Verdict.HELD if ok else Verdict.NOT_HELD, text, {f"{bn.label} - {noisy.label}": gap, **better.numbers})


def claim_less_stable(run, tolerance: float) -> ClaimResult:
    from covshift.experiments.results import verdict_greater

    none, _, noisy = _arms(run)
    if not (none and noisy):
        return not_evaluated("the run lacks the noisy-BN or the plain network")
    d = run.paired(instability, noisy.name, none.name, op="log_ratio")
    if d.n == 0:
        return not_evaluated("no single-unit monitor records")
    v = verdict_greater(d, tolerance, f"log instability (mean |standardized mean shift| between records), {noisy.label} / {none.label}", 3)
    return ClaimResult(v.verdict, f"{noisy.label} is {math.exp(d.mean):.3g}x as unstable as {none.label}. {v.summary}", v.numbers)


def _not_below(d: Estimate, what: str, direction: str, digits: int = 4) -> tuple[bool, str]:
    """``direction="not smaller"``: the interval is not entirely below 0 (``"not larger"``: not above)."""
    if d.has_interval:
        ok = d.hi >= 0 if direction == "not smaller" else d.lo <= 0
    else:
        ok = d.mean >= 0 if direction == "not smaller" else d.mean <= 0
    return ok, f"{what} = {d.format(digits)}"


def claim_gradient_ics(run, tolerance: float) -> ClaimResult:
    none, bn, _ = _arms(run)
    if not (none and bn):
        return not_evaluated("the run lacks the BN or the plain network")
    l2 = run.paired(ics_mean("l2_diff"), bn.name, none.name, op="log_ratio")
    cos = run.paired(ics_mean("cosine"), bn.name, none.name)
    if l2.n == 0 or cos.n == 0:
        return not_evaluated("no gradient-ICS records (--ics-every 0?)")
    ok1, t1 = _not_below(l2, f"log(l2 gradient ICS {bn.label} / {none.label})", "not smaller", 3)
    ok2, t2 = _not_below(cos, f"cosine {bn.label} minus {none.label}", "not larger", 4)
    text = (f"{t1}, {t2} (means over training and hidden layers 2+, paired by seed, 95% intervals); the claim needs the "
            f"first interval not entirely below 0 and the second not entirely above 0")
    return ClaimResult(Verdict.HELD if ok1 and ok2 else Verdict.NOT_HELD, text, {"log l2 ratio": l2, "cosine difference": cos})


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
    axes[2].set_title(f"instability: |mean shift| between records (seed {run.seeds()[0]})", fontsize=10)
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
            monitor_every=100, ics_every=100, probe_size=0, seeds=(0, 1, 2),
        ),
        arms=(
            Arm("none", Role.BASELINE, "no normalization", {"norm": "none"}, color="#d1495b"),
            Arm("bn", Role.TREATMENT, "BatchNorm", {"norm": "bn"}, color="#00798c"),
            Arm("noisy-bn", Role.VARIANT, "noisy BN", {"norm": "noisy-bn"}, color="#edae49"),
        ),
        layers=_layers,
        build_model=he_mlp,
        findings=findings,
        metrics=(
            Metric("final_test_acc", "final test accuracy", _final_acc),
            Metric("instability", "mean |standardized mean shift| of single units between records", instability, digits=4),
            Metric("ics_l2", "gradient ICS l2 (mean over training, layers 2+)", ics_mean("l2_diff"), digits=4),
            Metric("ics_cosine", "gradient ICS cosine (mean over training, layers 2+)", ics_mean("cosine"), digits=4),
        ),
        claims=(
            Claim(
                "noisy-trains",
                "The performance difference between models with BatchNorm layers and 'noisy' BatchNorm layers is almost "
                "non-existent. Also, both these networks perform much better than standard networks.",
                "Santurkar et al. 2018, section 2.1, Figure 2",
                claim_trains,
                tolerance=0.01,
                tolerance_text="BN minus noisy BN final accuracy at most 0.01 (upper end of the 95% interval), and noisy BN minus no normalization above 0",
            ),
            Claim(
                "noisy-less-stable",
                "The noisy BatchNorm network has qualitatively less stable distributions than even the standard, non-BatchNorm "
                "network, yet it still performs better in terms of training.",
                "Santurkar et al. 2018, section 2.1, Figure 2",
                claim_less_stable,
                tolerance=0.0,
                tolerance_text="log(instability noisy BN / no normalization), paired by seed: the 95% interval above 0",
            ),
            Claim(
                "gradient-ics",
                "Models with BatchNorm often exhibit an increase in ICS (even for deep linear networks) ... the addition of "
                "BatchNorm layers does not necessarily reduce ICS (by Definition 2.1).",
                "Santurkar et al. 2018, section 2.2, Figure 5",
                claim_gradient_ics,
                tolerance=0.0,
                tolerance_text="BN's l2 gradient ICS not significantly smaller, and its cosine not significantly larger, than no normalization's",
            ),
        ),
        figures=(
            FigureSpec("noise.png", "Figures 2 and 3, reproduced: test accuracy (mean over seeds with its 95% band); the 15th, 50th "
                       "and 85th percentiles of one unit's input to the ReLU in the last hidden layer on the training batches; and "
                       "the instability (absolute standardized mean shift between consecutive records, mean over the 24 recorded "
                       "units).", _figure_accuracy_and_drift),
            FigureSpec("gradient_ics.png", "Figure 5, reproduced: gradient ICS (Definition 2.1) of hidden layers 2 and 3, l2 "
                       "difference and cosine, every 100 steps (mean over seeds).", _figure_ics),
        ),
        notes=(
            "MNIST and a 784-100-100-100-10 ReLU MLP instead of VGG on CIFAR-10; He initialization; plain SGD, lr 0.1, 3,000 "
            "steps of 60 examples.",
            "Noise of covshift's choosing (the paper's appendix values were not available): per step and channel, mean "
            "~ U(-0.5, 0.5) and std ~ U(0.5, 1.0), added after BN to every activation of every sample, off at inference.",
            "Distribution stability is measured on the training batches at every record (the noise acts in training only), "
            "on 8 single units per hidden layer.",
        ),
    )
)
