r"""``update_bn_stats``: re-estimate BatchNorm running statistics as a true average over batches."""

from __future__ import annotations

from typing import Any, Iterable, Optional

import torch
from torch.nn.modules.batchnorm import _BatchNorm

from covshift.nn.batch_renorm import _BatchRenormMixin
from covshift.nn.frozen_batchnorm import _FrozenBatchNormMixin

__all__ = ["update_bn_stats"]


def _input_of(batch: Any) -> Any:
    """A batch is the input itself, or an ``(input, target, ...)`` tuple or list."""
    if isinstance(batch, (tuple, list)):
        if not batch:
            raise ValueError("update_bn_stats got an empty tuple as a batch; expected a tensor or (input, target).")
        return batch[0]
    return batch


@torch.no_grad()
def update_bn_stats(model: torch.nn.Module, loader: Iterable[Any], num_batches: Optional[int] = None) -> None:
    r"""Recompute every BatchNorm layer's running statistics from ``loader`` ("precise BN").

    The exponential moving average of training lags behind the weights and weights recent batches
    more; after training (or after averaging weights, as in SWA) it no longer matches the model.
    This replaces it with the plain average over the given batches. For ``B`` batches, each layer ends
    with

    .. math::

        \hat\mu = \frac1B \sum_b \mu_b, \qquad \hat\sigma^2 = \frac1B \sum_b \sigma_b^2\,\frac{m_b}{m_b - 1}

    the mean of the per-batch means and of the per-batch *unbiased* variances (equal weight per batch,
    ``m_b`` values per channel in batch ``b``), and ``num_batches_tracked = B``.

    How: for every ``torch.nn.modules.batchnorm._BatchNorm`` with running statistics (torch's and
    covshift's layers, ``SyncBatchNorm`` included), reset the statistics and set ``momentum=None``
    (torch's cumulative average); run ``model`` in train mode under ``torch.no_grad()`` on the first
    ``num_batches`` batches (all, when ``None``); then restore every layer's ``momentum`` and every
    module's train/eval mode. Nothing else in the model changes. Batches are passed to ``model`` as they
    are (move them to the model's device in the loader); for a ``SyncBatchNorm`` every process must run
    the same number of batches.

    Special layers: ``FrozenBatchNorm*`` are left as they are. ``BatchRenorm*`` run as plain BatchNorm
    (``r = 1``, ``d = 0``) during the estimate, so later layers see batch-normalized activations as for
    BatchNorm, and keep their relaxation schedule's step (``num_batches_tracked``).

    Args:
        model: any module; the layers found in it are updated in place.
        loader: an iterable of batches: tensors, or ``(input, target, ...)`` tuples/lists whose first
            element is the model's input.
        num_batches: how many batches to use, ``>= 1``; ``None`` uses the whole loader.

    Raises:
        ValueError: ``num_batches`` is not ``None`` nor a positive int; the loader yields no batch (the
            statistics are then left as they were).
    """
    if num_batches is not None and (isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1):
        raise ValueError(f"update_bn_stats expected num_batches to be None or an int >= 1, got {num_batches!r}.")
    layers = [
        m for m in model.modules()
        if isinstance(m, _BatchNorm) and not isinstance(m, _FrozenBatchNormMixin)
        and m.track_running_stats and m.running_mean is not None and m.running_var is not None
    ]
    if not layers:
        return
    modes = {m: m.training for m in model.modules()}
    saved = {m: (m.momentum, {k: b.clone() for k, b in m._buffers.items() if b is not None}) for m in layers}
    renorm = {m: (m.r_max, m.d_max) for m in layers if isinstance(m, _BatchRenormMixin)}
    seen = 0
    try:
        for m in layers:
            m.reset_running_stats()
            m.momentum = None
        for m in renorm:
            m.r_max, m.d_max = 1.0, 0.0
        model.train()
        for batch in loader:
            if num_batches is not None and seen >= num_batches:
                break
            model(_input_of(batch))
            seen += 1
        if seen == 0:
            raise ValueError("update_bn_stats: the loader yielded no batches, so there is nothing to average. "
                             "Pass a loader with at least one batch; the running statistics were left as they were.")
    except BaseException:
        for m, (_, buffers) in saved.items():
            for k, b in buffers.items():
                m._buffers[k].copy_(b)
        raise
    finally:
        for m, (momentum, _) in saved.items():
            m.momentum = momentum
        for m, (r_max, d_max) in renorm.items():
            m.r_max, m.d_max = r_max, d_max
            m.num_batches_tracked.copy_(saved[m][1]["num_batches_tracked"])  # the schedule's step
        for m, mode in modes.items():
            m.training = mode
