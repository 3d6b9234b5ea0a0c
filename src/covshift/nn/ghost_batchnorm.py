r"""``GhostBatchNorm1d/2d``: BatchNorm over "ghost" sub-batches of a large batch (Hoffer et al. 2017)."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from covshift.functional.batchnorm import batch_norm, batch_stats, check_eps
from covshift.nn._running import advance_running_stats
from covshift.nn.batchnorm import BatchNorm1d, BatchNorm2d

__all__ = ["GhostBatchNorm1d", "GhostBatchNorm2d"]

_DOC = r"""
    Hoffer, Hubara & Soudry 2017, "Train longer, generalize better: closing the generalization gap in
    large batch training of neural networks" (arXiv:1705.08741), section 4. The batch is split along
    dim 0 into consecutive ghost batches ``B_1, ..., B_K`` of ``virtual_batch_size`` samples; each is
    normalized with its own statistics, exactly as :class:`covshift.nn.BatchNorm*` would normalize it
    alone (biased variance, analytic backward through each ghost batch's statistics):

    .. math:: y_k = \gamma\,\frac{x_k - \mu_k}{\sqrt{\sigma_k^2 + \epsilon}} + \beta, \qquad x_k \in B_k

    **Remainder.** When ``N`` is not a multiple of ``virtual_batch_size``, the last ghost batch is
    smaller and is normalized on its own; it is merged into the previous one only if it would hold a
    single value per channel (whose variance is zero by construction). Nothing is dropped. When
    ``virtual_batch_size >= N`` the layer is exactly BatchNorm.

    **Running statistics: one update per forward.** With ``m_k`` values per channel in ghost batch ``k``
    and ``M = sum_k m_k``, the batch statistics fed to the usual rule
    ``running = (1 - momentum) * running + momentum * stat`` are

    .. math::

        \mu = \frac1M \sum_k m_k \mu_k, \qquad
        s^2 = \frac{1}{M - K} \sum_k m_k \sigma_k^2

    the count-weighted mean of the ghost-batch means (the batch mean) and the *pooled unbiased
    within-ghost-batch variance*: the variance the ghost batches actually normalize with, corrected for
    the ``K`` estimated means. With ``K = 1`` this is BatchNorm's rule (``s^2 = sigma^2 M/(M-1)``), and
    ``num_batches_tracked`` counts forwards, not ghost batches, so ``momentum=None`` averages forwards.

    **Inference** is plain BatchNorm with the running statistics. With ``track_running_stats=False``
    (no buffers) ghost-batch statistics are used in eval too.

    The positional arguments are torch's, in torch's order; ``virtual_batch_size`` is keyword-only and
    required: ``GhostBatchNorm2d(64, virtual_batch_size=32)``.

    Args:
        num_features: ``C``, the number of channels.
        eps, momentum, affine, track_running_stats, device, dtype: as ``torch.nn.BatchNorm*``.
        virtual_batch_size: keyword-only, required; samples per ghost batch, an int ``>= 1``.
        bias: keyword-only, as ``torch.nn.BatchNorm*``: with ``affine=True``, whether ``beta`` exists.
        skip_nonfinite: keyword-only; a training batch with NaN or inf does not update the running
            statistics, with a :class:`covshift.nn.NonFiniteBatchWarning`. Default ``False``.

    Raises:
        ValueError: ``virtual_batch_size`` not a positive int; in the forward, ``eps <= 0`` in training or
            ``eps < 0`` in eval (as torch); and as ``covshift.nn.BatchNorm*`` for the
            input (rank, one value per channel, channel count).
"""


class _GhostBatchNormMixin:
    """The ghost-batch forward shared by GhostBatchNorm1d/2d. Placed first in the MRO."""

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
        virtual_batch_size: int,
        skip_nonfinite: bool = False,
    ) -> None:
        if isinstance(virtual_batch_size, bool) or not isinstance(virtual_batch_size, int) or virtual_batch_size < 1:
            raise ValueError(
                f"{type(self).__name__} expected virtual_batch_size to be a positive int (samples per ghost "
                f"batch), got {virtual_batch_size!r}. Pass e.g. virtual_batch_size=32."
            )
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias, skip_nonfinite=skip_nonfinite
        )
        self.virtual_batch_size = virtual_batch_size

    def extra_repr(self) -> str:
        return super().extra_repr() + f", virtual_batch_size={self.virtual_batch_size}"

    def _ghost_sizes(self, input: Tensor) -> list[int]:
        n, vbs = input.shape[0], self.virtual_batch_size
        per_sample = input[0].numel() // input.shape[1]  # values per channel in one sample
        if vbs * per_sample == 1:
            raise ValueError(
                f"{type(self).__name__}(virtual_batch_size=1) on input of shape {list(input.shape)} gives ghost "
                "batches of one value per channel, whose variance is zero by construction. Use "
                "virtual_batch_size >= 2."
            )
        sizes = [vbs] * (n // vbs) + ([n % vbs] if n % vbs else [])
        if len(sizes) > 1 and sizes[-1] * per_sample == 1:  # a lone value per channel: join the previous batch
            sizes[-2:] = [sizes[-2] + sizes[-1]]
        return sizes

    def forward(self, input: Tensor) -> Tensor:
        if isinstance(input, torch.fx.Proxy):  # torch.fx.symbolic_trace: a leaf module, as the plain layers
            return super().forward(input)
        self._check_input_dim(input)
        self._check_channels(input)
        check_eps(self.eps, self.training)
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        if not use_batch_stats or input.shape[0] <= self.virtual_batch_size or input.numel() == 0:
            return super().forward(input)  # one ghost batch (or inference): plain BatchNorm
        sizes = self._ghost_sizes(input)
        chunks = input.split(sizes)
        if self.training and self.track_running_stats and not self._nonfinite_batch(input):
            # Before normalizing, as torch's kernel does: a checkpointed forward that stops recomputing once
            # the normalization has saved its tensors then updates twice per step, as torch's layer does.
            with torch.no_grad():
                stats = [batch_stats(chunk.detach()) for chunk in chunks]  # (mean_k, biased var_k), (C,) each
                counts = [c.numel() // c.shape[1] for c in chunks]  # m_k, values per channel
                m = torch.tensor(counts, dtype=stats[0][0].dtype, device=input.device).unsqueeze(1)
                means = torch.stack([s[0] for s in stats])  # (K, C)
                vars_ = torch.stack([s[1] for s in stats])
                total = float(sum(counts))  # M
                mean = (m * means).sum(0) / total
                within = (m * vars_).sum(0) / total  # biased, within ghost batches
            # The update applies n/(n-1) to the variance; with n = M/K that is M/(M-K): the pooled unbiased one.
            advance_running_stats(self, mean, within, total / len(chunks))
        # Each ghost batch is normalized alone by the core, with its own batch statistics.
        outs = [batch_norm(chunk, None, None, self.weight, self.bias, True, 0.0, self.eps) for chunk in chunks]
        return torch.cat(outs)


class GhostBatchNorm1d(_GhostBatchNormMixin, BatchNorm1d):
    __doc__ = "Ghost Batch Normalization over 2D ``(N, C)`` or 3D ``(N, C, L)`` input.\n" + _DOC


class GhostBatchNorm2d(_GhostBatchNormMixin, BatchNorm2d):
    __doc__ = "Ghost Batch Normalization over 4D ``(N, C, H, W)`` input.\n" + _DOC
