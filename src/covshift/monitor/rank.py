r"""Rank and similarity of a representation: a ``(N, D)`` matrix with one row per sample.

* :func:`numerical_rank`: the number of singular values above ``max(atol, rtol * s_max)``
  (``torch.linalg.matrix_rank``'s rule; default ``rtol = max(N, D) * eps`` of the dtype);
* :func:`stable_rank`: :math:`\|Y\|_F^2 / \|Y\|_2^2 = \sum_i s_i^2 / s_1^2`, a continuous rank that
  ignores tiny singular values (Daneshmand et al. 2020 track the rank's collapse with depth);
* :func:`mean_cosine_similarity`: the mean of :math:`\cos(Y_i, Y_j)` over pairs :math:`i \ne j` of
  nonzero rows, not centered (Lubana et al. 2021: near 1, the samples are indistinguishable).

Everything is computed in float64 (float32 on MPS) on the matrix's device. Used by
:func:`covshift.monitor.signal_propagation` on every block's output.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = ["singular_values", "numerical_rank", "stable_rank", "mean_cosine_similarity"]


def _compute_dtype(t: Tensor) -> torch.dtype:
    return torch.float32 if t.device.type == "mps" else torch.float64


def _as_matrix(a: Tensor, name: str) -> Tensor:
    if a.dim() < 2:
        raise ValueError(
            f"{name}: expected a matrix (N, D) or a batch (N, *) of at least 2 dims, got shape "
            f"{tuple(a.shape)}. Pass one row per sample."
        )
    return a.detach().reshape(a.shape[0], -1).to(_compute_dtype(a))


def singular_values(m: Tensor) -> Tensor:
    """Singular values of a matrix, descending; a wide (or tall) matrix is first reduced to its
    square triangular factor by a QR of its tall orientation, which has the same singular values and
    is backward stable (no Gram matrix, so nothing is squared), and much faster than an SVD of a
    64 x 65536 batch."""
    n, d = m.shape
    if max(n, d) > 2 * min(n, d):
        m = torch.linalg.qr(m.T if d > n else m, mode="r").R
    return torch.linalg.svdvals(m)


def _rank_from(s: Tensor, shape: tuple, dtype: torch.dtype, atol: Optional[float], rtol: Optional[float]) -> int:
    if s.numel() == 0:
        return 0
    if rtol is None:
        rtol = 0.0 if atol is not None else max(shape) * torch.finfo(dtype).eps
    tau = max(float(atol or 0.0), float(rtol) * float(s[0]))
    return int((s > tau).sum())


def _stable_from(s: Tensor) -> float:
    top = float(s[0]) if s.numel() else 0.0
    return 0.0 if top == 0.0 else float((s * s).sum()) / top**2


def numerical_rank(
    a: Tensor, *, atol: Optional[float] = None, rtol: Optional[float] = None, eps_dtype: Optional[torch.dtype] = None
) -> int:
    r"""The number of singular values of ``a`` above a tolerance: :math:`\#\{i : \sigma_i > \tau\}`.

    ``a`` is ``(N, D)``, or ``(N, *)`` flattened to one row per sample. The tolerance is
    :math:`\tau = \max(\text{atol},\ \text{rtol} \cdot \sigma_{\max})`, with the defaults of
    ``torch.linalg.matrix_rank`` / ``numpy.linalg.matrix_rank``: ``atol = 0`` and, when neither is
    given, ``rtol = max(N, D) * eps``, where ``eps`` is the machine epsilon of ``eps_dtype`` (default
    ``a.dtype``: the precision the values were computed in, so that rounding noise of a float32
    activation does not count as rank). The singular values are computed in float64.
    """
    m = _as_matrix(a, "numerical_rank")
    if m.numel() == 0:
        return 0
    dtype = eps_dtype or (a.dtype if a.is_floating_point() else torch.float32)
    return _rank_from(singular_values(m), tuple(m.shape), dtype, atol, rtol)


def stable_rank(a: Tensor) -> float:
    r"""Stable rank :math:`\|A\|_F^2 / \|A\|_2^2 = \sum_i \sigma_i^2 / \sigma_{\max}^2` of ``a``.

    ``a`` is ``(N, D)`` or ``(N, *)`` (one row per sample). It lies in :math:`[1, \operatorname{rank} A]`,
    and, unlike the numerical rank, needs no threshold. A zero matrix has stable rank 0.
    """
    m = _as_matrix(a, "stable_rank")
    return 0.0 if m.numel() == 0 else _stable_from(singular_values(m))


def mean_cosine_similarity(a: Tensor) -> float:
    r"""Mean of :math:`\cos(a_i, a_j)` over pairs :math:`i \ne j` of the nonzero rows of ``a`` (N, *).

    NaN when fewer than two rows are nonzero (the cosine is undefined).
    """
    m = _as_matrix(a, "mean_cosine_similarity")
    norms = torch.linalg.vector_norm(m, dim=1)
    m = m[norms > 0] / norms[norms > 0, None]
    k = m.shape[0]
    if k < 2:
        return float("nan")
    total = torch.linalg.vector_norm(m.sum(0)) ** 2  # sum over all ordered pairs, diagonal included
    return float((total - k) / (k * (k - 1)))
