"""Run a registered experiment: resolve its units, skip the complete ones, run the rest on an
executor, and build the report. ``covshift run`` is a thin shell over :func:`run_experiment`.

The run directory holds ``config.json`` (the experiment's name and version, the config, versions,
data, status) and one directory per unit (``<arm>/[<point>/]seed<k>/``), each written only by
its unit. Running again with the same ``--out`` resumes: complete units are skipped, partial ones
restart (and say so), and units of other seeds already there are kept and merged by the report.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

import covshift
from covshift._io import atomic_write_json
from covshift.experiments.config import EXECUTION_FIELDS, ExperimentConfig
from covshift.experiments.declaration import Experiment, Unit
from covshift.experiments.executors import UnitFailed, UnitProgress, run_processes, run_ray, run_serial, unit_state
from covshift.experiments.registry import get_experiment

__all__ = ["run_experiment", "RunResult", "default_run_dir", "RunDirError", "UnitFailed", "plan_units"]

log = logging.getLogger("covshift.experiments")


class RunDirError(ValueError):
    """The run directory cannot be created, written, or resumed with this config."""


@dataclass
class RunResult:
    run_dir: Path
    status: str  # "complete" or "interrupted"
    summary: dict  # the report's summary
    seconds: float
    skipped: list[Unit] = field(default_factory=list)  # complete units found and kept
    restarted: list[Unit] = field(default_factory=list)  # partial units redone


def default_run_dir(experiment: str) -> Path:
    return Path("runs") / f"{experiment}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def _prepare_run_dir(path: Path) -> Path:
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise RunDirError(f"cannot write to output directory {path}: {e.strerror or e}; choose another with --out") from None
    return path


def _science(config_dict: dict) -> dict:
    return {k: v for k, v in config_dict.items() if k not in EXECUTION_FIELDS}


def _check_resumable(run_dir: Path, exp: Experiment, config: ExperimentConfig) -> Optional[dict]:
    """The existing config.json, if it describes the same experiment and settings; else RunDirError."""
    path = run_dir / "config.json"
    if not path.exists():
        return None
    try:
        old = json.loads(path.read_text())
    except json.JSONDecodeError:
        raise RunDirError(f"{path} is damaged (not JSON); choose another --out") from None
    if old.get("experiment") != exp.name or old.get("version") != exp.version:
        raise RunDirError(f"{run_dir} holds a run of {old.get('experiment')!r} (version {old.get('version')}), not {exp.name!r} (version {exp.version}); choose another --out")
    new = _science(json.loads(json.dumps(config.to_dict())))
    diff = [k for k in sorted(set(new) | set(old.get("config", {}))) if k not in EXECUTION_FIELDS and new.get(k) != old.get("config", {}).get(k)]
    if diff:
        k = diff[0]
        raise RunDirError(
            f"{run_dir} holds a run with other settings (--{k.replace('_', '-')} {old['config'].get(k)!r}, now {new.get(k)!r}); "
            "resume it with the same settings or choose another --out"
        )
    return old


def plan_units(exp: Experiment, config: ExperimentConfig, run_dir: Path) -> tuple[list[tuple[Unit, ExperimentConfig]], list[Unit], list[tuple[Unit, dict]]]:
    """``(to run, complete and skipped, partial with their old status)`` for a run of ``config`` in ``run_dir``."""
    todo, skipped, partial = [], [], []
    for unit in exp.units(config):
        cfg = exp.unit_config(config, unit)
        state, status = unit_state(run_dir, unit, cfg)
        if state == "complete":
            skipped.append(unit)
            continue
        if state == "partial":
            partial.append((unit, status))
        todo.append((unit, cfg))
    return todo, skipped, partial


def _check_models(exp: Experiment, todo: list[tuple[Unit, ExperimentConfig]], data) -> None:
    """Build each arm's network once before any unit starts, so a setting the model cannot take
    (``--norm instance`` on an MLP, a bad width) is a one-line error here and not a failed unit."""
    from covshift.experiments.config import ConfigError

    seen = set()
    for unit, cfg in todo:
        if unit.arm in seen:
            continue
        seen.add(unit.arm)
        try:
            exp.build_model(cfg, data)
        except ValueError as e:
            raise ConfigError(f"arm {unit.arm!r} cannot build its network: {e}") from None


def _workers(config: ExperimentConfig, n_units: int) -> int:
    """Local worker processes: 0 means this process (serial)."""
    cores = os.cpu_count() or 1
    if config.parallel == "no" or n_units == 0:
        return 0
    want = config.workers or cores
    if config.parallel == "auto" and (n_units < 2 or cores < 2 or want < 2):
        return 0
    return max(1, min(want, n_units))


def _versions() -> dict:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "covshift": covshift.__version__,
        "platform": platform.platform(),
    }


def _prepare_report() -> None:
    """Import the report's plotting stack (matplotlib, about a second) on a core that the units no
    longer use, so that the report after the last unit does not wait for it."""
    import importlib
    import threading

    threading.Thread(target=importlib.import_module, args=("covshift.experiments.plots",), daemon=True).start()


def _warn_unused_settings(exp: Experiment, config: ExperimentConfig) -> None:
    """The API's counterpart of the CLI's check: a setting (changed from the declaration's default)
    that an arm or the sweep overwrites, or that the experiment never reads, would silently do
    nothing; say so with a warning (the CLI rejects it)."""
    import warnings

    from covshift.experiments.config import ConfigError

    changed = {
        f.name: getattr(config, f.name)
        for f in dataclasses.fields(config)
        if f.name not in EXECUTION_FIELDS and hasattr(exp.config, f.name) and getattr(config, f.name) != getattr(exp.config, f.name)
    }
    try:
        exp.check_overrides(changed)
    except ConfigError as e:
        warnings.warn(f"run_experiment({exp.name!r}): {e}", UserWarning, stacklevel=3)


def run_experiment(
    experiment: str,
    config: Optional[ExperimentConfig] = None,
    progress: Optional[UnitProgress] = None,
    argv: Optional[list[str]] = None,
    notify: Optional[Callable[[str], None]] = None,
) -> RunResult:
    """Run every unit of ``experiment`` that is not complete yet, then (re)build the report.

    Args:
        experiment: a registered name.
        config: the settings (default: the declaration's).
        progress: ``progress(unit, step, total, loss, acc)`` from the units (local executors).
        argv: the command line, recorded in config.json.
        notify: receives one-line notices (data fallback, skipped and restarted units); default: logging.

    On KeyboardInterrupt every running unit records what it measured, the report is built from
    what is there, and the result's status is ``"interrupted"``. The caller's torch thread count is
    left as it was.
    """
    from covshift.experiments.report import build_report

    say = notify or log.info
    exp = get_experiment(experiment)
    if config is not None:
        _warn_unused_settings(exp, config)
    config = config if config is not None else exp.config
    run_dir = _prepare_run_dir(Path(config.out) if config.out else default_run_dir(experiment))
    config = dataclasses.replace(config, out=str(run_dir))
    old = _check_resumable(run_dir, exp, config)
    data = None
    data_desc = None
    if exp.needs_data:
        from covshift.experiments.declaration import _cached_dataset

        data = _cached_dataset(config.data)  # fail fast on bad data, before any unit starts
        data_desc = data.describe()
        if data.notice:
            say(data.notice)
    todo, skipped, partial = plan_units(exp, config, run_dir)
    if exp.unit_fn is None and data is not None:
        _check_models(exp, todo, data)
    if skipped:
        say(f"resuming {run_dir}: {len(skipped)} complete unit(s) kept ({', '.join(map(str, skipped))})")
    for unit, status in partial:
        why = "its settings changed" if status.get("same_config") is False else f"{status.get('status', 'no status')} at step {status.get('step', 0)}"
        say(f"restarting partial unit {unit} ({why})")
    workers = _workers(config, len(todo)) if config.executor == "local" else None
    meta = {
        "experiment": exp.name,
        "version": exp.version,
        "summary": exp.summary,
        "paper": exp.paper,
        "config": config.to_dict(),
        "arms": {a.name: {"role": a.role.value, "label": a.label, "overrides": dict(a.overrides)} for a in exp.arms},
        "seeds": list(config.seeds),
        "versions": _versions(),
        "device": "cpu",
        "threads_per_unit": 1,
        "executor": config.executor,
        "workers": workers,
        "data": data_desc,
        "command": argv if argv is not None else sys.argv,
        "started": (old or {}).get("started", datetime.now().isoformat(timespec="seconds")),
        "resumed": datetime.now().isoformat(timespec="seconds") if old else None,
        "status": "running",
    }
    atomic_write_json(run_dir / "config.json", meta)
    t0 = time.perf_counter()
    status = "complete"
    try:
        if config.executor == "ray":
            run_ray(exp, todo, run_dir, config.ray_address, on_done=lambda u, s: say(f"unit {u}: {s}"))
        elif workers:
            run_processes(exp, todo, run_dir, progress, workers, on_idle=_prepare_report)
        else:
            run_serial(exp, todo, run_dir, progress, data)
    except KeyboardInterrupt:
        status = "interrupted"
    except BaseException:
        meta.update(status="failed", finished=datetime.now().isoformat(timespec="seconds"))
        atomic_write_json(run_dir / "config.json", meta)
        raise
    seconds = time.perf_counter() - t0
    meta.update(status=status, units_seconds=round(seconds, 2), finished=datetime.now().isoformat(timespec="seconds"))
    atomic_write_json(run_dir / "config.json", meta)
    summary = build_report(run_dir)
    return RunResult(run_dir, status, summary, time.perf_counter() - t0, skipped, [u for u, _ in partial])
