"""The registry of experiments: ``register(Experiment(...))`` makes ``covshift run NAME`` work.

The built-in ``fig1`` lives in :mod:`covshift.experiments.fig1` (and ``mlp``, one network with any
``--norm``, in :mod:`covshift.experiments.mlp`); the literature experiments in
:mod:`covshift.experiments.papers` register themselves when that package is imported, which
happens the first time the registry is read.
"""

from __future__ import annotations

import importlib
import sys
from typing import Iterator, Mapping

from covshift.experiments.config import ConfigError
from covshift.experiments.declaration import Experiment

__all__ = ["EXPERIMENTS", "register", "get_experiment", "experiments", "origin", "load_origin"]

_REGISTRY: dict[str, Experiment] = {}
_ORIGINS: dict[str, str] = {}  # name -> the module that registered it, imported by worker processes
_BUILTIN_MODULES = ("covshift.experiments.fig1", "covshift.experiments.mlp", "covshift.experiments.papers")
_loaded = False


def register(experiment: Experiment, *, overwrite: bool = False) -> Experiment:
    """Add ``experiment`` under its name (a ``ValueError`` if the name is taken and not ``overwrite``)."""
    if not isinstance(experiment, Experiment):
        raise TypeError(f"register: expected an Experiment, got {type(experiment).__name__}")
    if experiment.name in _REGISTRY and not overwrite and _REGISTRY[experiment.name] is not experiment:
        raise ValueError(f"an experiment named {experiment.name!r} is already registered; pass overwrite=True to replace it")
    _REGISTRY[experiment.name] = experiment
    _ORIGINS[experiment.name] = sys._getframe(1).f_globals.get("__name__", "")
    return experiment


def origin(name: str) -> str:
    """The module that registered ``name`` ("" if unknown): a worker process imports it to find the experiment."""
    return _ORIGINS.get(name, "")


def load_origin(name: str, module: str) -> Experiment:
    """In a worker: import ``module`` (which registers ``name``) unless it is already known, then look it up."""
    _load()
    if name not in _REGISTRY and module and module not in ("__main__", "__mp_main__"):
        importlib.import_module(module)
    return get_experiment(name)


def _load() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        for module in _BUILTIN_MODULES:
            importlib.import_module(module)


class _Experiments(Mapping[str, Experiment]):
    """A read-only view of the registry that loads the built-in experiments on first use."""

    def __getitem__(self, name: str) -> Experiment:
        _load()
        return _REGISTRY[name]

    def __iter__(self) -> Iterator[str]:
        _load()
        return iter(list(_REGISTRY))

    def __len__(self) -> int:
        _load()
        return len(_REGISTRY)


EXPERIMENTS: Mapping[str, Experiment] = _Experiments()


def experiments() -> list[Experiment]:
    """Every registered experiment, in registration order."""
    return [EXPERIMENTS[n] for n in EXPERIMENTS]


def get_experiment(name: str) -> Experiment:
    _load()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown experiment {name!r}; available: {', '.join(sorted(_REGISTRY))} (see `covshift list`)") from None
