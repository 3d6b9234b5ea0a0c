"""Forward + backward of training-mode BatchNorm on CPU: covshift's two paths against torch.nn.BatchNorm*.

Three implementations run in one process, call by call in rotating order, so that drift in machine
load hits all of them equally:

* ``torch``: ``torch.nn.BatchNorm*`` (ATen's kernel);
* ``fast``: ``covshift.nn.BatchNorm*`` on covshift's default path (the fused C++ kernel on CPU float32);
* ``reference``: the same layer forced onto the plain PyTorch implementation.

Each time is the median over ``--repeats`` calls after warm-up; ratios are against torch, and their
geometric mean is over the shapes.

**Memory floor.** BatchNorm is memory-bound, so each shape also gets a floor: the time to read its
input once at the machine's copy bandwidth, measured here by copying a 256 MB tensor (bytes read plus
bytes written per second, the STREAM convention). "floors" is an implementation's time in units of
that floor. A training forward + backward must at least read x and write y, then read x and dy and
write dx: 5 floors. Tensors that fit in the last-level cache can beat this, since their passes after the
first are not served by memory.

**Peak memory.** The extra tensor memory one forward + backward holds at its peak, in units of the
input's size, from the PyTorch profiler's allocation events: every allocation and free of CPU tensor
memory through c10's allocator (ATen's internal buffers and covshift's kernel included), replayed in
time order. It measures what the tensors hold, not what malloc keeps cached, so it does not depend
on the allocator.

    python benchmarks/bn_speed.py [--repeats 30] [--threads N] [--dtype float32] [--no-memory]
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import platform
import statistics
import sys
import time
from typing import Callable

import torch

import covshift
import covshift.nn as cnn
from covshift.functional import fast_path_status, use_backend

# (label, torch class, covshift class, shape, memory format)
SHAPES = [
    ("BatchNorm1d (256, 1024)", torch.nn.BatchNorm1d, cnn.BatchNorm1d, (256, 1024), None),
    ("BatchNorm1d (4096, 256)", torch.nn.BatchNorm1d, cnn.BatchNorm1d, (4096, 256), None),
    ("BatchNorm2d (32, 256, 14, 14)", torch.nn.BatchNorm2d, cnn.BatchNorm2d, (32, 256, 14, 14), None),
    ("BatchNorm2d (32, 256, 14, 14) channels_last", torch.nn.BatchNorm2d, cnn.BatchNorm2d, (32, 256, 14, 14), torch.channels_last),
    ("BatchNorm2d (32, 64, 56, 56)", torch.nn.BatchNorm2d, cnn.BatchNorm2d, (32, 64, 56, 56), None),
    ("BatchNorm3d (8, 64, 8, 28, 28)", torch.nn.BatchNorm3d, cnn.BatchNorm3d, (8, 64, 8, 28, 28), None),
]

IMPLS = ("torch", "fast", "reference")
BACKEND = {"torch": None, "fast": "fast", "reference": "reference"}  # covshift backend per implementation (float32: "fast" is the default "auto")


def _step(impl: str, layer: torch.nn.Module, x: torch.Tensor, dy: torch.Tensor) -> None:
    x.grad = None
    layer.zero_grad(set_to_none=True)
    backend = BACKEND[impl]
    with use_backend(backend) if backend else contextlib.nullcontext():
        layer(x).backward(dy)


def _timed(fn: Callable[[], None]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def copy_bandwidth(nbytes: int = 256 * 2**20, repeats: int = 7) -> float:
    """Bytes per second of a large tensor copy, counting bytes read plus bytes written."""
    src = torch.ones(nbytes // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    dst.copy_(src)  # touch every page first
    t = statistics.median(_timed(lambda: dst.copy_(src)) for _ in range(repeats))
    return 2 * nbytes / t


@contextlib.contextmanager
def _quiet_stderr():
    """Silence the profiler's C++ log lines (written straight to file descriptor 2)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def peak_extra_bytes(fn: Callable[[], None]) -> float | None:
    """Peak tensor memory allocated (net of frees) while ``fn`` runs, from the profiler's allocation events."""
    try:
        from torch._C._profiler import _EventType
        from torch.profiler import ProfilerActivity, profile
    except ImportError:
        return None
    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        e = stack.pop()
        stack.extend(e.children)
        if e.typed[0] == _EventType.Allocation and e.typed[1].device.type == "cpu":
            events.append((e.start_time_ns, e.typed[1].alloc_size))
    live = peak = 0
    for _, size in sorted(events):
        live += size
        peak = max(peak, live)
    return float(peak)


def bench_shape(torch_cls, ours_cls, shape, fmt, dtype, repeats: int, memory: bool, warmup: int = 3):
    """Median seconds and peak extra bytes of one forward+backward, per implementation."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen, dtype=dtype)
    dy = torch.randn(shape, generator=gen, dtype=dtype)
    if fmt is not None:
        x, dy = x.contiguous(memory_format=fmt), dy.contiguous(memory_format=fmt)
    x.requires_grad_()
    layers = {
        "torch": torch_cls(shape[1], dtype=torch.float32).train(),
        "fast": ours_cls(shape[1], dtype=torch.float32).train(),
        "reference": ours_cls(shape[1], dtype=torch.float32).train(),
    }
    steps = {impl: (lambda impl=impl: _step(impl, layers[impl], x, dy)) for impl in IMPLS}
    for _ in range(warmup):
        for impl in IMPLS:
            steps[impl]()
    times: dict[str, list[float]] = {impl: [] for impl in IMPLS}
    for i in range(repeats):
        order = IMPLS[i % 3 :] + IMPLS[: i % 3]  # rotate who goes first, so no one always runs on a warm cache
        for impl in order:
            times[impl].append(_timed(steps[impl]))
    peaks: dict[str, float | None] = {impl: None for impl in IMPLS}
    if memory:
        for impl in IMPLS:
            x.grad = None
            peaks[impl] = peak_extra_bytes(steps[impl])
    return {impl: statistics.median(ts) for impl, ts in times.items()}, peaks


def _geomean(values: list[float]) -> float:
    return math.exp(sum(map(math.log, values)) / len(values))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16"])
    parser.add_argument("--no-memory", dest="memory", action="store_false", help="skip the peak-memory measurement")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)

    bandwidth = copy_bandwidth()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"covshift {covshift.__version__}, torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, {args.threads} threads, {args.dtype}, training forward+backward, median of {args.repeats}"
    )
    print(f"copy bandwidth {bandwidth / 1e9:.1f} GB/s (read+write); 1-min load average at start {load:.2f}")
    status = fast_path_status()
    warm = torch.zeros(2, 3, requires_grad=True)  # build/load the kernel before timing
    with use_backend("auto"):
        cnn.BatchNorm1d(3)(warm).sum().backward()
    status = fast_path_status()
    print(f"fast path: {'loaded ' + str(status['library'] or '') if status['loaded'] else 'UNAVAILABLE: ' + str(status['error'])}")
    print()
    header = (
        f"{'shape':44s} {'floor':>6s} | {'torch':>7s} {'(fl)':>5s} | {'fast':>7s} {'(fl)':>5s} {'ratio':>5s} | "
        f"{'ref':>7s} {'(fl)':>5s} {'ratio':>5s} | {'peak mem / input':>18s}"
    )
    print(header)
    print(f"{'':44s} {'ms':>6s} | {'ms':>7s} {'':>5s} | {'ms':>7s} {'':>5s} {'':>5s} | {'ms':>7s} {'':>5s} {'':>5s} | {'torch fast  ref':>18s}")
    ratios: dict[str, list[float]] = {"fast": [], "reference": []}
    for label, torch_cls, ours_cls, shape, fmt in SHAPES:
        med, peaks = bench_shape(torch_cls, ours_cls, shape, fmt, dtype, args.repeats, args.memory)
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        floor = nbytes / bandwidth
        for impl in ratios:
            ratios[impl].append(med[impl] / med["torch"])
        mem = " ".join(f"{peaks[i] / nbytes:5.2f}" if peaks[i] is not None else "    -" for i in IMPLS)
        print(
            f"{label:44s} {floor * 1e3:6.2f} | {med['torch'] * 1e3:7.2f} {med['torch'] / floor:5.1f} | "
            f"{med['fast'] * 1e3:7.2f} {med['fast'] / floor:5.1f} {med['fast'] / med['torch']:5.2f} | "
            f"{med['reference'] * 1e3:7.2f} {med['reference'] / floor:5.1f} {med['reference'] / med['torch']:5.2f} | {mem:>18s}"
        )
    print()
    print(
        "floor: one read of the input at the copy bandwidth; (fl): time in floors (read x + write y + read x, dy + "
        "write dx = 5 floors from memory); ratio: time / torch's; peak mem: extra tensor memory of one step / input size"
    )
    print(
        f"geometric mean ratio to torch: fast {_geomean(ratios['fast']):.2f} (worst {max(ratios['fast']):.2f}), "
        f"reference {_geomean(ratios['reference']):.2f} (worst {max(ratios['reference']):.2f})"
    )
    load_end = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"1-min load average at end {load_end:.2f} (above the thread count, timings are noisy)")


if __name__ == "__main__":
    main()
