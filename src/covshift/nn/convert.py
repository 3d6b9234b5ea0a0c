"""Swap torch's BatchNorm layers for covshift's in any model, and back."""

from __future__ import annotations

import warnings
from typing import Literal

import torch

from covshift.nn.batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d
from covshift.nn.swap import replace_modules, swap_class

__all__ = ["convert"]

_TO_COVSHIFT = {
    torch.nn.BatchNorm1d: BatchNorm1d,
    torch.nn.BatchNorm2d: BatchNorm2d,
    torch.nn.BatchNorm3d: BatchNorm3d,
}
_TO_TORCH = {v: k for k, v in _TO_COVSHIFT.items()}
_LAZY = (torch.nn.LazyBatchNorm1d, torch.nn.LazyBatchNorm2d, torch.nn.LazyBatchNorm3d)


def convert(model: torch.nn.Module, to: Literal["covshift", "torch"] = "covshift") -> torch.nn.Module:
    """Replace every ``torch.nn.BatchNorm1d/2d/3d`` in ``model`` (nested too) with covshift's.

    ``to="torch"`` goes back. Parameters and buffers are the *same* tensors, so values, device,
    dtype, ``requires_grad``, an existing optimizer's references, and each layer's train/eval mode,
    hyper-parameters and hooks are kept (:mod:`covshift.nn.swap`); a layer shared by several parents
    stays shared. Only exact classes are swapped: user subclasses of torch's
    BatchNorm (and ``SyncBatchNorm``) keep their own behaviour.

    The model is changed in place and returned; when ``model`` itself is a BatchNorm layer the
    converted layer is returned instead.

    A ``torch.nn.LazyBatchNorm*`` whose parameters are not materialized yet cannot be swapped (it has
    no channel count): it stays torch's and becomes torch's ``BatchNorm*`` at its first forward, so
    ``convert`` warns, naming it; run one forward first, then convert.

    Raises:
        ValueError: ``to`` is neither ``"covshift"`` nor ``"torch"``.
    """
    if to == "covshift":
        lazy = [n or type(model).__name__ for n, m in model.named_modules() if isinstance(m, _LAZY) and m.has_uninitialized_params()]
        if lazy:
            warnings.warn(
                f"convert: {', '.join(lazy)} {'is an' if len(lazy) == 1 else 'are'} uninitialized torch.nn.LazyBatchNorm "
                "layer(s), left as torch's (they become torch's BatchNorm at their first forward). Run one forward "
                "through the model first, then convert.",
                UserWarning,
                stacklevel=2,
            )
        table = _TO_COVSHIFT
    elif to == "torch":
        table = _TO_TORCH
    else:
        raise ValueError(f"convert(to=...) expected 'covshift' or 'torch', got {to!r}")
    return replace_modules(model, lambda name, m: swap_class(m, table[type(m)]) if type(m) in table else None)
