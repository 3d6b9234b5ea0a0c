"""``SyncBatchNorm``: BatchNorm over the global batch of a ``torch.distributed`` process group,
on gloo (CPU) as well as NCCL (GPU). The maths is in the class docstring."""

from __future__ import annotations

import warnings
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.nn.modules.batchnorm import _BatchNorm

from covshift.functional.batchnorm import (
    acc_dtype,
    backward_elemt,
    backward_reduce,
    batch_stats,
    centered,
    check_eps,
    normalize,
)
from covshift.nn._running import advance_running_stats
from covshift.nn.batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d, _BatchNormMixin
from covshift.nn.swap import replace_modules, swap_class

__all__ = ["SyncBatchNorm", "ProcessGroupError"]


class ProcessGroupError(ValueError, RuntimeError):
    """A ``SyncBatchNorm`` was given a process group, but ``torch.distributed`` is not initialised."""


class _SyncBatchNormFunction(torch.autograd.Function):
    """Forward: :func:`normalize` with the global statistics. Backward: all-reduce, then the core's formula."""

    @staticmethod
    def forward(ctx: Any, input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], mean: Tensor,
                invstd: Tensor, count: int, group: Any) -> Tensor:
        ctx.save_for_backward(input, weight, mean, invstd)
        ctx.count = count
        ctx.group = group
        ctx.bias_dtype = None if bias is None else bias.dtype
        return normalize(input, mean, invstd, weight, bias)

    @staticmethod
    @once_differentiable  # the global statistics cannot be recomputed from the local input
    def backward(ctx: Any, grad_output: Tensor):
        input, weight, mean, invstd = ctx.saved_tensors
        need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
        xmu = centered(input, mean)
        sum_dy, sum_dy_xmu = backward_reduce(grad_output, input, mean, invstd, xmu=xmu)  # local, (C,) each
        grad_input = grad_weight = grad_bias = None
        if need_input:
            # Every process takes this branch (an empty shard too), so the collective always matches.
            both = torch.cat([sum_dy, sum_dy_xmu])
            dist.all_reduce(both, group=ctx.group)
            all_dy, all_dy_xmu = both.split(sum_dy.numel())
            grad_input = backward_elemt(
                grad_output, input, mean, invstd, weight, all_dy, all_dy_xmu, ctx.count, xmu=xmu
            )
        if need_weight:  # dgamma = sum(dy * x_hat), this process's share
            grad_weight = (sum_dy_xmu * invstd.to(sum_dy_xmu.dtype)).to(weight.dtype)
        if need_bias:  # dbeta = sum(dy), this process's share
            grad_bias = sum_dy.to(ctx.bias_dtype)
        return grad_input, grad_weight, grad_bias, None, None, None, None


def merge_stats(counts: Tensor, means: Tensor, m2s: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    r"""Count-weighted (Chan) merge of per-shard statistics.

    Args:
        counts: ``(P,)`` values per channel in each shard (``0`` for an empty shard).
        means: ``(P, C)`` shard means (ignored where the count is 0).
        m2s: ``(P, C)`` shard sums of squared deviations, ``n_i * var_i``.

    Returns:
        ``(n, mean, var)``: the total count and the mean and *biased* variance of the union.
    """
    n = counts.sum()
    w = counts.unsqueeze(1)
    mean = (w * means).sum(0) / n.clamp(min=1)
    m2 = m2s.sum(0) + (w * (means - mean) ** 2).sum(0)
    return n, mean, m2 / n.clamp(min=1)


class SyncBatchNorm(_BatchNormMixin, _BatchNorm):
    r"""Batch Normalization over the global batch of a ``torch.distributed`` process group.

    Each process holds a shard of the batch. In training the statistics are those of the whole
    (concatenated) batch, so data parallelism does not shrink the batch BatchNorm sees. Unlike
    ``torch.nn.SyncBatchNorm``, this one runs on CPU with the gloo backend as well as on GPUs with NCCL:
    it only uses the collectives every backend has (``all_gather`` and ``all_reduce``) on tensors of the
    input's device.

    **Forward (count-weighted merge).** Process ``i`` computes its local count ``n_i`` (values per
    channel), mean ``mu_i`` and biased variance ``var_i`` with :func:`covshift.functional.batchnorm.batch_stats`
    (two-pass, float32 or wider). One ``all_gather`` of ``(n_i, mu_i, n_i var_i)`` (in float64) gives every
    process the same global statistics, merged with Chan et al.'s parallel formulas:

    .. math::

        n = \sum_i n_i, \qquad \mu = \frac1n \sum_i n_i \mu_i, \qquad
        \sigma^2 = \frac1n \sum_i \big(n_i \sigma_i^2 + n_i (\mu_i - \mu)^2\big)

    Uneven shards and empty shards (``n_i = 0``) are exact: they are the statistics of the concatenated
    batch. The output is ``gamma * (x - mu) / sqrt(sigma^2 + eps) + beta``, and the running statistics are
    updated with torch's rule on the global statistics (unbiased ``sigma^2 * n/(n-1)`` into
    ``running_var``; ``momentum``, or ``1/num_batches_tracked`` when ``momentum=None``), identically on
    every process.

    **Backward.** The two per-channel reductions of the analytic backward are summed over processes
    with one ``all_reduce``, then each process forms its own input gradient with the global count ``n``:

    .. math::

        dx = \gamma\,\mathrm{invstd}\,\Big(dy - \frac1n \sum_{\text{all}} dy
             - (x - \mu)\,\frac{\mathrm{invstd}^2}{n} \sum_{\text{all}} dy\,(x - \mu)\Big)

    ``dgamma`` and ``dbeta`` stay *local* (this process's share); summing them across processes is the
    data-parallel wrapper's job (``DistributedDataParallel`` averages gradients).

    Papers: Ioffe & Szegedy 2015 (arXiv:1502.03167); Peng et al. 2018, "MegDet" (arXiv:1711.07240),
    cross-GPU BatchNorm; Chan, Golub & LeVeque 1979 for the merge.

    **When it synchronizes.** Only in training, and only inside an initialised process group of more
    than one process (``process_group``, or the default group when ``None``). Otherwise, and always in
    eval, it is exactly :class:`covshift.nn.BatchNorm1d/2d/3d` on the local input (so evaluating on one
    rank alone never hangs). Every process of the group must call it in training with the same
    ``requires_grad`` on its input, as for any collective.

    It is not a subclass of ``torch.nn.SyncBatchNorm``: ``DistributedDataParallel`` refuses those on
    CPU. It is a ``torch.nn.modules.batchnorm._BatchNorm``, with torch's parameters, buffers and
    ``state_dict`` keys. Double backward is not supported.

    Args:
        num_features: ``C``, dim 1 of the ``(N, C, *)`` input.
        eps, momentum, affine, track_running_stats, device, dtype: as ``torch.nn.BatchNorm*``.
        process_group: the group to synchronize over; ``None`` is the default (world) group.
        bias: keyword-only, as ``torch.nn.BatchNorm*``: with ``affine=True``, whether ``beta`` exists.
        skip_nonfinite: keyword-only; when the *global* batch holds NaN or inf (detected from the merged
            statistics, so every process agrees), skip the running-statistics update on every process and
            emit :class:`covshift.nn.NonFiniteBatchWarning`. Default ``False``.

    Raises:
        ValueError: input of fewer than 2 dimensions; a single value per channel over the global batch;
            ``eps <= 0`` in training or ``eps < 0`` in eval (as torch).
        ChannelMismatchError: a wrong channel count.
        ProcessGroupError: ``process_group`` was given but ``torch.distributed`` is not initialised
            (or was destroyed) when the layer trains.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: Optional[Any] = None,
        device: Any = None,
        dtype: Optional[torch.dtype] = None,
        *,
        bias: bool = True,
        skip_nonfinite: bool = False,
    ) -> None:
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias,
            skip_nonfinite=skip_nonfinite,
        )
        self.process_group = process_group

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(
                f"SyncBatchNorm expected at least 2D input (got {input.dim()}D input of shape {list(input.shape)}); "
                "it takes (N, C, *). Add a batch dimension with input.unsqueeze(0)."
            )

    def _sync_group(self) -> Optional[Any]:
        """The group to synchronize over in this forward, or ``None`` to act as plain BatchNorm."""
        if not self.training:
            return None
        if not (dist.is_available() and dist.is_initialized()):
            if self.process_group is not None:
                raise ProcessGroupError(
                    "SyncBatchNorm was given a process_group, but torch.distributed is not initialised "
                    "(or the group was destroyed). Call torch.distributed.init_process_group(...) first, or "
                    "pass process_group=None to fall back to plain BatchNorm outside distributed runs."
                )
            return None
        group = self.process_group if self.process_group is not None else dist.group.WORLD
        return group if dist.get_world_size(group) > 1 else None

    def forward(self, input: Tensor) -> Tensor:
        if isinstance(input, torch.fx.Proxy):  # torch.fx.symbolic_trace: a leaf module, as the plain layers
            return super().forward(input)
        self._check_input_dim(input)
        self._check_channels(input)
        check_eps(self.eps, self.training)  # the same on every process: no collective hangs
        group = self._sync_group()
        if group is None:
            return super().forward(input)

        channels = input.shape[1]
        local_count = input.numel() // channels
        with torch.no_grad():
            if local_count > 0:
                mean, var = batch_stats(input.detach())
            else:  # an empty shard still takes part in every collective
                mean = var = torch.zeros(channels, dtype=acc_dtype(input.dtype), device=input.device)
            # float64 so that counts are exact and the merge loses nothing; (2C + 1,) per process.
            local = torch.cat(
                [torch.tensor([float(local_count)], dtype=torch.float64, device=input.device),
                 mean.double(), var.double() * local_count]
            )
            gathered = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
            dist.all_gather(gathered, local, group=group)
            stats = torch.stack(gathered)
            count_t, mean64, var64 = merge_stats(stats[:, 0], stats[:, 1 : channels + 1], stats[:, channels + 1 :])
        count = int(count_t.item())
        if count == 0:  # every shard is empty: the same on every process, so no collective is skipped unevenly
            return super().forward(input)
        if count == 1:
            raise ValueError(
                f"Expected more than 1 value per channel when training, got 1 over the global batch "
                f"(local input size {list(input.shape)}); batch statistics of a single value are meaningless. "
                "Use a larger global batch, or call .eval() to normalize with the running statistics."
            )
        acc = acc_dtype(input.dtype)
        mean, var = mean64.to(acc), var64.to(acc)

        # Every process sees the same merged statistics, so they all agree on the guard and the update.
        if self.track_running_stats and not self._nonfinite_batch(torch.stack([mean, var])):
            advance_running_stats(self, mean, var, count)

        invstd = torch.rsqrt(var + self.eps)
        return _SyncBatchNormFunction.apply(input, self.weight, self.bias, mean, invstd, count, group)

    @classmethod
    def convert_sync_batchnorm(cls, module: torch.nn.Module, process_group: Optional[Any] = None) -> torch.nn.Module:
        """Replace every BatchNorm layer in ``module`` (nested too) with a covshift ``SyncBatchNorm``.

        Converts ``torch.nn.BatchNorm1d/2d/3d``, ``torch.nn.SyncBatchNorm``, covshift's
        ``BatchNorm1d/2d/3d`` and ``SyncBatchNorm`` (to set ``process_group``). Parameters and buffers are
        the *same* tensors (values, device, dtype, ``requires_grad`` and an optimizer's references
        survive), and so are each layer's train/eval mode, hyper-parameters, ``skip_nonfinite`` and hooks; a
        layer shared by several parents stays shared (:mod:`covshift.nn.swap`).

        Other BatchNorm subclasses keep their own behaviour and are left as they are: covshift's
        ``BatchRenorm*`` and ``GhostBatchNorm*`` (with a ``UserWarning``, since they stay per-process),
        ``FrozenBatchNorm*`` (nothing to synchronize), and your own subclasses (with a warning).

        The model is changed in place and returned; when ``module`` itself is converted, the new layer
        is returned.
        """
        return _convert(module, cls, process_group)


_SYNCABLE = (
    torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d, torch.nn.SyncBatchNorm,
    BatchNorm1d, BatchNorm2d, BatchNorm3d, SyncBatchNorm,
)


def _convert(module: torch.nn.Module, cls: type, process_group: Any) -> torch.nn.Module:
    def synced(name: str, layer: torch.nn.Module) -> Optional[torch.nn.Module]:
        if type(layer) in _SYNCABLE:
            new = swap_class(layer, cls)
            new.process_group = process_group
            return new
        if isinstance(layer, _BatchNorm) and not getattr(layer, "_is_frozen_batchnorm", False):
            warnings.warn(
                f"convert_sync_batchnorm left {type(layer).__name__} at {name or '<root>'!r} as it is: it is a "
                "BatchNorm subclass with its own behaviour, so its statistics stay per-process.",
                UserWarning,
                stacklevel=5,  # synced <- replace_modules <- _convert <- convert_sync_batchnorm <- the caller
            )
        return None

    return replace_modules(module, synced)
