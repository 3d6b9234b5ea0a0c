"""covshift does not import torch._dynamo (1.5-2 s) unless the user compiles or exports: not on import,
not on an eager training step. The kernel's compile-time mark is set by hand, so check that torch's
decorator still means exactly that mark, and that compile still treats the check as a constant."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import torch


def test_eager_use_does_not_import_dynamo():
    code = textwrap.dedent(
        """
        import sys
        import torch
        import covshift, covshift.nn, covshift.monitor, covshift.experiments, covshift.cli
        bn = covshift.nn.BatchNorm1d(8)
        x = torch.randn(16, 8, requires_grad=True)
        bn(x).sum().backward()
        bn.eval(); bn(x)
        print("torch._dynamo" in sys.modules)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "False", "an eager covshift step imported torch._dynamo"


def test_the_constant_mark_is_what_torch_decorator_sets():
    from covshift.ops import dispatch

    def f() -> bool:
        return True

    before = set(vars(f))
    torch.compiler.assume_constant_result(f)
    added = {k: v for k, v in vars(f).items() if k not in before}
    assert added == {"_dynamo_marked_constant": True}
    assert getattr(dispatch._kernel_available, "_dynamo_marked_constant", False) is True
