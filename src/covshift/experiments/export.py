"""``covshift export RUN_DIR``: a run's numbers as files under ``docs/results/`` and its figures under
``docs/images/``, so that the README shows only numbers a command wrote (see scripts/sync_readme.py).

Writes ``docs/results/<name>.md`` (a caption naming the command, the table of metrics with their
95% intervals, and every claim's verdict), ``docs/results/<name>.json`` (the run's summary plus
its data, seeds, versions and command) and copies the report's figures to ``docs/images/``
as ``<image_prefix><figure>`` (default prefix ``<name>_``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional, Union

from covshift._io import atomic_write_json, atomic_write_text
from covshift.experiments.report import build_report
from covshift.experiments.results import load_run

__all__ = ["export_run", "markdown"]


def _cell(v) -> str:
    return str(v).replace("|", "\\|")


def markdown(summary: dict, meta: dict, command: str, wall_seconds: Optional[float]) -> str:
    """The results file: a caption with the command and the data, the metrics table, the claims."""
    data = meta.get("data") or {}
    seeds = summary.get("seeds", [])
    wall = f"; wall time {wall_seconds:.0f} s" if wall_seconds is not None else ""
    lines = [
        f"Measured by `{command}` ({data.get('source', 'n/a')}, {data.get('train', '?')} train / {data.get('test', '?')} test digits; "
        f"seeds {', '.join(map(str, seeds))}; {summary.get('ci_method', '')}{wall}).",
        "",
    ]
    rows = summary.get("table", [])
    if rows:
        keys = [k for k in dict.fromkeys(k for r in rows for k in r) if k not in ("role", "complete")]
        lines.append("| " + " | ".join(keys) + " |")
        lines.append("|" + "---|" * len(keys))
        for r in rows:
            lines.append("| " + " | ".join(_cell(r.get(k, "")) for k in keys) + " |")
        lines.append("")
    for c in summary.get("claims", []):
        detail = c["reason"] if c["verdict"] == "could not be evaluated" else c["summary"]
        lines.append(f"* **{c['verdict']}**: \"{c['statement']}\" ({c['source']}). {detail}")
    for f in summary.get("findings", []):
        lines.append(f"* {f}")
    return "\n".join(lines) + "\n"


def export_run(
    run_dir: Union[str, Path],
    docs: Union[str, Path] = "docs",
    name: Optional[str] = None,
    command: Optional[str] = None,
    wall_seconds: Optional[float] = None,
    image_prefix: Optional[str] = None,
) -> list[Path]:
    """Rebuild the run's report, then write its results files and figures; returns the paths written."""
    summary = build_report(run_dir)
    run = load_run(run_dir)
    meta = run.meta
    name = name or run.experiment.name
    command = command or " ".join(meta.get("command", [])) or f"covshift run {run.experiment.name}"
    docs = Path(docs)
    results, images = docs / "results", docs / "images"
    results.mkdir(parents=True, exist_ok=True)
    images.mkdir(parents=True, exist_ok=True)
    written = []
    md = results / f"{name}.md"
    atomic_write_text(md, markdown(summary, meta, command, wall_seconds))
    written.append(md)
    js = results / f"{name}.json"
    record = {
        "command": command,
        "wall_seconds": wall_seconds,
        "experiment": meta.get("experiment"),
        "version": meta.get("version"),
        "data": meta.get("data"),
        "config": meta.get("config"),
        "versions": meta.get("versions"),
        "units_seconds": {str(u.unit): u.status.get("seconds") for u in run.units},
        "summary": summary,
    }
    atomic_write_json(js, json.loads(json.dumps(record, default=str)))
    written.append(js)
    prefix = f"{name}_" if image_prefix is None else image_prefix
    for fig in summary.get("figures", []):
        dst = images / f"{prefix}{fig}"
        shutil.copyfile(run.dir / "figures" / fig, dst)
        written.append(dst)
    return written
