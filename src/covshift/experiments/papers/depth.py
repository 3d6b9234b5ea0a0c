"""``depth``: deep MLPs at initialization (Yang et al. 2019; Daneshmand et al. 2020; Brock et al. 2021).

Fully connected ReLU networks of width 128 and depth 4 to 128 (hidden layers), He-initialized,
without normalization, with BatchNorm, and with LayerNorm before every ReLU, are measured at
initialization on one training-mode forward and backward of a batch of 128 MNIST digits
(cross-entropy on their labels):

* the log ratio of the first hidden layer's weight-gradient norm to the last hidden layer's,
  :func:`covshift.experiments.papers.gradient_ratio.log_gradient_ratio`;
* the signal-propagation statistics of every hidden layer's output
  (:func:`covshift.monitor.signal_propagation`: channel squared mean, channel variance, numerical
  and stable rank, inter-sample cosine), the last hidden layer's ranks being the representation's.

Choices (not fixed by the papers): He initialization :math:`N(0, 2/\\text{fan-in})`, the
"well-initialized" plain network (Yang et al. use the mean-field critical initialization, which for
ReLU is He's); ReLU throughout; depths 4, 8, 16, 32, 64, 128 at width 128; the stable rank
is reported, but the rank claim is judged on the trend of the numerical rank (torch's default
tolerance) with depth, since BN's uncentered stable rank is near pi at every depth. Every unit is one (norm, depth, seed): its own initial weights and
its own batch.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from covshift.experiments.config import ExperimentConfig
from covshift.experiments.declaration import Arm, Axis, Claim, ClaimResult, Experiment, FigureSpec, Metric, Role, UnitContext, Verdict
from covshift.experiments.papers.common import EVAL_SCHEDULE_FIELDS, HE_INIT, HE_MLP_READS, MONITOR_FIELDS, doc_field as _doc, he_mlp, hints, not_evaluated, tensors
from covshift.experiments.papers.gradient_ratio import log_gradient_ratio
from covshift.experiments.papers.plotting import arm_color, new_figure, sweep_band
from covshift.experiments.registry import register
from covshift.experiments.stats import estimate

__all__ = ["DEPTH", "DepthConfig", "depth_unit", "fit_line", "rank_drop", "linear_growth_verdict"]

RANK_STATS = ("numerical_rank", "stable_rank", "cosine_similarity", "channel_sq_mean", "channel_var")


@dataclass
class DepthConfig(ExperimentConfig):
    """The depth sweep's settings: each unit's network has ``depth`` hidden layers of ``width`` units."""

    depth: int = _doc("hidden layers of the network (set by the sweep)", default=4)
    width: int = _doc("units per hidden layer", default=128)
    depths: tuple[int, ...] = _doc("numbers of hidden layers, the sweep's grid", default=(4, 8, 16, 32, 64, 128))
    flat_slope: float = _doc("the plain network is 'flat' when its slope of the log gradient ratio per layer lies within plus or minus this (95 percent interval)", default=0.01)

    def __post_init__(self) -> None:
        super().__post_init__()
        from covshift.experiments.config import ConfigError

        if self.depth < 1 or self.width < 1:
            raise ConfigError(f"--depth and --width must be positive integers, got {self.depth} and {self.width}")
        if not self.depths or min(self.depths) < 1:
            raise ConfigError(f"--depths expects positive numbers of hidden layers, e.g. 4,8,16; got {self.depths}")
        if not self.flat_slope > 0:
            raise ConfigError(f"--flat-slope must be > 0 (a half-width around a zero slope), got {self.flat_slope}")


def _result(u, key: str) -> Optional[float]:
    r = u.status.get("result") or {}
    v = r.get(key)
    return None if v is None else float(v)


def depth_unit(ctx: UnitContext) -> dict:
    """One network at initialization: the gradient ratio and signal propagation of one batch."""
    from covshift.monitor import signal_propagation

    cfg = dataclasses.replace(ctx.config, hidden=(ctx.config.width,) * ctx.config.depth)
    x_train, y_train, _, _ = tensors(ctx.data)
    gen = torch.Generator().manual_seed(10_000 + ctx.seed)  # the batch: its own stream, one per seed
    idx = torch.randperm(len(y_train), generator=gen)[: cfg.batch_size]
    x, y = x_train[idx], y_train[idx]
    model = he_mlp(cfg, ctx.data).train()  # training mode: BatchNorm uses the batch's statistics
    depth = len(cfg.hidden)
    ratio = log_gradient_ratio(model, F.cross_entropy, x, y, "hidden1.linear.weight", f"hidden{depth}.linear.weight")
    sp = signal_propagation(model, x, blocks=[f"hidden{i}" for i in range(1, depth + 1)], training=True)
    for i in range(depth):
        ctx.log("signal", {"step": 0, "block": i + 1, **{k: float(sp.statistic(k)[i]) for k in RANK_STATS}})
    result = {"depth": depth, "log_grad_ratio": ratio, **{k: float(sp.statistic(k)[-1]) for k in RANK_STATS}}
    ctx.log("metrics", {"step": 0, **result})
    return result


def fit_line(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """Least-squares ``y = a + b x``: ``(slope b, intercept a, R^2)`` (R^2 is 1 for a constant ``y`` fitted exactly)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    b, a = np.polyfit(x, y, 1)
    ss_res = float(((y - (a + b * x)) ** 2).sum())
    ss_tot = float(((y - y.mean()) ** 2).sum())
    return float(b), float(a), (1.0 - ss_res / ss_tot) if ss_tot > 0 else 1.0


def _per_seed_series(run, arm: str, key: str) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    out: dict[int, list] = {}
    for p in run.points():
        d = dict(p).get("depth")
        for u in run.units_of(arm, p):
            v = _result(u, key)
            if d is not None and v is not None and math.isfinite(v):
                out.setdefault(u.seed, []).append((d, v))
    return {s: (np.array([a for a, _ in sorted(r)]), np.array([b for _, b in sorted(r)])) for s, r in out.items()}


def slope_estimate(run, arm: str, key: str = "log_grad_ratio"):
    """(estimate over seeds of the per-seed slope of ``key`` against depth, R^2 of the fit to the seed mean)."""
    series = _per_seed_series(run, arm, key)
    series = {s: v for s, v in series.items() if len(v[0]) >= 3}
    if not series:
        return estimate([]), math.nan
    slopes = [fit_line(*v)[0] for v in series.values()]
    depths = sorted(set.intersection(*(set(v[0].tolist()) for v in series.values())))
    mean = [np.mean([v[1][list(v[0]).index(d)] for v in series.values()]) for d in depths]
    r2 = fit_line(np.array(depths), np.array(mean))[2] if len(depths) >= 3 else math.nan
    return estimate(slopes), r2


def _within(e, bound: float) -> Verdict:
    """Is ``e`` (95% interval; the value with one seed) inside ``[-bound, bound]``? Held when the whole
    interval is, did not hold when it lies entirely outside, otherwise undetermined (NOT_EVALUATED)."""
    lo, hi = (e.lo, e.hi) if e.has_interval else (e.mean, e.mean)
    if -bound <= lo and hi <= bound:
        return Verdict.HELD
    if lo > bound or hi < -bound:
        return Verdict.NOT_HELD
    return Verdict.NOT_EVALUATED


def linear_growth_verdict(st, r2t: float, sb, min_r2: float, flat_slope: float) -> Verdict:
    """BN's slope interval above 0 with ``R^2 >= min_r2`` (else did not hold), and the plain network
    flat: its slope interval inside ``[-flat_slope, flat_slope]`` (:func:`_within`; entirely outside:
    did not hold; straddling the bound: could not be evaluated)."""
    bn_linear = (st.lo if st.has_interval else st.mean) > 0 and r2t >= min_r2
    flat = _within(sb, flat_slope)
    if not bn_linear or flat is Verdict.NOT_HELD:
        return Verdict.NOT_HELD
    return flat


def claim_linear_growth(run, tolerance: float) -> ClaimResult:
    t, b = run.first(Role.TREATMENT), run.first(Role.BASELINE)
    if not (t and b):
        return not_evaluated("the run lacks the BN or the plain network")
    st, r2t = slope_estimate(run, t.name)
    sb, r2b = slope_estimate(run, b.name)
    if st.n == 0 or sb.n == 0:
        return not_evaluated("fewer than 3 depths measured per seed: no slope")
    flat = run.config.flat_slope
    verdict = linear_growth_verdict(st, r2t, sb, tolerance, flat)
    text = (
        f"slope of the log gradient ratio per layer: {t.label} {st.format(4)} (R^2 of the fit to the seed mean {r2t:.3f}), "
        f"{b.label} {sb.format(4)} (R^2 {r2b:.3f}); the claim needs {t.label}'s interval above 0 with R^2 >= {tolerance:g}, and "
        f"{b.label}'s interval inside +-{flat:g} per layer (flat: the gradient ratio grows by at most {100 * (math.exp(flat) - 1):.1f}% "
        f"per layer); entirely outside it did not hold, straddling it cannot be told"
    )
    numbers = {f"slope {t.label}": st, f"slope {b.label}": sb}
    if verdict is Verdict.NOT_EVALUATED:
        return ClaimResult(verdict, text, numbers, reason=f"{b.label}'s slope interval straddles the flatness bound +-{flat:g}: {text}")
    return ClaimResult(verdict, text, numbers)


def _extreme_points(run) -> Optional[tuple[tuple, tuple]]:
    pts = [p for p in run.points() if dict(p).get("depth") is not None]
    if len(pts) < 2:
        return None
    pts.sort(key=lambda p: dict(p)["depth"])
    return pts[0], pts[-1]


def _deepest(run) -> Optional[tuple]:
    ends = _extreme_points(run)
    return ends[1] if ends else None


def rank_drop(run, arm: str, key: str = "numerical_rank") -> dict[int, float]:
    """Per seed, ``rank(shallowest) - rank(deepest)`` of the last hidden representation."""
    ends = _extreme_points(run)
    if ends is None:
        return {}
    first = run.per_seed(lambda u: _result(u, key), arm, ends[0])
    last = run.per_seed(lambda u: _result(u, key), arm, ends[1])
    return {s: first[s] - last[s] for s in sorted(set(first) & set(last)) if first[s] is not None and last[s] is not None}


def claim_rank(run, tolerance: float) -> ClaimResult:
    """Rank collapse *with depth*: judged on the trend of the numerical rank from the shallowest to the
    deepest network, not on the deepest alone. (BN's uncentered stable rank is pinned near pi by the
    ReLU outputs' common mean at every depth, depth 1 included, so a comparison at one depth says
    nothing about collapse.) Held when the plain network's drop ``rank(shallowest) - rank(deepest)``
    is above ``tolerance`` and BN's drop is smaller than the plain network's by more than
    ``tolerance`` (95% intervals over seeds); did not hold when either interval lies entirely at or
    below ``tolerance``; otherwise could not be evaluated."""
    t, b = run.first(Role.TREATMENT), run.first(Role.BASELINE)
    ends = _extreme_points(run)
    if not (t and b and ends):
        return not_evaluated("the run lacks the BN or the plain network, or two depths")
    pb, pt = rank_drop(run, b.name), rank_drop(run, t.name)
    if not pb or not pt:
        return not_evaluated("no numerical rank at the shallowest and deepest depths")
    drop_b, drop_t = estimate(list(pb.values())), estimate(list(pt.values()))
    less = estimate([pb[s] - pt[s] for s in sorted(set(pb) & set(pt))])  # BN falls less: plain's drop minus BN's, per seed
    verdicts = []
    for e in (drop_b, less):
        lo, hi = (e.lo, e.hi) if e.has_interval else (e.mean, e.mean)
        verdicts.append(Verdict.HELD if lo > tolerance else Verdict.NOT_HELD if hi <= tolerance else Verdict.NOT_EVALUATED)
    d0, d1 = dict(ends[0])["depth"], dict(ends[1])["depth"]
    text = (
        f"numerical rank of the last hidden representation, depth {d0} minus depth {d1}: {b.label} {drop_b.format(1)}, "
        f"{t.label} {drop_t.format(1)}; {b.label}'s drop minus {t.label}'s = {less.format(1)} (95% intervals over seeds); "
        f"the claim needs {b.label}'s drop and the difference both above {tolerance:g}"
    )
    numbers = {f"rank drop {b.label}": drop_b, f"rank drop {t.label}": drop_t, "drop difference": less}
    if Verdict.NOT_HELD in verdicts:
        return ClaimResult(Verdict.NOT_HELD, text, numbers)
    if all(v is Verdict.HELD for v in verdicts):
        return ClaimResult(Verdict.HELD, text, numbers)
    return ClaimResult(Verdict.NOT_EVALUATED, text, numbers, reason=f"an interval straddles {tolerance:g}: {text}")


# --- figures --------------------------------------------------------------------------------------


def _figure_gradients(run):
    fig, (ax,) = new_figure(1, 5.5, 4.0)
    for arm in run.arms:
        sweep_band(ax, run, arm, "depth", lambda u: _result(u, "log_grad_ratio"))
    ax.set_xlabel("depth (hidden layers)")
    ax.set_ylabel("ln(||grad W_1|| / ||grad W_D||)")
    ax.set_title("gradient explosion at initialization")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _figure_rank(run):
    fig, axes = new_figure(2)
    for ax, key, title in zip(axes, ("stable_rank", "numerical_rank"), ("stable rank", "numerical rank")):
        for arm in run.arms:
            sweep_band(ax, run, arm, "depth", lambda u, k=key: _result(u, k))
        ax.set_xscale("log", base=2)
        ax.set_xlabel("depth (hidden layers)")
        ax.set_title(f"{title} of the last hidden layer's output")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    return fig


def _figure_signal(run):
    p = _deepest(run)
    if p is None:
        return None
    fig, axes = new_figure(3)
    for arm in run.arms:
        us = run.units_of(arm.name, p)
        if not us:
            continue
        rows = us[0].records("signal")
        block = [r["block"] for r in rows]
        for ax, key in zip(axes, ("channel_sq_mean", "channel_var", "stable_rank")):
            ax.plot(block, [r[key] for r in rows], color=arm_color(run, arm), label=arm.label)
    for ax, key in zip(axes, ("average channel squared mean", "average channel variance", "stable rank")):
        ax.set_xlabel("hidden layer")
        ax.set_title(key)
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"signal propagation at initialization, depth {dict(p)['depth']} (first seed)")
    fig.tight_layout()
    return fig


def _rank_bounds(cfg) -> tuple[float, float]:
    """A rank of the (batch, width) representation lies in [0, min(batch, width)]; the stable rank
    ||Y||_F^2 / ||Y||_2^2 is at most the numerical rank."""
    return (0.0, float(min(cfg.batch_size, cfg.width)))


def _slope_metric(u):  # per-unit metrics are per depth; the slope is a claim-level number
    return _result(u, "log_grad_ratio")


DEPTH = register(
    Experiment(
        name="depth",
        version=1,
        summary="deep MLPs at initialization (depth 4-128, width 128): gradient explosion and rank collapse, with and without BN and LayerNorm",
        paper="Yang et al. 2019; Daneshmand et al. 2020; Brock et al. 2021",
        question="At initialization, does BN make gradients explode with depth, and does it keep the representation's rank from collapsing?",
        config=DepthConfig(activation="relu", batch_size=128, steps=1, eval_every=1, probe_size=0, ics_every=0, seeds=(0, 1, 2),
                           units=()),  # no single units are recorded; (0..7) would refuse a --width below 8
        arms=(
            Arm("none", Role.BASELINE, "no normalization (He init)", {"norm": "none"}, color="#d1495b"),
            Arm("bn", Role.TREATMENT, "BatchNorm", {"norm": "bn"}, color="#00798c"),
            Arm("layer", Role.VARIANT, "LayerNorm", {"norm": "layer"}, color="#edae49"),
        ),
        sweep=(Axis("depth", "depths", label="depth (hidden layers)", log=True),),
        unit_fn=depth_unit,
        # depth_unit: width, depth (the sweep), batch_size, data, and he_mlp's fields (hidden is replaced
        # by width x depth); the gradient-explosion claim reads flat_slope.
        reads=(HE_MLP_READS - {"hidden"}) | {"width", "depth", "batch_size", "flat_slope"},
        instead=hints({
            "depth's networks are --width wide and --depths deep": ("hidden",),
            "depth measures at initialization, without training": ("steps", "optimizer", "lr", "momentum", "eval_every", *EVAL_SCHEDULE_FIELDS),
            "depth measures signal propagation itself, without the activation monitor": MONITOR_FIELDS,
            HE_INIT: ("init_std",),
        }),
        metrics=(
            Metric("log_grad_ratio", "ln(first / last hidden layer's gradient norm)", _slope_metric, digits=3),
            Metric("stable_rank", "stable rank of the last hidden representation", lambda u: _result(u, "stable_rank"), digits=2,
                   bounds=_rank_bounds),
            Metric("numerical_rank", "numerical rank of the last hidden representation", lambda u: _result(u, "numerical_rank"), digits=1,
                   bounds=_rank_bounds),
        ),
        claims=(
            Claim(
                "gradient-explosion",
                "Batch normalization itself is the cause of gradient explosion: at initialization the gradients of a deep "
                "batch-normalized network explode exponentially in depth (so the log ratio of the first to the last layer's "
                "gradient norm grows linearly), while a well-initialized network without BN does not explode.",
                "Yang et al. 2019, abstract and section 3 (our paraphrase of the linear-in-depth consequence)",
                claim_linear_growth,
                tolerance=0.9,
                tolerance_text="tolerance = the least R^2 of the line fit that counts as linear growth",
            ),
            Claim(
                "rank",
                "Batch normalization provably avoids rank collapse: without it the representation's rank collapses with depth, "
                "with it the rank stays high.",
                "Daneshmand et al. 2020, title and abstract",
                claim_rank,
                tolerance=0.0,
                tolerance_text="numerical rank, shallowest minus deepest network: the plain network's drop above 0, and the plain "
                "network's drop minus BN's above 0 (95% intervals over seeds)",
            ),
        ),
        figures=(
            FigureSpec("gradient_ratio.png", "The log ratio of the first to the last hidden layer's weight-gradient norm at initialization, "
                       "against depth (mean over seeds with its 95% band).", _figure_gradients),
            FigureSpec("rank.png", "Stable and numerical rank of the last hidden layer's output over a batch of 128 digits, against "
                       "depth (mean over seeds with its 95% band).", _figure_rank),
            FigureSpec("signal_propagation.png", "Signal propagation plot (Brock et al. 2021) of the deepest networks at initialization: "
                       "per hidden layer, the average channel squared mean, the average channel variance and the stable rank "
                       "(first seed).", _figure_signal),
        ),
        notes=(
            "MNIST digits instead of the papers' Gaussian inputs or CIFAR-10; a batch of 128 training digits per unit, "
            "cross-entropy on their labels as the loss whose gradients are measured.",
            "ReLU MLPs of width 128 without skip connections, He-initialized (N(0, 2/fan-in); the output layer N(0, 1/fan-in)); "
            "BN and LayerNorm before every ReLU, the linear layers then without bias.",
            "Measured at initialization only, in training mode (batch statistics), one forward and backward per unit.",
            "The rank claim is judged on the trend of the numerical rank (torch's default tolerance max(N, D) * eps(float32)) "
            "from the shallowest to the deepest network: BN's uncentered stable rank is pinned near pi by the ReLU outputs' "
            "common mean at every depth, so it cannot show collapse with depth.",
            "The plain network's gradient ratio is 'flat' when its slope's 95% interval lies within +-0.01 per layer (the "
            "ratio grows by at most 1% per layer), an absolute bound chosen so that 'flat' is not merely 'a tenth of BN's'.",
        ),
    )
)
