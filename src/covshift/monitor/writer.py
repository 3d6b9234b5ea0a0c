"""Where a monitor's records go: the in-memory :class:`MonitorRecords` and the run directory.

:class:`RunWriter` takes each flush's :class:`~covshift.monitor.flush.RecordBatch` and hands it to
every consumer: the records (the views read them), ``monitor.jsonl`` (appended at once), TensorBoard
(with ``tensorboard=True``), and ``histograms.npz``, which holds the whole run and is therefore
rewritten at most every ``interval`` seconds unless forced. File formats: :mod:`covshift.monitor.io`.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Literal, Optional, Sequence, Union

import numpy as np

from covshift.monitor import io
from covshift.monitor.flush import RecordBatch
from covshift.monitor.records import MonitorRecords, RecordKey

__all__ = ["RunWriter"]


class RunWriter:
    """The records of one monitored run, in memory and (with ``log_dir``) on disk.

    Args:
        declared: the record keys known before recording (watched modules, channel extras, probe
            variants), listed first in the views.
        log_dir: the run directory, or None for memory only (also on ranks that do not write).
        if_exists: what to do with a run already in ``log_dir`` (see :func:`io.prepare_log_dir`);
            with ``"append"`` its records are read back and continued.
        tensorboard: also write TensorBoard events to ``log_dir``.
        npz_interval: seconds between automatic rewrites of ``histograms.npz``.
    """

    def __init__(
        self,
        declared: Sequence[RecordKey],
        log_dir: Optional[Union[str, Path]],
        if_exists: Literal["error", "overwrite", "append"],
        tensorboard: bool,
        npz_interval: float,
    ) -> None:
        self.log_dir = None if log_dir is None else Path(log_dir)
        self.records = MonitorRecords(declared)
        self.edges: dict[RecordKey, np.ndarray] = {}  # fixed edges of the keys of an appended run
        self._jsonl: Optional[io.JsonlWriter] = None
        self._tb: Optional[io.TensorBoardWriter] = None
        self._tensorboard = tensorboard and self.log_dir is not None
        self._interval = npz_interval
        self._last_npz = -math.inf
        self._npz_dirty = False
        self._meta_written = False
        if self.log_dir is not None:
            previous = io.prepare_log_dir(self.log_dir, if_exists)
            if previous is not None:
                previous.declare(declared)
                self.records = previous
                self.edges = {k: previous.histograms(k).edges for k in previous.histogram_keys()}
            self._jsonl = io.JsonlWriter(self.log_dir / io.JSONL_NAME)

    def write_meta(self, meta: dict) -> None:
        """Write ``meta.json`` once (atomically), when there is a run directory."""
        if self.log_dir is None or self._meta_written:
            return
        io.write_json_atomic(self.log_dir / io.META_NAME, {"format": io.FORMAT, **meta})
        self._meta_written = True

    def write(self, batch: RecordBatch) -> None:
        """Hand one flush's records to the records and to every file writer."""
        self.records.add_batch(batch)
        if self._jsonl is not None:
            self._jsonl.write_lines(io.batch_lines(batch))
        if self._tensorboard:
            if self._tb is None:
                self._tb = io.TensorBoardWriter(self.log_dir)  # type: ignore[arg-type]
            self._tb.write_batch(batch)
        self._npz_dirty = True

    def write_histograms(self, force: bool) -> None:
        """Rewrite ``histograms.npz`` if there is news and ``force`` or the interval has passed."""
        if self.log_dir is None or not self._npz_dirty:
            return
        now = time.monotonic()
        if force or now - self._last_npz >= self._interval:
            io.write_histograms(self.log_dir / io.NPZ_NAME, self.records)
            self._last_npz, self._npz_dirty = now, False

    def flush(self) -> None:
        """Push TensorBoard's buffered events to disk."""
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
            self._tb = None
