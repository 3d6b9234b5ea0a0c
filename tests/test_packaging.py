"""What the package promises about itself: it ships its C++ source, an installed copy builds the
kernel, and its declared torch floor is the one this project tests."""

import os
import re
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def test_the_torch_floor_is_the_tested_version():
    pyproject = (ROOT / "pyproject.toml").read_text()
    floor = re.search(r'"torch>=([0-9.]+)"', pyproject).group(1)
    pinned = re.search(r"^torch==([0-9.]+)$", (ROOT / "constraints.txt").read_text(), re.M).group(1)
    assert pinned.startswith(floor + ".") or pinned == floor, (floor, pinned)
    assert torch.__version__.split("+")[0] == pinned  # the environment is the pinned one (a CPU build)


def test_the_dev_extras_left_the_pinned_cpu_torch_alone():
    """onnx, onnxruntime and ray are installed by the dev extra; none of them may bring another torch."""
    from importlib.metadata import version

    for name in ("onnx", "onnxruntime", "onnxscript", "ray"):
        assert version(name)  # installed
    pinned = re.search(r"^torch==([0-9.]+)$", (ROOT / "constraints.txt").read_text(), re.M).group(1)
    assert torch.__version__ == f"{pinned}+cpu", torch.__version__
    assert not torch.cuda.is_available() and torch.version.cuda is None


@pytest.mark.slow
def test_a_wheel_ships_the_kernel_source_and_an_installed_copy_builds_and_loads_it(tmp_path):
    wheels = tmp_path / "wheels"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels), str(ROOT)],
        capture_output=True, text=True, timeout=300,
    )
    assert build.returncode == 0, build.stdout + build.stderr
    (wheel,) = wheels.glob("covshift-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "covshift/csrc/batch_norm_cpu.cpp" in names, names
    # Install it (not editable) where it shadows the source tree, and build the kernel from the copy.
    target = tmp_path / "site"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        capture_output=True, text=True, timeout=300,
    )
    assert install.returncode == 0, install.stdout + install.stderr
    script = textwrap.dedent(
        """
        import torch, torch.nn.functional as F
        import covshift
        from covshift.ops import batch_norm as op, build
        assert covshift.__file__.startswith(%r), covshift.__file__
        assert op.load(), op.error()
        print("LIBRARY", build.status(op.LIBRARY).library)
        x = torch.randn(16, 4, 3, requires_grad=True)
        y = covshift.functional.batch_norm(x, None, None, training=True)
        assert "BatchNormAutograd" in y.grad_fn.name()
        torch.testing.assert_close(y, F.batch_norm(x, None, None, training=True), atol=1e-5, rtol=1e-5)
        print("OK")
        """
        % str(target)
    )
    env = {**os.environ, "PYTHONPATH": str(target), "COVSHIFT_EXTENSIONS_DIR": str(tmp_path / "ext")}
    env.pop("COVSHIFT_BACKEND", None)
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "OK" in run.stdout and str(tmp_path / "ext") in run.stdout
