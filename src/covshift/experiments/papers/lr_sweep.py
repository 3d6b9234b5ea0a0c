"""``lr-sweep``: which learning rates train, with and without BN (Bjorck et al. 2018; Ioffe & Szegedy 2015).

Bjorck, Gomes, Selman & Weinberger 2018 ("Understanding Batch Normalization", arXiv:1806.02375)
find that BN's benefit is mainly that it makes much larger learning rates trainable; Ioffe &
Szegedy's BN-x5 and BN-x30 trained Inception at 5 and 30 times the baseline's rate. Here a
784-100-100-100-10 ReLU MLP (He-initialized), with and without BN before every ReLU, is trained
with plain SGD for a fixed budget of steps at every rate of a logarithmic grid (half decades,
``1e-3`` to ``1e2``), and the final test accuracy is recorded, with the divergences (a non-finite
training loss, which stops the run, or a final test loss that is not finite or above 100 ln 10).

"Trains at a rate" is defined before the run: at every seed, the run did not diverge and its final
test accuracy is at least ``trains_threshold`` (0.5, five times chance on ten classes). The largest
trainable rate is read off the grid, so it is only bracketed: between the largest rate that trained
``L`` and the next rate of the grid ``F`` (which did not). The claim "BN's largest rate is at least
10x the plain network's" is held when even the lowest ratio the brackets allow, ``L_BN / F_plain``,
is at least 10; did not hold when the highest, ``F_BN / L_plain``, is at most 10; otherwise the grid
cannot tell. Runs that end with a finite loss below the threshold ("failed to train", e.g. stuck at
chance) are counted apart from divergences, both as counts of seeds.

Choices (not from the papers): MNIST and an MLP instead of CIFAR-10 and ResNet-110; no momentum,
no weight decay, no schedule; 1,000 steps of 60 examples (one epoch) per rate. The half-decade grid
is refined at 0.5 and 5, added after the first default run had bracketed the plain network's largest
rate in [0.3, 1) and BN's in [3, 10): with them the ratio can be decided when the two bracketing
rates fall on opposite sides (BN trains at 5 and plain fails at 0.5: at least 10; the reverse: below
10); a finer grid did not fit the 3-minute budget.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
import enum
from typing import Optional

import numpy as np

from covshift.experiments.config import ExperimentConfig
from covshift.experiments.declaration import Arm, Axis, Claim, ClaimResult, Experiment, FigureSpec, Metric, Role, UnitContext, Verdict
from covshift.experiments.papers.common import EVAL_SCHEDULE_FIELDS, HE_INIT, HE_MLP_READS, MONITOR_FIELDS, PROBABILITY, doc_field, he_mlp, hints, not_evaluated, tensors, train_classifier
from covshift.experiments.papers.plotting import arm_color, new_figure, sweep_band
from covshift.experiments.registry import register

__all__ = ["LR_SWEEP", "LrSweepConfig", "lr_unit", "largest_trainable", "bracket", "ratio_verdict", "Outcome", "outcome_counts"]


class Outcome(enum.Enum):
    """How one run at one rate ended."""

    TRAINED = "trained"  # finite loss, final test accuracy >= trains_threshold
    FAILED = "failed to train"  # finite loss, but final test accuracy below the threshold (e.g. stuck at chance)
    DIVERGED = "diverged"  # a non-finite loss, or a final test loss not finite or above 100 ln 10


@dataclass
class LrSweepConfig(ExperimentConfig):
    lrs: tuple[float, ...] = doc_field(
        "the learning-rate grid (half decades, refined at 0.5 and 5)",
        default=(0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 0.5, 1.0, 3.0, 5.0, 10.0, 30.0, 100.0),
    )
    trains_threshold: float = doc_field("final test accuracy at or above which a run counts as trained", default=0.5)

    def __post_init__(self) -> None:
        from covshift.experiments.config import ConfigError

        if not self.lrs or not all(v > 0 for v in self.lrs):  # before the base check, which would name --lr
            raise ConfigError(f"--lrs expects positive learning rates, e.g. 0.01,0.1,1; got {self.lrs}")
        super().__post_init__()
        if not 0 < self.trains_threshold <= 1:
            raise ConfigError(f"--trains-threshold is a test accuracy in (0, 1], got {self.trains_threshold}")


def _result(u, key: str) -> Optional[float]:
    v = (u.status.get("result") or {}).get(key)
    return None if v is None else float(v)


def lr_unit(ctx: UnitContext) -> dict:
    cfg = ctx.config
    x_train, y_train, x_test, y_test = tensors(ctx.data)
    model = he_mlp(cfg, ctx.data)
    res = train_classifier(
        model, x_train, y_train, x_test, y_test,
        steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr, seed=cfg.seeds[0], momentum=cfg.momentum,
        eval_every=cfg.eval_every, eval_at_start=False, log=lambda r: ctx.log("metrics", r), progress=ctx.progress,
    )
    return {"lr": cfg.lr, "diverged": res.diverged, "steps_taken": res.steps, "test_acc": res.test_acc, "test_loss": res.test_loss, "seconds": res.seconds}


def _outcome(u, threshold: float) -> Outcome:
    r = u.status.get("result") or {}
    if r.get("diverged", True):
        return Outcome.DIVERGED
    acc = _result(u, "test_acc")
    return Outcome.TRAINED if acc is not None and acc >= threshold else Outcome.FAILED


def _trained(u, threshold: float) -> bool:
    return _outcome(u, threshold) is Outcome.TRAINED


def trained_at(run, arm: str) -> tuple[dict[float, bool], int]:
    """``({rate: trained at every seed}, number of seeds)`` over the grid's rates that ``arm`` ran."""
    threshold = run.config.trains_threshold
    out, seeds = {}, 0
    for p in run.points():
        lr = dict(p).get("lr")
        us = run.units_of(arm, p)
        if lr is None or not us:
            continue
        seeds = max(seeds, len(us))
        out[float(lr)] = all(_trained(u, threshold) for u in us)
    return out, seeds


def largest_trainable(run, arm: str) -> tuple[Optional[float], int, list[float]]:
    """``(largest rate trained at every seed, number of seeds, the grid)``; ``None`` when no rate trains."""
    trained, seeds = trained_at(run, arm)
    best = max((lr for lr, ok in trained.items() if ok), default=None)
    return best, seeds, sorted(trained)


def bracket(trained: dict[float, bool]) -> tuple[Optional[float], float]:
    """``(L, F)``: the largest rate of the grid that trained and the next rate of the grid above it
    (which did not train; ``inf`` when ``L`` is the grid's largest). The true largest trainable rate
    lies in ``[L, F)``. ``L`` is ``None`` when no rate trained."""
    grid = sorted(trained)
    ok = [lr for lr in grid if trained[lr]]
    if not ok:
        return None, math.inf
    largest = ok[-1]
    above = [lr for lr in grid if lr > largest]
    return largest, (above[0] if above else math.inf)


def ratio_verdict(trained_t: dict[float, bool], trained_b: dict[float, bool], tolerance: float) -> tuple[Verdict, str, float, float]:
    """The verdict on "treatment's largest trainable rate >= ``tolerance`` x baseline's", from grids.

    With brackets ``[L_t, F_t)`` and ``[L_b, F_b)`` (:func:`bracket`), the true ratio lies in
    ``(L_t / F_b, F_t / L_b)``: held when the lowest possible ratio ``L_t / F_b`` is at least
    ``tolerance``; did not hold when the highest possible ``F_t / L_b`` is at most ``tolerance`` (the
    bound itself is not attained, F_t did not train); otherwise the grid is too coarse to tell.
    Returns ``(verdict, reason or "", lowest ratio, highest ratio)``."""
    lt, ft = bracket(trained_t)
    lb, fb = bracket(trained_b)
    if lt is None or lb is None:
        return Verdict.NOT_EVALUATED, "a network trained at no rate of the grid, so there is no largest trainable rate", math.nan, math.nan
    low, high = lt / fb, ft / lb
    if low >= tolerance * (1 - 1e-9):
        return Verdict.HELD, "", low, high
    if high <= tolerance * (1 + 1e-9):
        return Verdict.NOT_HELD, "", low, high
    return Verdict.NOT_EVALUATED, (
        f"the grid brackets the ratio of largest trainable rates only to ({low:g}, {high:g}), which contains {tolerance:g}; "
        "a finer grid between the bracketing rates is needed (a finer one than the default's did not fit the 3-minute budget)"
    ), low, high


def claim_larger_rates(run, tolerance: float) -> ClaimResult:
    t, b = run.first(Role.TREATMENT), run.first(Role.BASELINE)
    if not (t and b):
        return not_evaluated("the run lacks the BN or the plain network")
    (tt, nt), (tb, _) = trained_at(run, t.name), trained_at(run, b.name)
    verdict, reason, low, high = ratio_verdict(tt, tb, tolerance)
    (lt, ft), (lb, fb) = bracket(tt), bracket(tb)
    if lt is None or lb is None:
        who = t.label if lt is None else b.label
        return not_evaluated(f"{who} trained at no rate of the grid, so there is no largest trainable rate")
    text = (
        f"largest rate of the grid that trains at all {nt} seeds: {t.label} {lt:g} (next rate {ft:g} did not), "
        f"{b.label} {lb:g} (next rate {fb:g} did not); so the ratio of largest trainable rates lies in ({low:g}, {high:g}); "
        f"the claim needs the lowest possible ratio {t.label} {lt:g} / {b.label} {fb:g} to be at least {tolerance:g} "
        f"(and did not hold if the highest possible, {ft:g} / {lb:g}, were at most {tolerance:g})"
    )
    return ClaimResult(verdict, text, reason=reason)


def _best_over_grid(run, arm: str) -> dict[int, float]:
    best: dict[int, float] = {}
    for p in run.points():
        for u in run.units_of(arm, p):
            acc = _result(u, "test_acc")
            if acc is not None and math.isfinite(acc):
                best[u.seed] = max(best.get(u.seed, -math.inf), acc)
    return best


def claim_best_accuracy(run, tolerance: float) -> ClaimResult:
    from covshift.experiments.results import verdict_greater
    from covshift.experiments.stats import estimate

    t, b = run.first(Role.TREATMENT), run.first(Role.BASELINE)
    if not (t and b):
        return not_evaluated("the run lacks the BN or the plain network")
    bt, bb = _best_over_grid(run, t.name), _best_over_grid(run, b.name)
    d = estimate([bt[s] - bb[s] for s in sorted(set(bt) & set(bb))])
    v = verdict_greater(d, -tolerance, f"best final test accuracy over the grid, {t.label} minus {b.label} (per seed)")
    return ClaimResult(
        v.verdict,
        f"{v.summary}; best accuracy {t.label} {estimate(list(bt.values())).format(4)}, {b.label} {estimate(list(bb.values())).format(4)}",
        v.numbers,
    )


def outcome_counts(run, arm: str) -> list[tuple[float, dict[Outcome, int], int]]:
    """Per rate (ascending): ``(rate, {outcome: seeds}, seeds)``."""
    threshold, out = run.config.trains_threshold, []
    for p in sorted((p for p in run.points() if dict(p).get("lr") is not None), key=lambda p: dict(p)["lr"]):
        us = run.units_of(arm, p)
        if us:
            counts = {o: sum(1 for u in us if _outcome(u, threshold) is o) for o in Outcome}
            out.append((float(dict(p)["lr"]), counts, len(us)))
    return out


def findings(run) -> list[str]:
    """Divergences and failures to train as counts of seeds (k/n), not intervals on a 0/1 fraction."""
    out = []
    for arm in run.arms:
        rows = outcome_counts(run, arm.name)
        parts = []
        for o in (Outcome.DIVERGED, Outcome.FAILED):
            hits = [f"{lr:g} ({c[o]}/{n})" for lr, c, n in rows if c[o]]
            parts.append(f"{o.value} at " + (", ".join(hits) if hits else "no rate of the grid"))
        out.append(f"{arm.label}: " + "; ".join(parts) + " (seeds out of seeds run at that rate).")
    return out


def _figure(run):
    fig, (ax,) = new_figure(1, 6.0, 4.2)
    for arm in run.arms:
        sweep_band(ax, run, arm, "lr", lambda u: _result(u, "test_acc"), clip=(0.0, 1.0))
        xs = [dict(p)["lr"] for p in run.points() for u in run.units_of(arm.name, p) if (u.status.get("result") or {}).get("diverged")]
        if xs:
            ax.scatter(xs, np.zeros(len(xs)), marker="x", color=arm_color(run, arm), label=f"{arm.label}: diverged")
    ax.axhline(run.config.trains_threshold, color="gray", ls=":", lw=1, label="'trains' threshold")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel(f"test accuracy after {run.config.steps:,} steps")
    ax.set_ylim(-0.03, 1.0)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


LR_SWEEP = register(
    Experiment(
        name="lr-sweep",
        version=1,
        summary="a logarithmic learning-rate grid for an MNIST ReLU MLP with and without BN: final accuracy and divergences",
        paper="Bjorck et al. 2018; Ioffe & Szegedy 2015 (BN-x5, BN-x30)",
        question="Does BN make learning rates trainable that are at least 10x larger, without losing the best accuracy?",
        config=LrSweepConfig(activation="relu", steps=1000, batch_size=60, eval_every=1000, eval_every_early=1000, probe_size=0, ics_every=0,
                             units=(), seeds=(0, 1, 2)),  # units=(): no single units are recorded, so any --hidden is valid
        arms=(
            Arm("none", Role.BASELINE, "no normalization", {"norm": "none"}, color="#d1495b"),
            Arm("bn", Role.TREATMENT, "BatchNorm", {"norm": "bn"}, color="#00798c"),
        ),
        sweep=(Axis("lr", "lrs", label="learning rate", log=True),),
        unit_fn=lr_unit,
        # lr_unit: he_mlp's fields, steps, batch_size, lr (the sweep), momentum, eval_every, data; the claims,
        # findings and figure read trains_threshold (and steps, in the figure's label).
        reads=HE_MLP_READS | {"steps", "batch_size", "lr", "momentum", "eval_every", "trains_threshold"},
        instead=hints({
            HE_INIT: ("init_std",),
            "lr-sweep trains with SGD (--momentum is read)": ("optimizer",),
            "test accuracy is measured every --eval-every steps and at the end": EVAL_SCHEDULE_FIELDS,
            "lr-sweep runs without the activation monitor": MONITOR_FIELDS,
        }),
        metrics=(
            Metric("test_acc", "final test accuracy", lambda u: _result(u, "test_acc"), bounds=PROBABILITY),
        ),
        claims=(
            Claim(
                "larger-rates",
                "BN primarily enables training with larger learning rates, which is the cause for faster convergence and "
                "better generalization. (Ioffe & Szegedy's BN-x30 trained Inception at 30 times the baseline's rate.)",
                "Bjorck et al. 2018, abstract; Ioffe & Szegedy 2015, section 4.2.1",
                claim_larger_rates,
                tolerance=10.0,
                tolerance_text="largest trainable rate with BN / without: the lowest ratio the grid allows at least 10 (held), "
                "the highest at most 10 (did not hold), else could not be evaluated",
            ),
            Claim(
                "best-accuracy",
                "[Larger learning rates are] the cause for faster convergence and better generalization (so BN's best accuracy "
                "over the learning rates is at least the plain network's best).",
                "Bjorck et al. 2018, abstract (the parenthesis is the form tested here)",
                claim_best_accuracy,
                tolerance=0.005,
                tolerance_text="per-seed best accuracy over the grid, BN minus plain: the 95% interval above -0.005",
            ),
        ),
        figures=(
            FigureSpec("lr_sweep.png", "Final test accuracy against the learning rate (mean over seeds with its 95% band); a cross "
                       "marks each run that diverged; the dotted line is the accuracy that counts as 'trains'.", _figure),
        ),
        findings=findings,
        notes=(
            "MNIST and a 784-100-100-100-10 ReLU MLP instead of CIFAR-10 and ResNet-110 (Bjorck et al.) or Inception on "
            "ImageNet (Ioffe & Szegedy).",
            "Plain SGD without momentum, weight decay or schedule, 1,000 steps of 60 examples per rate; He initialization.",
            "The half-decade grid refined at 0.5 and 5 after the first default run bracketed the largest trainable rates "
            "in [0.3, 1) (plain) and [3, 10) (BN): the points that can decide the 10x claim within the time bound.",
            "A rate 'trains' when every seed finishes without a non-finite loss at a test accuracy of at least 0.5; chosen "
            "before the run.",
        ),
    )
)
