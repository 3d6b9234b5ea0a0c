"""Where units run: in this process, in local worker processes (one per core), or as Ray tasks.

Every executor calls :func:`run_unit`, which owns a unit's directory: it clears a partial one,
writes ``unit.json`` (the unit and its full config) and ``status.json`` (running, then complete,
interrupted or failed), runs the declaration's unit function on one thread, and restores the
caller's thread count. A unit is *complete* when its ``status.json`` says so and its
``unit.json`` holds the same config; the runner skips those.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import queue
import shutil
import signal
import sys
import threading
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch

from covshift._io import atomic_write_json
from covshift.experiments.config import EXECUTION_FIELDS, ConfigError, ExperimentConfig
from covshift.experiments.declaration import Experiment, Unit, UnitContext

__all__ = ["run_unit", "unit_state", "run_serial", "run_processes", "run_ray", "UnitFailed", "UnitProgress"]

# progress(unit, step, total, loss, acc)
UnitProgress = Callable[[Unit, int, int, Optional[float], Optional[float]], None]


class UnitFailed(RuntimeError):
    """One or more units raised; the message names them and their errors."""


@contextmanager
def one_thread() -> Iterator[None]:
    """Run the body on one intra-op thread and give the caller back its own count afterwards.

    Small networks gain nothing from threads, one thread per unit keeps units from competing for
    cores, and a fixed count makes the metrics identical however the units are scheduled.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _json_norm(obj: Any) -> Any:
    return json.loads(json.dumps(obj))


def unit_state(run_dir: Path, unit: Unit, config: ExperimentConfig) -> tuple[str, dict]:
    """``("complete" | "partial" | "absent", status)`` of ``unit`` in ``run_dir`` for ``config``.

    A unit that finished under another config (e.g. other ``--steps``) counts as partial: it is redone.
    """
    d = run_dir / unit.path
    if not d.exists():
        return "absent", {}
    try:
        status = json.loads((d / "status.json").read_text())
        desc = json.loads((d / "unit.json").read_text())
    except (OSError, json.JSONDecodeError):
        return "partial", {}
    # Where and how it ran (run directory, executor, workers) may differ: a unit copied in from
    # another machine, or a run directory moved, is still complete.
    skip = set(EXECUTION_FIELDS) - {"seeds"}
    want = {k: v for k, v in _json_norm(config.to_dict()).items() if k not in skip}
    same = {k: v for k, v in desc.get("config", {}).items() if k not in skip} == want
    return ("complete" if status.get("status") == "complete" and same else "partial"), {**status, "same_config": same}


def run_unit(experiment: Experiment, config: ExperimentConfig, unit: Unit, run_dir: Path, progress: Optional[UnitProgress] = None, data=None) -> dict:
    """Run one unit into ``run_dir / unit.path`` (cleared first); returns its status dict."""
    from covshift.experiments.train import train_unit

    d = Path(run_dir) / unit.path
    if d.exists():
        shutil.rmtree(d)  # a partial unit restarts from scratch: no stale lines in its files
    d.mkdir(parents=True)
    atomic_write_json(d / "unit.json", {"experiment": experiment.name, "version": experiment.version, "unit": unit.to_dict(), "config": config.to_dict()})
    status: dict[str, Any] = {"unit": str(unit), "status": "running", "step": 0, "pid": os.getpid()}
    atomic_write_json(d / "status.json", status)
    report = (lambda step, total, loss, acc: progress(unit, step, total, loss, acc)) if progress else None
    ctx = UnitContext(experiment, unit, config, d, report, data)
    fn = experiment.unit_fn or train_unit
    t0 = time.perf_counter()
    try:
        with one_thread():
            result = fn(ctx)
        status.update(status="complete", step=ctx.step, result=result)
    except KeyboardInterrupt:
        status.update(status="interrupted", step=ctx.step)
        raise
    except BaseException as e:
        status.update(status="failed", step=ctx.step, error=f"{type(e).__name__}: {e}")
        raise
    finally:
        status["seconds"] = round(time.perf_counter() - t0, 3)
        atomic_write_json(d / "status.json", status)
    return status


def run_serial(experiment: Experiment, jobs: list[tuple[Unit, ExperimentConfig]], run_dir: Path, progress: Optional[UnitProgress], data=None) -> None:
    """Every unit in this process, one after another (KeyboardInterrupt propagates after the unit records it)."""
    failed = []
    for unit, cfg in jobs:
        try:
            run_unit(experiment, cfg, unit, run_dir, progress, data)
        except (KeyboardInterrupt, ConfigError):
            raise
        except Exception as e:
            failed.append(f"{unit} ({type(e).__name__}: {e})")
    if failed:
        raise UnitFailed(f"{len(failed)} unit(s) failed: {'; '.join(failed)}")


# --- local worker processes ----------------------------------------------------------------------


def _worker(name: str, module: str, tasks, events, stop) -> None:
    """A worker process: run units from ``tasks`` until the sentinel, reporting on ``events``.

    It starts with SIGINT ignored (inherited from the parent, see :func:`run_processes`), so a Ctrl-C
    during its start-up cannot interrupt an import half-way; from here on Ctrl-C is a KeyboardInterrupt
    again, and ``stop`` says whether the parent was interrupted meanwhile.

    When the loop ends (sentinel or Ctrl-C) the worker makes sure every event has reached the pipe
    and leaves with ``os._exit``: the interpreter's teardown with torch loaded takes about a second,
    which the parent would otherwise wait for before it builds the report. Every file a unit writes
    is closed by then. A worker that crashed exits the normal way (traceback, exit code 1)."""
    _worker_loop(name, module, tasks, events, stop)
    events.close()
    events.join_thread()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _worker_loop(name: str, module: str, tasks, events, stop) -> None:
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.default_int_handler)
    from covshift.experiments.registry import load_origin

    torch.set_num_threads(1)
    try:
        exp = load_origin(name, module)
        warmed = False
        while True:
            if stop.is_set():
                return
            item = tasks.get()
            if item is None:
                return
            unit, cfg, run_dir = item
            if not warmed:
                _warm_up(exp, cfg)
                warmed = True
            try:
                status = run_unit(exp, cfg, unit, Path(run_dir), lambda u, *a: events.put(("progress", u, a)))
                events.put(("done", unit, status.get("status")))
            except KeyboardInterrupt:
                events.put(("done", unit, "interrupted"))
                return
            except BaseException as e:  # recorded in the unit's status.json; the parent reports it
                events.put(("done", unit, f"failed: {type(e).__name__}: {e}"))
                traceback.print_exc()
    except KeyboardInterrupt:
        return
    except BaseException as e:
        events.put(("crash", None, f"{type(e).__name__}: {e}"))
        raise


def _warm_up(exp: Experiment, cfg: ExperimentConfig) -> None:
    """Before a worker's first unit: load its data while a thread imports ``torch._dynamo``.

    The first ``torch.optim`` optimizer a process builds imports ``torch._dynamo`` (about a second);
    reading and scaling the data mostly runs outside the GIL (zlib, numpy), so the two overlap. The
    thread is joined before any unit code runs. A data error is left for the unit to raise and record.
    """
    import importlib

    from covshift.experiments.declaration import _cached_dataset

    if not exp.needs_data:
        return
    importer = threading.Thread(target=importlib.import_module, args=("torch._dynamo",), daemon=True)
    importer.start()
    try:
        _cached_dataset(cfg.data)
    except Exception:
        pass
    finally:
        importer.join()


def run_processes(
    experiment: Experiment,
    jobs: list[tuple[Unit, ExperimentConfig]],
    run_dir: Path,
    progress: Optional[UnitProgress],
    workers: int,
    on_idle: Optional[Callable[[], None]] = None,
) -> None:
    """The units on ``workers`` spawned processes, each taking the next unit when it finishes one.

    ``on_idle()`` is called once, when fewer units remain than workers (a core is free from then on).

    On Ctrl-C the workers (same process group) record their units as interrupted and stop; the
    parent waits for them, then re-raises the KeyboardInterrupt.
    """
    ctx = mp.get_context("spawn")  # a clean interpreter per worker: no forked torch thread pools
    tasks, events = ctx.Queue(), ctx.Queue()
    for unit, cfg in jobs:
        tasks.put((unit, cfg, str(run_dir)))
    n = max(1, min(workers, len(jobs)))
    for _ in range(n):
        tasks.put(None)
    from covshift.experiments.registry import origin

    stop = ctx.Event()
    procs = [ctx.Process(target=_worker, args=(experiment.name, origin(experiment.name), tasks, events, stop), name=f"covshift-worker-{i}") for i in range(n)]
    # Started with SIGINT ignored (the disposition survives exec), so that a Ctrl-C while a worker is
    # still importing does not print a traceback from it; each worker turns it back on when ready.
    main = threading.current_thread() is threading.main_thread()  # only it may set signal handlers
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None
    try:
        for p in procs:
            p.start()
    finally:
        if main:
            signal.signal(signal.SIGINT, previous)
    pending = {u for u, _ in jobs}
    failed: list[str] = []
    interrupted = False
    try:
        while pending:
            try:
                kind, unit, payload = events.get(timeout=0.5)
            except queue.Empty:
                if not any(p.is_alive() for p in procs):
                    break
                continue
            if kind == "progress" and progress:
                progress(unit, *payload)
            elif kind == "done":
                pending.discard(unit)
                if on_idle is not None and pending and len(pending) < n:
                    on_idle()
                    on_idle = None
                if payload == "interrupted":
                    interrupted = True
                elif payload != "complete":
                    failed.append(f"{unit} ({payload})")
            elif kind == "crash":
                failed.append(f"a worker ({payload})")
    except KeyboardInterrupt:
        interrupted = True
        stop.set()
    finally:
        for p in procs:
            p.join(timeout=30)  # on Ctrl-C the workers got the same SIGINT: give them time to flush
            if p.is_alive():
                p.terminate()
    crashed = [f"worker {p.name} (exit code {p.exitcode})" for p in procs if p.exitcode not in (0, None) and not interrupted]
    if interrupted:
        raise KeyboardInterrupt
    if failed or crashed or pending:
        lost = [f"{u} (never finished)" for u in sorted(pending)] if pending else []
        raise UnitFailed(f"units failed: {'; '.join(sorted(failed) + crashed + lost)}; see the traceback above and each unit's status.json")


# --- Ray ---------------------------------------------------------------------------------------------


def _ray_unit(name: str, module: str, cfg: ExperimentConfig, unit: Unit, run_dir: str) -> dict:
    from covshift.experiments.registry import load_origin

    torch.set_num_threads(1)
    return run_unit(load_origin(name, module), cfg, unit, Path(run_dir))


def run_ray(experiment: Experiment, jobs: list[tuple[Unit, ExperimentConfig]], run_dir: Path, address: Optional[str], on_done: Optional[Callable[[Unit, str], None]] = None) -> None:
    """Each unit as a Ray task (one CPU). The run directory must be storage every node can write
    (or copy the unit directories in afterwards: ``covshift report`` merges whatever units are there).

    Uses the Ray instance already initialized in this process, else connects to ``address`` (or
    starts a local one) and shuts it down afterwards.
    """
    try:
        import ray
    except ImportError as e:
        raise ConfigError(f"--executor ray needs Ray: pip install 'covshift[ray]' ({e})") from None
    started = False
    if not ray.is_initialized():
        try:
            ray.init(address=address, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
        except ConnectionError as e:
            raise ConfigError(f"--ray-address {address}: {e}; start the cluster (ray start --head) or fix the address") from None
        started = True
    try:
        from covshift.experiments.registry import origin

        task = ray.remote(num_cpus=1, max_retries=0)(_ray_unit)
        refs = {task.remote(experiment.name, origin(experiment.name), cfg, unit, str(run_dir)): unit for unit, cfg in jobs}
        failed = []
        while refs:
            done, _ = ray.wait(list(refs), num_returns=1)
            unit = refs.pop(done[0])
            try:
                status = ray.get(done[0]).get("status", "?")
            except Exception as e:  # the task raised: RayTaskError wraps it
                status = f"failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                failed.append(f"{unit} ({status})")
            if on_done:
                on_done(unit, status)
        if failed:
            raise UnitFailed(f"units failed on Ray: {'; '.join(failed)}")
    finally:
        if started:
            ray.shutdown()
