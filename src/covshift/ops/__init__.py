"""covshift's operators: C++ kernels built once per machine and registered with ``torch.library``."""
