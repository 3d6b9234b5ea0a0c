"""``python -m covshift.ops``: build covshift's C++ extensions now (``make setup`` runs it), and say how it went.

The BatchNorm operator (``torch.ops.covshift.batch_norm``) and the monitor's fused statistics. Exits 0
either way: without a compiler covshift runs its reference paths (and warns once).
"""

import sys
import time

from covshift.ops import batch_norm, build


def _batch_norm_extension() -> build.Extension:
    batch_norm.load()
    return build.status(batch_norm.LIBRARY)


def main() -> int:
    from covshift.monitor import stats as monitor_stats  # the monitor's kernels, built through covshift.ops.build

    for what, extension in (("fast CPU BatchNorm", _batch_norm_extension), ("monitor kernels", monitor_stats.extension)):
        start = time.perf_counter()
        ext = extension()
        if ext.loaded:
            print(f"covshift {what} ready in {time.perf_counter() - start:.1f} s: {ext.library}")
        else:
            print(f"covshift {what} unavailable, the reference path will run: {ext.error}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
