"""Forward + backward of training-mode BatchNorm on CPU: covshift against torch.nn.BatchNorm*.

Every implementation runs in one process, call by call in rotating order (benchmarks/harness.py, which
also pins glibc's malloc), so that drift in machine load and heap state hits all of them equally:

* ``torch``: ``torch.nn.BatchNorm*`` (ATen's kernel);
* ``control``: a second, identical ``torch.nn.BatchNorm*``. Its ratio to ``torch`` shows the benchmark's
  own fairness: it must read about 1.00, and its spread says how far to trust the other ratios;
* ``covshift``: ``covshift.nn.BatchNorm*`` on its default path. The "path" column says which one ran
  (``kernel``: the operator ``torch.ops.covshift.batch_norm``; ``reference``: plain PyTorch), read off
  the autograd graph rather than assumed, so ``--dtype float64|bfloat16`` labels what it measures;
* ``reference``: the same layer forced onto the plain PyTorch implementation.

Each time is the median over ``--repeats`` calls after warm-up; ratios are against torch, and their
geometric mean is over the shapes. The last table times one training step of the paper's Figure 1 MLP
(784-100x3-10, sigmoid, batch 60, SGD) with covshift's and with torch's BatchNorm1d.

``--compile`` instead compares ``torch.compile`` of each layer: compiled covshift against compiled
torch and against eager covshift (compile must keep covshift's kernel, so it must not be slower).

**Memory floor.** BatchNorm is memory-bound, so each shape also gets a floor: the time to read its input
once at the machine's copy bandwidth (bytes read plus written per second, the STREAM convention).
"(fl)" is a time in floors; a training forward + backward moves at least 5 floors from memory (read x,
write y, read x and dy, write dx). Tensors that fit in the last-level cache can beat that.

**Peak memory.** The extra tensor memory one forward + backward holds at its peak, in units of the
input's size, from the PyTorch profiler's allocation events (c10's allocator, replayed in time order).

    python benchmarks/bn_speed.py [--repeats 40] [--threads 2] [--dtype float32] [--no-memory] [--compile] [--write]

``--write`` writes the tables to docs/results/bn_speed.md (or bn_speed_compile.md), with this command,
the machine and its load average, for the README.
"""

from __future__ import annotations

import harness  # noqa: I001 - first: pins malloc before torch allocates

import argparse
import contextlib
import datetime
import math
import os
import platform
import sys
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

import covshift
import covshift.nn as cnn
from covshift.functional import fast_path_status, use_backend

RESULTS = Path(__file__).resolve().parent.parent / "docs" / "results"

# (label, torch class, covshift class, shape, memory format)
SHAPES = [
    ("BatchNorm1d (60, 100)", torch.nn.BatchNorm1d, cnn.BatchNorm1d, (60, 100), None),
    ("BatchNorm1d (64, 16)", torch.nn.BatchNorm1d, cnn.BatchNorm1d, (64, 16), None),
    ("BatchNorm1d (256, 1024)", torch.nn.BatchNorm1d, cnn.BatchNorm1d, (256, 1024), None),
    ("BatchNorm1d (4096, 256)", torch.nn.BatchNorm1d, cnn.BatchNorm1d, (4096, 256), None),
    ("BatchNorm2d (8, 16, 8, 8)", torch.nn.BatchNorm2d, cnn.BatchNorm2d, (8, 16, 8, 8), None),
    ("BatchNorm2d (32, 256, 14, 14)", torch.nn.BatchNorm2d, cnn.BatchNorm2d, (32, 256, 14, 14), None),
    ("BatchNorm2d (32, 256, 14, 14) channels_last", torch.nn.BatchNorm2d, cnn.BatchNorm2d, (32, 256, 14, 14), torch.channels_last),
    ("BatchNorm2d (32, 64, 56, 56)", torch.nn.BatchNorm2d, cnn.BatchNorm2d, (32, 64, 56, 56), None),
    ("BatchNorm2d (32, 64, 56, 56) channels_last", torch.nn.BatchNorm2d, cnn.BatchNorm2d, (32, 64, 56, 56), torch.channels_last),
    ("BatchNorm3d (8, 64, 8, 28, 28)", torch.nn.BatchNorm3d, cnn.BatchNorm3d, (8, 64, 8, 28, 28), None),
]

BOUND_GEOMEAN, BOUND_WORST, BOUND_COMPILE_EAGER, BOUND_FIG1 = 0.75, 1.00, 1.05, 1.05


def _step(layer: torch.nn.Module, x: torch.Tensor, dy: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    x.grad = None
    layer.zero_grad(set_to_none=True)
    with use_backend(backend) if backend else contextlib.nullcontext():
        y = layer(x)
        y.backward(dy)
    return y


def path_of(layer: torch.nn.Module, x: torch.Tensor) -> str:
    """Which implementation a covshift layer ran: read off the autograd node its output hangs on."""
    y = layer(x)
    return "kernel" if "BatchNormAutograd" in y.grad_fn.name() else "reference"


def copy_bandwidth(nbytes: int = 256 * 2**20, repeats: int = 7) -> float:
    """Bytes per second of a large tensor copy, counting bytes read plus bytes written."""
    src = torch.ones(nbytes // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    dst.copy_(src)  # touch every page first
    return 2 * nbytes / harness.alternate({"copy": lambda: dst.copy_(src)}, repeats, warmup=1)["copy"]


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


def peak_extra_bytes(fn: Callable[[], object]) -> float | None:
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


def _inputs(shape, fmt, dtype):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen, dtype=dtype)
    dy = torch.randn(shape, generator=gen, dtype=dtype)
    if fmt is not None:
        x, dy = x.contiguous(memory_format=fmt), dy.contiguous(memory_format=fmt)
    return x.requires_grad_(), dy


def _inner(shape) -> int:
    """Calls per timed sample: enough that a sample of a tiny shape is well above the clock's resolution."""
    return max(1, min(50, 2_000_000 // math.prod(shape)))


def bench_eager(torch_cls, ours_cls, shape, fmt, dtype, repeats: int, memory: bool):
    x, dy = _inputs(shape, fmt, dtype)
    pdtype = torch.float32 if dtype == torch.bfloat16 else dtype  # mixed precision: float32 parameters
    layers = {
        "torch": torch_cls(shape[1], dtype=pdtype),
        "control": torch_cls(shape[1], dtype=pdtype),
        "covshift": ours_cls(shape[1], dtype=pdtype),
        "reference": ours_cls(shape[1], dtype=pdtype),
    }
    backend = {"covshift": None, "reference": "reference"}
    steps = {k: (lambda k=k: _step(layers[k], x, dy, backend.get(k))) for k in layers}
    med = harness.alternate(steps, repeats, inner=_inner(shape))
    peaks = {k: (peak_extra_bytes(steps[k]) if memory else None) for k in ("torch", "covshift", "reference")}
    return med, peaks, path_of(layers["covshift"], x)


def bench_compiled(torch_cls, ours_cls, shape, fmt, dtype, repeats: int):
    x, dy = _inputs(shape, fmt, dtype)
    torch._dynamo.reset()
    eager = ours_cls(shape[1], dtype=dtype)
    layers = {
        "torch compiled": torch.compile(torch_cls(shape[1], dtype=dtype), fullgraph=True, dynamic=False),
        "covshift compiled": torch.compile(ours_cls(shape[1], dtype=dtype), fullgraph=True, dynamic=False),
        "covshift eager": eager,
    }
    steps = {k: (lambda k=k: _step(layers[k], x, dy)) for k in layers}
    return harness.alternate(steps, repeats, warmup=3, inner=_inner(shape))


def fig1_mlp(bn_cls) -> torch.nn.Module:
    """The paper's Figure 1 network with BN before every sigmoid (784-100x3-10, no bias before BN)."""
    layers, width = [], 784
    for _ in range(3):
        layers += [torch.nn.Linear(width, 100, bias=False), bn_cls(100), torch.nn.Sigmoid()]
        width = 100
    layers.append(torch.nn.Linear(width, 10))
    return torch.nn.Sequential(*layers)


def bench_fig1(repeats: int) -> dict[str, float]:
    torch.manual_seed(0)
    models = {"torch": fig1_mlp(torch.nn.BatchNorm1d), "control": fig1_mlp(torch.nn.BatchNorm1d), "covshift": fig1_mlp(cnn.BatchNorm1d)}
    for m in models.values():
        m.load_state_dict(models["torch"].state_dict())
    opts = {k: torch.optim.SGD(m.parameters(), lr=0.1) for k, m in models.items()}
    gen = torch.Generator().manual_seed(1)
    x, y = torch.rand(60, 784, generator=gen), torch.randint(0, 10, (60,), generator=gen)

    def step(k):
        opts[k].zero_grad(set_to_none=True)
        F.cross_entropy(models[k](x), y).backward()
        opts[k].step()

    return harness.alternate({k: (lambda k=k: step(k)) for k in models}, repeats, warmup=20, inner=10)


def _header(args, bandwidth: float, load: float) -> list[str]:
    status = fast_path_status()
    kernel = "loaded" if status["loaded"] else f"UNAVAILABLE ({status['error']})"
    return [
        f"`python benchmarks/bn_speed.py{' --compile' if args.compile else ''}"
        f"{'' if args.dtype == 'float32' else ' --dtype ' + args.dtype} --threads {args.threads} --repeats {args.repeats}`, "
        f"{datetime.date.today().isoformat()}: covshift {covshift.__version__}, torch {torch.__version__}, "
        f"{platform.machine()} ({torch.backends.cpu.get_cpu_capability()}), {os.cpu_count()} CPUs, {args.threads} threads, "
        f"{args.dtype}, training forward+backward, median of {args.repeats} (alternating; {harness.MALLOC}); "
        f"copy bandwidth {bandwidth / 1e9:.1f} GB/s; kernel {kernel}; load average {load:.2f} at start",
        "",
    ]


def run_eager(args, dtype, bandwidth) -> tuple[list[str], bool]:
    lines = [
        "| shape | floor ms | torch ms (fl) | covshift ms (fl) | path | covshift / torch | control / torch | reference ms | reference / torch | peak mem torch / covshift / ref |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    ratios, ref_ratios, controls = [], [], []
    for label, torch_cls, ours_cls, shape, fmt in SHAPES:
        med, peaks, path = bench_eager(torch_cls, ours_cls, shape, fmt, dtype, args.repeats, args.memory)
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        floor = nbytes / bandwidth
        r, c, rr = med["covshift"] / med["torch"], med["control"] / med["torch"], med["reference"] / med["torch"]
        ratios.append(r), controls.append(c), ref_ratios.append(rr)
        mem = " / ".join(f"{peaks[i] / nbytes:.1f}" if peaks[i] is not None else "-" for i in ("torch", "covshift", "reference"))
        lines.append(
            f"| {label} | {floor * 1e3:.3f} | {med['torch'] * 1e3:.3f} ({med['torch'] / floor:.1f}) | "
            f"{med['covshift'] * 1e3:.3f} ({med['covshift'] / floor:.1f}) | {path} | {r:.2f} | {c:.2f} | "
            f"{med['reference'] * 1e3:.3f} | {rr:.2f} | {mem} |"
        )
        print(lines[-1], flush=True)
    g = harness.geomean(ratios)
    lines.append(f"| **geometric mean** | | | | | **{g:.2f}** | {harness.geomean(controls):.2f} | | {harness.geomean(ref_ratios):.2f} | |")
    fig = bench_fig1(max(args.repeats, 30))
    lines += [
        "",
        "| Figure 1 MLP training step (784-100x3-10, sigmoid, batch 60, SGD) | torch BN ms | covshift BN ms | covshift / torch | control / torch |",
        "|---|---|---|---|---|",
        f"| one step: forward, loss, backward, optimizer | {fig['torch'] * 1e3:.3f} | {fig['covshift'] * 1e3:.3f} | "
        f"{fig['covshift'] / fig['torch']:.2f} | {fig['control'] / fig['torch']:.2f} |",
    ]
    fig_ratio = fig["covshift"] / fig["torch"]
    ok = g <= BOUND_GEOMEAN and max(ratios) <= BOUND_WORST and fig_ratio <= BOUND_FIG1
    lines += [
        "",
        f"Bounds: geometric mean {g:.2f} (at most {BOUND_GEOMEAN}), worst shape {max(ratios):.2f} (at most "
        f"{BOUND_WORST:.2f}), Figure 1 step {fig_ratio:.2f} (at most {BOUND_FIG1}): {'met' if ok else 'NOT met'}.",
    ]
    return lines, ok


def run_compiled(args, dtype) -> tuple[list[str], bool]:
    lines = [
        "| shape | torch compiled ms | covshift compiled ms | covshift eager ms | compiled covshift / compiled torch | compiled / eager covshift |",
        "|---|---|---|---|---|---|",
    ]
    worst_t = worst_e = 0.0
    for label, torch_cls, ours_cls, shape, fmt in SHAPES:
        med = bench_compiled(torch_cls, ours_cls, shape, fmt, dtype, args.repeats)
        rt = med["covshift compiled"] / med["torch compiled"]
        re_ = med["covshift compiled"] / med["covshift eager"]
        worst_t, worst_e = max(worst_t, rt), max(worst_e, re_)
        lines.append(
            f"| {label} | {med['torch compiled'] * 1e3:.3f} | {med['covshift compiled'] * 1e3:.3f} | "
            f"{med['covshift eager'] * 1e3:.3f} | {rt:.2f} | {re_:.2f} |"
        )
        print(lines[-1], flush=True)
    ok = worst_t <= 1.0 and worst_e <= BOUND_COMPILE_EAGER
    lines += [
        "",
        f"Bounds: compiled covshift / compiled torch at most 1.00 (worst {worst_t:.2f}), compiled / eager covshift "
        f"at most {BOUND_COMPILE_EAGER} (worst {worst_e:.2f}): {'met' if ok else 'NOT met'}.",
    ]
    return lines, ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16"])
    parser.add_argument("--no-memory", dest="memory", action="store_false", help="skip the peak-memory measurement")
    parser.add_argument("--compile", action="store_true", help="compare torch.compile of each layer instead")
    parser.add_argument("--write", action="store_true", help="write the tables to docs/results/")
    parser.add_argument("--only", default=None, help="run only the shapes whose label contains this text")
    args = parser.parse_args()
    if args.only:
        SHAPES[:] = [s for s in SHAPES if args.only in s[0]]
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    cnn.BatchNorm1d(3)(torch.zeros(2, 3, requires_grad=True)).sum().backward()  # build/load the kernel first
    bandwidth = copy_bandwidth()
    head = _header(args, bandwidth, harness.load_average())
    print("\n".join(head), flush=True)
    body, ok = run_compiled(args, dtype) if args.compile else run_eager(args, dtype, bandwidth)
    end = harness.load_average()
    quiet = "below 1: a quiet machine" if end < 1 else "1 or more: other work was running, timings are noisy"
    tail = ["", f"Load average at end {end:.2f} ({quiet})."]
    print("\n".join(body[-2:] + tail))
    if args.write:
        name = "bn_speed_compile.md" if args.compile else ("bn_speed.md" if args.dtype == "float32" else f"bn_speed_{args.dtype}.md")
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / name).write_text("\n".join(head + body + tail) + "\n", encoding="utf-8")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
