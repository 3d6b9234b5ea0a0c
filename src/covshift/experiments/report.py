"""Figures, metrics, claims and a self-contained ``report.html``, built from a run directory alone.

:func:`build_report` reads only what the units wrote, through the declaration the run names
(arms, roles, labels, layers, figures, metrics, claims), so it works for any registered
experiment, on a finished run, an interrupted one, or units merged from several machines,
and again later through ``covshift report RUN_DIR`` without rerunning anything.

Numbers over seeds are the mean and a 95% Student-t interval (:mod:`covshift.experiments.stats`),
clipped to the metric's declared range (``Metric.bounds``) where it reaches past it, and then marked
with a dagger in the table and given with ``ci95_unclipped`` in ``summary.json``; differences
between arms are paired by seed.
"""

from __future__ import annotations

import base64
import html
import json
import math
from datetime import datetime
from pathlib import Path
from typing import Any, Union

from covshift._io import atomic_write_json, atomic_write_text
from covshift.experiments.declaration import Verdict
from covshift.experiments.results import LoadedRun, RunLoadError, load_run
from covshift.experiments.stats import CI_METHOD, CLIPPED_MARK, Estimate

__all__ = ["build_report", "ReportError", "evaluate_claims", "metric_table"]

ReportError = RunLoadError


def _point_label(point: tuple) -> str:
    return ", ".join(f"{k}={v}" for k, v in point)


def metric_table(run: LoadedRun) -> tuple[list[dict], dict]:
    """Rows for the report (one per arm and sweep point) and the same numbers for summary.json."""
    rows, numbers = [], {}
    for point in run.points():
        for arm in run.arms:
            units = run.units_of(arm.name, point)
            if not units:
                continue
            key = arm.name + (f" @ {_point_label(point)}" if point else "")
            row = {"network": arm.label + (f" ({_point_label(point)})" if point else ""), "role": arm.role.value, "seeds": len(units),
                   "complete": sum(u.complete for u in units)}
            numbers[key] = {}
            for m in run.experiment.metrics:
                est = run.estimate(m.compute, arm.name, point, bounds=m.bounds_for(run.config))
                numbers[key][m.name] = est.to_dict()
                row[m.label] = est.format(m.digits) if est.n else "n/a"
            rows.append(row)
    return rows, numbers


def evaluate_claims(run: LoadedRun) -> list[dict]:
    """Every declared claim, judged on ``run``: verdict, sentence, numbers, tolerance."""
    out = []
    for c in run.experiment.claims:
        r = c.evaluate(run, c.tolerance)
        out.append(
            {
                "name": c.name,
                "statement": c.statement,
                "source": c.source,
                "verdict": r.verdict.value,
                "summary": r.summary,
                "reason": r.reason,
                "numbers": {k: v.to_dict() if isinstance(v, Estimate) else v for k, v in r.numbers.items()},
                "tolerance": c.tolerance,
                "tolerance_text": c.tolerance_text,
            }
        )
    return out


def _claim_line(c: dict) -> str:
    if c["verdict"] == Verdict.NOT_EVALUATED.value:
        return f"[{c['verdict']}] {c['statement']} -- {c['reason']}"
    return f"[{c['verdict']}] {c['statement']} -- {c['summary']}"


_CSS = """
body { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", sans-serif; max-width: 1280px; margin: 2em auto; padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; margin-bottom: .2em; } h2 { font-size: 1.15em; margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: .8em 0; } td, th { border: 1px solid #ddd; padding: .3em .7em; text-align: left; font-variant-numeric: tabular-nums; }
th { background: #f6f6f6; } figure { margin: 1.2em 0; } img { max-width: 100%; } figcaption { color: #555; font-size: .9em; }
.claim { border-left: 4px solid #999; padding: .4em 1em; margin: .8em 0; background: #fafafa; }
.held { border-color: #2a9d8f; } .not-held { border-color: #d1495b; } .not-evaluated { border-color: #edae49; }
.verdict { font-weight: 600; text-transform: uppercase; font-size: .85em; letter-spacing: .03em; }
.side { display: grid; grid-template-columns: 1fr 1fr; gap: 1em; } @media (max-width: 900px) { .side { grid-template-columns: 1fr; } }
.warn { background: #fff4e5; border-left: 4px solid #edae49; padding: .5em 1em; } .muted { color: #777; font-size: .9em; }
"""


def _html(run: LoadedRun, rows: list[dict], claims: list[dict], findings: list[str], figures: list[tuple[str, str]], clipped: bool) -> str:
    esc, meta, exp = html.escape, run.meta, run.experiment

    def img(name: str, caption: str) -> str:
        data = base64.b64encode((run.dir / "figures" / name).read_bytes()).decode("ascii")
        # the caption is the image's text alternative (a screen reader, a failed image); the file name is its id
        return (f'<figure id="{esc(name.rsplit(".", 1)[0])}"><img alt="{esc(caption)}" src="data:image/png;base64,{data}">'
                f'<figcaption>{esc(caption)}</figcaption></figure>')

    def table(rs: list[dict]) -> str:
        if not rs:
            return "<p>n/a</p>"
        keys = list(dict.fromkeys(k for r in rs for k in r))
        head = "".join(f"<th>{esc(k)}</th>" for k in keys)
        body = "".join("<tr>" + "".join(f"<td>{esc(str(r.get(k, '')))}</td>" for k in keys) + "</tr>" for r in rs)
        return f"<table><tr>{head}</tr>{body}</table>"

    css_class = {Verdict.HELD.value: "held", Verdict.NOT_HELD.value: "not-held", Verdict.NOT_EVALUATED.value: "not-evaluated"}
    claims_html = "".join(
        f'<div class="claim {css_class[c["verdict"]]}"><span class="verdict">{esc(c["verdict"])}</span> &middot; '
        f'<i>&ldquo;{esc(c["statement"])}&rdquo;</i> <span class="muted">({esc(c["source"])})</span><br>'
        f'{esc(c["reason"] if c["verdict"] == Verdict.NOT_EVALUATED.value else c["summary"])}'
        f'<br><span class="muted">judged by: {esc(c["tolerance_text"] or "tolerance " + str(c["tolerance"]))}</span></div>'
        for c in claims
    ) or "<p>This experiment declares no claims.</p>"
    # The paper's ICS and Santurkar's side by side, when both figures are there.
    names = [n for n, _ in figures]
    side = [n for n in ("drift.png", "gradient_ics.png") if n in names]
    figs_html = "".join(img(n, c) for n, c in figures if n not in side or len(side) < 2)
    if len(side) == 2:
        caps = dict(figures)
        figs_html += (
            "<h2>Two notions of internal covariate shift, side by side</h2>"
            f'<div class="side">{img(side[0], caps[side[0]])}{img(side[1], caps[side[1]])}</div>'
        )
    data = meta.get("data") or {}
    cfg_rows = "".join(f"<tr><th>{esc(k)}</th><td>{esc(json.dumps(v))}</td></tr>" for k, v in meta.get("config", {}).items())
    env = {**meta.get("versions", {}), "device": meta.get("device"), "executor": meta.get("executor"), "data": data.get("source")}
    env_rows = "".join(f"<tr><th>{esc(k)}</th><td>{esc(str(v))}</td></tr>" for k, v in env.items())
    status = meta.get("status", "unknown")
    incomplete = [str(u.unit) for u in run.units if not u.complete]
    banner = ""
    if status != "complete" or incomplete:
        banner = f'<p class="warn">This run is <b>{esc(status)}</b>{"; incomplete units: " + esc(", ".join(incomplete)) if incomplete else ""}: the numbers show what was measured before they stopped.</p>'
    notice = f'<p class="warn">{esc(data["notice"])}</p>' if data.get("notice") else ""
    notes = "".join(f"<li>{esc(n)}</li>" for n in exp.notes)
    layer_rows = "".join(
        f"<tr><td>{esc(l.label)}</td><td><code>{esc(l.module)}</code></td><td>{'yes' if l.record_units else ''}</td><td><code>{esc(l.weights)}</code></td></tr>"
        for l in run.layers
    )
    layers_html = (
        "<h2>Layers of interest</h2><table><tr><th>name</th><th>module (input recorded)</th><th>single units recorded</th>"
        f"<th>weights (gradient ICS)</th></tr>{layer_rows}</table>" if layer_rows else ""
    )
    seeds = run.seeds()
    clip_note = (
        f'<p class="muted">{CLIPPED_MARK} The Student-t interval, symmetric about the mean, reached past the '
        "metric's possible range (for example above 1 for an accuracy) and is clipped to it; the mean is not changed, "
        "and summary.json gives the unclipped ends (ci95_unclipped).</p>"
        if clipped else ""
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1"><title>covshift {esc(exp.name)}: {esc(run.dir.name)}</title>
<style>{_CSS}</style></head><body>
<h1>covshift &middot; {esc(exp.name)}</h1>
<p class="muted">{esc(exp.paper)} &middot; {esc(exp.question)}<br>{esc(exp.summary)}<br>
run {esc(run.dir.name)}, started {esc(str(meta.get('started', '')))}, seeds {esc(', '.join(map(str, seeds)))}, data: {esc(str(data.get('source', 'n/a')))}
({esc(str(data.get('train', '?')))} train / {esc(str(data.get('test', '?')))} test), report built {datetime.now().isoformat(timespec='seconds')}</p>
{banner}{notice}
<h2>Claims</h2>
{claims_html}
<h2>Headline numbers</h2>
<p class="muted">{esc(CI_METHOD)} (with one seed: the value, no interval). Differences between networks are paired by seed.</p>
{table(rows)}
{clip_note}
{''.join(f'<p>{esc(f)}</p>' for f in findings)}
<h2>Figures</h2>
{figs_html}
{layers_html}
<h2>Settings that differ from the paper, and why</h2>
<ul>{notes or '<li>none declared</li>'}</ul>
<h2>Config</h2>
<table>{cfg_rows}</table>
<h2>Environment</h2>
<table>{env_rows}</table>
<p class="muted">Command: <code>{esc(' '.join(meta.get('command', [])))}</code></p>
</body></html>
"""


def build_report(run_dir: Union[str, Path]) -> dict[str, Any]:
    """(Re)build ``figures/``, ``summary.json`` and ``report.html`` of a run directory.

    Returns the summary: metrics per arm (mean, 95% interval, values), claims with verdicts,
    findings, a table and one-line headlines. Raises :class:`ReportError` when ``run_dir`` is
    not a run directory or holds no units.
    """
    from covshift.experiments import plots

    run = load_run(run_dir)
    if not run.units:
        raise ReportError(f"{run.dir} holds no measurements yet (no unit has started)")
    figures = []
    for spec in run.experiment.figures:
        fig = spec.draw(run)
        if fig is not None:
            plots.save(fig, run.dir / "figures" / spec.filename)
            figures.append((spec.filename, spec.caption))
    rows, numbers = metric_table(run)
    claims = evaluate_claims(run)
    findings = run.experiment.findings(run) if run.experiment.findings else []
    headlines = [_claim_line(c) for c in claims]
    summary = {
        "experiment": run.experiment.name,
        "version": run.experiment.version,
        "status": run.meta.get("status"),
        "data": run.meta.get("data"),
        "seeds": run.seeds(),
        "ci_method": CI_METHOD,
        "metrics": numbers,
        "claims": claims,
        "findings": findings,
        "table": rows,
        "headlines": headlines,
        "figures": [n for n, _ in figures],
        "units": {str(u.unit): u.status.get("status", "unknown") for u in run.units},
    }
    atomic_write_json(run.dir / "summary.json", _finite(summary))
    clipped = any("ci95_unclipped" in est for arm in numbers.values() for est in arm.values())  # Estimate.to_dict's mark
    atomic_write_text(run.dir / "report.html", _html(run, rows, claims, findings, figures, clipped))
    return summary


def _finite(obj: Any) -> Any:
    """NaN and inf become None, so summary.json is strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj
