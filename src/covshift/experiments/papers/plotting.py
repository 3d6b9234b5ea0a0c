"""Small matplotlib helpers shared by the literature experiments' figures (mean lines with 95% bands)."""

from __future__ import annotations

from typing import Callable, Optional, Sequence

from covshift.experiments.stats import estimate

__all__ = ["new_figure", "arm_color", "sweep_band", "PALETTE"]

PALETTE = ("#d1495b", "#00798c", "#edae49", "#66a182", "#2e4057", "#8d96a3")


def new_figure(ncols: int, width: float = 4.6, height: float = 3.6):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=(width * ncols, height), squeeze=False)
    return fig, list(axes[0])


def arm_color(run, arm) -> str:
    if arm.color:
        return arm.color
    names = [a.name for a in run.experiment.arms]
    return PALETTE[names.index(arm.name) % len(PALETTE)]


def sweep_band(
    ax,
    run,
    arm,
    field: str,
    fn: Callable,
    label: Optional[str] = None,
    xs: Optional[Sequence] = None,
    clip: Optional[tuple[float, float]] = None,
    **style,
) -> None:
    """Mean over seeds of ``fn(unit)`` at each sweep value of ``field`` for ``arm``, with its 95% band
    (clipped to ``clip = (lo, hi)`` when given: a Student-t band of an accuracy can leave [0, 1])."""
    points = [p for p in run.points() if dict(p).get(field) is not None]
    points.sort(key=lambda p: dict(p)[field])
    x, m, lo, hi = [], [], [], []
    for p in points:
        e = estimate([fn(u) for u in run.units_of(arm.name, p)])
        if e.n == 0:
            continue
        v = dict(p)[field]
        x.append(v[0] if isinstance(v, tuple) else v)
        m.append(e.mean)
        l, h = (e.lo, e.hi) if e.has_interval else (e.mean, e.mean)
        if clip is not None:
            l, h = max(l, clip[0]), min(h, clip[1])
        lo.append(l)
        hi.append(h)
    if not x:
        return
    color = style.pop("color", arm_color(run, arm))
    ax.plot(x, m, marker="o", ms=3, color=color, label=label or arm.label, **style)
    ax.fill_between(x, lo, hi, color=color, alpha=0.2, lw=0)
    ax.grid(alpha=0.3)

