"""The ``eps`` rule of torch 2.13's ``F.batch_norm``, for the variants' own forward paths.

The plain layers get it from :func:`covshift.functional.batch_norm`; a variant that computes its
statistics itself (renormalization, ghost batches, cross-process merging) checks first, before any
running statistic or collective is touched, so a bad ``eps`` fails the same way on every path.
"""

from __future__ import annotations

__all__ = ["check_eps"]


def check_eps(owner: str, eps: float, training: bool) -> None:
    """``ValueError`` for ``eps <= 0`` in training and ``eps < 0`` otherwise, as ``torch.nn.BatchNorm*``."""
    if training and not eps > 0.0:
        raise ValueError(
            f"{owner}: batch_norm eps must be positive during training, but got {eps!r}; the batch variance can "
            "be 0, so 1/sqrt(var + eps) needs eps > 0. Build the layer with e.g. eps=1e-5."
        )
    if not eps >= 0.0:
        raise ValueError(f"{owner}: batch_norm eps must be non-negative, but got {eps!r}. Use e.g. eps=1e-5.")
