"""Experiment configs: one dataclass whose every field the CLI can override as ``--field value``."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

__all__ = ["ExperimentConfig", "ConfigError", "apply_overrides", "config_fields"]


class ConfigError(ValueError):
    """A bad config value; the message names the CLI flag and the accepted values."""


def _doc(text: str, **kw: Any) -> Any:
    return field(metadata={"help": text}, **kw)


@dataclass
class ExperimentConfig:
    """Settings of one experiment run. Each arm of the experiment overrides a few of them (``arms``)."""

    # --- data
    data: Optional[str] = _doc(
        "dataset: empty for the bundled 5k MNIST digits, a directory of MNIST IDX files, or an .npz file", default=None
    )
    # --- network
    hidden: tuple[int, ...] = _doc("hidden layer widths", default=(100, 100, 100))
    activation: Literal["sigmoid", "tanh", "relu"] = _doc("nonlinearity of every hidden layer", default="sigmoid")
    norm: Literal["none", "bn"] = _doc("normalization before each nonlinearity (set per arm)", default="none")
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
    momentum: float = _doc("SGD momentum", default=0.0)
    seed: int = _doc("seed of initialisation and batch order; the same seed gives the same metrics", default=0)
    # --- measurement
    eval_every: int = _doc("steps between test-accuracy checkpoints", default=500)
    monitor_every: int = _doc("steps between activation-statistics records", default=100)
    units: tuple[int, ...] = _doc("units of the last hidden layer whose input distribution is recorded one by one", default=(0, 1, 2, 3, 4, 5, 6, 7))
    probe_size: int = _doc("the first N test examples form a fixed probe batch measured at every record (0: none)", default=1000)
    tensorboard: bool = _doc("also write TensorBoard event files", default=False)
    # --- execution
    out: Optional[str] = _doc("run directory (default runs/<experiment>-<timestamp>)", default=None)
    parallel: Literal["auto", "yes", "no"] = _doc("train the arms in parallel processes ('auto': when the machine has a core per arm)", default="auto")
    progress: bool = _doc("show progress bars", default=True)

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "eval_every", "monitor_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{_flag(name)} must be a positive integer, got {getattr(self, name)}")
        if self.probe_size < 0:
            raise ConfigError(f"--probe-size must be >= 0, got {self.probe_size}")
        for name in ("lr", "init_std"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"--{_flag(name)} must be > 0, got {getattr(self, name)}")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"--momentum must be in [0, 1), got {self.momentum}")
        if not self.hidden or min(self.hidden) < 1:
            raise ConfigError(f"--hidden needs at least one positive width, got {self.hidden}")
        bad = [u for u in self.units if not 0 <= u < self.hidden[-1]]
        if bad:
            raise ConfigError(f"--units {bad} out of range: the last hidden layer has {self.hidden[-1]} units")
        for f in dataclasses.fields(self):
            choices = _choices(f)
            if choices and getattr(self, f.name) not in choices:
                raise ConfigError(f"--{_flag(f.name)} must be one of {', '.join(choices)}; got {getattr(self, f.name)!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _flag(name: str) -> str:
    return name.replace("_", "-")


def _hints() -> dict[str, Any]:
    return typing.get_type_hints(ExperimentConfig)


def _choices(f: dataclasses.Field) -> tuple[str, ...]:
    hint = _hints()[f.name]
    return typing.get_args(hint) if typing.get_origin(hint) is Literal else ()


def config_fields() -> list[tuple[str, Any, str]]:
    """``(name, type hint, help)`` for every field, for the CLI to build its flags from."""
    hints = _hints()
    return [(f.name, hints[f.name], f.metadata.get("help", "")) for f in dataclasses.fields(ExperimentConfig)]


def _parse(name: str, hint: Any, raw: Any) -> Any:
    """Turn a CLI string (or a JSON value) into the field's type."""
    if not isinstance(raw, str):
        return tuple(raw) if isinstance(raw, list) else raw
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    try:
        if origin is typing.Union and type(None) in args:  # Optional[X]
            return None if raw in ("", "none", "None") else _parse(name, next(a for a in args if a is not type(None)), raw)
        if origin is tuple:
            return tuple(int(v) for v in raw.replace(" ", "").split(",") if v)
        if hint is bool:
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if hint in (int, float):
            return hint(raw)
        return raw
    except ValueError:
        kind = {int: "an integer", float: "a number", bool: "true or false"}.get(hint, "comma-separated integers")
        raise ConfigError(f"--{_flag(name)} expects {kind}, got {raw!r}") from None


def apply_overrides(config: ExperimentConfig, overrides: dict[str, Any]) -> ExperimentConfig:
    """A new config with ``overrides`` (field name -> string or value) applied and validated."""
    hints = _hints()
    unknown = [k for k in overrides if k not in hints]
    if unknown:
        raise ConfigError(f"unknown setting {unknown[0]!r}; known: {', '.join(sorted(hints))}")
    parsed = {k: _parse(k, hints[k], v) for k, v in overrides.items()}
    return dataclasses.replace(config, **parsed)
