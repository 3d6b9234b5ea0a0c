"""One-command experiments: named configs, a training loop with the monitor attached, and reports."""

from covshift.experiments.config import ConfigError, ExperimentConfig, apply_overrides
from covshift.experiments.data import DataError, Dataset, load_dataset
from covshift.experiments.registry import EXPERIMENTS, Experiment, get_experiment

__all__ = [
    "ConfigError",
    "DataError",
    "Dataset",
    "EXPERIMENTS",
    "Experiment",
    "ExperimentConfig",
    "apply_overrides",
    "get_experiment",
    "load_dataset",
    "run_experiment",
    "build_report",
]


def __getattr__(name):
    # The runner and report pull in matplotlib and the monitor; load them only when used.
    if name == "run_experiment":
        from covshift.experiments.runner import run_experiment

        return run_experiment
    if name == "build_report":
        from covshift.experiments.report import build_report

        return build_report
    raise AttributeError(name)
