"""Figures, headline numbers and a self-contained ``report.html``, built from a run directory alone.

:func:`build_report` reads only what training wrote (``config.json``, each arm's ``metrics.jsonl``
and ``monitor/``), so it works on a finished run, on an interrupted one, and again later through
``covshift report RUN_DIR`` without retraining.
"""

from __future__ import annotations

import base64
import html
import json
import math
from datetime import datetime
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from covshift._io import atomic_write_json, atomic_write_text, read_jsonl
from covshift.experiments import plots

__all__ = ["build_report", "ReportError", "headline_numbers", "steps_to_reach"]

FIGURES = {
    "figure1.png": "Figure 1, reproduced. (a) Test accuracy over training. (b, c) The 15th, 50th and 85th percentiles of the input to one typical sigmoid of the last hidden layer over training, without and with BN, on one y-axis, measured on a fixed probe batch of held-out digits (in inference mode) at every record.",
    "heatmaps.png": "The distribution of every watched layer's input over training: each column is one recorded step's histogram (fixed bin edges for the whole run), colour is the count on a log scale.",
    "drift.png": "Drift of each layer's input distribution from its first record, by four measures (see the monitor's drift metrics). Solid and dashed lines are the layers; colour is the network.",
}


class ReportError(ValueError):
    """The directory is not a covshift run directory, or holds nothing to report."""


def steps_to_reach(steps: np.ndarray, acc: np.ndarray, target: float) -> Optional[int]:
    """The first recorded step whose test accuracy is at least ``target``, or None."""
    hit = np.nonzero(np.asarray(acc) >= target - 1e-12)[0]
    return int(steps[hit[0]]) if len(hit) else None


def _load_arm(arm_dir: Path) -> dict[str, Any]:
    from covshift.monitor import load

    metrics = read_jsonl(arm_dir / "metrics.jsonl") if (arm_dir / "metrics.jsonl").exists() else []
    status = json.loads((arm_dir / "status.json").read_text()) if (arm_dir / "status.json").exists() else {}
    try:
        monitor = load(arm_dir / "monitor")
    except FileNotFoundError:  # interrupted before the monitor's first flush
        monitor = None
    return {"metrics": metrics, "status": status, "monitor": monitor}


def _accuracy(arm: dict) -> tuple[np.ndarray, np.ndarray]:
    m = arm["metrics"]
    return np.array([r["step"] for r in m], dtype=np.int64), np.array([r["test_acc"] for r in m], dtype=float)


def _unit_layers(monitor, layer: str) -> list[str]:
    """The single units of ``layer`` recorded one by one: on the fixed probe batch when there is one
    (the same held-out inputs at every record, so the curves show the network changing, not the
    batch), else on the training batches."""
    units = [name for name in monitor.layers if name.startswith(layer + "[")]
    probed = [u for u in units if u.endswith("@probe")]
    return probed or [u for u in units if "@" not in u]


def _unit_label(name: str) -> str:
    """``"hidden3.act[4]@probe"`` -> ``"unit 4 of hidden3 (probe batch)"``."""
    base, _, where = name.partition("@")
    layer, _, unit = base.partition("[")
    text = f"unit {unit.rstrip(']')} of {layer.removesuffix('.act')}" if unit else layer
    return text + (" (probe batch)" if where == "probe" else "")


def _typical_unit(monitor, layer: str) -> Optional[str]:
    """Of the units recorded one by one, the one whose median input moved a median amount.

    "Typical" in the paper's sense: neither the most nor the least drifting of the recorded units.
    """
    units = _unit_layers(monitor, layer)
    if not units:
        return None
    moves = []
    for u in units:
        _, p50 = monitor.series(u, "p50")
        moves.append(abs(p50[-1] - p50[0]) if len(p50) else 0.0)
    return units[int(np.argsort(moves)[len(moves) // 2])]


def _drift_series(monitor, layers: list[str]) -> dict[str, tuple[np.ndarray, dict[str, np.ndarray]]]:
    from covshift.monitor import drift

    out = {}
    for layer in layers:
        d = drift.layer_drift(monitor, layer, reference="first")
        out[layer] = (d["steps"], {"mean_shift": d["mean_shift"], "log_std_ratio": d["log_std_ratio"], "wasserstein": d["w1"], "js_divergence": d["js"]})
    return out


def headline_numbers(arms: dict[str, dict], last_layer: str, base: str = "no-bn", treated: str = "bn") -> dict[str, Any]:
    """The numbers the paper's claims are about, from the saved records.

    * final test accuracy of each network;
    * ``target``: the no-BN network's final accuracy; the step at which each network first reaches it,
      and the speed-up ``steps_no_bn / steps_bn`` (the paper reports 14x fewer steps on ImageNet,
      with BN and a 5x learning rate);
    * the drift of the last hidden layer's sigmoid input from its first record to its last, in each
      network: mean shift in std units, log std ratio, 1-Wasserstein and Jensen-Shannon.
    """
    out: dict[str, Any] = {"final_test_acc": {}, "best_test_acc": {}, "steps_trained": {}}
    for name, arm in arms.items():
        steps, acc = _accuracy(arm)
        out["final_test_acc"][name] = float(acc[-1]) if len(acc) else None
        out["best_test_acc"][name] = float(acc.max()) if len(acc) else None
        out["steps_trained"][name] = int(steps[-1]) if len(steps) else 0
    if base in arms and treated in arms and out["final_test_acc"].get(base) is not None:
        target = out["final_test_acc"][base]
        s_base = steps_to_reach(*_accuracy(arms[base]), target)
        s_treat = steps_to_reach(*_accuracy(arms[treated]), target)
        out["target_acc"] = target
        out["steps_to_target"] = {base: s_base, treated: s_treat}
        out["speedup"] = (s_base / s_treat) if s_base and s_treat else None
    out["last_layer_drift"] = {}
    for name, arm in arms.items():
        mon = arm["monitor"]
        if mon is None or last_layer not in mon.layers:
            continue
        steps, metrics = _drift_series(mon, [last_layer])[last_layer]
        if len(steps):
            out["last_layer_drift"][name] = {k: float(v[-1]) for k, v in metrics.items()}
    return out


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{digits}f}" if math.isfinite(v) else str(v)
    return str(v)


def _summary_lines(h: dict, config: dict) -> tuple[list[dict], list[str]]:
    table = []
    for arm, acc in h["final_test_acc"].items():
        row = {"network": arm, "steps": h["steps_trained"][arm], "final test acc": _fmt(acc), "best test acc": _fmt(h["best_test_acc"][arm])}
        if "steps_to_target" in h:
            row["steps to no-BN final acc"] = _fmt(h["steps_to_target"].get(arm))
        d = h["last_layer_drift"].get(arm)
        if d:
            row["last-layer W1 drift"] = _fmt(d["wasserstein"], 3)
            row["mean shift (std)"] = _fmt(d["mean_shift"], 2)
        table.append(row)
    lines = []
    if h.get("speedup"):
        lines.append(
            f"BN reaches the no-BN network's final test accuracy ({h['target_acc']:.4f}) at step "
            f"{h['steps_to_target']['bn']} instead of {h['steps_to_target']['no-bn']}: {h['speedup']:.1f}x fewer steps "
            "(paper, ImageNet: 14x)."
        )
    d = h["last_layer_drift"]
    if "no-bn" in d and "bn" in d and d["bn"]["wasserstein"] > 0:
        lines.append(
            f"Last hidden layer's sigmoid input drifts {d['no-bn']['wasserstein'] / d['bn']['wasserstein']:.1f}x "
            f"more without BN (W1 {d['no-bn']['wasserstein']:.3f} vs {d['bn']['wasserstein']:.3f})."
        )
    return table, lines


def _html(run_dir: Path, meta: dict, h: dict, table: list[dict], lines: list[str], figures: list[str]) -> str:
    esc = html.escape

    def img(name: str) -> str:
        data = base64.b64encode((run_dir / "figures" / name).read_bytes()).decode("ascii")
        return f'<figure><img alt="{esc(name)}" src="data:image/png;base64,{data}"><figcaption>{esc(FIGURES.get(name, name))}</figcaption></figure>'

    rows = "".join("<tr>" + "".join(f"<td>{esc(str(v))}</td>" for v in r.values()) + "</tr>" for r in table)
    head = "".join(f"<th>{esc(k)}</th>" for k in table[0]) if table else ""
    cfg_rows = "".join(f"<tr><th>{esc(k)}</th><td>{esc(json.dumps(v))}</td></tr>" for k, v in meta.get("config", {}).items())
    env_rows = "".join(f"<tr><th>{esc(k)}</th><td>{esc(str(v))}</td></tr>" for k, v in {**meta.get("versions", {}), "device": meta.get("device"), "data": meta.get("data", {}).get("source")}.items())
    status = meta.get("status", "unknown")
    banner = f'<p class="warn">This run is <b>{esc(status)}</b>: the figures show what was measured before it stopped.</p>' if status != "complete" else ""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>covshift {esc(meta.get('experiment', ''))}: {esc(run_dir.name)}</title>
<style>
body {{ font: 15px/1.5 system-ui, -apple-system, "Segoe UI", sans-serif; max-width: 1180px; margin: 2em auto; padding: 0 1em; color: #222; }}
h1 {{ font-size: 1.5em; margin-bottom: .2em; }} h2 {{ font-size: 1.15em; margin-top: 2em; border-bottom: 1px solid #ddd; }}
table {{ border-collapse: collapse; margin: .8em 0; }} td, th {{ border: 1px solid #ddd; padding: .3em .7em; text-align: left; font-variant-numeric: tabular-nums; }}
th {{ background: #f6f6f6; }} figure {{ margin: 1.2em 0; }} img {{ max-width: 100%; }} figcaption {{ color: #555; font-size: .9em; }}
.headline {{ font-size: 1.05em; background: #f3f8f9; border-left: 4px solid #00798c; padding: .5em 1em; }}
.warn {{ background: #fff4e5; border-left: 4px solid #edae49; padding: .5em 1em; }} .muted {{ color: #777; font-size: .9em; }}
</style></head><body>
<h1>covshift &middot; {esc(meta.get('experiment', ''))}</h1>
<p class="muted">{esc(meta.get('summary', ''))}<br>run {esc(run_dir.name)}, started {esc(str(meta.get('started', '')))}, seed {esc(str(meta.get('seed', '')))}, report built {datetime.now().isoformat(timespec='seconds')}</p>
{banner}
<h2>Headline numbers</h2>
<div class="headline">{''.join(f'<p>{esc(l)}</p>' for l in lines) or '<p>n/a</p>'}</div>
<table><tr>{head}</tr>{rows}</table>
<h2>Figures</h2>
{''.join(img(f) for f in figures)}
<h2>Config</h2>
<table>{cfg_rows}</table>
<h2>Environment</h2>
<table>{env_rows}</table>
<p class="muted">Command: <code>{esc(' '.join(meta.get('command', [])))}</code></p>
</body></html>
"""


def build_report(run_dir: Union[str, Path]) -> dict[str, Any]:
    """(Re)build ``figures/``, ``summary.json`` and ``report.html`` of a run directory.

    Returns the summary: headline numbers, a table (one row per network) and one-line findings.
    Raises :class:`ReportError` when ``run_dir`` is not a run directory or holds no measurements.
    """
    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.json"
    if not cfg_path.is_file():
        raise ReportError(f"{run_dir} is not a covshift run directory (no config.json); pass a directory written by `covshift run`")
    try:
        meta = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise ReportError(f"{cfg_path} is not valid JSON ({e}); the run directory is damaged") from None
    arm_names = [a for a in meta.get("arms", {}) if (run_dir / a).is_dir()]
    arms = {a: _load_arm(run_dir / a) for a in arm_names}
    arms = {a: v for a, v in arms.items() if v["metrics"]}
    if not arms:
        raise ReportError(f"{run_dir} holds no measurements yet (no arm has a metrics.jsonl line)")
    hidden = meta["config"]["hidden"]
    last_layer = f"hidden{len(hidden)}.act"

    figures_dir = run_dir / "figures"
    figures = []
    accuracy = {a: _accuracy(v) for a, v in arms.items()}
    percentiles, unit_labels, hists, drifts = {}, {}, {}, {}
    for a, v in arms.items():
        mon = v["monitor"]
        if mon is None or not mon.layers:
            continue
        unit = _typical_unit(mon, last_layer) or (last_layer if last_layer in mon.layers else None)
        if unit:
            steps, _ = mon.series(unit, "p50")
            percentiles[a] = (steps, {k: mon.series(unit, k)[1] for k in ("p15", "p50", "p85")})
            unit_labels[a] = _unit_label(unit)
        layers = [name for name in mon.layers if "[" not in name and "@" not in name]
        hists[a] = {}
        for layer in layers:
            hh = mon.histograms(layer)
            hists[a][layer] = (hh.steps, hh.edges, hh.counts)
        drifts[a] = _drift_series(mon, layers)
    if percentiles:
        plots.save(plots.figure1(accuracy, percentiles, unit_labels), figures_dir / "figure1.png")
        figures.append("figure1.png")
    if hists:
        plots.save(plots.heatmaps(hists), figures_dir / "heatmaps.png")
        figures.append("heatmaps.png")
    if drifts:
        plots.save(plots.drift_figure(drifts), figures_dir / "drift.png")
        figures.append("drift.png")

    h = headline_numbers(arms, last_layer)
    table, lines = _summary_lines(h, meta["config"])
    summary = {"status": meta.get("status"), "headline": h, "table": table, "headlines": lines, "figures": figures, "typical_units": unit_labels}
    atomic_write_json(run_dir / "summary.json", summary)
    atomic_write_text(run_dir / "report.html", _html(run_dir, meta, h, table, lines, figures))
    return summary
