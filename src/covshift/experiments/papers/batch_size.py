"""``batch-size``: normalization at small batches (Wu & He 2018, GroupNorm; Ioffe 2017, Batch Renormalization).

Wu & He find that BN's error rises sharply as the batch per device shrinks to 2, while GroupNorm's
stays about flat; Ioffe finds that Batch Renormalization recovers most of what BN loses at small
batches. Here a small CNN on MNIST,

    conv 3x3/2 (1 -> 16) - norm - ReLU - conv 3x3/2 (16 -> 32) - norm - ReLU - linear (32 x 7 x 7 -> 10),

is trained at batch sizes 2, 4, 8, 16 and 32 with the learning rate scaled linearly with the batch
size (``lr = base_lr * batch / 32``, Goyal et al.'s rule, which Wu & He use) and the same number of
training samples seen at every batch size, with BatchNorm, Batch Renormalization, GroupNorm and
LayerNorm (over ``(C, H, W)``, i.e. GroupNorm with one group). Test error is measured on the full
test set in inference mode (BN and BRN with their running statistics).

The claims are about converged networks: they are judged only when every norm's test error at the
largest batch is at most ``converged_error`` (0.02), and "could not be evaluated" otherwise (see
:func:`converged`). Even at batch 2 BatchNorm2d's statistics average ``N * H * W`` values per
channel (392 and 98 here).

Choices (not from the papers): 4,000 samples seen (a fifteenth of an epoch of MNIST) per run; SGD with
momentum 0.9 and ``base_lr = 0.1`` at batch 32, no weight decay; 8 groups for GroupNorm (the
layers have 16 and 32 channels, too few for Wu & He's 32 groups); Batch Renormalization with
``r_max = 3, d_max = 5`` and the paper's schedule (plain BN for 5k steps, ``r_max`` relaxed until
40k, ``d_max`` until 25k, of 160k steps) scaled to the run's length: warm-up, ``r`` and ``d``
relaxation end at 5/160, 40/160 and 25/160 of the run's steps. Running statistics use torch's
momentum 0.1 for both BN and BRN. He initialization.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from covshift.experiments.config import ExperimentConfig
from covshift.experiments.declaration import Arm, Axis, Claim, ClaimResult, Experiment, FigureSpec, Metric, Role, UnitContext, Verdict
from covshift.experiments.papers.common import EVAL_SCHEDULE_FIELDS, MONITOR_FIELDS, PROBABILITY, doc_field, he_init_, hints, not_evaluated, tensors, train_classifier
from covshift.experiments.papers.plotting import new_figure, sweep_band
from covshift.experiments.registry import register
from covshift.experiments.stats import estimate
from covshift.nn.norms import get_norm_layer

__all__ = ["BATCH_SIZE", "BatchSizeConfig", "SmallCNN", "renorm_schedule", "batch_size_unit", "converged"]

PAPER_STEPS = 160_000  # Ioffe 2017's runs at mini-batches of 4: the schedule below is a fraction of it


@dataclass
class BatchSizeConfig(ExperimentConfig):
    batch_sizes: tuple[int, ...] = doc_field("the batch sizes, the sweep's grid", default=(2, 4, 8, 16, 32))
    samples: int = doc_field("training samples seen per run (steps = samples // batch size)", default=4000)
    base_batch: int = doc_field("the batch size at which the learning rate is --lr (lr scales with batch / base-batch)", default=32)
    channels: tuple[int, ...] = doc_field("output channels of the two conv layers", default=(16, 32))
    groups: int = doc_field("GroupNorm's number of groups", default=8)
    converged_error: float = doc_field(
        "the claims are judged only if every norm's mean test error at the largest batch is at most this (trained to convergence)", default=0.02
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        from covshift.experiments.config import ConfigError

        if self.samples < 1 or self.base_batch < 1 or not self.batch_sizes or min(self.batch_sizes) < 2:
            raise ConfigError(f"--samples and --base-batch must be positive and --batch-sizes at least 2 each, got {self.samples}, {self.base_batch}, {self.batch_sizes}")
        if len(self.channels) != 2 or min(self.channels) < 1:
            raise ConfigError(f"--channels expects two positive channel counts, got {self.channels}")
        if self.groups < 1:
            raise ConfigError(f"--groups must be a positive integer, got {self.groups}")
        if not 0 < self.converged_error <= 1:
            raise ConfigError(f"--converged-error is a test error in (0, 1], got {self.converged_error}")


def renorm_schedule(steps: int) -> dict:
    """Ioffe 2017's schedule (5k warm-up, r_max 3 by 40k, d_max 5 by 25k of 160k steps) scaled to ``steps``."""
    f = steps / PAPER_STEPS
    warm = round(5_000 * f)
    return {"r_max": 3.0, "d_max": 5.0, "warmup_steps": warm, "r_relax_steps": round(40_000 * f) - warm, "d_relax_steps": round(25_000 * f) - warm}


class SmallCNN(nn.Module):
    """``conv-norm-relu`` x 2 (3x3, stride 2) then a linear classifier of the ``(C2, 7, 7)`` map, for ``(N, 1, 28, 28)``."""

    def __init__(self, norm: str, channels: tuple[int, int] = (16, 32), num_classes: int = 10, **norm_kwargs) -> None:
        super().__init__()
        ctor = get_norm_layer(norm, dim=2, **norm_kwargs)
        c1, c2 = channels
        self.conv1 = nn.Conv2d(1, c1, 3, stride=2, padding=1, bias=ctor is None)
        self.norm1 = nn.Identity() if ctor is None else ctor(c1)
        self.conv2 = nn.Conv2d(c1, c2, 3, stride=2, padding=1, bias=ctor is None)
        self.norm2 = nn.Identity() if ctor is None else ctor(c2)
        self.act = nn.ReLU()
        self.out = nn.Linear(c2 * 7 * 7, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.norm1(self.conv1(x)))
        x = self.act(self.norm2(self.conv2(x)))
        return self.out(x.flatten(1))  # (N, C2 * 7 * 7)


def _norm_kwargs(cfg, steps: int) -> dict:
    key = cfg.norm.strip().lower().replace("_", "-")
    if key == "group":
        return {"num_groups": cfg.groups}
    if key == "renorm":
        return renorm_schedule(steps)
    return {}


def batch_size_unit(ctx: UnitContext) -> dict:
    cfg = ctx.config
    x_train, y_train, x_test, y_test = tensors(ctx.data, (1, 28, 28))
    steps = cfg.samples // cfg.batch_size
    lr = cfg.lr * cfg.batch_size / cfg.base_batch
    model = SmallCNN(cfg.norm, tuple(cfg.channels), ctx.data.num_classes, **_norm_kwargs(cfg, steps))
    he_init_(model, cfg.seeds[0], last=model.out)
    res = train_classifier(
        model, x_train, y_train, x_test, y_test,
        steps=steps, batch_size=cfg.batch_size, lr=lr, seed=cfg.seeds[0], momentum=cfg.momentum,
        eval_every=0, eval_at_start=False, log=lambda r: ctx.log("metrics", r), progress=ctx.progress,
    )
    return {"batch_size": cfg.batch_size, "lr": lr, "steps": steps, "diverged": res.diverged, "test_acc": res.test_acc,
            "test_error": 1.0 - res.test_acc, "test_loss": res.test_loss, "seconds": res.seconds}


def _error(u) -> Optional[float]:
    v = (u.status.get("result") or {}).get("test_error")
    return None if v is None else float(v)


def _arm(run, name: str):
    """The arm called ``name`` (the declaration's typed identity), or ``None`` when the run lacks it."""
    return next((a for a in run.arms if a.name == name), None)


def converged(run, large) -> Optional[str]:
    """``None`` when every arm's mean test error at the largest batch is at most ``converged_error``;
    otherwise why the claims cannot be judged.

    Wu & He's and Ioffe's comparisons are between converged networks (100 epochs), where what remains
    is the noise of small batches' statistics. With the same samples seen, a short run is far from
    convergence, and there the smallest batches win by taking more updates (at batch 2, 16 times as
    many as at 32), which says nothing about normalization.
    """
    limit = run.config.converged_error
    errs = {a.label: run.estimate(_error, a.name, large) for a in run.arms}
    far = {k: e for k, e in errs.items() if e.n and e.mean > limit}
    if not far:
        return None
    shown = ", ".join(f"{k} {e.mean:.4f}" for k, e in far.items())
    return (
        f"not trained to convergence: test error at batch {dict(large)['batch_size']} is {shown}, above the {limit:g} of a "
        f"converged MNIST CNN, with {run.config.samples:,} samples seen (what fits in the 3-minute budget); far from "
        "convergence the smallest batches win by taking more updates, so the comparison says nothing about normalization"
    )


def _small_large(run):
    pts = sorted((p for p in run.points() if dict(p).get("batch_size")), key=lambda p: dict(p)["batch_size"])
    return (pts[0], pts[-1]) if len(pts) >= 2 else (None, None)


def _rise(run, arm, small, large):
    """Per seed: test error at the smallest batch minus at the largest."""
    a = {u.seed: _error(u) for u in run.units_of(arm.name, small)}
    b = {u.seed: _error(u) for u in run.units_of(arm.name, large)}
    return estimate([a[s] - b[s] for s in sorted(set(a) & set(b)) if a[s] is not None and b[s] is not None])


def claim_bn_degrades(run, tolerance: float) -> ClaimResult:
    bn, gn = _arm(run, "bn"), _arm(run, "group")
    small, large = _small_large(run)
    if not (bn and gn and small):
        return not_evaluated("the run lacks BN, GroupNorm or two batch sizes")
    rb, rg = _rise(run, bn, small, large), _rise(run, gn, small, large)
    if rb.n == 0 or rg.n == 0:
        return not_evaluated("no seed has both batch sizes")
    s, l = dict(small)["batch_size"], dict(large)["batch_size"]
    why = converged(run, large)
    bn_rises = (rb.lo if rb.has_interval else rb.mean) > 0
    gn_flat = (rg.hi if rg.has_interval else rg.mean) < tolerance
    text = (
        f"test error at batch {s} minus at batch {l}: BN {rb.format(4)}, GroupNorm {rg.format(4)} (95% intervals over seeds); "
        f"the claim needs BN's interval above 0 and GroupNorm's below {tolerance:g}"
    )
    if why is not None:
        return ClaimResult(Verdict.NOT_EVALUATED, text, {"BN rise": rb, "GroupNorm rise": rg}, reason=f"{why}; measured: {text}")
    return ClaimResult(Verdict.HELD if bn_rises and gn_flat else Verdict.NOT_HELD, text, {"BN rise": rb, "GroupNorm rise": rg})


def claim_renorm_beats_bn(run, tolerance: float) -> ClaimResult:
    from covshift.experiments.results import verdict_greater

    bn, brn = _arm(run, "bn"), _arm(run, "renorm")
    small, large = _small_large(run)
    if not (bn and brn and small):
        return not_evaluated("the run lacks BN, BatchRenorm or two batch sizes")
    d = run.paired(_error, bn.name, brn.name, point=small)
    v = verdict_greater(d, tolerance, f"test error at batch {dict(small)['batch_size']}, BN minus BatchRenorm")
    why = converged(run, large)
    if why is not None and v.verdict is not Verdict.NOT_EVALUATED:
        return ClaimResult(Verdict.NOT_EVALUATED, v.summary, v.numbers, reason=f"{why}; measured: {v.summary}")
    return v


def _figure(run):
    fig, (ax,) = new_figure(1, 6.0, 4.2)
    for arm in run.arms:
        sweep_band(ax, run, arm, "batch_size", _error)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size (learning rate scaled with it, same samples seen)")
    ax.set_ylabel("test error")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


BATCH_SIZE = register(
    Experiment(
        name="batch-size",
        version=1,
        summary="a small MNIST CNN at batch sizes 2-32 with BN, BatchRenorm, GroupNorm and LayerNorm: test error",
        paper="Wu & He 2018 (GroupNorm); Ioffe 2017 (Batch Renormalization)",
        question="Does BN's test error rise at small batches while GroupNorm's stays flat, and does BatchRenorm recover BN's loss?",
        config=BatchSizeConfig(activation="relu", lr=0.1, momentum=0.9, steps=1, eval_every=1, probe_size=0, ics_every=0, seeds=(0, 1, 2)),
        arms=(
            Arm("bn", Role.BASELINE, "BatchNorm", {"norm": "bn"}, color="#d1495b"),
            Arm("renorm", Role.TREATMENT, "BatchRenorm", {"norm": "renorm"}, color="#00798c"),
            Arm("group", Role.VARIANT, "GroupNorm", {"norm": "group"}, color="#edae49"),
            Arm("layer", Role.VARIANT, "LayerNorm", {"norm": "layer"}, color="#66a182"),
        ),
        sweep=(Axis("batch_size", "batch_sizes", label="batch size", log=True),),
        unit_fn=batch_size_unit,
        # batch_size_unit: samples, batch_size (the sweep), lr, base_batch, channels, norm, groups (GroupNorm),
        # seeds, momentum, data; the claims read converged_error and samples.
        reads=frozenset({"samples", "batch_size", "lr", "base_batch", "channels", "norm", "groups", "seeds", "momentum", "converged_error"}),
        instead=hints({
            "batch-size trains on --samples examples (steps = samples / batch size)": ("steps",),
            "the network is a fixed two-conv ReLU CNN, sized by --channels and He-initialized": ("hidden", "activation", "init_std"),
            "batch-size trains with SGD (--momentum is read)": ("optimizer",),
            "test error is measured once, at the end of training": ("eval_every", *EVAL_SCHEDULE_FIELDS),
            "batch-size runs without the activation monitor": MONITOR_FIELDS,
        }),
        metrics=(Metric("test_error", "test error", _error, bounds=PROBABILITY),),
        claims=(
            Claim(
                "bn-degrades",
                "BN's error increases rapidly when the batch size becomes smaller, ... while GN's accuracy is stable in a wide "
                "range of batch sizes.",
                "Wu & He 2018, abstract and Figure 1",
                claim_bn_degrades,
                tolerance=0.02,
                tolerance_text="test error at the smallest batch minus the largest: BN's 95% interval above 0, GroupNorm's below 0.02",
            ),
            Claim(
                "renorm-small-batch",
                "Models trained with Batch Renormalization perform substantially better than batchnorm when training with "
                "small or non-i.i.d. minibatches (74.2% vs 76.5% top-1 at minibatches of 4).",
                "Ioffe 2017, abstract and section 4.2",
                claim_renorm_beats_bn,
                tolerance=0.0,
                tolerance_text="test error at the smallest batch, BN minus BatchRenorm, paired by seed: the 95% interval above 0",
            ),
        ),
        figures=(FigureSpec("batch_size.png", "Test error against the batch size for each normalization (mean over seeds with "
                            "its 95% band).", _figure),),
        notes=(
            "MNIST and a two-conv CNN instead of ResNet-50 on ImageNet; 4,000 samples seen per run instead of 100 epochs.",
            "SGD, momentum 0.9, lr 0.1 at batch 32 scaled linearly with the batch size; no weight decay; He initialization.",
            "GroupNorm with 8 groups (16 and 32 channels), LayerNorm as GroupNorm with one group.",
            "Batch Renormalization's schedule scaled to the run (warm-up and relaxation at 5/160, 40/160, 25/160 of the steps); "
            "running statistics with momentum 0.1 (the paper averages with alpha = 0.01).",
            "Ghost BN is not included: its point is large batches, which this sweep does not reach.",
            "The claims are judged only on converged networks (every norm's test error at the largest batch at most 0.02); "
            "the 3-minute budget allows 4,000 samples seen, far from convergence, so they could not be evaluated here. Even "
            "at batch 2, BatchNorm2d averages each channel over N*H*W values (2*14*14 = 392 in the first layer, 2*7*7 = 98 "
            "in the second), so its batch statistics are much less noisy than a batch of 2 suggests.",
            "The network's head was changed once, after a pilot run and before the default runs: a global-mean-pooled head "
            "barely learned in the sample budget, so the classifier reads the whole 7x7 map.",
        ),
    )
)
