"""The named experiments. A new experiment is a new entry here: a config, its arms, and what to watch."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from torch import nn

from covshift.experiments.config import ConfigError, ExperimentConfig, apply_overrides
from covshift.experiments.data import Dataset
from covshift.experiments.models import MLP

__all__ = ["Experiment", "EXPERIMENTS", "get_experiment", "build_mlp"]


def build_mlp(config: ExperimentConfig, data: Dataset) -> nn.Module:
    """The fully connected network of ``config``, sized from the data."""
    return MLP(data.num_features, config.hidden, data.num_classes, config.norm, config.activation, config.init_std)


@dataclass(frozen=True)
class Experiment:
    """One experiment: networks ("arms") trained side by side on the same data, seed and batches."""

    name: str
    summary: str  # one line, for `covshift list`
    config: ExperimentConfig
    arms: dict[str, dict[str, Any]]  # arm name -> config overrides, e.g. {"bn": {"norm": "bn"}}
    build_model: Callable[[ExperimentConfig, Dataset], nn.Module] = build_mlp
    # Which modules the activation monitor watches (qualified-name globs), and the layer whose single
    # units are recorded one by one (the paper's "one typical sigmoid of the last hidden layer").
    watch: tuple[str, ...] = ("*.act",)
    unit_layer: Optional[Callable[[ExperimentConfig], str]] = field(default=lambda c: f"hidden{len(c.hidden)}.act")

    def arm_config(self, config: ExperimentConfig, arm: str) -> ExperimentConfig:
        return apply_overrides(config, self.arms[arm])


EXPERIMENTS: dict[str, Experiment] = {
    "fig1": Experiment(
        name="fig1",
        summary="Ioffe & Szegedy 2015, Figure 1: MNIST MLP (3x100 sigmoid) with and without BatchNorm, "
        "test accuracy and the drift of the last hidden layer's sigmoid inputs",
        config=ExperimentConfig(),
        arms={"no-bn": {"norm": "none"}, "bn": {"norm": "bn"}},
    ),
}


def get_experiment(name: str) -> Experiment:
    try:
        return EXPERIMENTS[name]
    except KeyError:
        raise ConfigError(f"unknown experiment {name!r}; available: {', '.join(sorted(EXPERIMENTS))} (see `covshift list`)") from None
