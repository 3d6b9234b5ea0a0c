"""Matplotlib figures of a loaded run, drawn only from saved data (so ``covshift report`` can redraw them).

Arms, their labels and colours, and the layers and their names all come from the run's
declaration (:class:`~covshift.experiments.results.LoadedRun`); nothing here names an arm or a
layer. Curves over seeds are the mean with its 95% Student-t band. Every function returns a
``matplotlib.figure.Figure`` (or ``None`` when the run holds nothing to draw); saving is the caller's.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import matplotlib

matplotlib.use("Agg")  # files only: no display needed, and no GUI backend is ever imported
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import LogNorm  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

__all__ = ["palette", "plot_curve", "accuracy_panel", "figure1", "heatmaps", "drift_figure", "gradient_ics_figure", "save"]

_PALETTE = ["#d1495b", "#00798c", "#edae49", "#66a182", "#2e4057", "#8d96a3", "#a05195", "#f95d6a"]
_LAYER_COLORS = plt.get_cmap("viridis")


def palette(run) -> dict[str, str]:
    """arm name -> colour: the declaration's, else the palette in declaration order."""
    return {a.name: a.color or _PALETTE[i % len(_PALETTE)] for i, a in enumerate(run.experiment.arms)}


def _layer_colors(n: int) -> list:
    return [_LAYER_COLORS(x) for x in np.linspace(0.0, 0.85, max(n, 1))]


def plot_curve(ax, curve, color, label: Optional[str] = None, ls: str = "-", lw: float = 1.6) -> None:
    """Mean line with a band (the band only when there are several seeds)."""
    if curve is None:
        return
    ax.plot(curve.steps, curve.mean, ls, color=color, lw=lw, label=label + (f" ({curve.n} seeds)" if label and curve.n > 1 else "") if label else None)
    if curve.n > 1:
        ax.fill_between(curve.steps, curve.lo, curve.hi, color=color, alpha=0.2, lw=0)


_POINT_STYLES = ["-", "--", ":", "-."]


def _styles(run) -> dict[tuple, str]:
    return {p: _POINT_STYLES[i % len(_POINT_STYLES)] for i, p in enumerate(run.points())}


def accuracy_panel(ax, run, key: str = "test_acc", title: str = "test accuracy") -> None:
    """One curve per arm (colour) and sweep point (line style): the mean over seeds with its band."""
    colors, styles = palette(run), _styles(run)
    for arm, point, label in run.groups():
        plot_curve(ax, run.curve(lambda u: u.series(key), arm.name, point), colors[arm.name], label, ls=styles[point])
    ax.set_xlabel("training step")
    ax.set_ylabel(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")


def _first_seed_unit(run, arm: str, point: tuple = ()):
    us = run.units_of(arm, point)
    return us[0] if us else None


def figure1(run, unit_index: Optional[int]) -> Optional[Figure]:
    """(a) test accuracy per arm; then one panel per arm with the 15/50/85th percentiles of the
    input to unit ``unit_index`` of the declaration's unit-recorded layer (first seed), on one y-axis."""
    layer = next((l for l in run.layers if l.record_units), None)
    colors = palette(run)
    panels = []
    for arm, point, label in run.groups():
        u = _first_seed_unit(run, arm.name, point)
        if u is None or layer is None:
            continue
        key = None
        if unit_index is not None:
            key = u.monitor_key(layer.module, unit_index, probe=True) or u.monitor_key(layer.module, unit_index)
        if key is None:
            key = u.monitor_key(layer.module, probe=True) or u.monitor_key(layer.module)
        if key is None:
            continue
        ps = {}
        for k in ("p15", "p50", "p85"):
            steps, v = u.monitor.series(key, k)
            ps[k] = (steps, v)
        what = f"unit {unit_index}" if unit_index is not None and str(key).startswith(f"{layer.module}[{unit_index}]") else "whole layer"
        panels.append((arm, f"{label}: {what}" + (" (probe batch)" if str(key).endswith("@probe") else ""), ps))
    fig, axes = plt.subplots(1, 1 + len(panels), figsize=(5.0 * (1 + len(panels)), 4.0), constrained_layout=True, squeeze=False)
    axes = axes[0]
    accuracy_panel(axes[0], run)
    axes[0].set_title("(a) test accuracy")
    vals = [v for _, _, ps in panels for (_, v) in ps.values() if len(v)]
    lo = min((np.nanmin(v) for v in vals), default=-1.0)
    hi = max((np.nanmax(v) for v in vals), default=1.0)
    pad = 0.05 * (hi - lo if hi > lo else 1.0)
    for j, (arm, title, ps) in enumerate(panels, start=1):
        ax, color = axes[j], colors[arm.name]
        steps = ps["p50"][0]
        ax.fill_between(steps, ps["p15"][1], ps["p85"][1], color=color, alpha=0.15, lw=0)
        for k, ls in (("p85", "--"), ("p50", "-"), ("p15", "--")):
            ax.plot(ps[k][0], ps[k][1], ls, color=color, lw=1.5, label=f"{k[1:]}th percentile")
        ax.set_ylim(lo - pad, hi + pad)
        ax.set_xlabel("training step")
        ax.set_ylabel(layer.label)
        ax.set_title(f"({'abcdefghijklmnop'[j % 16]}) {title}", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=8)
    return fig


def _step_edges(steps: np.ndarray) -> np.ndarray:
    """Cell boundaries around each recorded step, for pcolormesh."""
    steps = np.asarray(steps, dtype=float)
    if len(steps) == 1:
        return np.array([steps[0] - 0.5, steps[0] + 0.5])
    mid = (steps[1:] + steps[:-1]) / 2
    return np.concatenate([[steps[0] - (mid[0] - steps[0])], mid, [steps[-1] + (steps[-1] - mid[-1])]])


def heatmaps(run) -> Optional[Figure]:
    """Histogram over time, one row per arm (first seed) and one column per declared layer:
    step on x, value on y, log counts as colour. Tails are reported in each panel's title."""
    grid = []
    for arm, point, label in run.groups():
        u = _first_seed_unit(run, arm.name, point)
        row = []
        for layer in run.layers:
            key = u.monitor_key(layer.module) if u is not None else None
            if key is not None and key in u.monitor.histogram_layers():
                row.append((layer, u.monitor.histograms(key)))
        if row:
            grid.append((label, row))
    if not grid:
        return None
    ncol = max(len(r) for _, r in grid)
    fig, axes = plt.subplots(len(grid), ncol, figsize=(4.2 * ncol + 1, 3.2 * len(grid)), squeeze=False, constrained_layout=True)
    vmax = max((h.counts[:, 1:-1].max() for _, r in grid for _, h in r if h.counts.size), default=1)
    norm = LogNorm(vmin=1, vmax=max(vmax, 2))
    image = None
    for i, (label, row) in enumerate(grid):
        for j in range(ncol):
            ax = axes[i, j]
            if j >= len(row) or len(row[j][1].steps) == 0:
                ax.set_axis_off()
                continue
            layer, h = row[j]
            inside = h.counts[:, 1:-1].astype(float)
            inside[inside == 0] = np.nan  # empty bins blank, not the lowest colour
            image = ax.pcolormesh(_step_edges(h.steps), h.edges, inside.T, norm=norm, cmap="magma", shading="flat")
            total, tails = h.counts.sum(), h.counts[:, 0].sum() + h.counts[:, -1].sum()
            ax.set_title(f"{label}: {layer.label}" + (f"  ({100 * tails / total:.1f}% outside)" if total and tails else ""), fontsize=9)
            ax.set_xlabel("training step")
            if j == 0:
                ax.set_ylabel("value")
    if image is not None:
        fig.colorbar(image, ax=axes, label="count per bin (log scale)", shrink=0.9)
    return fig


_DRIFT = {
    "mean_shift": "mean shift (in std of the first record)",
    "log_std_ratio": "log std ratio",
    "w1": "1-Wasserstein distance",
    "js": "Jensen-Shannon divergence (bits)",
}


def _grid_by_arm(run, rows: dict[str, str], series: Callable, title: str, reference_lines: Optional[dict] = None) -> Optional[Figure]:
    """Rows are measures, columns are arms (and sweep points), colour is the declared layer; one legend at the bottom."""
    groups, layers = run.groups(), run.layers
    colors = _layer_colors(len(layers))
    fig, axes = plt.subplots(len(rows), len(groups), figsize=(5.2 * len(groups), 3.1 * len(rows)), squeeze=False, sharex=True, sharey="row")
    drew = False
    for j, (arm, point, title_j) in enumerate(groups):
        for i, (metric, label) in enumerate(rows.items()):
            ax = axes[i, j]
            for k, layer in enumerate(layers):
                curve = run.curve(lambda u: series(u, layer, metric), arm.name, point)
                if curve is not None:
                    plot_curve(ax, curve, colors[k], layer.label if (i == 0 and j == 0) else None)
                    drew = True
            if reference_lines and metric in reference_lines:
                ax.axhline(reference_lines[metric], color="#888", lw=0.8, ls=":")
            ax.grid(alpha=0.3)
            if j == 0:
                ax.set_ylabel(label, fontsize=9)
            if i == 0:
                ax.set_title(title_j, fontsize=11)
            if i == len(rows) - 1:
                ax.set_xlabel("training step")
    if not drew:
        plt.close(fig)
        return None
    fig.suptitle(title, fontsize=12)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    # As many legend columns as fit the figure's width (about 11 characters per inch at this size).
    width = fig.get_figwidth()
    longest = max((len(l) for l in labels), default=1) + 6
    ncol = max(1, min(len(labels), int(width * 11 // longest)))
    nrows = -(-len(labels) // ncol) if labels else 0
    fig.legend(handles, labels, loc="lower center", ncol=ncol, fontsize=10, frameon=False)
    fig.tight_layout(rect=(0, 0.035 * nrows / max(len(rows) / 4, 0.5) + 0.01, 1, 0.97))
    return fig


def _drift_series(u, layer, metric):
    d = u.drift(layer.module)
    if d is None:
        return np.array([], dtype=np.int64), np.array([])
    return d["steps"], d[metric]


def drift_figure(run) -> Optional[Figure]:
    """Drift of each declared layer's input distribution from its first record (training batches)."""
    return _grid_by_arm(run, _DRIFT, _drift_series, "Distribution drift of each layer's input, against its first record")


def _ics_series(u, layer, stat):
    rows = [r for r in u.records("gradient_ics") if r["layer"] == layer.weights and r[stat] is not None and math.isfinite(r[stat])]
    return np.array([r["step"] for r in rows], dtype=np.int64), np.array([r[stat] for r in rows], dtype=float)


def gradient_ics_figure(run) -> Optional[Figure]:
    """Gradient ICS (Santurkar et al. 2018, Definition 2.1) of each declared layer's weights."""
    if not any(l.weights for l in run.layers):
        return None
    return _grid_by_arm(
        run,
        {"l2_diff": "||G - G'||  (l2 difference)", "cosine": "cos(G, G')"},
        _ics_series,
        "Gradient ICS of each layer's weights (Santurkar et al. 2018)",
        reference_lines={"cosine": 1.0, "l2_diff": 0.0},
    )


def save(fig: Figure, path, dpi: int = 110) -> None:
    """Save a figure atomically as PNG and release it."""
    import io

    from covshift._io import atomic_write_bytes

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
