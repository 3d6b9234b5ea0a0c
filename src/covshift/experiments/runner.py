"""Run a named experiment: make the run directory, train every arm (in parallel processes when that
pays), and build the report. ``covshift run`` is a thin shell over :func:`run_experiment`.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import platform
import queue
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Optional

import numpy as np
import torch

import covshift
from covshift._io import atomic_write_json
from covshift.experiments.config import ExperimentConfig
from covshift.experiments.data import load_dataset
from covshift.experiments.registry import get_experiment
from covshift.experiments.train import ProgressFn, train_arm

__all__ = ["run_experiment", "RunResult", "default_run_dir", "RunDirError"]


class RunDirError(ValueError):
    """The run directory cannot be created or written."""


@dataclass
class RunResult:
    run_dir: Path
    status: str  # "complete" or "interrupted"
    summary: dict  # the report's headline numbers
    seconds: float


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


def _use_parallel(config: ExperimentConfig, arms: int) -> bool:
    if config.parallel == "yes":
        return True
    if config.parallel == "no":
        return False
    return arms > 1 and (os.cpu_count() or 1) >= 2


def _worker(experiment, config, arm, run_dir, progress_queue) -> None:
    report = (lambda *a: progress_queue.put(a)) if progress_queue is not None else None
    try:
        train_arm(experiment, config, arm, run_dir, report)
    except KeyboardInterrupt:
        pass  # train_arm has recorded the interruption and flushed what it measured
    finally:
        if progress_queue is not None:
            progress_queue.put((arm, None, None, None))  # done


def _run_parallel(experiment: str, config: ExperimentConfig, arms: list[str], run_dir: Path, progress: Optional[ProgressFn]) -> None:
    ctx = mp.get_context("spawn")  # a clean interpreter per arm: no forked torch thread pools
    q = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(experiment, config, arm, run_dir, q), name=f"covshift-{arm}") for arm in arms]
    for p in procs:
        p.start()
    running = set(arms)
    try:
        while running:
            try:
                arm, step, loss, acc = q.get(timeout=0.5)
            except queue.Empty:
                if not any(p.is_alive() for p in procs):
                    break
                continue
            if step is None:
                running.discard(arm)
            elif progress:
                progress(arm, step, loss, acc)
    finally:
        # On Ctrl-C the workers got the same SIGINT: give them time to flush, then make sure they are gone.
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.terminate()
    # An interrupted worker exits 0; anything else is a crash, whose traceback the worker printed.
    failed = [f"{arm} (exit code {p.exitcode})" for arm, p in zip(arms, procs) if p.exitcode != 0]
    if failed:
        raise RuntimeError(f"training failed in arm {', '.join(failed)}; see the traceback above")


def _versions() -> dict:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "covshift": covshift.__version__,
        "platform": platform.platform(),
    }


def run_experiment(
    experiment: str,
    config: Optional[ExperimentConfig] = None,
    progress: Optional[ProgressFn] = None,
    argv: Optional[list[str]] = None,
) -> RunResult:
    """Train every arm of ``experiment`` and write the run directory, report included.

    The run directory holds ``config.json`` (the full config, seed, versions, device, data source,
    status), one folder per arm (``metrics.jsonl``, ``status.json``, ``monitor/``) and, from
    :func:`covshift.experiments.report.build_report`, ``figures/``, ``summary.json`` and
    ``report.html``. On KeyboardInterrupt every arm flushes what it measured, the report is built
    from the partial run, and the interrupt propagates.
    """
    from covshift.experiments.report import build_report

    exp = get_experiment(experiment)
    config = config if config is not None else exp.config
    run_dir = _prepare_run_dir(Path(config.out) if config.out else default_run_dir(experiment))
    data = load_dataset(config.data)  # fail fast on bad data, before any process starts; also warms the cache
    arms = list(exp.arms)
    parallel = _use_parallel(config, len(arms))
    meta = {
        "experiment": experiment,
        "summary": exp.summary,
        "config": config.to_dict(),
        "arms": {arm: exp.arms[arm] for arm in arms},
        "seed": config.seed,
        "versions": _versions(),
        "device": "cpu",
        "threads_per_arm": 1,
        "parallel": parallel,
        "data": {"source": data.source, "train": len(data.y_train), "test": len(data.y_test), "features": data.num_features, "classes": data.num_classes},
        "command": argv if argv is not None else sys.argv,
        "started": datetime.now().isoformat(timespec="seconds"),
        "status": "running",
    }
    atomic_write_json(run_dir / "config.json", meta)
    t0 = time.perf_counter()
    status = "complete"
    try:
        if parallel:
            _run_parallel(experiment, config, arms, run_dir, progress)
        else:
            for arm in arms:
                train_arm(experiment, config, arm, run_dir, progress, data=data)
    except KeyboardInterrupt:
        status = "interrupted"
    except Exception:
        meta.update(status="failed", finished=datetime.now().isoformat(timespec="seconds"))
        atomic_write_json(run_dir / "config.json", meta)
        raise
    seconds = time.perf_counter() - t0
    meta.update(status=status, train_seconds=round(seconds, 2), finished=datetime.now().isoformat(timespec="seconds"))
    atomic_write_json(run_dir / "config.json", meta)
    summary = build_report(run_dir)
    return RunResult(run_dir, status, summary, time.perf_counter() - t0)
