"""covshift: Batch Normalization from its formula, and instruments for internal covariate shift."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("covshift")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

from covshift import functional, monitor, nn  # noqa: E402

__all__ = ["functional", "monitor", "nn", "__version__"]
