"""``mlp``: one fully connected network with any normalization of ``covshift.nn.get_norm_layer``.

Not a reproduction: the way to train every variant of the toolbox from the command line
(``covshift run mlp --norm group``, ``--norm renorm``, ...), with the same measurements as
``fig1`` (test accuracy, every layer's input distribution and its drift, gradient ICS) and the
same run directory, resume and executors. It declares no claims.
"""

from __future__ import annotations

import dataclasses

from covshift.experiments.config import ExperimentConfig
from covshift.experiments.declaration import COSINE, NON_NEGATIVE, PROBABILITY, Arm, Experiment, FigureSpec, Metric, Role
from covshift.experiments.fig1 import _layers, best_acc, final_acc, ics_mean, layer_drift_last
from covshift.experiments.registry import register

__all__ = ["MLP_EXPERIMENT"]


def _accuracy(run):
    import matplotlib.pyplot as plt

    from covshift.experiments import plots

    fig, ax = plt.subplots(figsize=(6, 4), constrained_layout=True)
    plots.accuracy_panel(ax, run)
    ax.set_title("test accuracy")
    return fig


def _heatmaps(run):
    from covshift.experiments import plots

    return plots.heatmaps(run)


def _drift(run):
    from covshift.experiments import plots

    return plots.drift_figure(run)


def _ics(run):
    from covshift.experiments import plots

    return plots.gradient_ics_figure(run)


MLP_EXPERIMENT = register(
    Experiment(
        name="mlp",
        summary="one MNIST MLP with the normalization of --norm (any name of covshift.nn.get_norm_layer), measured like fig1",
        paper="(no paper: a training run)",
        question="How does a network with --norm NAME train, and how do its layers' input distributions and gradients move?",
        config=dataclasses.replace(ExperimentConfig(), steps=10_000),
        arms=(Arm("net", Role.TREATMENT, "the network"),),
        layers=_layers,
        metrics=(
            Metric("final_test_acc", "final test accuracy", final_acc, bounds=PROBABILITY),
            Metric("best_test_acc", "best test accuracy", best_acc, bounds=PROBABILITY),
            Metric("last_layer_w1_drift", "last layer's input drift (W1, first to last)", layer_drift_last, digits=3, bounds=NON_NEGATIVE),
            Metric("last_layer_ics_cosine", "gradient ICS cosine, last layer (mean over training)", ics_mean(-1, "cosine"), digits=3, bounds=COSINE),
        ),
        figures=(
            FigureSpec("accuracy.png", "Test accuracy over training (mean over seeds, with its 95% band).", _accuracy),
            FigureSpec("heatmaps.png", "The distribution of every layer's input over training (first seed), log counts.", _heatmaps),
            FigureSpec("drift.png", "Drift of each layer's input distribution from its first record (training batches).", _drift),
            FigureSpec("gradient_ics.png", "Gradient ICS (Santurkar et al. 2018) of each layer's weights at the monitor's checkpoints.", _ics),
        ),
        notes=("Not a reproduction of a paper; the settings are fig1's, with 10,000 steps.",),
    )
)
