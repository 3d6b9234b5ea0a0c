r"""``BatchRenorm1d/2d/3d``: Batch Renormalization (Ioffe 2017), on covshift's functional core."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from covshift.functional.batchnorm import acc_dtype, batch_norm, batch_stats, check_batch_size, check_eps
from covshift.nn._running import advance_running_stats
from covshift.nn.batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d

__all__ = ["BatchRenorm1d", "BatchRenorm2d", "BatchRenorm3d", "PAPER_SCHEDULE"]

#: The schedule of Ioffe 2017, section 4: ``r_max = 1, d_max = 0`` for the first 5k steps, then relaxed
#: linearly to reach ``r_max = 3`` at step 40k and ``d_max = 5`` at step 25k.
#: Use as ``BatchRenorm2d(64, **PAPER_SCHEDULE)``.
PAPER_SCHEDULE: dict[str, Any] = {
    "r_max": 3.0,
    "d_max": 5.0,
    "warmup_steps": 5_000,
    "r_relax_steps": 35_000,
    "d_relax_steps": 20_000,
}

_DOC = r"""
    Ioffe 2017, "Batch Renormalization: Towards Reducing Minibatch Dependence in Batch-Normalized
    Models" (arXiv:1702.03275). In training, with ``mu_B``, ``sigma_B = sqrt(var_B + eps)`` the batch
    statistics (biased variance) and ``mu``, ``sigma = sqrt(running_var + eps)`` the running ones:

    .. math::

        r = \mathrm{sg}\big(\mathrm{clip}_{[1/r_{max},\,r_{max}]}(\sigma_B / \sigma)\big), \qquad
        d = \mathrm{sg}\big(\mathrm{clip}_{[-d_{max},\,d_{max}]}((\mu_B - \mu) / \sigma)\big)

        \hat x = \frac{x - \mu_B}{\sigma_B}\, r + d, \qquad y = \gamma \hat x + \beta

    ``sg`` is stop-gradient: ``r`` and ``d`` are constants for the backward pass, so the layer is the
    core BatchNorm with effective affine ``gamma * r`` and ``beta + gamma * d`` (its analytic backward
    then gives ``dgamma = r * sum(dy x_hat_B) + d * sum(dy)``). ``r`` and ``d`` are computed from the
    running statistics *before* this batch updates them. When the clipping is inactive,
    ``x_hat = (x - mu) / sigma``: training sees what inference will.

    **Inference** is plain BatchNorm with the running statistics. **Running statistics** follow torch's
    rule (covshift.nn.BatchNorm*): ``running = (1 - momentum) * running + momentum * batch_stat`` with the
    *unbiased* batch variance into ``running_var`` (the paper averages ``sigma`` itself with rate
    ``alpha = 0.01``; ``momentum=0.01`` is its closest equivalent here).

    **Relaxation schedule.** The step ``t`` is ``num_batches_tracked`` before this batch (the number of
    training batches seen so far; skipped non-finite batches do not count). With ``w = warmup_steps``:

    .. math::

        r_{max}(t) = 1 + (r_{max} - 1) \min\big(1, \max(0, t - w) / \text{r\_relax\_steps}\big), \qquad
        d_{max}(t) = d_{max} \min\big(1, \max(0, t - w) / \text{d\_relax\_steps}\big)

    for ``t >= w``, and ``r_max(t) = 1, d_max(t) = 0`` (plain BatchNorm) before. A relax length of 0
    jumps to the final value at step ``w``. The defaults (``warmup_steps=0`` and no relaxation) apply
    ``r_max`` and ``d_max`` from the first step; the paper's schedule is
    ``warmup_steps=5000, r_relax_steps=35000, d_relax_steps=20000`` with ``r_max=3, d_max=5``
    (:data:`PAPER_SCHEDULE`). :meth:`limits` gives the current pair. With ``r_max=1, d_max=0`` the layer
    *is* BatchNorm (same outputs, gradients and running statistics, bit for bit).

    **Checkpointing.** Under ``torch.utils.checkpoint`` the running statistics are updated by the forward
    and again by its recomputation, as torch's BatchNorm does; the recomputation therefore forms ``r`` and
    ``d`` from statistics one update newer than the first pass did, so gradients differ from an
    un-checkpointed step by that update (none while ``r_max = 1, d_max = 0``).

    State: torch's BatchNorm parameters and buffers, so a checkpoint loads into ``torch.nn.BatchNorm*``
    (for inference) and back with ``strict=True``.

    The positional arguments are torch's, in torch's order; everything covshift adds is keyword-only,
    so ``BatchRenorm2d(*args)`` accepts exactly what ``torch.nn.BatchNorm2d(*args)`` does.

    Args:
        num_features: ``C``, the number of channels.
        eps: added to the variances. Default ``1e-5``.
        momentum: running-average factor, or ``None`` for a cumulative average. Default ``0.1``.
        affine: learnable ``weight`` (``gamma``) and ``bias`` (``beta``). Default ``True``.
        track_running_stats: as ``torch.nn.BatchNorm*``. Renormalization needs the running statistics:
            without them (``False`` at construction) the layer is plain BatchNorm. Default ``True``.
        device, dtype: as ``torch.nn.BatchNorm*``.
        bias: keyword-only, as ``torch.nn.BatchNorm*``: with ``affine=True``, whether ``beta`` exists.
        r_max: keyword-only; final bound of ``r``, ``>= 1``. Default ``3.0``.
        d_max: keyword-only; final bound of ``|d|``, ``>= 0``. Default ``5.0``.
        warmup_steps: keyword-only; training steps run as plain BatchNorm (``r_max = 1, d_max = 0``).
            Default ``0``.
        r_relax_steps: keyword-only; steps after the warmup over which ``r_max`` grows linearly from 1.
            Default ``0``.
        d_relax_steps: keyword-only; steps after the warmup over which ``d_max`` grows linearly from 0.
            Default ``0``.
        skip_nonfinite: keyword-only; a training batch with NaN or inf does not update the running
            statistics (nor the schedule's step), with a :class:`covshift.nn.NonFiniteBatchWarning`.

    Raises:
        ValueError: ``r_max < 1``, ``d_max < 0``, a negative step count; in the forward, ``eps <= 0`` in
            training or ``eps < 0`` in eval (as torch); and as ``covshift.nn.BatchNorm*`` for the input
            (rank, one value per channel, channel count).
"""


def _check_nonneg_int(owner: str, name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{owner} expected {name} to be an int >= 0, got {value!r}.")


class _BatchRenormMixin:
    """The Batch Renormalization forward, shared by BatchRenorm1d/2d/3d. Placed first in the MRO."""

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
        r_max: float = 3.0,
        d_max: float = 5.0,
        warmup_steps: int = 0,
        r_relax_steps: int = 0,
        d_relax_steps: int = 0,
        skip_nonfinite: bool = False,
    ) -> None:
        owner = type(self).__name__
        if not r_max >= 1.0:
            raise ValueError(f"{owner} expected r_max >= 1 (r is clipped to [1/r_max, r_max]), got {r_max!r}.")
        if not d_max >= 0.0:
            raise ValueError(f"{owner} expected d_max >= 0 (d is clipped to [-d_max, d_max]), got {d_max!r}.")
        for name, value in (("warmup_steps", warmup_steps), ("r_relax_steps", r_relax_steps), ("d_relax_steps", d_relax_steps)):
            _check_nonneg_int(owner, name, value)
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias, skip_nonfinite=skip_nonfinite
        )
        self.r_max = float(r_max)
        self.d_max = float(d_max)
        self.warmup_steps = warmup_steps
        self.r_relax_steps = r_relax_steps
        self.d_relax_steps = d_relax_steps

    def extra_repr(self) -> str:
        s = super().extra_repr() + f", r_max={self.r_max}, d_max={self.d_max}"
        if self.warmup_steps or self.r_relax_steps or self.d_relax_steps:
            s += f", warmup_steps={self.warmup_steps}, r_relax_steps={self.r_relax_steps}, d_relax_steps={self.d_relax_steps}"
        return s

    def limits(self, step: Optional[int] = None) -> tuple[float, float]:
        """``(r_max(t), d_max(t))`` at ``step`` (default: the current step, ``num_batches_tracked``)."""
        if step is None:
            step = 0 if self.num_batches_tracked is None else int(self.num_batches_tracked)
        if step < self.warmup_steps:
            return 1.0, 0.0
        t = step - self.warmup_steps
        r_frac = min(1.0, t / self.r_relax_steps) if self.r_relax_steps else 1.0
        d_frac = min(1.0, t / self.d_relax_steps) if self.d_relax_steps else 1.0
        return 1.0 + (self.r_max - 1.0) * r_frac, self.d_max * d_frac

    def _current_limits(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """:meth:`limits` at the current step, as 0-dim tensors of ``dtype``: the step counter is never
        read on the host, so a training step costs no device sync and ``torch.compile`` no graph break."""
        t = (self.num_batches_tracked - self.warmup_steps).double()  # < 0 while warming up
        warm = t >= 0
        one = torch.ones_like(t)
        r_frac = (t / self.r_relax_steps).clamp(0.0, 1.0) if self.r_relax_steps else one
        d_frac = (t / self.d_relax_steps).clamp(0.0, 1.0) if self.d_relax_steps else one
        r_lim = torch.where(warm, 1.0 + (self.r_max - 1.0) * r_frac, one)
        d_lim = torch.where(warm, self.d_max * d_frac, torch.zeros_like(t))
        return r_lim.to(dtype), d_lim.to(dtype)

    def forward(self, input: Tensor) -> Tensor:
        if isinstance(input, torch.fx.Proxy):  # torch.fx.symbolic_trace: a leaf module, as the plain layers
            return super().forward(input)
        self._check_input_dim(input)
        self._check_channels(input)
        check_eps(self.eps, self.training)
        if not self.training or self.running_mean is None or self.running_var is None or input.numel() == 0:
            return super().forward(input)  # plain BatchNorm: inference, or no running statistics to correct by
        check_batch_size(input)
        acc = acc_dtype(input.dtype)
        r_lim, d_lim = self._current_limits(acc)  # before this batch counts
        with torch.no_grad():  # r and d are constants for the backward (stop-gradient)
            mean, var = batch_stats(input.detach())
            invstd = torch.rsqrt(var + self.eps)
            # A copy of the running statistics before this batch updates them, made by a reduction (a sum
            # over a length-1 axis): torch.compile's partitioners recompute pointwise ops and copies in the
            # backward from the graph's inputs, which by then hold the *updated* buffers (a silently wrong
            # dgamma); a reduction's output is saved instead. (2, C): running mean, running variance.
            running = torch.stack([self.running_mean.to(acc), self.running_var.to(acc)]).unsqueeze(0).sum(0)
            running_invstd = torch.rsqrt(running[1] + self.eps)
            r = torch.clamp(running_invstd / invstd, 1.0 / r_lim, r_lim)  # sigma_B / sigma, (C,)
            d = torch.clamp((mean - running[0]) * running_invstd, -d_lim, d_lim)  # (C,)
        # Before normalizing, as torch's kernel does: a checkpointed forward that stops recomputing once
        # the normalization has saved its tensors then updates twice per step, exactly as torch's layer.
        if self.track_running_stats and not self._nonfinite_batch(input):
            advance_running_stats(self, mean, var, input.numel() // input.shape[1])
        if self.weight is None:  # gamma = 1, beta = 0
            weight, bias = r, d
        else:  # gamma * (x_hat_B * r + d) + beta; autograd gives dgamma = r sum(dy x_hat_B) + d sum(dy)
            weight = self.weight * r.to(self.weight.dtype)
            bias = self.weight * d.to(self.weight.dtype)
            bias = bias if self.bias is None else self.bias + bias
        # Batch statistics, no running buffers: the core normalizes with (mean, var) of this batch again.
        return batch_norm(input, None, None, weight, bias, True, 0.0, self.eps)


class BatchRenorm1d(_BatchRenormMixin, BatchNorm1d):
    __doc__ = "Batch Renormalization over 2D ``(N, C)`` or 3D ``(N, C, L)`` input.\n" + _DOC


class BatchRenorm2d(_BatchRenormMixin, BatchNorm2d):
    __doc__ = "Batch Renormalization over 4D ``(N, C, H, W)`` input.\n" + _DOC


class BatchRenorm3d(_BatchRenormMixin, BatchNorm3d):
    __doc__ = "Batch Renormalization over 5D ``(N, C, D, H, W)`` input.\n" + _DOC
