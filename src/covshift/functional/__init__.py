"""Pure functions: the maths of every covshift layer, with no module state."""

from covshift.functional._fast import FastPathWarning, fast_path_status, get_backend, set_backend, use_backend
from covshift.functional.batchnorm import ChannelMismatchError, batch_norm

__all__ = [
    "batch_norm",
    "ChannelMismatchError",
    # which implementation batch_norm runs: the fused CPU kernel or the plain PyTorch reference
    "set_backend",
    "get_backend",
    "use_backend",
    "fast_path_status",
    "FastPathWarning",
]
