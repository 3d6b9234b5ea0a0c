"""Run the five literature experiments with their defaults, timed, and export their results.

    python -m covshift.experiments.papers.make_results [--only NAME ...] [--reuse]

For each experiment, one after another: ``covshift run NAME --no-progress`` into a fresh
``runs/papers/NAME`` (timed as a whole command, interpreter start to exit), then
``covshift.experiments.export.export_run`` to ``docs/results/papers/NAME.md`` and ``.json`` and the
figures to ``docs/images/papers/NAME_*.png``; finally ``docs/results/papers/timing.md``, the wall time
of every experiment with the machine's cores and load average (timings on a loaded machine are
inflated). ``--reuse`` keeps complete runs and only re-exports.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path.cwd()
NAMES = ("santurkar-noise", "landscape", "lr-sweep", "depth", "batch-size")
BUDGET_SECONDS = 180  # the bound: each default run, report included, in at most 3 minutes


def _load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} / {five:.2f} / {fifteen:.2f}"


def _run(name: str, out: Path, reuse: bool) -> dict:
    timing = out / "timing.json"
    if reuse and (out / "summary.json").exists() and timing.exists():
        return {**json.loads(timing.read_text()), "reused": True}
    if out.exists():
        shutil.rmtree(out)  # fresh: resuming would skip the work being timed
    before = _load()
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "covshift", "run", name, "--no-progress", "--out", str(out)], check=True)
    rec = {"experiment": name, "command": f"covshift run {name}", "wall_seconds": round(time.perf_counter() - t0, 1),
           "load_before": before, "load_after": _load()}
    timing.write_text(json.dumps(rec))
    return rec


def _timing_table(results: Path) -> str:
    rows = []
    for name in NAMES:
        p = results / f"{name}.json"
        if not p.exists():
            continue
        rec = json.loads(p.read_text())
        t = rec.get("timing") or {}
        units = rec.get("units_seconds") or {}
        rows.append(
            f"| `covshift run {name}` | {rec.get('wall_seconds', float('nan')):.0f} | {'yes' if (rec.get('wall_seconds') or 1e9) <= BUDGET_SECONDS else 'no'} "
            f"| {len(units)} | {sum(v for v in units.values() if v):.0f} | {t.get('load_before', '?')} | {t.get('load_after', '?')} |"
        )
    head = (
        f"Measured by `python -m covshift.experiments.papers.make_results` on {os.cpu_count()} cores ({platform.machine()}, "
        f"{platform.system()}), one experiment at a time, each a fresh run with its defaults (report included). The machine "
        f"was shared with other work while this ran (load average, 1/5/15 min, in the table), so the times are upper bounds.\n\n"
        "| command | wall time (s) | within 3 min | units | unit seconds (sum) | load before | load after |\n|---|---|---|---|---|---|---|\n"
    )
    return head + "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", choices=NAMES, help="run these experiments only")
    parser.add_argument("--reuse", action="store_true", help="keep complete runs under runs/papers/ and only re-export")
    args = parser.parse_args(argv)
    from covshift._io import atomic_write_json, atomic_write_text
    from covshift.experiments.export import export_run

    results, images = ROOT / "docs" / "results" / "papers", ROOT / "docs" / "images" / "papers"
    results.mkdir(parents=True, exist_ok=True)
    images.mkdir(parents=True, exist_ok=True)
    for name in args.only or NAMES:
        out = ROOT / "runs" / "papers" / name
        rec = _run(name, out, args.reuse)
        export_run(out, docs=ROOT / "docs", name=f"papers/{name}", command=f"covshift run {name}",
                   wall_seconds=rec["wall_seconds"], image_prefix=f"papers/{name}_")
        js = results / f"{name}.json"
        data = json.loads(js.read_text())
        data["timing"] = rec
        atomic_write_json(js, json.loads(json.dumps(data, default=str)))
    atomic_write_text(results / "timing.md", _timing_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
