"""Instruments for internal covariate shift: an activation monitor, drift metrics, gradient ICS.

* :class:`ActivationMonitor` / :class:`MonitorConfig`: record activation statistics of any
  ``nn.Module`` while the user's loop trains it (``activations.py``, kernels in ``stats.py``);
  (lifecycle and hooks in ``activations.py``; the flush in ``flush.py``; the files in
  ``writer.py`` and ``io.py``; fused C++ kernels with a pure-torch reference in ``stats.py``);
* :func:`load`: read a run directory back into the same views (``io.py``, ``records.py``), by
  typed :class:`RecordKey` or by its display string;
* :mod:`covshift.monitor.drift`: distributional ICS between checkpoints (pure functions);
* :func:`gradient_ics`: Santurkar et al. 2018, Definition 2.1 (``gradient_ics.py``).
"""

from covshift.monitor import drift, stats
from covshift.monitor.activations import ActivationMonitor, suspend_monitors
from covshift.monitor.config import MonitorConfig
from covshift.monitor.drift import drift_table, layer_drift
from covshift.monitor.gradient_ics import GradientICS, forward_order, gradient_ics
from covshift.monitor.io import load
from covshift.monitor.flush import LayerStats, RecordBatch
from covshift.monitor.records import ChannelStats, Histograms, MonitorRecords, RecordKey
from covshift.monitor.selection import ACTIVATION_TYPES, NORM_TYPES, select_modules
from covshift.monitor.signal_propagation import (
    SignalPropagation,
    numerical_rank,
    plot_signal_propagation,
    signal_propagation,
    stable_rank,
)

__all__ = [
    "ActivationMonitor",
    "MonitorConfig",
    "MonitorRecords",
    "RecordKey",
    "RecordBatch",
    "LayerStats",
    "Histograms",
    "ChannelStats",
    "load",
    "suspend_monitors",
    "select_modules",
    "ACTIVATION_TYPES",
    "NORM_TYPES",
    "drift",
    "layer_drift",
    "drift_table",
    "stats",
    "gradient_ics",
    "forward_order",
    "GradientICS",
    "signal_propagation",
    "SignalPropagation",
    "plot_signal_propagation",
    "numerical_rank",
    "stable_rank",
]
