"""Matplotlib figures of a run, drawn only from saved data (so ``covshift report`` can redraw them).

Every function takes plain arrays and returns a ``matplotlib.figure.Figure``; saving is the caller's.
"""

from __future__ import annotations

from typing import Mapping

import matplotlib

matplotlib.use("Agg")  # files only: no display needed, and no GUI backend is ever imported
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import LogNorm  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

__all__ = ["figure1", "heatmaps", "drift_figure", "ARM_STYLE"]

# No-BN in a warm colour, BN in a cool one, on every figure.
ARM_STYLE = {
    "no-bn": dict(color="#d1495b", label="without BN"),
    "bn": dict(color="#00798c", label="with BN"),
}
_FALLBACK = ["#edae49", "#66a182", "#2e4057", "#8d96a3"]


def _style(arm: str, i: int) -> dict:
    return ARM_STYLE.get(arm, dict(color=_FALLBACK[i % len(_FALLBACK)], label=arm))


def figure1(
    accuracy: Mapping[str, tuple[np.ndarray, np.ndarray]],
    percentiles: Mapping[str, tuple[np.ndarray, Mapping[str, np.ndarray]]],
    unit_labels: Mapping[str, str],
) -> Figure:
    """The paper's Figure 1: (a) test accuracy; (b), (c) the 15/50/85th percentiles of one
    last-layer sigmoid's input over training, without and with BN, on one y-axis.

    Args:
        accuracy: arm -> (steps, test accuracy).
        percentiles: arm -> (steps, {"p15": ..., "p50": ..., "p85": ...}).
        unit_labels: arm -> which unit is shown, for the panel titles.
    """
    arms = list(percentiles)
    fig, axes = plt.subplots(1, 1 + len(arms), figsize=(4.2 * (1 + len(arms)), 3.6), constrained_layout=True)
    ax = axes[0]
    for i, (arm, (steps, acc)) in enumerate(accuracy.items()):
        ax.plot(steps, acc, lw=1.8, **_style(arm, i))
    ax.set_xlabel("training step")
    ax.set_ylabel("test accuracy")
    ax.set_title("(a) test accuracy")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    lo, hi = np.inf, -np.inf
    for steps, ps in percentiles.values():
        for v in ps.values():
            if len(v):
                lo, hi = min(lo, np.nanmin(v)), max(hi, np.nanmax(v))
    pad = 0.05 * (hi - lo if np.isfinite(hi - lo) and hi > lo else 1.0)
    for j, arm in enumerate(arms, start=1):
        ax = axes[j]
        steps, ps = percentiles[arm]
        color = _style(arm, j - 1)["color"]
        if "p15" in ps and "p85" in ps:
            ax.fill_between(steps, ps["p15"], ps["p85"], color=color, alpha=0.15, lw=0)
        for key, ls in (("p85", "--"), ("p50", "-"), ("p15", "--")):
            if key in ps:
                ax.plot(steps, ps[key], ls, color=color, lw=1.5, label=f"{key[1:]}th percentile")
        ax.set_ylim(lo - pad, hi + pad) if np.isfinite(lo) else None
        ax.set_xlabel("training step")
        ax.set_ylabel("input to the sigmoid")
        ax.set_title(f"({'abcdefg'[j]}) {_style(arm, j - 1)['label']}: {unit_labels.get(arm, '')}")
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=8)
    return fig


def heatmaps(
    hists: Mapping[str, Mapping[str, tuple[np.ndarray, np.ndarray, np.ndarray]]],
) -> Figure:
    """Histogram over time per layer and arm: step on x, value on y, log counts as colour.

    Args:
        hists: arm -> layer -> (steps (T,), edges (B+1,), counts (T, B+2) with the under/overflow
            columns first and last). Tails are reported in each panel's title.
    """
    arms = list(hists)
    layers = list(next(iter(hists.values()))) if hists else []
    fig, axes = plt.subplots(
        len(arms), max(len(layers), 1), figsize=(3.8 * max(len(layers), 1) + 1, 2.9 * len(arms)), squeeze=False, constrained_layout=True
    )
    vmax = max((c[:, 1:-1].max() for a in hists.values() for (_, _, c) in a.values() if c.size), default=1)
    norm = LogNorm(vmin=1, vmax=max(vmax, 2))
    image = None
    for i, arm in enumerate(arms):
        for j, layer in enumerate(layers):
            ax = axes[i, j]
            steps, edges, counts = hists[arm][layer]
            if len(steps) == 0:
                ax.set_axis_off()
                continue
            inside = counts[:, 1:-1].astype(float)
            inside[inside == 0] = np.nan  # empty bins blank, not the lowest colour
            x_edges = _step_edges(steps)
            image = ax.pcolormesh(x_edges, edges, inside.T, norm=norm, cmap="magma", shading="flat")
            total = counts.sum()
            tails = counts[:, 0].sum() + counts[:, -1].sum()
            ax.set_title(f"{_style(arm, i)['label']}: {layer}" + (f"  ({100 * tails / total:.1f}% outside)" if total and tails else ""), fontsize=9)
            ax.set_xlabel("training step")
            if j == 0:
                ax.set_ylabel("activation value")
    if image is not None:
        fig.colorbar(image, ax=axes, label="count per bin (log scale)", shrink=0.9)
    return fig


def _step_edges(steps: np.ndarray) -> np.ndarray:
    """Cell boundaries around each recorded step, for pcolormesh."""
    steps = np.asarray(steps, dtype=float)
    if len(steps) == 1:
        return np.array([steps[0] - 0.5, steps[0] + 0.5])
    mid = (steps[1:] + steps[:-1]) / 2
    return np.concatenate([[steps[0] - (mid[0] - steps[0])], mid, [steps[-1] + (steps[-1] - mid[-1])]])


_DRIFT_TITLES = {
    "mean_shift": "mean shift (in std of the first record)",
    "log_std_ratio": "log std ratio",
    "wasserstein": "1-Wasserstein distance",
    "js_divergence": "Jensen-Shannon divergence (bits)",
}


def drift_figure(drift: Mapping[str, Mapping[str, tuple[np.ndarray, Mapping[str, np.ndarray]]]], reference: str = "first") -> Figure:
    """Drift of each layer's distribution over training, per metric, both arms.

    Args:
        drift: arm -> layer -> (steps, {metric: values}) with metrics among ``mean_shift``,
            ``log_std_ratio``, ``wasserstein``, ``js_divergence``, measured against ``reference``.
    """
    metrics = [m for m in _DRIFT_TITLES if any(m in d for a in drift.values() for (_, d) in a.values())]
    fig, axes = plt.subplots(1, max(len(metrics), 1), figsize=(4.2 * max(len(metrics), 1), 3.4), squeeze=False, constrained_layout=True)
    dashes = ["-", "--", ":", "-."]
    for k, metric in enumerate(metrics):
        ax = axes[0, k]
        for i, (arm, layers) in enumerate(drift.items()):
            color = _style(arm, i)["color"]
            for j, (layer, (steps, values)) in enumerate(layers.items()):
                if metric in values:
                    ax.plot(steps, values[metric], dashes[j % len(dashes)], color=color, lw=1.3, label=f"{_style(arm, i)['label']}: {layer}")
        ax.set_title(f"{_DRIFT_TITLES[metric]}\nvs the {reference} record", fontsize=9)
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
    if metrics:
        axes[0, 0].legend(fontsize=7, loc="best")
    return fig


def save(fig: Figure, path, dpi: int = 110) -> None:
    """Save a figure atomically as PNG and release it."""
    import io

    from covshift._io import atomic_write_bytes

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
