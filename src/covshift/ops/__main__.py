"""``python -m covshift.ops``: build covshift's C++ operators now (``make setup`` runs it), and say how it went.

Exits 0 either way: without a compiler covshift runs its reference paths (and warns once).
"""

import sys
import time

from covshift.ops import batch_norm, build


def main() -> int:
    start = time.perf_counter()
    ok = batch_norm.load()
    ext = build.status(batch_norm.LIBRARY)
    if ok:
        print(f"covshift fast CPU path ready in {time.perf_counter() - start:.1f} s: {ext.library}")
    else:
        print(f"covshift fast CPU path unavailable, the reference path will run: {ext.error}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
