"""Layers: covshift's BatchNorm family, drop-in for ``torch.nn``'s, its variants, and the tools around them."""

from covshift.nn.batch_renorm import PAPER_SCHEDULE, BatchRenorm1d, BatchRenorm2d, BatchRenorm3d
from covshift.nn.batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d, NonFiniteBatchWarning
from covshift.nn.convert import convert
from covshift.nn.frozen_batchnorm import FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d, freeze, unfreeze
from covshift.nn.fuse import fuse_bn
from covshift.nn.ghost_batchnorm import GhostBatchNorm1d, GhostBatchNorm2d
from covshift.nn.noisy_batchnorm import NoisyBatchNorm1d, NoisyBatchNorm2d  # also registers norm "noisy-bn"
from covshift.nn.norms import create_norm_layer, get_norm_layer, norm_names, register_norm
from covshift.nn.stats import update_bn_stats
from covshift.nn.sync_batchnorm import ProcessGroupError, SyncBatchNorm

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "NonFiniteBatchWarning",
    "convert",
    # variants
    "SyncBatchNorm",
    "ProcessGroupError",
    "BatchRenorm1d",
    "BatchRenorm2d",
    "BatchRenorm3d",
    "PAPER_SCHEDULE",
    "GhostBatchNorm1d",
    "GhostBatchNorm2d",
    "NoisyBatchNorm1d",
    "NoisyBatchNorm2d",
    "FrozenBatchNorm1d",
    "FrozenBatchNorm2d",
    "FrozenBatchNorm3d",
    "freeze",
    "unfreeze",
    # tools
    "update_bn_stats",
    # normalization layers by name
    "get_norm_layer",
    "create_norm_layer",
    "register_norm",
    "norm_names",
    "fuse_bn",
]
