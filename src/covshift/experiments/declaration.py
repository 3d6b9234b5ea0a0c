"""An experiment is a declaration: arms, sweeps, layers, figures, metrics and claims.

Everything the runner, the report and the plots need is declared here; ``report.py`` and
``plots.py`` read roles, labels and layers from the declaration and never name an arm or a layer.

The pieces:

* :class:`Arm` -- one network variant: a ``name`` (its directory), a :class:`Role`, a ``label``
  for figures, and the config ``overrides`` it owns (the CLI rejects those flags, naming the arm).
* :class:`Axis` -- one sweep axis: a config field and its values (or the name of a config field
  that holds them, so the grid is a CLI flag). Sweep points are the Cartesian product of the axes.
* :class:`Layer` -- a module of interest and its display name ("input to the sigmoid").
* :class:`FigureSpec` -- ``draw(run) -> matplotlib Figure`` of a :class:`~covshift.experiments.results.LoadedRun`.
* :class:`Metric` -- a headline number per unit, ``compute(unit) -> float | None``; the report gives
  its mean and 95% interval over seeds per arm (and sweep point).
* :class:`Claim` -- a sentence from the paper, ``evaluate(run, tolerance) -> ClaimResult`` and the
  tolerance it is judged with. A :class:`ClaimResult` is :attr:`Verdict.HELD` (numbers and their
  interval), :attr:`Verdict.NOT_HELD` (numbers) or :attr:`Verdict.NOT_EVALUATED` (a reason).
* :class:`Unit` -- one unit of work, ``(arm, seed, sweep point)``; it writes only its own
  sub-directory ``<arm>/[<axis>=<value>,.../]seed<k>/``. ``Experiment.unit_fn(ctx) -> dict`` runs it:
  the default (``None``) is the training loop of :mod:`covshift.experiments.train`; a declaration
  whose units are not plain training (measurements at initialization, extra measurements at
  checkpoints) supplies its own, which writes into ``ctx.dir`` (``ctx.log(name, record)`` appends
  to ``<name>.jsonl``) and returns its final numbers.

Registering (``covshift.experiments.registry.register``) makes ``covshift run NAME`` work. A toy
example, with its own config fields (every field is a ``--flag``)::

    from dataclasses import dataclass
    from covshift.experiments import (Arm, Axis, Claim, Experiment, ExperimentConfig, Layer, Metric,
                                      Role, register, results)

    @dataclass
    class ToyConfig(ExperimentConfig):
        widths: tuple[int, ...] = (16, 64)   # the sweep's grid: `--widths 8,16,32`

    def final_acc(unit):                      # a LoadedUnit -> float
        return unit.final("test_acc")

    def ln_beats_plain(run, tolerance):       # a LoadedRun -> ClaimResult
        d = run.paired(final_acc, "ln", "plain")       # Estimate of ln - plain, paired by seed
        return results.verdict_greater(d, tolerance, "LayerNorm minus plain final accuracy")

    register(Experiment(
        name="toy", version=1, paper="(none)", question="Does LayerNorm help a tiny MLP?",
        summary="a toy", config=ToyConfig(hidden=(16,), steps=200),
        arms=(Arm("plain", Role.BASELINE, "plain", {"norm": "none"}),
              Arm("ln", Role.TREATMENT, "LayerNorm", {"norm": "layer"})),
        sweep=(Axis("hidden", "widths", label="width"),),   # hidden=(16,), then (64,)
        layers=lambda cfg: (Layer("hidden1.act", "input to the first tanh"),),
        metrics=(Metric("final_acc", "final test accuracy", final_acc),),
        claims=(Claim("ln", "LayerNorm trains better.", "nobody 2024", ln_beats_plain, tolerance=0.0),),
    ))

A unit function reads only some config fields; ``reads=`` lists them (the default ``None``: every
field, as the training loop does), and the CLI then rejects any other option, since it would do
nothing in this experiment. ``instead=`` says, per ignored field, which option does that job there::

    register(Experiment(..., unit_fn=probe_unit, reads=frozenset({"hidden", "batch_size", "seeds"}),
                        instead={"steps": "the probe measures at initialization, without training"}))

Execution fields (:data:`~covshift.experiments.config.EXECUTION_FIELDS`), ``data`` (when
``needs_data``) and the sweep grids' fields are always accepted.

``Axis("hidden", "widths")`` with an int grid sets a tuple field from each value: an axis value is
converted by ``Axis.convert`` (default: a tuple field gets ``(value,)``; give ``convert=`` for
anything else, e.g. ``lambda d: (128,) * d`` for depths).
"""

from __future__ import annotations

import dataclasses
import enum
import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional, Sequence, Union

from covshift.experiments.config import EXECUTION_FIELDS, ConfigError, ExperimentConfig, apply_overrides

if TYPE_CHECKING:  # heavy or circular at import time
    from matplotlib.figure import Figure
    from torch import nn

    from covshift.experiments.data import Dataset
    from covshift.experiments.results import LoadedRun, LoadedUnit
    from covshift.experiments.stats import Estimate

__all__ = [
    "Role",
    "Arm",
    "Axis",
    "Layer",
    "FigureSpec",
    "Metric",
    "Bounds",
    "PROBABILITY",
    "NON_NEGATIVE",
    "COSINE",
    "Claim",
    "ClaimResult",
    "Verdict",
    "Unit",
    "UnitContext",
    "Experiment",
]


class Role(enum.Enum):
    """What an arm is for. Claims and figures find arms by role, never by name."""

    BASELINE = "baseline"  # the reference the paper compares against (e.g. no normalization)
    TREATMENT = "treatment"  # the method under test (e.g. BatchNorm)
    VARIANT = "variant"  # another method compared (e.g. noisy BN, GroupNorm)
    CONTROL = "control"  # a sanity check (e.g. the same noise without BN)


@dataclass(frozen=True)
class Arm:
    """One network variant of an experiment.

    Attributes:
        name: its key and directory name (``"bn"``); letters, digits, ``-`` and ``_``.
        role: what it is for.
        label: how figures and tables call it (``"with BN"``).
        overrides: the config fields it sets (``{"norm": "bn"}``); a user cannot set them on the CLI.
        color: a matplotlib colour, or ``None`` for the report's palette.
    """

    name: str
    role: Role
    label: str
    overrides: Mapping[str, Any] = field(default_factory=dict)
    color: Optional[str] = None

    def __post_init__(self) -> None:
        if not self.name or not all(c.isalnum() or c in "-_" for c in self.name):
            raise ValueError(f"Arm name must be letters, digits, '-' or '_' (it names a directory), got {self.name!r}")


def _default_convert(value: Any, current: Any) -> Any:
    return (value,) if isinstance(current, tuple) and not isinstance(value, tuple) else value


@dataclass(frozen=True)
class Axis:
    """One sweep axis: every unit runs at one value of ``field``.

    Attributes:
        field: the config field each point sets (``"lr"``).
        values: the grid, or the name of a config field that holds it (so ``--lrs 0.01,0.1`` changes it).
        label: the axis label in figures (``"learning rate"``).
        log: draw this axis on a log scale.
        convert: ``convert(value, current_field_value) -> field value``; default puts a scalar into a
            one-element tuple when the field is a tuple, else uses it as is.
    """

    field: str
    values: Union[tuple, str]
    label: str = ""
    log: bool = False
    convert: Callable[[Any, Any], Any] = _default_convert

    def grid(self, config: ExperimentConfig) -> tuple:
        vals = getattr(config, self.values) if isinstance(self.values, str) else self.values
        return tuple(vals)


@dataclass(frozen=True)
class Layer:
    """A module of interest: its qualified name in the model and what the report calls it.

    Attributes:
        module: the watched module (``"hidden3.act"``: the monitor records its input).
        label: its display name (``"input to the sigmoid, hidden layer 3"``).
        record_units: also record the single units listed in ``config.units`` one by one (the
            paper's "one typical sigmoid of the last hidden layer").
        weights: the module owning this layer's weights ``W_i`` (``"hidden3.linear"``), whose
            gradient ICS the training loop measures; empty for none.
    """

    module: str
    label: str
    record_units: bool = False
    weights: str = ""


@dataclass(frozen=True)
class FigureSpec:
    """A figure of the report: ``draw(run)`` returns a matplotlib Figure, or ``None`` to skip it
    (for example when the run holds nothing it could show)."""

    filename: str
    caption: str
    draw: Callable[["LoadedRun"], Optional["Figure"]]


Bounds = tuple[float, float]
# Metric.bounds of the quantities experiments report: the range their values can take.
PROBABILITY: Bounds = (0.0, 1.0)  # accuracies, error rates
NON_NEGATIVE: Bounds = (0.0, math.inf)  # norms, distances, counts of steps, ranks
COSINE: Bounds = (-1.0, 1.0)


@dataclass(frozen=True)
class Metric:
    """A headline number: ``compute(unit)`` per unit; reported as mean and interval over seeds.

    Attributes:
        name: its key in ``summary.json``.
        label: its column in the report's table.
        compute: ``compute(unit) -> float | None``.
        digits: decimals shown.
        bounds: the range the metric can take (``(0.0, 1.0)`` for an accuracy, ``(0.0, math.inf)``
            for a norm, ``(-1.0, 1.0)`` for a cosine), or ``bounds(config) -> (lo, hi)`` when it
            depends on the settings (a rank is at most the layer's width); ``None``: unbounded.
            The Student-t interval, symmetric about the mean, can reach past it (an accuracy of
            0.99, 1.0, 1.0 gives ``[0.985, 1.006]``); the report clips it to the bounds and marks it
            (:meth:`covshift.experiments.stats.Estimate.clip`).
    """

    name: str
    label: str
    compute: Callable[["LoadedUnit"], Optional[float]]
    digits: int = 4
    bounds: Union[None, Bounds, Callable[[ExperimentConfig], Bounds]] = None

    def bounds_for(self, config: ExperimentConfig) -> Optional[Bounds]:
        """The feasible range under ``config`` (``None``: unbounded)."""
        b = self.bounds(config) if callable(self.bounds) else self.bounds
        if b is not None and not b[0] <= b[1]:
            raise ValueError(f"metric {self.name!r}: bounds must be (lo, hi) with lo <= hi, got {b}")
        return b


class Verdict(enum.Enum):
    HELD = "held"
    NOT_HELD = "did not hold"
    NOT_EVALUATED = "could not be evaluated"


@dataclass(frozen=True)
class ClaimResult:
    """The verdict on one claim.

    Attributes:
        verdict: held / did not hold / could not be evaluated.
        summary: one sentence with the numbers (and intervals) the verdict rests on.
        numbers: the named estimates behind it (written to ``summary.json``).
        reason: why it could not be evaluated (``NOT_EVALUATED`` only).
    """

    verdict: Verdict
    summary: str
    numbers: Mapping[str, "Estimate"] = field(default_factory=dict)
    reason: str = ""


@dataclass(frozen=True)
class Claim:
    """A sentence from the paper and how this run judges it.

    Attributes:
        name: a short key (``"bn-higher-accuracy"``).
        statement: the paper's claim in its own words.
        source: where it is said (``"Ioffe & Szegedy 2015, Section 4.1"``).
        evaluate: ``evaluate(run, tolerance) -> ClaimResult``.
        tolerance: the margin the claim is judged with (its meaning is in ``tolerance_text``).
        tolerance_text: that meaning, for the report (``"BN ahead by more than 0 (95% interval)"``).
    """

    name: str
    statement: str
    source: str
    evaluate: Callable[["LoadedRun", float], ClaimResult]
    tolerance: float = 0.0
    tolerance_text: str = ""


@dataclass(frozen=True, order=True)
class Unit:
    """One unit of work: an arm at one seed and one sweep point (``((field, value), ...)``)."""

    arm: str
    seed: int
    point: tuple[tuple[str, Any], ...] = ()

    @property
    def path(self) -> Path:
        """Its sub-directory of the run: ``<arm>/[<field>=<value>,.../]seed<k>``."""
        parts = [self.arm]
        if self.point:
            parts.append(",".join(f"{k}={_fmt_value(v)}" for k, v in self.point))
        parts.append(f"seed{self.seed}")
        return Path(*parts)

    def to_dict(self) -> dict:
        return {"arm": self.arm, "seed": self.seed, "point": [[k, v] for k, v in self.point]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Unit":
        return cls(d["arm"], int(d["seed"]), tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in d.get("point", [])))

    def __str__(self) -> str:
        return self.path.as_posix()


def _fmt_value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, tuple):
        return "x".join(_fmt_value(x) for x in v)
    return str(v)


@dataclass
class UnitContext:
    """What a unit function gets.

    Attributes:
        experiment: the declaration.
        unit: which unit.
        config: the run's config with the arm's overrides, the sweep point and the seed applied
            (``config.seeds == (unit.seed,)``).
        dir: the unit's own directory (created, empty of earlier partial output).
        progress: ``progress(step, total, loss, acc)`` for the progress bars, or ``None``.
    """

    experiment: "Experiment"
    unit: Unit
    config: ExperimentConfig
    dir: Path
    progress: Optional[Callable[[int, int, Optional[float], Optional[float]], None]] = None
    _data: Optional["Dataset"] = None
    step: int = 0  # how far the unit got; a unit function updates it so an interruption is recorded where it stopped

    @property
    def seed(self) -> int:
        return self.unit.seed

    @property
    def data(self) -> "Dataset":
        """The config's dataset, loaded on first use (and shared by the units of one process)."""
        if self._data is None:
            self._data = _cached_dataset(self.config.data)
        return self._data

    def log(self, name: str, record: Mapping[str, Any]) -> None:
        """Append ``record`` as one line of ``<dir>/<name>.jsonl`` (read back by ``LoadedUnit.records(name)``)."""
        from covshift._io import append_jsonl

        append_jsonl(self.dir / f"{name}.jsonl", dict(record))


_DATASETS: dict[Optional[str], "Dataset"] = {}


def _cached_dataset(source: Optional[str]) -> "Dataset":
    # One load per process: a worker that runs several units parses the files once.
    if source not in _DATASETS:
        from covshift.experiments.data import load_dataset

        _DATASETS.clear()  # keep at most one dataset in memory
        _DATASETS[source] = load_dataset(source)
    return _DATASETS[source]


def _default_build_model(config: ExperimentConfig, data: "Dataset") -> "nn.Module":
    from covshift.experiments.models import build_mlp

    return build_mlp(config, data)


@dataclass(frozen=True)
class Experiment:
    """A registered experiment. See the module docstring for an example.

    Attributes:
        name: ``covshift run NAME``.
        version: bump when a change makes old run directories incomparable; recorded in config.json.
        summary: one line for ``covshift list``.
        paper: the paper it reproduces (``"Ioffe & Szegedy 2015, Figure 1"``).
        question: the one-line question it answers.
        config: default settings (an :class:`ExperimentConfig` or a dataclass subclass of it).
        arms: the variants compared; at least one.
        sweep: the sweep axes (none: one point).
        layers: the layers of interest, or ``layers(config) -> layers`` when they depend on it.
        figures, metrics, claims: what the report shows, tabulates and judges.
        findings: ``findings(run) -> [sentence, ...]``: what the figures show, for the report.
        notes: the settings that differ from the paper, and why (plain text, one item per entry).
        unit_fn: ``unit_fn(ctx) -> dict`` runs one unit; ``None``: the training loop.
        reads: the config fields that change what this experiment measures or reports, read by its
            units (``unit_fn``, ``build_model``, ``layers``) or by its metrics, claims, figures and
            findings (``run.config``); ``None``: every field (the training loop reads them all).
            The CLI rejects an option outside it (:meth:`check_overrides`). Execution fields,
            ``data`` (when ``needs_data``) and the sweep grids' fields are always read.
        instead: for fields outside ``reads``, why the field does nothing here, for the CLI's error,
            naming the option that does that job if there is one (``{"hidden": "its networks are
            --width wide"}``).
        needs_data: whether units read ``ctx.data`` (the runner then checks the data before any unit starts).
        build_model: ``build_model(config, data) -> nn.Module`` for the training loop.
        watch: module-name globs the training loop's activation monitor records (default: the
            ``layers``' modules, or every ``*.act`` when none are declared).
    """

    name: str
    summary: str
    config: ExperimentConfig
    arms: tuple[Arm, ...]
    version: int = 1
    paper: str = ""
    question: str = ""
    sweep: tuple[Axis, ...] = ()
    layers: Union[Sequence[Layer], Callable[[ExperimentConfig], Sequence[Layer]]] = ()
    figures: tuple[FigureSpec, ...] = ()
    metrics: tuple[Metric, ...] = ()
    claims: tuple[Claim, ...] = ()
    findings: Optional[Callable[["LoadedRun"], list[str]]] = None
    notes: tuple[str, ...] = ()
    unit_fn: Optional[Callable[[UnitContext], dict]] = None
    needs_data: bool = True
    build_model: Callable[[ExperimentConfig, "Dataset"], "nn.Module"] = _default_build_model
    watch: tuple[str, ...] = ()
    reads: Optional[frozenset[str]] = None
    instead: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.arms:
            raise ValueError(f"experiment {self.name!r} declares no arms")
        names = [a.name for a in self.arms]
        if len(set(names)) != len(names):
            raise ValueError(f"experiment {self.name!r}: arm names must be unique, got {names}")
        known = {f.name for f in dataclasses.fields(self.config)}
        for arm in self.arms:
            bad = [k for k in arm.overrides if k not in known]
            if bad:
                raise ValueError(f"experiment {self.name!r}, arm {arm.name!r}: unknown config fields {bad}")
        for axis in self.sweep:
            if axis.field not in known or (isinstance(axis.values, str) and axis.values not in known):
                raise ValueError(f"experiment {self.name!r}: sweep axis {axis.field!r} names an unknown config field")
        if self.reads is not None:
            if isinstance(self.reads, str) or not all(isinstance(k, str) for k in self.reads):
                raise ValueError(f"experiment {self.name!r}: reads must be a set of config field names, got {self.reads!r}")
            object.__setattr__(self, "reads", frozenset(self.reads))
            bad = sorted(k for k in self.reads if k not in known)
            if bad:
                raise ValueError(f"experiment {self.name!r}: reads names unknown config fields {bad}")
        bad = sorted(k for k in self.instead if k not in known or self.accepts(k))
        if bad:
            raise ValueError(f"experiment {self.name!r}: instead= is for fields it does not read; {bad} are unknown or read")

    # --- arms and roles
    def arm(self, name: str) -> Arm:
        for a in self.arms:
            if a.name == name:
                return a
        raise KeyError(f"experiment {self.name!r} has no arm {name!r}; arms: {', '.join(a.name for a in self.arms)}")

    def arms_with(self, role: Role) -> tuple[Arm, ...]:
        return tuple(a for a in self.arms if a.role is role)

    def first(self, role: Role) -> Optional[Arm]:
        found = self.arms_with(role)
        return found[0] if found else None

    # --- layers
    def layers_for(self, config: ExperimentConfig) -> tuple[Layer, ...]:
        return tuple(self.layers(config) if callable(self.layers) else self.layers)

    def watch_for(self, config: ExperimentConfig) -> tuple[str, ...]:
        """What the training loop's monitor watches."""
        return self.watch or tuple(l.module for l in self.layers_for(config)) or ("*.act",)

    # --- the fields the declaration sets, which the CLI must not
    def owned_fields(self) -> dict[str, str]:
        """``{field: who sets it}``: every field an arm overrides or a sweep axis sets."""
        owners: dict[str, list[str]] = {}
        for a in self.arms:
            for k, v in a.overrides.items():
                owners.setdefault(k, []).append(f"arm {a.name!r} sets {v!r}")
        for axis in self.sweep:
            grid = f" (grid from --{axis.values.replace('_', '-')})" if isinstance(axis.values, str) else ""
            owners.setdefault(axis.field, []).append(f"the sweep over {axis.label or axis.field}{grid}")
        return {k: "; ".join(v) for k, v in owners.items()}

    def accepts(self, name: str) -> bool:
        """Whether a setting of config field ``name`` can change this experiment's results (or how it runs):
        it is in ``reads`` (every field when ``reads`` is ``None``), an execution field, ``data`` of an
        experiment that reads data, or a sweep grid's field."""
        if self.reads is None or name in self.reads or name in EXECUTION_FIELDS:
            return True
        if name == "data":
            return self.needs_data
        return any(isinstance(a.values, str) and a.values == name for a in self.sweep)

    def ignored_fields(self) -> tuple[str, ...]:
        """The config fields this experiment never reads (the CLI rejects them), in declaration order."""
        return tuple(f.name for f in dataclasses.fields(self.config) if not self.accepts(f.name))

    def check_overrides(self, overrides: Mapping[str, Any]) -> None:
        """Raise :class:`ConfigError` for a CLI override of a field the declaration sets (an arm or a
        sweep owns it), or of one that this experiment does not read (it would do nothing)."""
        owned = self.owned_fields()
        for k in overrides:
            flag = f"--{k.replace('_', '-')}"
            if k in owned:
                raise ConfigError(f"{flag} is set by {self.name}'s declaration ({owned[k]}); it cannot be given on the command line")
            if not self.accepts(k):
                why = self.instead.get(k, "none of its units, metrics or claims reads it")
                raise ConfigError(f"{flag} does nothing in {self.name} ({why}); drop it")

    # --- units
    def points(self, config: ExperimentConfig) -> list[tuple[tuple[str, Any], ...]]:
        """The sweep points: the Cartesian product of the axes' grids (``[()]`` without a sweep)."""
        if not self.sweep:
            return [()]
        grids = [axis.grid(config) for axis in self.sweep]
        for axis, grid in zip(self.sweep, grids):
            if not grid:
                raise ConfigError(f"the sweep over {axis.label or axis.field} has no values")
        return [tuple((axis.field, v) for axis, v in zip(self.sweep, combo)) for combo in itertools.product(*grids)]

    def units(self, config: ExperimentConfig) -> list[Unit]:
        """Every unit of a run with ``config``: arms x sweep points x seeds, seed-major so that a
        partial run has every arm at its first seeds."""
        return [Unit(a.name, s, p) for s in config.seeds for p in self.points(config) for a in self.arms]

    def unit_config(self, config: ExperimentConfig, unit: Unit) -> ExperimentConfig:
        """``config`` with the unit's arm overrides, sweep point and seed applied (validated)."""
        cfg = apply_overrides(config, dict(self.arm(unit.arm).overrides))
        by_field = {a.field: a for a in self.sweep}
        point = {k: by_field[k].convert(v, getattr(cfg, k)) for k, v in unit.point}
        return apply_overrides(cfg, {**point, "seeds": (unit.seed,)})


def finite(x: Optional[float]) -> bool:
    return x is not None and math.isfinite(x)
