r"""``fuse_bn``: fold inference-mode BatchNorm into the Linear or Conv layer before it."""

from __future__ import annotations

import copy
from typing import Optional, Sequence, Union

import torch
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["fuse_bn"]

_Foldable = Union[torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d]
_FOLDABLE = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)


def _out_features(layer: _Foldable) -> int:
    return layer.out_features if isinstance(layer, torch.nn.Linear) else layer.out_channels


def _why_not(layer: torch.nn.Module, bn: torch.nn.Module) -> Optional[str]:
    """``None`` when ``bn`` folds into ``layer``; otherwise the reason, for an error message."""
    if not isinstance(layer, _FOLDABLE):
        return f"the first module is a {type(layer).__name__}, not a Linear or Conv1d/2d/3d"
    if not isinstance(bn, _BatchNorm):
        return f"the second module is a {type(bn).__name__}, not a BatchNorm layer"
    if bn.running_mean is None or bn.running_var is None:
        return "the BatchNorm has no running statistics (track_running_stats=False), so it normalizes with batch statistics"
    if _out_features(layer) != bn.num_features:
        return f"{type(layer).__name__} has {_out_features(layer)} output channels but the BatchNorm has {bn.num_features}"
    return None


@torch.no_grad()
def _fold(layer: _Foldable, bn: _BatchNorm) -> None:
    """Fold ``bn`` into ``layer`` in place, computing in float64."""
    w = layer.weight.double()
    scale = torch.rsqrt(bn.running_var.double() + bn.eps)  # 1/sqrt(rv + eps)
    if bn.weight is not None:
        scale = scale * bn.weight.double()  # gamma/sqrt(rv + eps)
    b = layer.bias.double() if layer.bias is not None else torch.zeros_like(scale)
    new_b = (b - bn.running_mean.double()) * scale
    if bn.bias is not None:
        new_b = new_b + bn.bias.double()
    layer.weight.copy_(w * scale.reshape(-1, *([1] * (w.dim() - 1))))  # per output channel (dim 0)
    if layer.bias is None:
        layer.bias = torch.nn.Parameter(new_b.to(layer.weight.dtype), requires_grad=layer.weight.requires_grad)
    else:
        layer.bias.copy_(new_b)


def _sequential_pairs(model: torch.nn.Module) -> list[tuple[str, str]]:
    pairs = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Sequential):
            children = list(module.named_children())
            for (a, first), (b, second) in zip(children, children[1:]):
                if _why_not(first, second) is None:
                    prefix = f"{name}." if name else ""
                    pairs.append((prefix + a, prefix + b))
    return pairs


def _set_submodule(model: torch.nn.Module, name: str, new: torch.nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def fuse_bn(model: torch.nn.Module, pairs: Optional[Sequence[tuple[str, str]]] = None) -> torch.nn.Module:
    r"""An inference copy of ``model`` with each BatchNorm folded into the Linear or Conv before it.

    In eval, BatchNorm is one affine map per channel, so it merges into the preceding layer's weights:

    .. math::

        W' = W \cdot \frac{\gamma}{\sqrt{\hat\sigma^2 + \epsilon}}, \qquad
        b' = (b - \hat\mu)\,\frac{\gamma}{\sqrt{\hat\sigma^2 + \epsilon}} + \beta

    per output channel (dim 0 of ``W``; a layer without bias gets one), with ``running_mean`` (``mu``),
    ``running_var`` (``sigma^2``), ``gamma = 1`` and ``beta = 0`` when not affine. The BatchNorm is then
    replaced by ``torch.nn.Identity``. Computed in float64 and stored in the layer's dtype; the copy's
    output equals the eval-mode original up to rounding.

    Which pairs: every ``Linear``/``Conv1d``/``Conv2d``/``Conv3d`` directly followed by a BatchNorm layer
    (any ``torch.nn.modules.batchnorm._BatchNorm``: torch's, covshift's, frozen, renorm, ghost) with
    running statistics and a matching channel count, inside any ``torch.nn.Sequential`` (nested too); and
    the ``pairs`` you give as ``(layer_name, bn_name)`` dotted names from ``model.named_modules()``, for
    models whose forward is not a Sequential. Only give a pair when the BatchNorm takes the layer's output
    and nothing else does. A Linear pair assumes 2D ``(N, C)`` activations (the BatchNorm's channel axis
    is the Linear's output axis).

    The original model is not modified.

    Raises:
        ValueError: ``model`` or one of its modules is in training mode (the running statistics are what
            gets folded, and training-mode BatchNorm would not use them); a given pair does not fold.
    """
    training = [name or "<root>" for name, m in model.named_modules() if m.training]
    if training:
        raise ValueError(
            f"fuse_bn folds inference-mode BatchNorm, but {len(training)} module(s) are in training mode "
            f"({', '.join(training[:5])}{', ...' if len(training) > 5 else ''}). Call model.eval() first."
        )
    modules = dict(model.named_modules())
    for first, second in pairs or ():
        missing = [n for n in (first, second) if n not in modules]
        if missing:
            raise ValueError(f"fuse_bn: no module named {missing[0]!r} in the model; pairs take dotted names "
                             "from model.named_modules(), e.g. ('conv1', 'bn1').")
        reason = _why_not(modules[first], modules[second])
        if reason is not None:
            raise ValueError(f"fuse_bn cannot fold {second!r} into {first!r}: {reason}.")
    # Process groups and similar handles cannot be deep-copied: share them.
    memo = {id(m.process_group): m.process_group for m in model.modules() if getattr(m, "process_group", None) is not None}
    fused = copy.deepcopy(model, memo)
    todo = list(dict.fromkeys([*_sequential_pairs(fused), *(tuple(p) for p in pairs or ())]))
    for side in (0, 1):
        names = [pair[side] for pair in todo]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"fuse_bn: {twice[0]!r} would be folded twice (it is in more than one pair); "
                             "give each layer and each BatchNorm in one pair only.")
    for first, second in todo:
        _fold(fused.get_submodule(first), fused.get_submodule(second))
        _set_submodule(fused, second, torch.nn.Identity())
    return fused
