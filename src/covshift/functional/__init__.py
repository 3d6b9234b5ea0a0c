"""Pure functions: the maths of every covshift layer, with no module state."""

from covshift.functional.batchnorm import (
    BatchNormArgumentError,
    ChannelMismatchError,
    InputRankError,
    MixedDtypeError,
    UnsupportedDtypeError,
    batch_norm,
    update_running_stats,
)
from covshift.ops.dispatch import FastPathWarning, fast_path_status, get_backend, set_backend, use_backend

__all__ = [
    "batch_norm",
    "update_running_stats",
    "BatchNormArgumentError",
    "ChannelMismatchError",
    "InputRankError",
    "MixedDtypeError",
    "UnsupportedDtypeError",
    # which implementation batch_norm runs: the fused CPU kernel or the plain PyTorch reference
    "set_backend",
    "get_backend",
    "use_backend",
    "fast_path_status",
    "FastPathWarning",
]
