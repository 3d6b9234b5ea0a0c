"""Accuracy of training-mode BatchNorm in float32 against float64, for torch and covshift's two paths.

Inputs: float32 tensors of shape (256, 8, 16); for each, the float64 result of the same float32 values is
the reference. The hard case is the one the issue names, mean 1e3 and std 0.1 (a sum of x loses digits of
the mean, E[x^2] - E[x]^2 cancels); the easy one is mean 0, std 1. Printed: the largest absolute error of
the output, and the largest difference between covshift's kernel and its reference path.

    python benchmarks/bn_numerics.py [--write]      # --write: docs/results/bn_numerics.md
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from covshift.functional import batch_norm, use_backend

RESULTS = Path(__file__).resolve().parent.parent / "docs" / "results"
CASES = {"mean 1e3, std 0.1": (1e3, 0.1), "mean 0, std 1": (0.0, 1.0)}


def errors(mean: float, std: float, seed: int = 0) -> dict[str, float]:
    g = torch.Generator().manual_seed(seed)
    x32 = (torch.randn(256, 8, 16, generator=g, dtype=torch.float64) * std + mean).float()
    ref = F.batch_norm(x32.double(), None, None, training=True)
    out = {"torch": F.batch_norm(x32, None, None, training=True)}
    for backend, key in (("fast", "kernel"), ("reference", "reference")):
        with use_backend(backend):
            out[key] = batch_norm(x32, None, None, training=True)
    err = {k: (v.double() - ref).abs().max().item() for k, v in out.items()}
    err["kernel vs reference"] = (out["kernel"] - out["reference"]).abs().max().item()
    return err


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    lines = [
        "`python benchmarks/bn_numerics.py`: largest absolute error of the float32 output of training-mode "
        "BatchNorm against float64 on the same values, (256, 8, 16) input",
        "",
        "| input | torch | covshift kernel | covshift reference | kernel vs reference |",
        "|---|---|---|---|---|",
    ]
    for label, (mean, std) in CASES.items():
        e = errors(mean, std)
        lines.append(
            f"| {label} | {e['torch']:.1e} | {e['kernel']:.1e} | {e['reference']:.1e} | {e['kernel vs reference']:.1e} |"
        )
    print("\n".join(lines))
    if args.write:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "bn_numerics.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
