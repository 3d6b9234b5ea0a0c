"""Forward + backward of training-mode BatchNorm: covshift against torch.nn.BatchNorm*, on CPU.

Both layers run in one process, alternating call by call so that drift in machine load hits
both equally; each figure is the median over ``--repeats`` timed calls after warm-up.

    python benchmarks/bn_speed.py [--repeats 30] [--threads N] [--dtype float32]

Prints one row per shape (milliseconds, ratio covshift/torch) and the geometric mean of the ratios.
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import time

import torch

import covshift
import covshift.nn as cnn

# (label, torch class, covshift class, shape, memory format)
SHAPES = [
    ("BatchNorm1d (256, 1024)", torch.nn.BatchNorm1d, cnn.BatchNorm1d, (256, 1024), None),
    ("BatchNorm1d (4096, 256)", torch.nn.BatchNorm1d, cnn.BatchNorm1d, (4096, 256), None),
    ("BatchNorm2d (32, 256, 14, 14)", torch.nn.BatchNorm2d, cnn.BatchNorm2d, (32, 256, 14, 14), None),
    ("BatchNorm2d (32, 256, 14, 14) channels_last", torch.nn.BatchNorm2d, cnn.BatchNorm2d, (32, 256, 14, 14), torch.channels_last),
    ("BatchNorm2d (32, 64, 56, 56)", torch.nn.BatchNorm2d, cnn.BatchNorm2d, (32, 64, 56, 56), None),
    ("BatchNorm3d (8, 64, 8, 28, 28)", torch.nn.BatchNorm3d, cnn.BatchNorm3d, (8, 64, 8, 28, 28), None),
]


def _step(layer: torch.nn.Module, x: torch.Tensor, dy: torch.Tensor) -> None:
    x.grad = None
    layer.zero_grad(set_to_none=True)
    layer(x).backward(dy)


def _time(layer, x, dy) -> float:
    t0 = time.perf_counter()
    _step(layer, x, dy)
    return time.perf_counter() - t0


def bench_shape(torch_cls, ours_cls, shape, fmt, dtype, repeats: int, warmup: int = 3) -> tuple[float, float]:
    """Median seconds of one forward+backward for (torch, covshift)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen, dtype=dtype)
    dy = torch.randn(shape, generator=gen, dtype=dtype)
    if fmt is not None:
        x, dy = x.contiguous(memory_format=fmt), dy.contiguous(memory_format=fmt)
    x.requires_grad_()
    ref, ours = torch_cls(shape[1]).train(), ours_cls(shape[1]).train()
    for _ in range(warmup):
        _step(ref, x, dy)
        _step(ours, x, dy)
    t_ref, t_ours = [], []
    for i in range(repeats):
        # Alternate which goes first, so neither always runs on a warmer cache.
        if i % 2:
            t_ref.append(_time(ref, x, dy))
            t_ours.append(_time(ours, x, dy))
        else:
            t_ours.append(_time(ours, x, dy))
            t_ref.append(_time(ref, x, dy))
    return statistics.median(t_ref), statistics.median(t_ours)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    print(
        f"covshift {covshift.__version__}, torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{args.threads} threads, {args.dtype}, training forward+backward, median of {args.repeats}"
    )
    print(f"{'shape':46s} {'torch ms':>9s} {'covshift ms':>12s} {'ratio':>7s}")
    ratios = []
    for label, torch_cls, ours_cls, shape, fmt in SHAPES:
        t_ref, t_ours = bench_shape(torch_cls, ours_cls, shape, fmt, dtype, args.repeats)
        ratios.append(t_ours / t_ref)
        print(f"{label:46s} {t_ref * 1e3:9.2f} {t_ours * 1e3:12.2f} {t_ours / t_ref:7.2f}")
    geo = math.exp(sum(map(math.log, ratios)) / len(ratios))
    print(f"geometric mean ratio covshift/torch: {geo:.2f}")


if __name__ == "__main__":
    main()
