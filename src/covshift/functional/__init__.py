"""Pure functions: the maths of every covshift layer, with no module state."""

from covshift.functional.batchnorm import ChannelMismatchError, batch_norm

__all__ = ["batch_norm", "ChannelMismatchError"]
