"""``landscape``: the loss landscape along the gradient, with and without BN (Santurkar et al. 2018, section 3.1, Figure 4).

Santurkar et al. find that BN makes the loss landscape smoother: at points along training, moving
along the gradient changes the loss less (Lipschitzness), changes the gradient less ("gradient
predictiveness"), and the largest change of the gradient per distance moved ("effective
:math:`\\beta`-smoothness") is smaller. Here a 784-100-100-100-10 ReLU MLP (He-initialized) is
trained on MNIST with plain SGD at one learning rate, with and without BN before every ReLU; every
``landscape_every`` steps, before the update, the three measures of
:func:`covshift.experiments.papers.landscape.landscape_point` are taken on that step's batch for
the step sizes ``step_sizes``. The measurement works on copies, so training is exactly what it
would be without it.

Choices (the paper's VGG/CIFAR-10 settings do not transfer): lr 0.1 for both networks, 3,000 steps
of 60 examples; step sizes 0.05, 0.1, 0.2, 0.3, 0.4 (half to four times the training step), chosen
before the run; a measurement every 100 steps on the training batch. Each network's measures are
averaged over its checkpoints, per seed, and compared as the paired log ratio (no BN / BN).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch.nn.functional as F

from covshift.experiments.config import ExperimentConfig
from covshift.experiments.declaration import Arm, Claim, ClaimResult, Experiment, FigureSpec, Metric, Role, UnitContext, Verdict
from covshift.experiments.papers.common import EVAL_SCHEDULE_FIELDS, HE_INIT, HE_MLP_READS, MONITOR_FIELDS, NON_NEGATIVE, PROBABILITY, doc_field, he_mlp, hints, not_evaluated, tensors, train_classifier
from covshift.experiments.papers.landscape import landscape_point
from covshift.experiments.papers.plotting import arm_color, new_figure
from covshift.experiments.registry import register

__all__ = ["LANDSCAPE", "LandscapeConfig", "landscape_unit", "MEASURES"]

# measure key in landscape.jsonl -> what the report calls it
MEASURES = {
    "loss_range": "loss variation along the gradient (max - min)",
    "grad_diff_max": "gradient change along the gradient (largest l2)",
    "beta_smoothness": "effective beta-smoothness",
}


@dataclass
class LandscapeConfig(ExperimentConfig):
    step_sizes: tuple[float, ...] = doc_field("step sizes along the gradient at every measurement", default=(0.05, 0.1, 0.2, 0.3, 0.4))
    landscape_every: int = doc_field("steps between landscape measurements (on that step's batch)", default=100)

    def __post_init__(self) -> None:
        super().__post_init__()
        from covshift.experiments.config import ConfigError

        if self.landscape_every < 1:
            raise ConfigError(f"--landscape-every must be a positive integer, got {self.landscape_every}")
        if not self.step_sizes or not all(v > 0 for v in self.step_sizes):
            raise ConfigError(f"--step-sizes expects positive numbers, e.g. 0.05,0.1,0.2; got {self.step_sizes}")


def landscape_unit(ctx: UnitContext) -> dict:
    cfg = ctx.config
    x_train, y_train, x_test, y_test = tensors(ctx.data)
    model = he_mlp(cfg, ctx.data)

    def measure(step, xb, yb) -> None:
        p = landscape_point(model, F.cross_entropy, xb, yb, cfg.step_sizes)
        rec = p.to_dict()
        ctx.log("landscape", {"step": step, **rec, "grad_diff_max": max(p.grad_diffs), "grad_diff_min": min(p.grad_diffs),
                              "loss_min": min((p.loss, *p.losses)), "loss_max": max((p.loss, *p.losses))})

    res = train_classifier(
        model, x_train, y_train, x_test, y_test,
        steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr, seed=cfg.seeds[0], momentum=cfg.momentum,
        eval_every=cfg.eval_every, log=lambda r: ctx.log("metrics", r), before_step=measure,
        measure_every=cfg.landscape_every, progress=ctx.progress,
    )
    return {"diverged": res.diverged, "test_acc": res.test_acc, "steps_taken": res.steps, "seconds": res.seconds}


def mean_measure(key: str):
    """The mean over a unit's checkpoints of one landscape measure (finite values only)."""

    def f(u) -> Optional[float]:
        v = [r[key] for r in u.records("landscape") if r.get(key) is not None and math.isfinite(r[key])]
        return float(np.mean(v)) if v else None

    return f


def claim_smoother(run, tolerance: float) -> ClaimResult:
    from covshift.experiments.results import verdict_greater

    t, b = run.first(Role.TREATMENT), run.first(Role.BASELINE)
    if not (t and b):
        return not_evaluated("the run lacks the BN or the plain network")
    parts, numbers, held = [], {}, True
    for key, label in MEASURES.items():
        d = run.paired(mean_measure(key), b.name, t.name, op="log_ratio")
        if d.n == 0:
            return not_evaluated(f"no landscape measurement of {label}")
        v = verdict_greater(d, tolerance, f"log({label}: {b.label} / {t.label})", 3)
        held &= v.verdict is Verdict.HELD
        parts.append(f"{label}: ratio {math.exp(d.mean):.3g}x, {v.summary}")
        numbers.update(v.numbers)
    return ClaimResult(Verdict.HELD if held else Verdict.NOT_HELD, "; ".join(parts), numbers)


def _stack(run, arm, key):
    rows = [{r["step"]: r[key] for r in u.records("landscape")} for u in run.units_of(arm.name)]
    rows = [r for r in rows if r]
    if not rows:
        return None, None
    steps = sorted(set.intersection(*(set(r) for r in rows)))
    return np.array(steps), np.array([[r[s] for s in steps] for r in rows], dtype=float)  # (seeds, T)


def _figure(run):
    fig, axes = new_figure(3)
    for arm in run.arms:
        c = arm_color(run, arm)
        for ax, (lo_key, hi_key) in zip(axes[:2], (("loss_min", "loss_max"), ("grad_diff_min", "grad_diff_max"))):
            s, lo = _stack(run, arm, lo_key)
            _, hi = _stack(run, arm, hi_key)
            if s is None:
                continue
            ax.fill_between(s, lo.mean(0), hi.mean(0), color=c, alpha=0.35, lw=0, label=arm.label)
        s, beta = _stack(run, arm, "beta_smoothness")
        if s is not None:
            m = beta.mean(0)
            axes[2].plot(s, m, color=c, label=arm.label)
            if len(beta) > 1:
                from covshift.experiments.stats import t_quantile

                half = t_quantile(0.975, len(beta) - 1) * beta.std(0, ddof=1) / math.sqrt(len(beta))
                axes[2].fill_between(s, m - half, m + half, color=c, alpha=0.2, lw=0)
    titles = ("(a) loss landscape: range of the loss", "(b) gradient predictiveness: range of ||g_eta - g||", "(c) effective beta-smoothness")
    for ax, title in zip(axes, titles):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("training step")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


LANDSCAPE = register(
    Experiment(
        name="landscape",
        version=1,
        summary="an MNIST ReLU MLP with and without BN at one learning rate: loss and gradient change along the gradient during training",
        paper="Santurkar et al. 2018, section 3.1, Figure 4",
        question="Along the gradient, does BN make the loss and its gradient change less (a smoother landscape)?",
        config=LandscapeConfig(activation="relu", steps=3000, batch_size=60, lr=0.1, eval_every=500, probe_size=0, ics_every=0,
                               units=(), seeds=(0, 1, 2)),  # units=(): no single units are recorded, so any --hidden is valid
        arms=(
            Arm("none", Role.BASELINE, "no normalization", {"norm": "none"}, color="#d1495b"),
            Arm("bn", Role.TREATMENT, "BatchNorm", {"norm": "bn"}, color="#00798c"),
        ),
        unit_fn=landscape_unit,
        # landscape_unit: he_mlp's fields, steps, batch_size, lr, momentum, eval_every, step_sizes,
        # landscape_every, data.
        reads=HE_MLP_READS | {"steps", "batch_size", "lr", "momentum", "eval_every", "step_sizes", "landscape_every"},
        instead=hints({
            HE_INIT: ("init_std",),
            "landscape trains with SGD (--momentum is read)": ("optimizer",),
            "test accuracy is measured every --eval-every steps and at the end": EVAL_SCHEDULE_FIELDS,
            "landscape measures every --landscape-every steps, without the activation monitor": MONITOR_FIELDS,
        }),
        metrics=(
            Metric("test_acc", "final test accuracy", lambda u: u.final("test_acc"), bounds=PROBABILITY),
            *(Metric(k, f"{label} (mean over training)", mean_measure(k), digits=4, bounds=NON_NEGATIVE) for k, label in MEASURES.items()),
        ),
        claims=(
            Claim(
                "smoother",
                "BatchNorm ... makes the landscape significantly more smooth: the loss changes at a smaller rate and the "
                "magnitudes of the gradients are smaller too (improved Lipschitzness of the loss and of the gradients, and "
                "a smaller effective beta-smoothness).",
                "Santurkar et al. 2018, section 3.1 and Figure 4",
                claim_smoother,
                tolerance=0.0,
                tolerance_text="for each of the three measures (mean over checkpoints), log(no BN / BN) paired by seed: the 95% interval above 0",
            ),
        ),
        figures=(
            FigureSpec("landscape.png", "Figure 4, reproduced: at every measurement step, (a) the range of the loss and (b) the range "
                       "of the gradient change over the step sizes along the gradient, as bands (mean over seeds of the lowest and "
                       "the highest value); (c) the effective beta-smoothness (mean over seeds with its 95% band).", _figure),
        ),
        notes=(
            "MNIST and a 784-100-100-100-10 ReLU MLP instead of VGG on CIFAR-10 (and the paper's deep linear networks).",
            "Plain SGD at lr 0.1 for both networks, 3,000 steps of 60 examples; He initialization.",
            "Step sizes 0.05-0.4 along the gradient and a measurement every 100 steps on the training batch, chosen before the run.",
        ),
    )
)
