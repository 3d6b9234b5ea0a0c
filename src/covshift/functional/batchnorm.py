r"""Batch Normalization from its formula, with an analytic backward pass.

Ioffe & Szegedy 2015, "Batch Normalization: Accelerating Deep Network Training by Reducing
Internal Covariate Shift" (arXiv:1502.03167), Algorithm 1. For each channel ``c`` the statistics
run over every axis except axis 1 (``N`` for ``(N, C)``; ``N, L`` / ``N, H, W`` / ``N, D, H, W``
for conv input), so ``m = numel / C`` values per channel:

.. math::

    \mu = \frac1m \sum x, \qquad
    \sigma^2 = \frac1m \sum (x - \mu)^2 \quad\text{(biased: used to normalize)}

    \hat x = (x - \mu)\,/\sqrt{\sigma^2 + \epsilon}, \qquad y = \gamma \hat x + \beta

Backward (sums over the same axes, ``invstd = 1/sqrt(var + eps)``):

.. math::

    \partial\beta = \sum dy, \qquad \partial\gamma = \sum dy\,\hat x, \qquad
    dx = \frac{\gamma\,\mathrm{invstd}}{m}\,\big(m\,dy - \partial\beta - \hat x\,\partial\gamma\big)

The module is a functional core: small pure functions (:func:`batch_stats`, :func:`normalize`,
:func:`backward_reduce`, :func:`backward_elemt`, :func:`update_running_stats`) that every covshift
normalization layer composes, and one :class:`BatchNormFunction` that wires them into autograd.
None of them calls ATen's batch-norm kernels. They are the readable reference: on CPU float32,
:func:`batch_norm` runs the same maths in a fused C++ kernel (:mod:`covshift.functional._fast`,
chosen with ``covshift.functional.set_backend``), and falls back to this code wherever that cannot run.

Numerics, decided here once for every layer:

* statistics accumulate in float32 for float16/bfloat16/float32 input and float64 for float64 input;
* the variance is two-pass (the mean, then the mean of squared deviations), never
  ``E[x^2] - E[x]^2``, which cancels catastrophically when ``|mean| >> std``;
* ``(x - mean)`` is formed before scaling, rather than folding ``x * alpha + beta``, for the same reason.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from covshift.functional import _fast

__all__ = [
    "batch_norm",
    "batch_stats",
    "normalize",
    "centered",
    "backward_reduce",
    "backward_elemt",
    "update_running_stats",
    "check_batch_size",
    "BatchNormFunction",
    "ChannelMismatchError",
]


class ChannelMismatchError(ValueError, RuntimeError):
    """The input's channel count (dim 1) differs from the layer's ``num_features``.

    A ``ValueError`` (bad user input) that is also a ``RuntimeError``, the type torch raises
    for the same mistake, so code written against either keeps working.
    """


def reduce_dims(input: Tensor) -> list[int]:
    """The axes statistics run over: every axis but the channel axis 1."""
    return [0, *range(2, input.dim())]


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half, bfloat16 and float32 input; float64 for float64 input."""
    return torch.promote_types(dtype, torch.float32)


def _channel_view(t: Tensor, ndim: int) -> Tensor:
    # (C,) -> (1, C, 1, ..., 1) so that it broadcasts against (N, C, *spatial)
    return t.reshape(1, -1, *([1] * (ndim - 2)))


def check_batch_size(input: Tensor) -> None:
    """Training needs at least two values per channel, or the variance is zero by construction."""
    size = input.shape
    values = size[0]
    for s in size[2:]:
        values *= s
    if values == 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size {size}; "
            "batch statistics of a single value are meaningless. Use a batch larger than 1, "
            "or call .eval() to normalize with the running statistics."
        )


def batch_stats(input: Tensor) -> tuple[Tensor, Tensor]:
    r"""Per-channel batch mean and *biased* variance, two-pass, accumulated in float32 or wider.

    .. math:: \mu_c = \frac1m \sum x_c, \qquad \sigma_c^2 = \frac1m \sum (x_c - \mu_c)^2

    The second pass sums squared *deviations*, so nothing cancels when ``|mean| >> std``
    (unlike ``E[x^2] - E[x]^2``); torch's sums are cascaded, which keeps the rounding error of
    each pass small for large ``m``.

    Args:
        input: ``(N, C, *)``.

    Returns:
        ``(mean, var)``, each ``(C,)`` in ``acc_dtype(input.dtype)``. Differentiable, so the
        double-backward pass can recompute them with a graph.
    """
    acc = acc_dtype(input.dtype)
    dims = reduce_dims(input)
    count = max(input.numel() // max(input.shape[1], 1), 1)
    mean = input.sum(dims, dtype=acc) / count
    xmu = input.to(acc) - _channel_view(mean, input.dim())
    var = (xmu * xmu).sum(dims) / count
    return mean, var


def normalize(
    input: Tensor,
    mean: Tensor,
    invstd: Tensor,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
) -> Tensor:
    r"""``y = (x - mean) * invstd * weight + bias``, per channel, in the input's dtype and layout.

    ``(x - mean)`` is formed first, in the accumulation dtype, so that a large ``|mean|``
    does not cancel against ``bias`` the way the folded ``x * alpha + beta`` form does.
    """
    acc = acc_dtype(input.dtype)
    n = input.dim()
    scale = invstd.to(acc) if weight is None else invstd.to(acc) * weight.to(acc)
    y = input.to(acc) - _channel_view(mean.to(acc), n)  # new tensor, same memory format as input
    if bias is None:
        y.mul_(_channel_view(scale, n))
    else:
        y = torch.addcmul(_channel_view(bias.to(acc), n), y, _channel_view(scale, n))
    return y.to(input.dtype)


def centered(input: Tensor, mean: Tensor) -> Tensor:
    """``x - mean`` per channel, in the accumulation dtype and the input's memory format."""
    return input.to(acc_dtype(input.dtype)) - _channel_view(mean.to(acc_dtype(input.dtype)), input.dim())


def backward_reduce(
    grad_output: Tensor, input: Tensor, mean: Tensor, invstd: Tensor, *, xmu: Optional[Tensor] = None
) -> tuple[Tensor, Tensor]:
    r"""The two per-channel reductions of the backward pass.

    Returns ``sum_dy = sum(dy)`` and ``sum_dy_xmu = sum(dy * (x - mean))``, each ``(C,)`` in the
    accumulation dtype. ``dbeta = sum_dy`` and ``dgamma = sum_dy_xmu * invstd``. These are the
    quantities a synchronized BatchNorm all-reduces across processes. ``xmu``, if given, is
    :func:`centered` ``(input, mean)`` computed once and shared with :func:`backward_elemt`.
    """
    acc = acc_dtype(input.dtype)
    dims = reduce_dims(input)
    if xmu is None:
        xmu = centered(input, mean)
    return grad_output.sum(dims, dtype=acc), (grad_output.to(acc) * xmu).sum(dims)


def backward_elemt(
    grad_output: Tensor,
    input: Tensor,
    mean: Tensor,
    invstd: Tensor,
    weight: Optional[Tensor],
    sum_dy: Tensor,
    sum_dy_xmu: Tensor,
    count: Union[int, float, Tensor],
    *,
    xmu: Optional[Tensor] = None,
) -> Tensor:
    r"""Input gradient of training-mode BatchNorm, the analytic formula.

    .. math::

        dx = \frac{\gamma\,\mathrm{invstd}}{m}\big(m\,dy - \textstyle\sum dy
             - \hat x \sum dy\,\hat x\big)
           = k\,dy - k\,a - k\,b\,(x - \mu),

    with ``k = gamma * invstd``, ``a = sum_dy / m`` and ``b = invstd^2 * sum_dy_xmu / m``. ``count``
    is ``m``, the number of values per channel over the *whole* batch (the global batch, for a
    synchronized BatchNorm). ``xmu`` (see :func:`backward_reduce`) is overwritten when given.
    """
    acc = acc_dtype(input.dtype)
    n = input.dim()
    inv_m = 1.0 / count
    invstd = invstd.to(acc)
    k = invstd if weight is None else invstd * weight.to(acc)
    shift = _channel_view(-k * sum_dy * inv_m, n)  # -k a
    slope = _channel_view(-k * invstd * invstd * sum_dy_xmu * inv_m, n)  # -k b
    if xmu is None:
        xmu = centered(input, mean)
    if torch.is_grad_enabled():  # double backward: out of place, so the graph stays intact
        dx = xmu * slope + grad_output.to(acc) * _channel_view(k, n) + shift
    else:  # three in-place passes over one buffer: (x - mu) * (-k b) + dy * k + (-k a)
        dx = xmu.mul_(slope).addcmul_(grad_output.to(acc), _channel_view(k, n)).add_(shift)
    return dx.to(input.dtype)


@torch.no_grad()
def update_running_stats(
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    mean: Tensor,
    var: Tensor,
    count: Union[int, float],
    momentum: float,
) -> None:
    r"""In-place exponential moving average of the batch statistics.

    .. math::

        \hat\mu \leftarrow (1 - m)\,\hat\mu + m\,\mu_B, \qquad
        \hat\sigma^2 \leftarrow (1 - m)\,\hat\sigma^2 + m\,\sigma_B^2\,\frac{n}{n-1}

    ``m`` is ``momentum`` (the caller passes ``1/num_batches_tracked`` for a cumulative average)
    and ``n = count``: the running variance receives the *unbiased* batch variance, while
    normalization uses the biased one.
    """
    if running_mean is not None:
        running_mean.mul_(1.0 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
    if running_var is not None:
        unbiased = var * (count / (count - 1)) if count > 1 else var
        running_var.mul_(1.0 - momentum).add_(unbiased.to(running_var.dtype), alpha=momentum)


class BatchNormFunction(torch.autograd.Function):
    r"""Autograd wiring of the core: forward is :func:`normalize`, backward is the analytic formula.

    ``mean`` and ``invstd`` are given, computed without a graph; in training the backward accounts
    for their dependence on ``input`` analytically (:func:`backward_elemt`). Double backward is
    supported: when the backward itself runs with grad enabled (``create_graph=True``) it recomputes
    the statistics from ``input`` with a graph, so that every term stays differentiable.
    """

    @staticmethod
    def forward(ctx, input, weight, bias, mean, invstd, training: bool, eps: float):
        ctx.save_for_backward(input, weight, mean, invstd)
        ctx.training = training
        ctx.eps = eps
        ctx.bias_dtype = None if bias is None else bias.dtype
        return normalize(input, mean, invstd, weight, bias)

    @staticmethod
    def backward(ctx, grad_output):
        input, weight, mean, invstd = ctx.saved_tensors
        if ctx.training and torch.is_grad_enabled():
            mean, var = batch_stats(input)
            invstd = torch.rsqrt(var + ctx.eps)
        need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_input = grad_weight = grad_bias = None
        if not (need_input or need_weight or need_bias):
            return None, None, None, None, None, None, None
        if input.numel() == 0:
            # An empty batch has no statistics; its gradients are empty or zero.
            grad_input = torch.zeros_like(input) if need_input else None
            zeros = torch.zeros(input.shape[1], dtype=acc_dtype(input.dtype), device=input.device)
            sum_dy = sum_dy_xmu = zeros
        else:
            xmu = centered(input, mean)
            sum_dy, sum_dy_xmu = backward_reduce(grad_output, input, mean, invstd, xmu=xmu)
            if need_input and ctx.training:
                m = input.numel() // input.shape[1]
                grad_input = backward_elemt(
                    grad_output, input, mean, invstd, weight, sum_dy, sum_dy_xmu, m, xmu=xmu
                )
            elif need_input:
                # Inference: y is affine in x, dx = dy * gamma * invstd.
                acc = acc_dtype(input.dtype)
                k = invstd.to(acc) if weight is None else invstd.to(acc) * weight.to(acc)
                grad_input = (grad_output.to(acc) * _channel_view(k, input.dim())).to(input.dtype)
        if need_weight:
            grad_weight = (sum_dy_xmu * invstd.to(sum_dy_xmu.dtype)).to(weight.dtype)
        if need_bias:
            grad_bias = sum_dy.to(ctx.bias_dtype)
        return grad_input, grad_weight, grad_bias, None, None, None, None


def _check_channels(name: str, t: Optional[Tensor], channels: int, where: str) -> None:
    if t is not None and t.numel() != channels:
        raise ChannelMismatchError(
            f"{where}: {name} has {t.numel()} elements but the input has {channels} channels (dim 1); "
            f"they must match. Give {name} one entry per channel."
        )


def batch_norm(
    input: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    r"""Batch Normalization, a drop-in for :func:`torch.nn.functional.batch_norm`.

    .. math:: y = \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}} \gamma + \beta

    In training, ``mu`` and ``sigma^2`` are the batch's per-channel mean and biased variance, and
    the running buffers (when given) are updated in place:
    ``running = (1 - momentum) * running + momentum * batch_stat``, with the *unbiased* variance
    going into ``running_var``. Otherwise the running buffers are used and nothing is updated.
    The output keeps the input's dtype and memory format; float16/bfloat16 input works with float32
    parameters and statistics.

    Args:
        input: ``(N, C, *)``.
        running_mean, running_var: ``(C,)`` buffers, or ``None`` (required when ``training=False``).
        weight, bias: ``(C,)`` affine parameters ``gamma`` and ``beta``, or ``None``.
        training: use batch statistics (and update the running buffers).
        momentum: the running-average factor; pass ``1 / num_batches_tracked`` for a cumulative average.
        eps: added to the variance for numerical stability.

    Raises:
        ValueError: input of fewer than 2 dimensions; one value per channel in training; no running
            statistics in inference.
        ChannelMismatchError: a ``(C,)`` argument of the wrong size.
    """
    if input.dim() < 2:
        raise ValueError(
            f"batch_norm expected input of shape (N, C, *) with at least 2 dimensions, "
            f"got {input.dim()}D input of shape {list(input.shape)}. Add a batch dimension with input.unsqueeze(0)."
        )
    channels = input.shape[1]
    for name, t in (("running_mean", running_mean), ("running_var", running_var), ("weight", weight), ("bias", bias)):
        _check_channels(name, t, channels, "batch_norm")
    if momentum is None:
        raise ValueError(
            "batch_norm got momentum=None; the functional form needs a number. "
            "For a cumulative average pass momentum=1/num_batches_tracked (the modules do this for you)."
        )
    acc = acc_dtype(input.dtype)
    if training:
        check_batch_size(input)
        if _fast.accepts(input, running_mean, running_var, weight, bias):  # fused C++ kernel, same maths
            return _fast.batch_norm(input, running_mean, running_var, weight, bias, True, momentum, eps)
        if input.numel() == 0:
            # N = 0: nothing to normalize, and the running statistics stay as they are.
            mean = torch.zeros(channels, dtype=acc, device=input.device)
            invstd = torch.ones(channels, dtype=acc, device=input.device)
        else:
            with torch.no_grad():
                mean, var = batch_stats(input.detach())
                update_running_stats(running_mean, running_var, mean, var, input.numel() // channels, momentum)
                invstd = torch.rsqrt(var + eps)
    else:
        if running_mean is None or running_var is None:
            raise ValueError(
                "batch_norm with training=False needs running_mean and running_var, got None. "
                "Pass the running statistics, or training=True to use batch statistics."
            )
        if _fast.accepts(input, running_mean, running_var, weight, bias):
            return _fast.batch_norm(input, running_mean, running_var, weight, bias, False, momentum, eps)
        mean = running_mean.detach().to(acc)
        invstd = torch.rsqrt(running_var.detach().to(acc) + eps)
    return BatchNormFunction.apply(input, weight, bias, mean, invstd, training, eps)
