r"""The flush: stage-2 statistics of the pending stage-1 results, one typed batch for the writers.

Placeholder while the module is written: this commit fixes the :class:`LayerStats` contract that
:func:`covshift.monitor.distributed.merge_across_ranks` consumes.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from torch import Tensor

from covshift.monitor.records import RecordKey

__all__ = ["LayerStats"]


# NOTE: covshift.monitor.distributed.merge_across_ranks (engineer A2) depends on this definition:
# its fields, shapes, dtypes and meaning. Change it only together with that function.
@dataclasses.dataclass
class LayerStats:
    r"""Mergeable statistics of ``L`` records (one row per recorded activation), on one device.

    Every row is a sufficient statistic that merges exactly across processes: counts add, means
    and squared deviations combine by Chan et al.'s formula

    .. math::

        n = n_a + n_b,\quad \delta = \mu_b - \mu_a,\quad \mu = \mu_a + \delta\,n_b/n,\quad
        M_2 = M_{2,a} + M_{2,b} + \delta^2 n_a n_b / n,

    minima and maxima take the min / max, histograms add bin by bin, and the percentile samples are
    concatenated (percentiles are computed after the merge, from the merged sample).

    Non-finite values (NaN, +inf, -inf) are counted in ``n_nonfinite`` and excluded from every
    other field: mean, M2, min, max, histogram, saturated and non-positive counts and the sample are
    over the finite values only.

    Rows correspond across ranks: every rank builds them in the same order (the same modules
    recorded at the same steps; an empty activation still gives a row, with ``count == 0``), and
    ``keys`` / ``steps`` are identical on every rank. Tensors live on the statistics' device
    (where the activations were); integer counts are int64, moments float64.

    Fields:
        keys: ``L`` record identities (host objects, not tensors).
        steps: ``(L,)`` int64, training step of each row (host tensor).
        count: ``(L,)`` int64, number of finite values :math:`n`.
        mean: ``(L,)`` float64, mean of the finite values (0 when ``count == 0``).
        m2: ``(L,)`` float64, :math:`M_2 = \sum (x - \mu)^2` over the finite values.
        min, max: ``(L,)`` float64, over the finite values (+inf / -inf when ``count == 0``).
        n_nonfinite: ``(L,)`` int64, number of NaN and infinite values (so numel = count + n_nonfinite).
        hist: ``(L, B + 2)`` int64, histogram of the finite *sample* values on the layer's fixed
            edges: ``[underflow (< e_0), bin_0, ..., bin_{B-1}, overflow (> e_B)]``; the edges are the
            same on every rank (decided once, by rank 0, under ``reduce="global"``).
        n_saturated: ``(L,)`` int64, finite sample values with :math:`|x| > t`.
        n_nonpositive: ``(L,)`` int64, finite sample values :math:`\le 0`.
        sample: ``(L, K)`` float32 or float64: row ``l`` holds its ``sample_count[l]`` finite sample
            values first (in no guaranteed order), then NaN padding. The merge may widen ``K``
            (concatenating ranks' samples), keeping this layout.
        sample_count: ``(L,)`` int64, valid entries of each sample row; ``hist`` rows sum to it.
        channel_sizes: ``(L,)`` int64, channels ``C_l`` of each row's per-channel statistics (0 for
            rows without); ``None`` when no row has them.
        channel_count: ``(L,)`` int64, values per channel (the same for every channel of a row).
        channel_mean, channel_m2, channel_max: ``(sum_l C_l,)`` float64, the rows' per-channel mean,
            M2 and max concatenated in row order (over every value: a channel holding a NaN has a
            NaN mean).
    """

    keys: list[RecordKey]
    steps: Tensor
    count: Tensor
    mean: Tensor
    m2: Tensor
    min: Tensor
    max: Tensor
    n_nonfinite: Tensor
    hist: Tensor
    n_saturated: Tensor
    n_nonpositive: Tensor
    sample: Tensor
    sample_count: Tensor
    channel_sizes: Optional[Tensor] = None
    channel_count: Optional[Tensor] = None
    channel_mean: Optional[Tensor] = None
    channel_m2: Optional[Tensor] = None
    channel_max: Optional[Tensor] = None

    def __len__(self) -> int:
        return len(self.keys)
