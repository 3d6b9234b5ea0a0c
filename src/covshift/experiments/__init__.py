"""One-command experiments, each a declaration (:mod:`covshift.experiments.declaration`): arms with
roles, sweeps, layers, figures, metrics and claims; units of work that resume and scale out; reports.
"""

from covshift.experiments.config import ConfigError, ExperimentConfig, apply_overrides
from covshift.experiments.data import DataError, Dataset, load_dataset
from covshift.experiments.declaration import (
    Arm,
    Axis,
    Claim,
    ClaimResult,
    Experiment,
    FigureSpec,
    Layer,
    Metric,
    Role,
    Unit,
    UnitContext,
    Verdict,
)
from covshift.experiments.registry import EXPERIMENTS, get_experiment, register
from covshift.experiments.stats import Estimate, estimate

__all__ = [
    "Arm",
    "Axis",
    "Claim",
    "ClaimResult",
    "ConfigError",
    "DataError",
    "Dataset",
    "EXPERIMENTS",
    "Estimate",
    "Experiment",
    "ExperimentConfig",
    "FigureSpec",
    "Layer",
    "Metric",
    "Role",
    "Unit",
    "UnitContext",
    "Verdict",
    "apply_overrides",
    "build_report",
    "estimate",
    "get_experiment",
    "load_dataset",
    "register",
    "results",
    "run_experiment",
]


def __getattr__(name):
    # The runner, report and results pull in matplotlib and the monitor; load them only when used.
    if name == "run_experiment":
        from covshift.experiments.runner import run_experiment

        return run_experiment
    if name == "build_report":
        from covshift.experiments.report import build_report

        return build_report
    if name == "results":
        import covshift.experiments.results as results

        return results
    raise AttributeError(name)
