"""Signal propagation plot of a BN and a non-BN ResNet at initialization (the README's picture).

    python scripts/signal_propagation_plot.py            # writes the two files below
    python scripts/signal_propagation_plot.py --out DIR  # elsewhere (for a look without touching docs/)

Writes ``docs/images/signal_propagation.png`` and the numbers it shows, with the configuration, seed
and versions, to ``docs/results/signal_propagation.md``.

The models: a CIFAR-style ResNet (a 3x3 stem to 16 channels, then 3 stages of ``--blocks``
torchvision-style BasicBlocks of widths 16, 32, 64, the first of stages 2 and 3 with stride 2 and a
1x1 projection shortcut), He-normal (fan-in, ReLU) initialization of every conv; "BN" has a
BatchNorm after every conv (weight 1, bias 0), "no BN" the same network without them. The input is
N(0, 1), batch 64, 3x32x32, and the forward runs in training mode (batch statistics), as in Brock
et al. 2021's plots at initialization.
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import numpy as np
import torch
from torch import nn

import covshift
from covshift._io import atomic_write_bytes, atomic_write_text
from covshift.monitor import plot_signal_propagation, signal_propagation

ROOT = Path(__file__).resolve().parent.parent


class BasicBlock(nn.Module):
    """out = relu(branch(x) + skip(x)), branch = conv-(BN)-relu-conv-(BN), skip = x or 1x1 conv-(BN)."""

    def __init__(self, cin: int, cout: int, stride: int, bn: bool) -> None:
        super().__init__()
        norm = nn.BatchNorm2d if bn else (lambda c: nn.Identity())
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = norm(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = norm(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), norm(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


def resnet(blocks: int, bn: bool) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(3, 16, 3, 1, 1, bias=False)]
    if bn:
        layers.append(nn.BatchNorm2d(16))
    layers.append(nn.ReLU(inplace=True))
    cin = 16
    for width, stride in ((16, 1), (32, 2), (64, 2)):
        stage = [BasicBlock(cin if i == 0 else width, width, stride if i == 0 else 1, bn) for i in range(blocks)]
        layers.append(nn.Sequential(*stage))
        cin = width
    model = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
    return model


def _fmt(v: float) -> str:
    return "nan" if not np.isfinite(v) else f"{v:.3g}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--blocks", type=int, default=6, help="BasicBlocks per stage (3 stages)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="directory for both files (default: docs/)")
    args = p.parse_args()

    torch.manual_seed(args.seed)
    x = torch.randn(args.batch, 3, 32, 32)
    runs = []
    for bn, label in ((True, "ResNet, BN"), (False, "ResNet, no BN")):
        torch.manual_seed(args.seed)
        runs.append(signal_propagation(resnet(args.blocks, bn), x, training=True, label=label))

    image = (args.out or ROOT / "docs" / "images") / "signal_propagation.png"
    table = (args.out or ROOT / "docs" / "results") / "signal_propagation.md"
    # the numerical rank is full (64) at every block of both models: it is in the table, not the figure
    fig = plot_signal_propagation(
        runs, ("channel_sq_mean", "channel_var", "residual_var", "stable_rank", "cosine_similarity"), ncols=3
    )
    fig.suptitle(f"Signal propagation at initialization: N(0,1) input, batch {args.batch}", fontsize=11)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    atomic_write_bytes(image, buf.getvalue())

    a, b = runs
    cmd = "python scripts/signal_propagation_plot.py" + (f" --blocks {args.blocks}" if args.blocks != 6 else "")
    lines = [
        f"Written by `{cmd}`: ResNet of 3 stages x {args.blocks} BasicBlocks (widths 16/32/64), He init, with "
        f"and without BN, at initialization; N(0,1) input {args.batch}x3x32x32, training-mode forward, seed "
        f"{args.seed}; torch {torch.__version__}, covshift {covshift.__version__}. First and last block of each "
        "stage (the figure shows every block):",
        "",
        "| depth | block | channel var, BN / no BN | residual var, BN / no BN | stable rank, BN / no BN "
        "| mean cosine, BN / no BN | numerical rank, BN / no BN |",
        "|---|---|---|---|---|---|---|",
    ]
    n = args.blocks
    shown = sorted({d for s in range(3) for d in (s * n, s * n + n - 1)})
    for i in shown:
        pair = lambda arr, f=_fmt: f"{f(arr(a)[i])} / {f(arr(b)[i])}"  # noqa: E731
        lines.append(
            f"| {i + 1} | `{a.blocks[i]}` | {pair(lambda r: r.channel_var)} | {pair(lambda r: r.residual_var)} | "
            f"{pair(lambda r: r.stable_rank)} | {pair(lambda r: r.cosine_similarity)} | "
            f"{pair(lambda r: r.numerical_rank, lambda v: str(int(v)))} |"
        )
    atomic_write_text(table, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
