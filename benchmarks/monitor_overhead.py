"""Cost of ActivationMonitor on training speed, with and without it, in one process.

Two models, each trained with plain SGD on fixed random batches:

* the paper's MLP (Ioffe & Szegedy, Figure 1): 784-100-100-100-10, sigmoid, batch 60;
* a small CNN: two conv3x3 + BatchNorm2d + ReLU + max-pool blocks (16, 32 channels), linear head,
  batch 64 on 28x28 input.

For each model three settings alternate block by block, in a rotating order, so that drift in
machine load hits them equally: no monitor, ``every=10`` and ``every=1`` (default config: every
activation and norm input watched, JSON Lines and npz written to a temporary run directory). A
block is a fixed number of optimizer steps (200 for the MLP, 20 for the CNN, times ``--scale``);
a monitored block attaches, trains, flushes what it recorded (device to host, statistics, JSON
Lines) and detaches, all timed, so each block pays for its own measurements. Only the rewrite of
the histogram npz, which the monitor does at most every 30 s, is left to the end of the run. Each
figure is the median over ``--rounds`` blocks.

    python benchmarks/monitor_overhead.py [--rounds 21] [--scale 1] [--threads N] [--clock wall]

``--clock cpu`` times with the process's CPU time instead of the wall clock: steadier on a
shared machine, where other processes' load inflates wall times at random.

The last line reads ``monitor overhead: every=10 X.X%  every=1 Y.Y%``, the worse of the two
models for each setting.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

import covshift
from covshift.monitor import ActivationMonitor


def paper_mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(784, 100), nn.Sigmoid(),
        nn.Linear(100, 100), nn.Sigmoid(),
        nn.Linear(100, 100), nn.Sigmoid(),
        nn.Linear(100, 10),
    )


def small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 7 * 7, 10),
    )


# name: (constructor, input shape, steps per block)
MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], int]] = {
    "mlp 784-100x3-10 sigmoid, batch 60": (paper_mlp, (60, 784), 200),
    "cnn 2x(conv+bn+relu), batch 64, 28x28": (small_cnn, (64, 1, 28, 28), 20),
}
SETTINGS: list[Optional[int]] = [None, 10, 1]  # None: no monitor


def _batches(shape: tuple[int, ...], n: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [(torch.rand(*shape, generator=g), torch.randint(0, 10, (shape[0],), generator=g)) for _ in range(n)]


def _block(model, opt, batches, steps: int, mon: Optional[ActivationMonitor], clock) -> float:
    """Seconds per step over one block of ``steps`` steps (attach, flush, detach included)."""
    t0 = clock()
    if mon is not None:
        mon.attach()
    for i in range(steps):
        x, y = batches[i % len(batches)]
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        if mon is not None:
            mon.step()
    if mon is not None:
        mon.flush(write_histograms=False)
        mon.detach()
    return (clock() - t0) / steps


def bench(make: Callable[[], nn.Module], shape, rounds: int, steps: int, root: str, clock) -> dict:
    """Median seconds per step for each setting."""
    torch.manual_seed(0)
    model = make()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    batches = _batches(shape)
    mons = {
        every: ActivationMonitor(model, every=every, log_dir=os.path.join(root, f"{id(model)}-{every}"))
        for every in SETTINGS
        if every is not None
    }
    for every in SETTINGS:  # warm-up: allocator, sample positions, histogram edges
        _block(model, opt, batches, steps, mons.get(every), clock)
    times: dict[Optional[int], list[float]] = {s: [] for s in SETTINGS}
    for r in range(rounds):
        order = SETTINGS[r % 3 :] + SETTINGS[: r % 3]
        for every in order:
            times[every].append(_block(model, opt, batches, steps, mons.get(every), clock))
    for mon in mons.values():
        mon.close()
    return {s: statistics.median(v) for s, v in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=21, help="timed blocks per setting (median taken)")
    p.add_argument("--scale", type=int, default=1, help="multiply the steps per block")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: CPUs available)")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall", help="wall clock or process CPU time")
    args = p.parse_args()
    threads = args.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    clock = time.perf_counter if args.clock == "wall" else time.process_time

    print(
        f"covshift {covshift.__version__}, torch {torch.__version__}, {platform.machine()}, "
        f"{threads} threads, {args.clock} clock; median of {args.rounds} blocks per setting"
    )
    print(f"{'model':<40} {'no monitor':>12} {'every=10':>18} {'every=1':>18}")
    worst = {10: -float("inf"), 1: -float("inf")}
    with tempfile.TemporaryDirectory() as root:
        for name, (make, shape, steps) in MODELS.items():
            med = bench(make, shape, args.rounds, steps * args.scale, root, clock)
            base = med[None]
            cells = []
            for every in (10, 1):
                over = 100.0 * (med[every] / base - 1.0)
                worst[every] = max(worst[every], over)
                cells.append(f"{1e3 * med[every]:8.3f} ms {over:+5.1f}%")
            print(f"{name:<40} {1e3 * base:9.3f} ms {cells[0]:>18} {cells[1]:>18}")
    print(f"monitor overhead: every=10 {worst[10]:.1f}%  every=1 {worst[1]:.1f}%")


if __name__ == "__main__":
    main()
