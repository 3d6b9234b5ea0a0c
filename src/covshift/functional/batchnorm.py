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
normalization layer composes, and one :class:`BatchNormFunction` that wires them into autograd
(analytic backward, a ``jvp`` for forward-mode AD, and a vmap rule for ``torch.func``). None of them
calls ATen's batch-norm kernels. They are the readable reference: on CPU float32, :func:`batch_norm`
runs the same maths in a fused C++ kernel registered as the operator ``torch.ops.covshift.batch_norm``
(:mod:`covshift.ops.batch_norm`; which path runs is :mod:`covshift.ops.dispatch`'s rule), and this code
wherever that cannot run.

Numerics, decided here once for every layer:

* statistics accumulate in float32 for float16/bfloat16/float32 input and float64 for float64 input;
* the mean is summed about a shift (each channel's first value), so the partial sums hold deviations
  rather than multiples of a large mean; the variance is two-pass (the mean, then the mean of squared
  deviations), never ``E[x^2] - E[x]^2``, which cancels catastrophically when ``|mean| >> std``;
* ``(x - mean)`` is formed before scaling, rather than folding ``x * alpha + beta``, for the same reason.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor
from torch._prims_common import suggest_memory_format  # c10's rule, as torch's own kernels apply it

from covshift.ops import batch_norm as _op
from covshift.ops import dispatch

__all__ = [
    "batch_norm",
    "batch_stats",
    "normalize",
    "centered",
    "backward_reduce",
    "backward_elemt",
    "update_running_stats",
    "check_batch_size",
    "check_eps",
    "BatchNormFunction",
    "BatchNormArgumentError",
    "ChannelMismatchError",
    "InputRankError",
    "MixedDtypeError",
    "UnsupportedDtypeError",
]


class BatchNormArgumentError(ValueError, RuntimeError):
    """A bad argument to batch norm: a ``ValueError`` (bad user input) that is also the ``RuntimeError``
    torch raises for the same call, so ``except RuntimeError:`` code written for torch keeps working."""


class ChannelMismatchError(BatchNormArgumentError):
    """The input's channel count (dim 1) differs from the layer's ``num_features``, or a ``(C,)``
    argument has the wrong size. torch raises ``RuntimeError`` for the same mistake."""


class UnsupportedDtypeError(TypeError, NotImplementedError):
    """Input that is not floating point (integers, bool, complex): torch raises ``NotImplementedError``."""


class MixedDtypeError(TypeError, RuntimeError):
    """Parameters or statistics of another dtype than the input (other than float32 ones with float16 or
    bfloat16 input, the mixed-precision case): torch raises ``RuntimeError``."""


class InputRankError(BatchNormArgumentError, IndexError):
    """Input of fewer than 2 dimensions (that is not the empty ``(0,)``, which torch accepts). torch raises
    ``RuntimeError`` or ``IndexError`` for it, depending on the other arguments; this is both."""


Momentum = Union[float, Tensor]  # a 0-dim tensor for the cumulative average, 1/num_batches_tracked


def reduce_dims(input: Tensor) -> list[int]:
    """The axes statistics run over: every axis but the channel axis 1."""
    return [0, *range(2, input.dim())]


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half, bfloat16 and float32 input; float64 for float64 input."""
    return torch.promote_types(dtype, torch.float32)


def _channel_view(t: Tensor, ndim: int) -> Tensor:
    # (C,) -> (1, C, 1, ..., 1) so that it broadcasts against (N, C, *spatial)
    return t.reshape(1, -1, *([1] * (ndim - 2)))


def check_eps(eps: float, training: bool) -> None:
    """torch's rule: ``eps > 0`` in training (the variance of a constant channel is 0), ``eps >= 0`` in eval."""
    if training and not eps > 0:
        raise ValueError(
            f"batch_norm eps must be positive during training, but got {eps}; "
            "use a small positive value such as 1e-5 (the default)."
        )
    if not eps >= 0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}; use 0 or a small positive value.")


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
    r"""Per-channel batch mean and *biased* variance, accumulated in float32 or wider.

    .. math:: \mu_c = K_c + \frac1m \sum (x_c - K_c), \qquad \sigma_c^2 = \frac1m \sum (x_c - \mu_c)^2

    ``K_c`` is the channel's first value: summing deviations from it instead of ``x`` keeps the
    partial sums small when ``|mean| >> std`` (with float32 input of mean 1e3 and std 0.1 the plain sum
    loses about three digits of the mean; this loses none). The second pass sums squared deviations, so
    nothing cancels (unlike ``E[x^2] - E[x]^2``). Out of place throughout, so ``torch.func`` may batch it.

    Args:
        input: ``(N, C, *)`` with ``N * prod(*) > 0``.

    Returns:
        ``(mean, var)``, each ``(C,)`` in ``acc_dtype(input.dtype)``. Differentiable, so the
        double-backward pass can recompute them with a graph.
    """
    acc = acc_dtype(input.dtype)
    dims = reduce_dims(input)
    n = input.dim()
    count = input.numel() // input.shape[1]
    x = input.to(acc)
    shift = x[(0, slice(None)) + (0,) * (n - 2)].detach()  # (C,): each channel's first value
    mean = shift + (x - _channel_view(shift, n)).sum(dims) / count
    xmu = x - _channel_view(mean, n)
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
    y = centered(input, mean) * _channel_view(scale, n)  # new tensor, same memory format as input
    if bias is not None:
        y = y + _channel_view(bias.to(acc), n)
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
    synchronized BatchNorm). Out of place, so that ``torch.func`` transforms may batch any argument
    (batched gradients, ``jacrev``, ``hessian``).
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
    dx = xmu * slope + grad_output.to(acc) * _channel_view(k, n) + shift
    return dx.to(input.dtype)


@torch.no_grad()
def update_running_stats(
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    mean: Tensor,
    var: Tensor,
    count: Union[int, float],
    momentum: Momentum,
) -> None:
    r"""In-place exponential moving average of the batch statistics (the reference implementation of the rule).

    .. math::

        \hat\mu \leftarrow (1 - m)\,\hat\mu + m\,\mu_B, \qquad
        \hat\sigma^2 \leftarrow (1 - m)\,\hat\sigma^2 + m\,\sigma_B^2\,\frac{n}{n-1}

    ``m`` is ``momentum``: a float, or a 0-dim tensor (``1/num_batches_tracked`` for the cumulative
    average, kept on the device so that neither a host sync nor a ``torch.compile`` graph break is
    needed), and ``n = count``: the running variance receives the *unbiased* batch variance, while
    normalization uses the biased one. The reference path, the variants and the cumulative average under
    ``torch.compile`` update through this function (``lerp_``: ``r + m (s - r)``); the fused kernel applies
    the same formula inside its sweep (a separate update cost as much as the kernel call on small
    tensors), and the tests hold the two to each other and to torch.
    """
    if running_var is not None:
        var = var * (count / (count - 1)) if count > 1 else var  # unbiased
    pairs = [(r, s) for r, s in ((running_mean, mean), (running_var, var)) if r is not None]
    if not isinstance(momentum, Tensor) and not torch.compiler.is_compiling() and all(r.dtype == s.dtype for r, s in pairs):
        # (not under compile: aot's partitioner has mis-ordered _foreach_lerp_ against reads of the buffers)
        torch._foreach_lerp_([r for r, _ in pairs], [s for _, s in pairs], momentum)  # one op for both
        return
    for r, s in pairs:
        r.lerp_(s.to(r.dtype), momentum.to(r.dtype) if isinstance(momentum, Tensor) else momentum)


class BatchNormFunction(torch.autograd.Function):
    r"""Autograd wiring of the reference core.

    ``forward(input, weight, bias, mean, var, training, eps) -> (y, mean, invstd, var)``: in training it
    computes the batch statistics from ``input`` itself (so a graph captured by ``torch.export`` or
    ``torch.jit.trace`` records them) and ignores ``mean``/``var``; otherwise it normalizes with the
    given ones. The statistics are returned, non-differentiable, for the running update.

    * **backward** is the analytic formula (:func:`backward_reduce`, :func:`backward_elemt`). When the
      backward itself is differentiated (``create_graph=True``) it recomputes the statistics from
      ``input`` with a graph, so that every term stays differentiable (double backward, Hessians).
    * **jvp** (forward-mode AD, ``torch.func.jvp``/``jacfwd``), with tangents ``dx, dgamma, dbeta``:

      .. math::

          d\mu = \overline{dx}, \quad d\sigma^2 = 2\,\overline{(x-\mu)\,dx}, \quad
          d\,\mathrm{invstd} = -\tfrac12\,\mathrm{invstd}^3\, d\sigma^2,

          dy = \gamma\big((dx - d\mu)\,\mathrm{invstd} + (x - \mu)\, d\,\mathrm{invstd}\big)
               + d\gamma\,\hat x + d\beta

      (in eval, ``dmu``/``dsigma^2`` are the tangents of the given statistics, usually zero).
    * ``generate_vmap_rule``: every op is out of place, so ``vmap`` batches it as it is.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(input, weight, bias, mean, var, training: bool, eps: float):
        acc = acc_dtype(input.dtype)
        if training:
            mean, var = batch_stats(input)
        else:  # copies, so that no output aliases an input
            mean, var = mean.to(acc, copy=True), var.to(acc, copy=True)
        invstd = torch.rsqrt(var + eps)
        return normalize(input, mean, invstd, weight, bias), mean, invstd, var

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, weight, bias, _, _, training, eps = inputs
        _, mean, invstd, var = output
        ctx.save_for_backward(input, weight, mean, invstd)
        ctx.save_for_forward(input, weight, mean, invstd)
        ctx.training, ctx.eps = training, eps
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.mark_non_differentiable(mean, invstd, var)

    @staticmethod
    def backward(ctx, grad_output, _grad_mean, _grad_invstd, _grad_var):
        input, weight, mean, invstd = ctx.saved_tensors
        need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_input = grad_weight = grad_bias = None
        if not (need_input or need_weight or need_bias):
            return None, None, None, None, None, None, None
        if ctx.training and torch.is_grad_enabled() and input.numel() > 0:
            mean, var = batch_stats(input)  # with a graph: double backward sees their dependence on x
            invstd = torch.rsqrt(var + ctx.eps)
        if input.numel() == 0:
            # An empty batch has no statistics; its gradients are empty or zero.
            grad_input = torch.zeros_like(input) if need_input else None
            sum_dy = sum_dy_xmu = torch.zeros(input.shape[1], dtype=acc_dtype(input.dtype), device=input.device)
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

    @staticmethod
    def jvp(ctx, d_input, d_weight, d_bias, d_mean, d_var, _d_training, _d_eps):
        input, weight, mean, invstd = ctx.saved_tensors
        acc = acc_dtype(input.dtype)
        n = input.dim()
        dims = reduce_dims(input)
        xmu = centered(input, mean)
        inv = _channel_view(invstd, n)
        count = max(input.numel() // max(input.shape[1], 1), 1)
        zero = torch.zeros_like(invstd)
        if ctx.training:
            dx = None if d_input is None else d_input.to(acc)
            dmu = zero if dx is None else dx.sum(dims) / count
            dvar = zero if dx is None else 2 * (xmu * dx).sum(dims) / count
        else:
            dx = None if d_input is None else d_input.to(acc)
            dmu = zero if d_mean is None else d_mean.to(acc)
            dvar = zero if d_var is None else d_var.to(acc)
        dinvstd = -0.5 * invstd * invstd * invstd * dvar
        dxhat = xmu * _channel_view(dinvstd, n) - _channel_view(dmu, n) * inv
        if dx is not None:
            dxhat = dxhat + dx * inv
        dy = dxhat if weight is None else dxhat * _channel_view(weight.to(acc), n)
        if d_weight is not None:
            dy = dy + xmu * inv * _channel_view(d_weight.to(acc), n)
        if d_bias is not None:
            dy = dy + _channel_view(d_bias.to(acc), n)
        return dy.to(input.dtype), None, None, None


def _affine_inference(input, running_mean, running_var, weight, bias, eps) -> Tensor:
    """Inference as plain elementwise ops (what export and ONNX graphs record): the reference formula."""
    acc = acc_dtype(input.dtype)
    invstd = torch.rsqrt(running_var.to(acc) + eps)
    return normalize(input, running_mean.to(acc), invstd, weight, bias)


def _check_channels(name: str, t: Optional[Tensor], channels: int, where: str) -> None:
    if t is not None and t.numel() != channels:
        raise ChannelMismatchError(
            f"{where}: {name} has {t.numel()} elements but the input has {channels} channels (dim 1); "
            f"they must match. Give {name} one entry per channel."
        )


_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _check_param(name: str, t: Tensor, input: Tensor) -> None:
    """A ``(C,)`` argument whose size or dtype differs from the input's: raise unless it is allowed."""
    _check_channels(name, t, input.shape[1], "batch_norm")
    if t.dtype != input.dtype and not (input.dtype in _LOW_PRECISION and t.dtype == torch.float32):
        raise MixedDtypeError(
            f"batch_norm: {name} is {t.dtype} but the input is {input.dtype}; they must match (or be float32 "
            f"with float16/bfloat16 input). Convert one of them, e.g. layer.to({input.dtype}) or input.to({t.dtype})."
        )


def batch_norm(
    input: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    training: bool = False,
    momentum: Momentum = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    r"""Batch Normalization, a drop-in for :func:`torch.nn.functional.batch_norm`.

    .. math:: y = \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}} \gamma + \beta

    In training, ``mu`` and ``sigma^2`` are the batch's per-channel mean and biased variance, and
    the running buffers (when given) are updated in place (:func:`update_running_stats`):
    ``running = (1 - momentum) * running + momentum * batch_stat``, with the *unbiased* variance
    going into ``running_var``. Otherwise the running buffers are used and nothing is updated.
    The output keeps the input's dtype and memory format; float16/bfloat16 input works with float32
    parameters and statistics. Which implementation runs is :mod:`covshift.ops.dispatch`'s rule.

    Args:
        input: ``(N, C, *)``; the empty ``(0,)`` is returned as it is, like torch.
        running_mean, running_var: ``(C,)`` buffers, or ``None`` (required when ``training=False``).
        weight, bias: ``(C,)`` affine parameters ``gamma`` and ``beta``, or ``None``.
        training: use batch statistics (and update the running buffers).
        momentum: the running-average factor; a float, or a 0-dim tensor such as
            ``1 / num_batches_tracked`` for a cumulative average.
        eps: added to the variance; ``> 0`` in training, ``>= 0`` in eval.

    Raises:
        ValueError: a bad ``eps``; one value per channel in training.
        InputRankError: non-empty input of fewer than 2 dimensions (also torch's ``RuntimeError``).
        UnsupportedDtypeError: input that is not floating point (also torch's ``NotImplementedError``).
        MixedDtypeError: parameters of another dtype than the input (also torch's ``RuntimeError``).
        ChannelMismatchError: a ``(C,)`` argument of the wrong size (also ``RuntimeError``).
        BatchNormArgumentError: no running statistics in inference (also ``RuntimeError``).
    """
    check_eps(eps, training)
    if input.dim() < 2:
        if input.dim() == 1 and input.numel() == 0:
            return input.clone()  # torch accepts the empty 1-D tensor (whatever the other arguments) and returns it
        raise InputRankError(
            f"batch_norm expected input of shape (N, C, *) with at least 2 dimensions, "
            f"got {input.dim()}D input of shape {list(input.shape)}. Add a batch dimension with input.unsqueeze(0)."
        )
    if not input.is_floating_point():
        raise UnsupportedDtypeError(
            f"batch_norm needs floating-point input, got {input.dtype}; convert it first, e.g. input.float()."
        )
    channels = input.shape[1]
    for name, t in (("running_mean", running_mean), ("running_var", running_var), ("weight", weight), ("bias", bias)):
        if t is not None and (t.numel() != channels or t.dtype is not input.dtype):
            _check_param(name, t, input)
    if momentum is None:
        raise ValueError(
            "batch_norm got momentum=None; the functional form needs a number. "
            "For a cumulative average pass momentum=1/num_batches_tracked (the modules do this for you)."
        )
    if training:
        check_batch_size(input)
    elif running_mean is None or running_var is None:
        raise BatchNormArgumentError(
            "batch_norm with training=False needs running_mean and running_var, got None. "
            "Pass the running statistics, or training=True to use batch statistics."
        )
    return run(input, running_mean, running_var, weight, bias, training, momentum, eps)


def _kernel():
    # Under torch.compile the operator is named through torch.ops, which dynamo resolves when it traces
    # (the module-level handle may have been read as None before a first, traced, load).
    return torch.ops.covshift.batch_norm.default if torch.compiler.is_compiling() else _op.kernel


def run(
    input: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    training: bool,
    momentum: Momentum,
    eps: float,
    *,
    eager_float32: Optional[bool] = None,
) -> Tensor:
    """:func:`batch_norm` on arguments already validated (the layers check theirs once, cheaply): the
    kernel or the reference, then the running update. The hot path of every training step.

    ``eager_float32``: the caller's answer to :func:`covshift.ops.dispatch.eager_float32`, if it has one."""
    if eager_float32 is None:
        eager_float32 = dispatch.eager_float32(input, running_mean, running_var, weight, bias)
    if eager_float32 and input.numel() > 0:
        if training:  # the kernel updates the running statistics in its sweep
            m = float(momentum) if isinstance(momentum, Tensor) else momentum  # a CPU scalar: no device sync
            return _op.kernel(input, weight, bias, running_mean, running_var, True, m, eps)[0]
        if not dispatch.tracing_inference():
            return _op.kernel(input, weight, bias, running_mean, running_var, False, 0.0, eps)[0]
    if input.numel() == 0:
        # torch's rule for an empty batch (ATen's _batch_norm_impl_index): a copy of the input (its
        # strides kept), times the first weight, plus the first bias, so that autograd still links
        # input and parameters (their gradients are zeros); the running statistics stay as they are.
        out = input.clone()
        if weight is not None:
            out = out * weight[0]
        if bias is not None:
            out = out + bias[0]
        return out
    if input.layout == torch.strided and not dispatch.dense(input):
        # torch's kernel reads any strides and lays its output out as input.suggest_memory_format();
        # ours reads three layouts, so other strides (a transpose, a slice) are copied into that one.
        input = input.contiguous(memory_format=suggest_memory_format(input))
    if training:
        if dispatch.use_kernel(input, running_mean, running_var, weight, bias):
            kernel = _kernel()
            if isinstance(momentum, Tensor) and not torch.compiler.is_compiling():
                momentum = float(momentum)  # a CPU scalar: reading it costs no device sync
            if not isinstance(momentum, Tensor):  # the kernel updates the running statistics in its sweep
                return kernel(input, weight, bias, running_mean, running_var, True, momentum, eps)[0]
            # Compiled with a tensor factor (momentum=None): the update stays in the graph, on the
            # variance recovered from invstd (to float32 rounding), so there is no graph break.
            y, mean, invstd = kernel(input, weight, bias, None, None, True, 0.0, eps)
            var = invstd.pow(-2) - eps
        else:
            y, mean, _, var = BatchNormFunction.apply(input, weight, bias, None, None, True, eps)
        if running_mean is not None or running_var is not None:
            update_running_stats(running_mean, running_var, mean, var, input.numel() // input.shape[1], momentum)
        return y
    if dispatch.tracing_inference():
        return _affine_inference(input, running_mean, running_var, weight, bias, eps)
    if dispatch.use_kernel(input, running_mean, running_var, weight, bias):
        return _kernel()(input, weight, bias, running_mean, running_var, False, 0.0, eps)[0]
    return BatchNormFunction.apply(input, weight, bias, running_mean, running_var, False, eps)[0]
