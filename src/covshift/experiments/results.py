"""A run directory read back: its units, their records, and estimates over seeds.

:func:`load_run` finds every unit by its ``unit.json`` (so units copied in from another machine
are merged), and the views below are what figures, metrics and claims of a declaration use:

* :class:`LoadedUnit`: ``metrics`` (``metrics.jsonl``), ``records(name)`` (``<name>.jsonl``),
  ``series(key)``, ``final(key)``, ``monitor`` (the activation monitor's run, via
  :func:`covshift.monitor.load`), ``status``, ``config``.
* :class:`LoadedRun`: ``units_of(arm, point)``, ``per_seed(fn, arm)``, ``estimate(fn, arm)``
  (mean and 95% Student-t interval over seeds), ``paired(fn, a, b)`` (a minus b, paired by seed),
  ``curve(fn, arm)`` (a mean curve with its band) and the arms by role.
* verdict helpers for claims: :func:`verdict_greater`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from covshift._io import read_jsonl
from covshift.experiments.declaration import Arm, ClaimResult, Experiment, Layer, Role, Unit, Verdict
from covshift.experiments.stats import Estimate, estimate

__all__ = ["LoadedUnit", "LoadedRun", "Curve", "load_run", "steps_to_reach", "verdict_greater", "RunLoadError"]


class RunLoadError(ValueError):
    """The directory is not a covshift run directory, or holds nothing to report."""


class LoadedUnit:
    """One unit's directory, read lazily."""

    def __init__(self, unit: Unit, path: Path, config: dict) -> None:
        self.unit, self.dir, self.config = unit, path, config
        self.run: Optional["LoadedRun"] = None  # set by load_run: metrics may compare with other arms

    @property
    def arm(self) -> str:
        return self.unit.arm

    @property
    def seed(self) -> int:
        return self.unit.seed

    @cached_property
    def status(self) -> dict:
        p = self.dir / "status.json"
        return json.loads(p.read_text()) if p.exists() else {}

    @property
    def complete(self) -> bool:
        return self.status.get("status") == "complete"

    @cached_property
    def metrics(self) -> list[dict]:
        return self.records("metrics")

    def records(self, name: str) -> list[dict]:
        """The lines of ``<name>.jsonl`` (empty when the file does not exist)."""
        p = self.dir / f"{name}.jsonl"
        return read_jsonl(p) if p.exists() else []

    def series(self, key: str, name: str = "metrics") -> tuple[np.ndarray, np.ndarray]:
        """``(steps, values)`` of ``key`` in ``<name>.jsonl`` (lines without it are skipped)."""
        rows = [r for r in self.records(name) if r.get(key) is not None] if name != "metrics" else [r for r in self.metrics if r.get(key) is not None]
        return np.array([r["step"] for r in rows], dtype=np.int64), np.array([r[key] for r in rows], dtype=float)

    def final(self, key: str) -> Optional[float]:
        _, v = self.series(key)
        return float(v[-1]) if len(v) else None

    @cached_property
    def monitor(self):
        """The activation monitor's records (``covshift.monitor.load``), or ``None`` if there are none."""
        from covshift.monitor import load

        try:
            return load(self.dir / "monitor")
        except FileNotFoundError:  # no monitor, or interrupted before its first flush
            return None

    def monitor_key(self, module: str, unit: Optional[int] = None, probe: bool = False):
        """The monitor's record of ``module`` (one ``unit`` of it; on the probe batch), or ``None``.

        The key is found by its fields (:class:`covshift.monitor.RecordKey`), never by its display string.
        """
        mon = self.monitor
        if mon is None:
            return None
        for key in mon.keys:
            if key.module == module and key.call == 0 and key.channel == unit and key.probe == probe:
                return str(key)  # the monitor's views take a key or its display string; callers compare strings
        return None

    def drift(self, module: str, probe: bool = False) -> Optional[dict]:
        """``covshift.monitor.layer_drift`` of ``module``'s records against the first (cached: the
        report asks for it once per figure panel and claim)."""
        cache = self.__dict__.setdefault("_drift_cache", {})
        if (module, probe) not in cache:
            from covshift.monitor import layer_drift

            key = self.monitor_key(module, probe=probe)
            cache[(module, probe)] = None if key is None else layer_drift(self.monitor, key, reference="first")
        return cache[(module, probe)]

    def __repr__(self) -> str:
        return f"LoadedUnit({self.unit}, {self.status.get('status', 'no status')})"


@dataclass(frozen=True)
class Curve:
    """A mean over seeds at each step, with its 95% band (``lo``/``hi`` equal ``mean`` for one seed)."""

    steps: np.ndarray
    mean: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    n: int


def steps_to_reach(steps: np.ndarray, values: np.ndarray, target: float) -> tuple[Optional[int], Optional[int]]:
    """The first evaluated step whose value is at least ``target``, and the grid's resolution there
    (the spacing to the evaluation before it: the target was crossed in ``(step - resolution, step]``).
    ``(None, None)`` if never reached; resolution 0 when it is reached at the first evaluation."""
    steps, values = np.asarray(steps), np.asarray(values, dtype=float)
    hit = np.nonzero(values >= target - 1e-12)[0]
    if not len(hit):
        return None, None
    i = int(hit[0])
    return int(steps[i]), int(steps[i] - steps[i - 1]) if i > 0 else 0


class LoadedRun:
    """A run directory: its config, its declaration, and every unit found in it."""

    def __init__(self, path: Path, meta: dict, experiment: Experiment, units: list[LoadedUnit]) -> None:
        self.dir, self.meta, self.experiment, self.units = path, meta, experiment, units

    @cached_property
    def config(self):
        """The run's config (before arm overrides), as the declaration's config class."""
        import dataclasses

        from covshift.experiments.config import apply_overrides

        known = {f.name for f in dataclasses.fields(self.experiment.config)}
        return apply_overrides(self.experiment.config, {k: v for k, v in self.meta.get("config", {}).items() if k in known})

    @property
    def layers(self) -> tuple[Layer, ...]:
        return self.experiment.layers_for(self.config)

    # --- arms
    @property
    def arms(self) -> list[Arm]:
        """The declaration's arms that have at least one unit here, in declaration order."""
        present = {u.arm for u in self.units}
        return [a for a in self.experiment.arms if a.name in present]

    def arms_with(self, role: Role) -> list[Arm]:
        return [a for a in self.arms if a.role is role]

    def first(self, role: Role) -> Optional[Arm]:
        found = self.arms_with(role)
        return found[0] if found else None

    def points(self) -> list[tuple]:
        """The sweep points present, in the sweep's order (:meth:`point_order`): every table row, figure
        curve and legend entry follows it, so depth 16 comes before depth 128 and lr 0.01 before 0.1."""
        seen: list[tuple] = []
        for u in self.units:
            if u.unit.point not in seen:
                seen.append(u.unit.point)
        return sorted(seen, key=self.point_order)

    def point_order(self, point: tuple) -> tuple:
        """The sort key of a sweep point: axis by axis, its value's position in the declared grid
        (``Axis.grid`` of the run's config); a value not in the grid (a unit copied in from a run
        with another grid) after the grid's values, numbers numerically, then tuples, then text."""
        grids = {a.field: a.grid(self.config) for a in self.experiment.sweep}
        key = []
        for field_name, value in point:
            grid = grids.get(field_name, ())
            pos = next((i for i, g in enumerate(grid) if _same_value(g, value)), None)
            key.append((0, pos, ()) if pos is not None else (1, 0, _natural(value)))
        return tuple(key)

    def groups(self) -> list[tuple[Arm, tuple, str]]:
        """``(arm, point, label)`` for every arm and sweep point present: what a figure draws one curve or column for."""
        out = []
        for point in self.points():
            for arm in self.arms:
                if self.units_of(arm.name, point):
                    out.append((arm, point, arm.label + (" (" + ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in point) + ")" if point else "")))
        return out

    def seeds(self) -> list[int]:
        return sorted({u.seed for u in self.units})

    def units_of(self, arm: str, point: Optional[tuple] = None) -> list[LoadedUnit]:
        """The units of ``arm`` (at ``point``; default: the run's only point), by seed."""
        if point is None:
            pts = self.points()
            point = pts[0] if len(pts) == 1 else ()
        return sorted((u for u in self.units if u.arm == arm and u.unit.point == point), key=lambda u: u.seed)

    # --- numbers over seeds
    def per_seed(self, fn: Callable[[LoadedUnit], Optional[float]], arm: str, point: Optional[tuple] = None) -> dict[int, Optional[float]]:
        return {u.seed: fn(u) for u in self.units_of(arm, point)}

    def estimate(self, fn: Callable[[LoadedUnit], Optional[float]], arm: str, point: Optional[tuple] = None,
                 bounds: Optional[tuple[float, float]] = None) -> Estimate:
        """Mean and 95% interval of ``fn(unit)`` over the seeds of ``arm`` (clipped to ``bounds``, the
        values' possible range, when given: :func:`covshift.experiments.stats.estimate`)."""
        return estimate(list(self.per_seed(fn, arm, point).values()), bounds=bounds)

    def paired(self, fn: Callable[[LoadedUnit], Optional[float]], a: str, b: str, point: Optional[tuple] = None, op: str = "difference") -> Estimate:
        """``fn(a) - fn(b)`` (``op="difference"``) or ``log(fn(a) / fn(b))`` (``"log_ratio"``), per seed
        that both arms have, as an estimate over those seeds."""
        va, vb = self.per_seed(fn, a, point), self.per_seed(fn, b, point)
        out = []
        for s in sorted(set(va) & set(vb)):
            x, y = va[s], vb[s]
            if x is None or y is None or not (math.isfinite(x) and math.isfinite(y)):
                continue
            if op == "difference":
                out.append(x - y)
            elif op == "log_ratio":
                if x > 0 and y > 0:
                    out.append(math.log(x / y))
            else:
                raise ValueError(f"paired: op must be 'difference' or 'log_ratio', got {op!r}")
        return estimate(out)

    def curve(self, fn: Callable[[LoadedUnit], tuple[np.ndarray, np.ndarray]], arm: str, point: Optional[tuple] = None) -> Optional[Curve]:
        """Mean and 95% band over seeds of ``fn(unit) -> (steps, values)``, on the steps every seed has."""
        series = [fn(u) for u in self.units_of(arm, point)]
        series = [(np.asarray(s), np.asarray(v, dtype=float)) for s, v in series if len(s)]
        if not series:
            return None
        common = series[0][0]
        for s, _ in series[1:]:
            common = np.intersect1d(common, s)
        if not len(common):
            return None
        stack = np.stack([v[np.searchsorted(s, common)] for s, v in series])  # (seeds, T)
        mean = stack.mean(0)
        if len(series) == 1:
            return Curve(common, mean, mean, mean, 1)
        from covshift.experiments.stats import t_quantile

        half = t_quantile(0.975, len(series) - 1) * stack.std(0, ddof=1) / math.sqrt(len(series))
        return Curve(common, mean, mean - half, mean + half, len(series))


def _same_value(a, b) -> bool:
    # A point's value comes back from JSON: a tuple as a list (converted by Unit.from_dict), 1.0 as 1.
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same_value(x, y) for x, y in zip(a, b))
    return a == b


def _natural(value) -> tuple:
    """Numbers by value, then tuples (element-wise), then anything else by its text."""
    if isinstance(value, bool) or not isinstance(value, (int, float, tuple, list)):
        return (2, str(value))
    if isinstance(value, (tuple, list)):
        return (1, tuple(_natural(v) for v in value))
    return (0, float(value))


def load_run(run_dir: Path | str) -> LoadedRun:
    """Read ``run_dir``'s ``config.json`` and every unit below it (any unit with a ``unit.json``)."""
    from covshift.experiments.registry import get_experiment

    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.json"
    if not cfg_path.is_file():
        raise RunLoadError(f"{run_dir} is not a covshift run directory (no config.json); pass a directory written by `covshift run`")
    try:
        meta = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise RunLoadError(f"{cfg_path} is not valid JSON ({e}); the run directory is damaged") from None
    exp = get_experiment(meta.get("experiment", "?"))
    units = []
    for p in sorted(run_dir.rglob("unit.json")):
        try:
            d = json.loads(p.read_text())
            units.append(LoadedUnit(Unit.from_dict(d["unit"]), p.parent, d.get("config", {})))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise RunLoadError(f"{p} is not a valid unit description ({e})") from None
    run = LoadedRun(run_dir, meta, exp, units)
    for u in units:
        u.run = run
    return run


def verdict_greater(d: Estimate, tolerance: float, what: str, digits: int = 4) -> ClaimResult:
    """The verdict on "``d`` > ``tolerance``": held when the whole 95% interval is above the
    tolerance (with one seed, when the value is), did not hold otherwise; could not be evaluated
    without a value."""
    if d.n == 0:
        return ClaimResult(Verdict.NOT_EVALUATED, f"{what}: no value", {what: d}, reason=f"no unit measured {what}")
    basis = f"95% interval over {d.n} seeds" if d.has_interval else "one seed, no interval: judged on the value alone"
    ok = (d.lo > tolerance) if d.has_interval else (d.mean > tolerance)
    text = f"{what} = {d.format(digits)} ({basis}); the claim needs it above {tolerance:g}"
    return ClaimResult(Verdict.HELD if ok else Verdict.NOT_HELD, text, {what: d})
