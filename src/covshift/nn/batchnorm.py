r"""``BatchNorm1d/2d/3d``: drop-in replacements for ``torch.nn.BatchNorm*`` on covshift's own maths.

Each class subclasses its torch counterpart, so the constructor, defaults, parameters, buffers,
``state_dict`` keys, ``reset_parameters``, ``reset_running_stats``, ``extra_repr`` and every
``isinstance(m, torch.nn.BatchNorm2d)`` check in user code stay exactly torch's. Only
``forward`` is replaced: it runs :func:`covshift.functional.batch_norm` (the formula with an
analytic backward) instead of ATen's kernel, and checks its input with clearer errors.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import Tensor

from covshift.functional.batchnorm import ChannelMismatchError, batch_norm, run
from covshift.nn._running import count_batch
from covshift.ops import dispatch

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "NonFiniteBatchWarning"]


class NonFiniteBatchWarning(RuntimeWarning):
    """A training batch held NaN or inf, so the running statistics were left as they were."""

_MATH_DOC = r"""
    .. math:: y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} * \gamma + \beta

    Ioffe & Szegedy 2015 (arXiv:1502.03167). Mean and variance are per channel (dim 1), over
    every other axis. ``gamma`` (``weight``, ones) and ``beta`` (``bias``, zeros) exist when
    ``affine=True``.

    **Which variance where.** Training normalizes with the *biased* batch variance
    ``(1/m) sum (x - mu)^2``; the running estimate receives the *unbiased* one, ``* m/(m-1)``.

    **Momentum rule.** In training with ``track_running_stats=True``, ``num_batches_tracked += 1`` and
    ``running = (1 - momentum) * running + momentum * batch_stat``. ``momentum=None`` uses
    ``1/num_batches_tracked``: a plain cumulative average, each batch weighted equally. (Keras'
    ``momentum=0.99`` is torch's and covshift's ``momentum=0.01``.)

    **Modes.** ``.eval()`` normalizes with the running statistics and updates nothing. With
    ``track_running_stats=False`` at construction the buffers are ``None`` and batch statistics are
    used in training *and* eval; set to ``False`` later, training uses batch statistics without
    updating the buffers and eval still uses them.

    An empty batch (``N = 0``) returns an empty tensor and leaves the statistics untouched. The output
    keeps the input's dtype and memory format (``channels_last`` stays ``channels_last``); float16 and
    bfloat16 input work with float32 parameters and float32 statistics.

    Args:
        num_features: ``C``, the number of channels.
        eps: added to the variance. Default ``1e-5``.
        momentum: running-average factor, or ``None`` for a cumulative average. Default ``0.1``.
        affine: learnable ``weight`` and ``bias``. Default ``True``.
        track_running_stats: keep ``running_mean``, ``running_var`` and ``num_batches_tracked``.
            Default ``True``.
        skip_nonfinite: keyword-only, covshift's addition. When ``True``, a training batch that
            holds NaN or inf is still normalized with its own statistics, but it does *not* update
            ``running_mean``, ``running_var`` or ``num_batches_tracked``, and a
            :class:`NonFiniteBatchWarning` says so. One bad batch (common under mixed precision, where
            the optimizer skips the step but BN has already updated) would otherwise poison the running
            statistics for good. Costs one pass over the input and one host sync per training step.
            Default ``False``.
"""


class _BatchNormMixin:
    """The covshift forward shared by BatchNorm1d/2d/3d. Placed first in the MRO."""

    _ranks: tuple[int, ...]
    _shape_hint: str
    skip_nonfinite: bool = False  # class default, so layers converted from torch's have it too

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
        skip_nonfinite: bool = False,
    ) -> None:
        # torch's parameters, in torch's order; covshift's own option is keyword-only, after them
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias)
        self.skip_nonfinite = skip_nonfinite

    def extra_repr(self) -> str:
        base = super().extra_repr()
        return base + ", skip_nonfinite=True" if self.skip_nonfinite else base

    def _nonfinite_batch(self, input: Tensor) -> bool:
        """Whether the guard must skip this batch's statistics update (warns when it does)."""
        if not (self.skip_nonfinite and self.training and self.track_running_stats):
            return False
        if bool(torch.isfinite(input).all()):
            return False
        warnings.warn(
            f"{type(self).__name__}({self.num_features}): the batch holds NaN or inf; its statistics were "
            "not added to running_mean/running_var (skip_nonfinite=True).",
            NonFiniteBatchWarning,
            stacklevel=3,
        )
        return True

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() not in self._ranks:
            expected = " or ".join(f"{r}D" for r in self._ranks)
            raise ValueError(  # torch's type for this; InputRankError is for input below 2D
                f"{type(self).__name__} expected {expected} input (got {input.dim()}D input of shape "
                f"{list(input.shape)}); it takes {self._shape_hint}."
            )

    def _check_channels(self, input: Tensor) -> None:
        if input.shape[1] != self.num_features:
            raise ChannelMismatchError(
                f"{type(self).__name__}({self.num_features}) expects {self.num_features} channels at dim 1, "
                f"got {input.shape[1]} (input shape {list(input.shape)}). Build the layer with "
                f"num_features={input.shape[1]}, or fix the layer that feeds it."
            )

    def __prepare_scriptable__(self):
        # torch.jit.script calls this on every submodule before compiling it.
        raise RuntimeError(
            f"torch.jit.script cannot compile covshift's {type(self).__name__}: its forward calls covshift's "
            "Python dispatch and C++ operator, which TorchScript does not see. Script a copy that runs "
            "torch's layer instead: covshift.nn.convert(model, to='torch') (same tensors), or capture the "
            "model with torch.jit.trace, torch.compile or torch.export, which all run covshift's kernel."
        )

    def forward(self, input: Tensor) -> Tensor:
        if isinstance(input, torch.fx.Proxy):
            # torch.fx.symbolic_trace: be a leaf module, as torch.nn's own layers are to FX's tracers, so
            # the graph calls this layer (its mode, buffers and checks at run time) instead of inlining
            # one mode's trace of its Python.
            return input.tracer.create_proxy("call_module", input.tracer.path_of_module(self), (input,), {})
        self._check_input_dim(input)  # always called: subclasses override it, as with torch's layers
        if input.shape[1] != self.num_features:
            self._check_channels(input)  # raises
        if self.skip_nonfinite and self._nonfinite_batch(input):
            return batch_norm(input, None, None, self.weight, self.bias, True, 0.0, self.eps)
        # Mirrors torch.nn.modules.batchnorm._BatchNorm.forward, so behaviour matches case by case; each
        # attribute is read once (buffers and parameters go through Module.__getattr__, ~0.3 us a read).
        if self.training:
            use_batch_stats = True
            if self.track_running_stats:  # the factor only matters when the buffers are updated
                momentum = count_batch(self)
                running_mean, running_var = self.running_mean, self.running_var
            else:  # batch statistics, buffers untouched
                momentum, running_mean, running_var = 0.0, None, None
        else:  # eval reads the buffers if they exist; batch statistics if there are none
            momentum, running_mean, running_var = 0.0, self.running_mean, self.running_var
            use_batch_stats = running_mean is None and running_var is None
        weight, bias, eps = self.weight, self.bias, self.eps
        if (
            eps > 0
            and input.numel() > input.shape[1]  # more than one value per channel
            and dispatch.eager_float32(input, running_mean, running_var, weight, bias)
        ):
            # Everything batch_norm() would validate is known good here: skip straight to the kernel.
            return run(input, running_mean, running_var, weight, bias, use_batch_stats, momentum, eps, eager_float32=True)
        return batch_norm(input, running_mean, running_var, weight, bias, use_batch_stats, momentum, eps)


class BatchNorm1d(_BatchNormMixin, torch.nn.BatchNorm1d):
    __doc__ = (
        "Batch Normalization over 2D ``(N, C)`` or 3D ``(N, C, L)`` input; a drop-in for "
        "``torch.nn.BatchNorm1d``.\n" + _MATH_DOC
    )
    _ranks = (2, 3)
    _shape_hint = "(N, C) or (N, C, L); use BatchNorm2d for (N, C, H, W)"


class BatchNorm2d(_BatchNormMixin, torch.nn.BatchNorm2d):
    __doc__ = (
        "Batch Normalization over 4D ``(N, C, H, W)`` input; a drop-in for ``torch.nn.BatchNorm2d``.\n"
        + _MATH_DOC
    )
    _ranks = (4,)
    _shape_hint = "(N, C, H, W); use BatchNorm1d for (N, C) or (N, C, L), BatchNorm3d for (N, C, D, H, W)"


class BatchNorm3d(_BatchNormMixin, torch.nn.BatchNorm3d):
    __doc__ = (
        "Batch Normalization over 5D ``(N, C, D, H, W)`` input; a drop-in for ``torch.nn.BatchNorm3d``.\n"
        + _MATH_DOC
    )
    _ranks = (5,)
    _shape_hint = "(N, C, D, H, W); use BatchNorm2d for (N, C, H, W)"
