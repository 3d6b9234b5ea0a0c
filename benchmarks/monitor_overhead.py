"""Cost of ActivationMonitor on training speed, with and without it, in one process.

Three models, each trained with plain SGD (momentum 0.9) on fixed random batches:

* the paper's MLP (Ioffe & Szegedy, Figure 1): 784-100-100-100-10, sigmoid, batch 60 (3 watched
  layers);
* a small CNN: two conv3x3 + BatchNorm2d + ReLU + max-pool blocks (16, 32 channels), linear head,
  batch 64 on 28x28 input (4 watched layers);
* a small ResNet: a conv3x3 + BN + ReLU stem and five basic residual blocks (16, 16, 32, 32, 64
  channels, strides 1, 1, 2, 1, 2), global average pool, linear head, batch 32 on 28x28 input
  (22 watched layers: every BN input and every ReLU input).

Every monitored setting uses the default config (every activation and norm input watched, JSON
Lines written to a temporary run directory). A *block* is a fixed number of optimizer steps; a
monitored block attaches, trains, flushes what it recorded (device to host, statistics, JSON Lines)
and detaches, all timed, so each block pays for its own measurements (only the npz rewrite, which
the monitor does at most every 30 s, is left out).

Steadiness: each round runs, for each candidate (``control``, ``every=10``, ``every=1``), a
reference block (no monitor) and a candidate block back to back, in an order that alternates from
round to round, and takes the ratio of the two; a figure is the median over ``--rounds`` rounds of
those ratios. The ``control`` candidate is the unmonitored model against itself: it must read ~0%,
and its spread says how far to trust the other columns. glibc's malloc is pinned (mallopt through
ctypes: a fixed mmap threshold, no trimming, one arena), so the heap's state does not drift between
blocks and move the ratios.

    python benchmarks/monitor_overhead.py [--rounds 31] [--scale 1] [--threads N] [--clock wall]
                                          [--models mlp,cnn,resnet] [--write]

``--clock cpu`` times with the process's CPU time instead of the wall clock (steadier on a shared
machine). ``--write`` also writes docs/results/monitor_overhead.md (the table, the last line, the
command and the machine's load average), which the README quotes.

The last line reads ``monitor overhead: every=10 X.X%  every=1 Y.Y%``, the worse model for each
setting.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

import harness  # noqa: E402 - pins glibc malloc before torch allocates anything

_MALLOC = harness.MALLOC


import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import covshift  # noqa: E402
from covshift.monitor import ActivationMonitor, stats  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULT = ROOT / "docs" / "results" / "monitor_overhead.md"


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


class BasicBlock(nn.Module):
    """He et al. 2016's basic block: conv-BN-ReLU-conv-BN, plus the (projected) input, then ReLU."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu2 = nn.ReLU(inplace=True)
        self.skip = nn.Identity() if stride == 1 and cin == cout else nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.relu1(self.bn1(self.conv1(x)))
        return self.relu2(self.bn2(self.conv2(h)) + self.skip(x))


def small_resnet() -> nn.Module:
    widths, strides = (16, 16, 32, 32, 64), (1, 1, 2, 1, 2)
    blocks, cin = [], 16
    for w, s in zip(widths, strides):
        blocks.append(BasicBlock(cin, w, s))
        cin = w
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(inplace=True),
        *blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, 10),
    )


# key: (label, constructor, input shape, steps per block)
MODELS: dict[str, tuple[str, Callable[[], nn.Module], tuple[int, ...], int]] = {
    "mlp": ("MLP 784-100x3-10, sigmoid, batch 60", paper_mlp, (60, 784), 200),
    "cnn": ("CNN 2x(conv+BN+ReLU), batch 64, 28x28", small_cnn, (64, 1, 28, 28), 20),
    "resnet": ("ResNet stem+5 basic blocks, batch 32, 28x28", small_resnet, (32, 1, 28, 28), 10),
}
CANDIDATES: list[str] = ["control", "every=10", "every=1"]


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
    """Per candidate: the median time per step and the median ratio to its paired reference block."""
    torch.manual_seed(0)
    model = make()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    batches = _batches(shape)
    mons: dict[str, Optional[ActivationMonitor]] = {"control": None, "reference": None}
    for every in (10, 1):
        mons[f"every={every}"] = ActivationMonitor(model, every=every, log_dir=os.path.join(root, f"{id(model)}-{every}"))
    watched = len(mons["every=1"].modules)  # type: ignore[union-attr]
    for name in ["reference", *CANDIDATES]:  # warm-up: allocator, sample positions, histogram edges
        _block(model, opt, batches, steps, mons[name], clock)
    times: dict[str, list[float]] = {name: [] for name in ["reference", *CANDIDATES]}
    ratios: dict[str, list[float]] = {name: [] for name in CANDIDATES}
    for r in range(rounds):
        order = CANDIDATES[r % 3 :] + CANDIDATES[: r % 3]
        for name in order:
            pair = ["reference", name] if r % 2 == 0 else [name, "reference"]
            t = {p: _block(model, opt, batches, steps, mons[p], clock) for p in pair}
            times["reference"].append(t["reference"])
            times[name].append(t[name])
            ratios[name].append(t[name] / t["reference"])
    for mon in mons.values():
        if mon is not None:
            mon.close()
    return {
        "watched": watched,
        "time": {k: statistics.median(v) for k, v in times.items()},
        "over": {k: 100.0 * (statistics.median(v) - 1.0) for k, v in ratios.items()},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=31, help="rounds of paired blocks (median taken)")
    p.add_argument("--scale", type=int, default=1, help="multiply the steps per block")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: CPUs available)")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall", help="wall clock or process CPU time")
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {','.join(MODELS)}")
    p.add_argument("--write", action="store_true", help=f"also write {RESULT.relative_to(ROOT)}")
    args = p.parse_args()
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in MODELS]
    if unknown or not models:
        p.error(f"--models: expected names from {','.join(MODELS)}, got {args.models!r}")
    threads = args.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    ext = stats.extension()
    kernels = "C++ monitor kernels" if ext.loaded else f"pure-torch kernels ({ext.error})"
    load_before = os.getloadavg()

    lines = [
        f"covshift {covshift.__version__}, torch {torch.__version__}, {platform.machine()}, {threads} threads, "
        f"{args.clock} clock, {kernels}, {_MALLOC}; median over {args.rounds} rounds of paired blocks",
        "",
        "| model | watched layers | no monitor | control | every=10 | every=1 |",
        "|---|---|---|---|---|---|",
    ]
    print(lines[0])
    worst = {"every=10": -float("inf"), "every=1": -float("inf")}
    with tempfile.TemporaryDirectory() as root:
        for key in models:
            label, make, shape, steps = MODELS[key]
            res = bench(make, shape, args.rounds, steps * args.scale, root, clock)
            t, over = res["time"], res["over"]
            for name in worst:
                worst[name] = max(worst[name], over[name])
            cells = [f"{1e3 * t[n]:.3f} ms ({over[n]:+.1f}%)" for n in CANDIDATES]
            row = f"| {label} | {res['watched']} | {1e3 * t['reference']:.3f} ms/step | " + " | ".join(cells) + " |"
            lines.append(row)
            print(row, flush=True)
    load_after = os.getloadavg()
    last = f"monitor overhead: every=10 {worst['every=10']:.1f}%  every=1 {worst['every=1']:.1f}%"
    load = f"load average (1, 5, 15 min) before: {', '.join(f'{v:.2f}' for v in load_before)}; after: {', '.join(f'{v:.2f}' for v in load_after)}; {os.cpu_count()} CPUs"
    print(load)
    print(last)
    if args.write:
        command = "python benchmarks/monitor_overhead.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
        body = [f"Written by `{command.strip()}`.", "", *lines, "", load, "", f"`{last}`"]
        from covshift._io import atomic_write_text

        atomic_write_text(RESULT, "\n".join(body) + "\n")


if __name__ == "__main__":
    main()
