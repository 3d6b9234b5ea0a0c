"""Layers: covshift's BatchNorm family, drop-in for ``torch.nn``'s."""

from covshift.nn.batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d, NonFiniteBatchWarning
from covshift.nn.convert import convert

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "NonFiniteBatchWarning", "convert"]
