r"""``FrozenBatchNorm1d/2d/3d`` and ``freeze(model)`` / ``unfreeze(model)``: BatchNorm as a fixed affine map."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

from covshift.functional.batchnorm import batch_norm, check_eps
from covshift.nn.batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d, _BatchNormMixin
from covshift.nn.swap import replace_modules, swap_class

__all__ = ["FrozenBatchNorm1d", "FrozenBatchNorm2d", "FrozenBatchNorm3d", "freeze", "unfreeze"]

_DOC = r"""
    The inference transform of BatchNorm (Ioffe & Szegedy 2015, Algorithm 2) with everything fixed:

    .. math:: y = \gamma\,\frac{x - \hat\mu}{\sqrt{\hat\sigma^2 + \epsilon}} + \beta

    with ``running_mean`` (``mu``), ``running_var`` (``sigma^2``), ``weight`` (``gamma``) and ``bias``
    (``beta``) constants, whatever the mode: ``.train()`` leaves the layer in eval (``training`` stays
    ``False``) and nothing is ever updated. ``weight`` and ``bias`` are kept as parameters with
    ``requires_grad=False`` and are detached in the forward, so they never receive a gradient; the
    input still does (``dx = dy * gamma / sqrt(sigma^2 + eps)``). The usual fine-tuning layer for small
    batches (as in torchvision's and detectron2's ``FrozenBatchNorm2d``).

    The parameters and buffers are torch's (``weight``, ``bias``, ``running_mean``, ``running_var``,
    ``num_batches_tracked``), so a ``state_dict`` loads from and into ``torch.nn.BatchNorm*`` with
    ``strict=True``. :func:`freeze` turns existing BatchNorm layers into these in place, keeping the
    tensors themselves; :func:`unfreeze` turns them back.

    The constructor takes torch's arguments in torch's order, so that ``FrozenBatchNorm2d(*args)`` builds
    the layer ``torch.nn.BatchNorm2d(*args)`` would, frozen.

    Args:
        num_features: ``C``, the number of channels.
        eps: added to the variance. Default ``1e-5``.
        momentum: kept as an attribute (it is what :func:`unfreeze` trains with); a frozen layer never
            uses it. Default ``0.1``.
        affine: keep ``weight`` and ``bias`` (ones and zeros until loaded). Default ``True``.
        track_running_stats: must be ``True`` (the fixed statistics are the running ones).
        device, dtype: as ``torch.nn.BatchNorm*``.
        bias: keyword-only, as ``torch.nn.BatchNorm*``: with ``affine=True``, whether ``beta`` exists.
        skip_nonfinite: accepted for uniformity with every covshift BatchNorm layer; a frozen layer
            never updates its statistics, so it has nothing to skip.

    Raises:
        ValueError: ``track_running_stats=False``; ``eps < 0`` in the forward (as torch in eval); and as
            ``covshift.nn.BatchNorm*`` for the input (rank, channel count).
"""


class _FrozenBatchNormMixin:
    """Fixed-statistics forward and a mode that ``.train()`` cannot change. Placed first in the MRO."""

    _is_frozen_batchnorm = True  # read by converters that must not import this module

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: Any = None,
        dtype: Optional[torch.dtype] = None,
        *,
        bias: bool = True,
        skip_nonfinite: bool = False,
    ) -> None:
        if not track_running_stats:
            raise ValueError(
                f"{type(self).__name__} expected track_running_stats=True, got {track_running_stats!r}: a frozen "
                "layer normalizes with its fixed running statistics, so it must have them. Use "
                "covshift.nn.BatchNorm* for a layer that normalizes with batch statistics."
            )
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias,
            skip_nonfinite=skip_nonfinite,
        )
        for p in self._parameters.values():
            if p is not None:
                p.requires_grad_(False)
        self.training = False

    def train(self, mode: bool = True) -> "_FrozenBatchNormMixin":
        """Ignored: a frozen layer stays in eval mode. Use :func:`unfreeze` to train it again."""
        return super().train(False)

    def forward(self, input: Tensor) -> Tensor:
        if isinstance(input, torch.fx.Proxy):  # torch.fx.symbolic_trace: a leaf module, as the plain layers
            return super().forward(input)
        self._check_input_dim(input)
        self._check_channels(input)
        check_eps(self.eps, training=False)
        weight = None if self.weight is None else self.weight.detach()
        bias = None if self.bias is None else self.bias.detach()
        return batch_norm(input, self.running_mean, self.running_var, weight, bias, False, 0.0, self.eps)


class FrozenBatchNorm1d(_FrozenBatchNormMixin, BatchNorm1d):
    __doc__ = "BatchNorm over ``(N, C)`` or ``(N, C, L)`` input with frozen statistics and affine.\n" + _DOC


class FrozenBatchNorm2d(_FrozenBatchNormMixin, BatchNorm2d):
    __doc__ = "BatchNorm over ``(N, C, H, W)`` input with frozen statistics and affine.\n" + _DOC


class FrozenBatchNorm3d(_FrozenBatchNormMixin, BatchNorm3d):
    __doc__ = "BatchNorm over ``(N, C, D, H, W)`` input with frozen statistics and affine.\n" + _DOC


class _FrozenBatchNormNd(_FrozenBatchNormMixin, _BatchNormMixin, _BatchNorm):
    """A frozen layer of any input rank: what :func:`freeze` makes of a ``SyncBatchNorm``."""

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(
                f"{type(self).__name__} expected at least 2D input (got {input.dim()}D input of shape "
                f"{list(input.shape)}); it takes (N, C, *)."
            )


# What a frozen layer made by its constructor becomes on unfreeze.
_UNFROZEN_DEFAULT = {FrozenBatchNorm1d: BatchNorm1d, FrozenBatchNorm2d: BatchNorm2d, FrozenBatchNorm3d: BatchNorm3d}


def _frozen_class(layer: _BatchNorm) -> type:
    for torch_cls, frozen_cls in (
        (torch.nn.BatchNorm1d, FrozenBatchNorm1d),
        (torch.nn.BatchNorm2d, FrozenBatchNorm2d),
        (torch.nn.BatchNorm3d, FrozenBatchNorm3d),
    ):
        if isinstance(layer, torch_cls):
            return frozen_cls
    return _FrozenBatchNormNd  # SyncBatchNorm (torch's or covshift's), or another _BatchNorm subclass


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    """Freeze every BatchNorm layer in ``model`` (nested too), in place: statistics and affine fixed.

    Each ``torch.nn.modules.batchnorm._BatchNorm`` (torch's, covshift's, ``SyncBatchNorm``,
    ``BatchRenorm*``, ``GhostBatchNorm*``, your subclasses) becomes a ``FrozenBatchNorm*`` of the same
    rank that *shares* its parameter and buffer tensors; its parameters get ``requires_grad=False`` and
    it stays in eval mode whatever ``model.train()`` says. :func:`unfreeze` restores the original class,
    hyper-parameters and ``requires_grad`` flags. Already frozen layers are left as they are. Hooks stay
    registered and a layer shared by several parents stays shared (:mod:`covshift.nn.swap`).

    Returns ``model`` (or the frozen layer, when ``model`` is itself a BatchNorm layer).

    Raises:
        ValueError: a layer without running statistics (``track_running_stats=False`` at construction):
            it has no fixed statistics to freeze. Nothing in ``model`` is changed then.
    """
    for name, module in model.named_modules():  # refuse before changing anything
        if isinstance(module, _BatchNorm) and (module.running_mean is None or module.running_var is None):
            raise ValueError(
                f"freeze: {type(module).__name__} at {name or '<root>'!r} has no running statistics "
                "(track_running_stats=False at construction), so there is nothing to freeze it to. Build it "
                "with track_running_stats=True, or leave it out of the model you freeze."
            )

    def frozen(name: str, module: torch.nn.Module) -> Optional[torch.nn.Module]:
        if isinstance(module, _FrozenBatchNormMixin):
            return module  # already frozen
        if not isinstance(module, _BatchNorm):
            return None
        requires_grad = {k: p.requires_grad for k, p in module._parameters.items() if p is not None}
        layer = swap_class(module, _frozen_class(module))
        layer._unfrozen = (type(module), requires_grad)
        for p in layer._parameters.values():
            if p is not None:
                p.requires_grad_(False)
        layer.training = False
        return layer

    return replace_modules(model, frozen)


def unfreeze(model: torch.nn.Module) -> torch.nn.Module:
    """Undo :func:`freeze`, in place: every ``FrozenBatchNorm*`` in ``model`` becomes a trainable layer.

    A layer frozen by :func:`freeze` gets back its original class (so its behaviour and
    hyper-parameters) and its parameters' ``requires_grad`` flags; one built as ``FrozenBatchNorm*``
    becomes ``covshift.nn.BatchNorm*`` with its ``momentum`` and trainable parameters. Tensors (and
    hooks) are shared, not copied (:mod:`covshift.nn.swap`). Each unfrozen layer takes its parent module's train/eval mode (the mode
    ``model.train()`` / ``model.eval()`` last set); an unfrozen root layer is left in eval.

    Returns ``model`` (or the unfrozen layer, when ``model`` is itself a frozen layer).
    """
    # Each unfrozen layer takes its parent's mode; the root has no parent and stays in eval.
    parent_mode = {id(c): m.training for m in model.modules() for c in m.children()}

    def unfrozen(name: str, module: torch.nn.Module) -> Optional[torch.nn.Module]:
        if not isinstance(module, _FrozenBatchNormMixin):
            return None
        cls, requires_grad = module.__dict__.get("_unfrozen", (_UNFROZEN_DEFAULT.get(type(module)), {}))
        layer = swap_class(module, cls)
        layer.__dict__.pop("_unfrozen", None)
        for k, p in layer._parameters.items():
            if p is not None:
                p.requires_grad_(requires_grad.get(k, True))
        layer.training = parent_mode.get(id(module), False)
        return layer

    return replace_modules(model, unfrozen)
