"""One training-step update of a BatchNorm layer's running statistics, shared by covshift's variants."""

from __future__ import annotations

from typing import Union

from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

from covshift.functional.batchnorm import update_running_stats


def count_batch(layer: _BatchNorm) -> Union[float, Tensor]:
    """``num_batches_tracked += 1`` (when the layer has it) and this batch's averaging factor:
    ``momentum``, or ``1/num_batches_tracked`` (a cumulative average) when ``momentum`` is ``None``.

    The cumulative factor is a 0-dim tensor on the buffer's device, never a Python float: reading the
    counter on the host would cost a device sync per step and break ``torch.compile`` graphs (with a
    recompile for every new batch size). :func:`~covshift.functional.batchnorm.update_running_stats`
    takes either form."""
    counter = layer.num_batches_tracked  # one Module.__getattr__ (this runs on every training step)
    momentum = layer.momentum
    if counter is not None:
        counter.add_(1)
        if momentum is None:
            return counter.double().reciprocal()  # 1/n in double, as torch has it
    return 0.0 if momentum is None else momentum


def advance_running_stats(layer: _BatchNorm, mean: Tensor, var: Tensor, count: Union[int, float]) -> None:
    r"""``num_batches_tracked += 1``, then ``running = (1 - m) * running + m * stat`` in place.

    The rule of ``torch.nn.BatchNorm*`` and :class:`covshift.nn.BatchNorm*`: ``m`` is ``momentum``, or
    ``1/num_batches_tracked`` (a cumulative average) when ``momentum`` is ``None``; ``var`` is the
    biased variance of ``count`` values per channel, and ``running_var`` receives ``var * count/(count-1)``
    (:func:`covshift.functional.batchnorm.update_running_stats`). Callers decide *whether* to update
    (training, ``track_running_stats``, the non-finite guard).
    """
    update_running_stats(layer.running_mean, layer.running_var, mean, var, count, count_batch(layer))
