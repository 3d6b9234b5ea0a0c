"""covshift's fast CPU path (the fused C++ kernel) against the reference path and against torch.

* the foundation's grid (tests/test_bn_grid.py) under each backend, "fast" and "reference";
* fast against reference on the same inputs, to 1e-5 in float32 and 1e-10 in float64, over layouts,
  odd sizes, several blocks and threads, train and eval, partial gradients;
* the default path on CPU float32 is the kernel, and float64 stays on the reference;
* gradcheck of the kernel's backward, and double backward through the reference backward;
* the fallbacks: a warning, once, that says why; a real failed build in a fresh process;
* the backend switch: set_backend, use_backend, COVSHIFT_BACKEND.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
import warnings

import pytest
import torch
import torch.nn.functional as F
from test_bn_grid import GRID, SHAPES, _run_case
from test_functional import _RecordOps

import covshift.nn as cnn
from covshift.functional import (
    FastPathWarning,
    batch_norm,
    fast_path_status,
    get_backend,
    set_backend,
    use_backend,
)
from covshift.ops import batch_norm as op_lib
from covshift.ops import build, dispatch

KERNEL_NODE = "BatchNormAutograd"  # the C++ autograd node of torch.ops.covshift.batch_norm


def _runs_kernel(y) -> bool:
    return KERNEL_NODE in y.grad_fn.name()


@pytest.fixture(scope="module", autouse=True)
def kernel():
    """Every test here needs the compiled kernel: a build failure fails loudly instead of skipping."""
    assert op_lib.load(), f"the fast path did not build: {fast_path_status()['error']}"


def _grid_id(v):
    return str(v).replace("torch.", "")


# --- the foundation's grid against torch, on each path ------------------------------------------
# bfloat16 is left to tests/test_bn_grid.py: it runs the reference path under every backend.
FLOAT_GRID = [case for case in GRID if case[1] in (torch.float32, torch.float64)]


@pytest.mark.parametrize("backend", ["fast", "reference"])
@pytest.mark.parametrize("shape_key,dtype,momentum,affine,track", FLOAT_GRID, ids=_grid_id)
def test_grid_matches_torch_on_each_path(backend, shape_key, dtype, momentum, affine, track):
    with use_backend(backend):
        _run_case(shape_key, dtype, momentum, affine, track)


@pytest.mark.parametrize("backend", ["fast", "reference"])
@pytest.mark.parametrize("shape_key", list(SHAPES))
def test_tracking_switched_off_after_construction_on_each_path(backend, shape_key):
    with use_backend(backend):
        _run_case(shape_key, torch.float32, 0.1, True, True, toggle_tracking=True)


# --- fast against reference, same inputs ----------------------------------------------------------
CASES = {
    # name: (shape, memory format); the kernel has two layouts: channels outer (N, C, S) and inner (R, C)
    "2D": ((16, 5), None),
    "2D-many-rows": ((8192, 24), None),  # several row blocks and one chunk per thread
    "2D-wide": ((3, 1029), None),  # vector tails over channels
    "3D": ((8, 5, 7), None),
    "3D-long": ((4, 6, 5000), None),  # runs longer than one partial-sum chunk
    "4D": ((6, 5, 4, 3), None),
    "4D-odd": ((3, 19, 9, 11), None),
    "4D-channels_last": ((6, 5, 4, 3), torch.channels_last),
    "4D-channels_last-odd": ((5, 37, 7, 3), torch.channels_last),
    "5D": ((3, 5, 3, 4, 2), None),
    "5D-channels_last": ((3, 5, 3, 4, 2), torch.channels_last_3d),
    "4D-1x1": ((64, 8, 1, 1), None),
}


def _inputs(shape, fmt, dtype, scale=2.0, offset=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = shape[1]
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * scale + offset).to(dtype)
    dy = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    if fmt is not None:
        x, dy = x.contiguous(memory_format=fmt), dy.contiguous(memory_format=fmt)
    w = (torch.rand(c, generator=g, dtype=torch.float64) + 0.5).to(dtype)
    b = torch.randn(c, generator=g, dtype=torch.float64).to(dtype)
    rm = torch.randn(c, generator=g, dtype=torch.float64).to(dtype)
    rv = (torch.rand(c, generator=g, dtype=torch.float64) + 0.5).to(dtype)
    return x, dy, w, b, rm, rv


def _run(backend, x, dy, w, b, rm, rv, training, affine, track, momentum=0.1, eps=1e-5):
    """Forward + backward through covshift.functional.batch_norm; returns everything it produced."""
    x = x.clone().requires_grad_()
    w = w.clone().requires_grad_() if affine else None
    b = b.clone().requires_grad_() if affine else None
    rm = rm.clone() if track or not training else None
    rv = rv.clone() if track or not training else None
    with use_backend(backend):
        y = batch_norm(x, rm, rv, w, b, training, momentum, eps)
        y.backward(dy)
    return {
        "y": y,
        "dx": x.grad,
        "dw": None if w is None else w.grad,
        "db": None if b is None else b.grad,
        "running_mean": rm,
        "running_var": rv,
    }


def _assert_same(fast, ref, tol):
    for key, r in ref.items():
        f = fast[key]
        if r is None:
            assert f is None, key
            continue
        assert f.dtype == r.dtype and f.shape == r.shape, key
        # Sums over m values (dw, db) carry m times the rounding of one term: scale the tolerance.
        scale = max(1.0, float(r.detach().abs().max()))
        torch.testing.assert_close(f, r, rtol=tol, atol=tol * scale, msg=lambda m: f"{key}: {m}")


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("affine,track", [(True, True), (False, True), (True, False)], ids=["affine", "no-affine", "no-track"])
@pytest.mark.parametrize("case", list(CASES))
def test_fast_matches_reference_float32(case, affine, track, training):
    shape, fmt = CASES[case]
    args = _inputs(shape, fmt, torch.float32)
    fast = _run("fast", *args, training, affine, track)
    ref = _run("reference", *args, training, affine, track)
    _assert_same(fast, ref, 1e-5)
    if fmt is not None:
        assert fast["y"].is_contiguous(memory_format=fmt) and fast["dx"].is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", list(CASES))
def test_fast_matches_reference_float64(case, training):
    shape, fmt = CASES[case]
    args = _inputs(shape, fmt, torch.float64)
    _assert_same(_run("fast", *args, training, True, True), _run("reference", *args, training, True, True), 1e-10)


@pytest.mark.parametrize("case", ["3D", "4D-odd", "2D-many-rows", "4D-channels_last-odd", "5D-channels_last"])
def test_large_mean_does_not_cancel(case):
    """Mean 1e3, std 0.1 in float32 (the foundation's cancellation case), in both kernel layouts."""
    shape, fmt = CASES[case]
    x = _inputs(shape, fmt, torch.float32, scale=0.1, offset=1e3)[0]
    with use_backend("fast"):
        y = batch_norm(x, None, None, training=True)
    truth = F.batch_norm(x.double(), None, None, training=True)
    torch.testing.assert_close(y.double(), truth, atol=1e-2, rtol=0)
    rm, rv = torch.zeros(shape[1]), torch.ones(shape[1])
    with use_backend("fast"):
        batch_norm(x, rm, rv, training=True, momentum=1.0)
    torch.testing.assert_close(rv.double(), x.double().transpose(0, 1).reshape(shape[1], -1).var(1), rtol=1e-3, atol=0)


@pytest.mark.parametrize(
    "shape,fmt",
    [
        ((16, 64, 32, 32), torch.channels_last),
        ((4096, 256), None),
        ((16, 64, 32, 32), None),
        ((64, 64, 15, 19), None),  # runs of 285 values: most start off a vector boundary
    ],
    ids=["channels_last", "2D", "NCHW", "NCHW-unaligned"],
)
def test_streaming_stores_of_large_outputs(shape, fmt):
    """Training outputs of 4 MiB or more (the first three exactly 4 MiB) are written with non-temporal
    stores: same values as the reference, in the input's layout."""
    args = _inputs(shape, fmt, torch.float32)
    fast = _run("fast", *args, True, True, True)
    _assert_same(fast, _run("reference", *args, True, True, True), 1e-5)
    if fmt is not None:
        assert fast["y"].is_contiguous(memory_format=fmt) and fast["dx"].is_contiguous(memory_format=fmt)


def test_threads_do_not_change_the_result():
    """The kernel splits channels-inner rows into one chunk per thread; the merge must not matter."""
    shape, fmt = CASES["2D-many-rows"]
    args = _inputs(shape, fmt, torch.float32)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _run("fast", *args, True, True, True)
    finally:
        torch.set_num_threads(before)
    many = _run("fast", *args, True, True, True)
    _assert_same(many, one, 1e-5)


@pytest.mark.parametrize("needs", ["input", "weight", "bias", "weight+bias"])
def test_partial_gradients(needs):
    x, dy, w, b, rm, rv = _inputs((6, 4, 5, 3), torch.channels_last, torch.float32)
    grads = {}
    for backend in ("fast", "reference"):
        xi = x.clone().requires_grad_("input" in needs)
        wi = w.clone().requires_grad_("weight" in needs)
        bi = b.clone().requires_grad_("bias" in needs)
        with use_backend(backend):
            batch_norm(xi, rm.clone(), rv.clone(), wi, bi, True).backward(dy)
        grads[backend] = (xi.grad, wi.grad, bi.grad)
    for f, r in zip(grads["fast"], grads["reference"]):
        assert (f is None) == (r is None)
        if r is not None:
            torch.testing.assert_close(f, r, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fmt", [None, torch.channels_last])
def test_gradient_in_another_layout(fmt):
    """y.sum().backward() sends an expanded (stride 0) gradient; a contiguous dy meets channels_last x."""
    x = _inputs((4, 3, 5, 5), fmt, torch.float32)[0]
    dy = torch.randn(4, 3, 5, 5)  # contiguous, whatever x is
    for make_loss in (lambda y: y.sum(), lambda y: (y * dy).sum()):
        grads = []
        for backend in ("fast", "reference"):
            xi = x.clone().requires_grad_()
            with use_backend(backend):
                make_loss(batch_norm(xi, None, None, training=True)).backward()
            grads.append(xi.grad)
        torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-5)


def test_no_grad_training_updates_running_stats_like_the_reference():
    x, _, w, b, rm, rv = _inputs((32, 6, 3, 3), None, torch.float32)
    out = {}
    for backend in ("fast", "reference"):
        rm_i, rv_i = rm.clone(), rv.clone()
        with torch.no_grad(), use_backend(backend):
            y = batch_norm(x, rm_i, rv_i, w, b, True, 0.3)
        out[backend] = (y, rm_i, rv_i)
    for f, r in zip(out["fast"], out["reference"]):
        torch.testing.assert_close(f, r, rtol=1e-6, atol=1e-6)


# --- which path runs -------------------------------------------------------------------------------
def test_default_path_on_cpu_float32_is_the_kernel(monkeypatch):
    monkeypatch.delenv("COVSHIFT_BACKEND", raising=False)
    assert dispatch._State().backend == "auto"  # the default, when the environment says nothing
    layer = cnn.BatchNorm2d(3)
    x = torch.randn(4, 3, 5, 5, requires_grad=True)
    with use_backend("auto"), _RecordOps() as rec:
        y = layer(x)
        y.sum().backward()
    assert _runs_kernel(y)
    assert {"covshift.batch_norm.default", "covshift.batch_norm_backward.default"} <= rec.ops, sorted(rec.ops)
    assert not [op for op in rec.ops if op.startswith("aten.") and "batch_norm" in op], sorted(rec.ops)
    layer.eval()
    with use_backend("auto"), _RecordOps() as rec:
        layer(x).sum().backward()
    assert "covshift.batch_norm.default" in rec.ops


def test_default_path_keeps_float64_on_the_reference():
    x = torch.randn(4, 3, 5, dtype=torch.float64, requires_grad=True)
    with use_backend("auto"), warnings.catch_warnings():
        warnings.simplefilter("error")  # by design, not a fallback: no warning
        y = batch_norm(x, None, None, training=True)
    assert type(y.grad_fn).__name__ == "BatchNormFunctionBackward"


def test_reference_backend_runs_the_reference():
    with use_backend("reference"):
        y = batch_norm(torch.randn(4, 3, requires_grad=True), None, None, training=True)
    assert type(y.grad_fn).__name__ == "BatchNormFunctionBackward"


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape,fmt", [((6, 3), None), ((4, 3, 5), None), ((3, 2, 3, 2), torch.channels_last)])
def test_gradcheck_of_the_kernel_float64(shape, fmt, training):
    x, _, w, b, rm, rv = _inputs(shape, fmt, torch.float64)
    x, w, b = x.requires_grad_(), w.requires_grad_(), b.requires_grad_()

    def fn(x, w, b):
        with use_backend("fast"):
            y = batch_norm(x, rm.clone(), rv.clone(), w, b, training)
        assert _runs_kernel(y)
        return y

    assert torch.autograd.gradcheck(fn, (x, w, b))


@pytest.mark.parametrize("training", [True, False])
def test_double_backward_through_the_fast_path(training):
    """create_graph=True hands the fast path's context to the reference backward, which is differentiable."""
    x, _, w, b, rm, rv = _inputs((6, 3, 2), None, torch.float64)
    x, w, b = x.requires_grad_(), w.requires_grad_(), b.requires_grad_()

    def fn(x, w, b):
        with use_backend("fast"):
            return batch_norm(x, rm.clone(), rv.clone(), w, b, training)

    assert torch.autograd.gradgradcheck(fn, (x, w, b))
    # float32 too, against the reference path's double backward
    x32 = _inputs((8, 4, 3), None, torch.float32)[0]
    grads = []
    for backend in ("fast", "reference"):
        xi = x32.clone().requires_grad_()
        with use_backend(backend):
            y = batch_norm(xi, None, None, training=True)
        (gx,) = torch.autograd.grad((y**3).sum(), xi, create_graph=True)
        (ggx,) = torch.autograd.grad(gx.square().sum(), xi)
        grads.append(ggx)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-4)


def test_a_new_shape_does_not_stall():
    """One kernel for every shape: nothing is compiled per shape after the first use."""
    batch_norm(torch.randn(8, 4, 3, 3), None, None, training=True)  # first use
    for shape in [(7, 13, 5, 3), (3, 29, 11), (1000, 17), (2, 3, 4, 5, 6)]:
        x = torch.randn(shape, requires_grad=True)
        start = time.perf_counter()
        batch_norm(x, None, None, training=True).sum().backward()
        assert time.perf_counter() - start < 1.0, shape


# --- fallbacks -------------------------------------------------------------------------------------
@pytest.fixture
def fresh_warnings(monkeypatch):
    """A clean record of reasons already warned about, so 'once' is tested from the start."""
    monkeypatch.setattr(dispatch._state, "warned", set())


def _warnings_of(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn()
    return out, [w for w in caught if issubclass(w.category, FastPathWarning)]


def test_forced_fast_with_bfloat16_warns_once_and_runs_the_reference(fresh_warnings):
    x = torch.randn(8, 3, 4).bfloat16()
    with use_backend("fast"):
        y, first = _warnings_of(lambda: batch_norm(x, None, None, training=True))
        _, second = _warnings_of(lambda: batch_norm(x, None, None, training=True))
    assert len(first) == 1 and "torch.bfloat16" in str(first[0].message) and not second
    with use_backend("reference"):
        ref = batch_norm(x, None, None, training=True)
    assert y.dtype == torch.bfloat16 and torch.equal(y, ref)


def test_auto_leaves_other_dtypes_to_the_reference_silently(fresh_warnings):
    for dtype in (torch.bfloat16, torch.float16, torch.float64):
        with use_backend("auto"):
            _, caught = _warnings_of(lambda: batch_norm(torch.randn(8, 3).to(dtype), None, None, training=True))
        assert not caught, dtype


_STRIDED = {
    "transposed 2-D": lambda: torch.randn(10, 6).t(),
    "sliced NCL": lambda: torch.randn(8, 4, 10)[:, :, ::2],
    "sliced NCHW": lambda: torch.randn(4, 6, 8, 8)[:, :, ::2],
    "sliced channels_last": lambda: torch.randn(4, 6, 8, 8).to(memory_format=torch.channels_last)[:, :, ::2],
    "permuted 4-D": lambda: torch.randn(4, 8, 8, 6).permute(0, 3, 2, 1),
    "sliced channels_last_3d": lambda: torch.randn(2, 6, 4, 4, 4).to(memory_format=torch.channels_last_3d)[:, :, :, ::2],
    "every other channel": lambda: torch.randn(4, 12, 5, 5)[:, ::2],
}


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", list(_STRIDED))
def test_strided_input_runs_the_kernel_silently_and_matches_torch(case, training, monkeypatch, fresh_warnings):
    """torch's kernel reads any strides; covshift copies them into input.suggest_memory_format()'s
    layout (torch's output layout) and runs its kernel: no warning, torch's values and strides."""
    x = _STRIDED[case]()
    calls = []
    real = op_lib.kernel
    monkeypatch.setattr(op_lib, "kernel", lambda *a: calls.append(1) or real(*a))
    C = x.shape[1]
    ref = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d, 5: torch.nn.BatchNorm3d}[x.dim()](C)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5), ref.bias.uniform_(-1, 1), ref.running_var.uniform_(0.5, 2)
    ours = cnn.convert(ref)
    ref.train(training), ours.train(training)
    x1, x2 = x.detach().requires_grad_(), x.detach().clone(memory_format=torch.preserve_format).requires_grad_()
    with use_backend("auto"):
        y2, seen = _warnings_of(lambda: ours(x2))
    y1 = ref(x1)
    assert not seen and calls
    torch.testing.assert_close(y2, y1)
    assert y2.stride() == y1.stride()
    g = torch.randn_like(y1)
    y1.backward(g), y2.backward(g)
    torch.testing.assert_close(x2.grad, x1.grad)
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad)
    torch.testing.assert_close(ours.running_mean, ref.running_mean)
    torch.testing.assert_close(ours.running_var, ref.running_var)


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_an_empty_batch_follows_torchs_rule(dtype, training, affine):
    """N = 0 (torch's ModuleInfo "zero_batch" input, here also strided): torch returns a copy of the
    input with its strides, times weight[0] plus bias[0]; gradients are zeros and the running
    statistics stay. Before, eval mode on strided empty input failed in the kernel's backward."""
    base = torch.randn(0, 5, 18, dtype=dtype)[:, :, ::2]
    ref = torch.nn.BatchNorm1d(5, affine=affine, dtype=dtype)
    ours = cnn.convert(ref)
    ref.train(training), ours.train(training)
    x1, x2 = base.detach().requires_grad_(), base.detach().clone().requires_grad_()
    y1, y2 = ref(x1), ours(x2)
    assert y2.shape == y1.shape and y2.stride() == y1.stride() and y2.dtype == y1.dtype
    y1.sum().backward(), y2.sum().backward()
    assert x2.grad.shape == x1.grad.shape
    if affine:
        torch.testing.assert_close(ours.weight.grad, ref.weight.grad)
        torch.testing.assert_close(ours.bias.grad, ref.bias.grad)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(ours, name), getattr(ref, name))


def test_mixed_parameter_dtype_is_torchs_error_not_a_fallback(fresh_warnings):
    """torch refuses float64 parameters with float32 input (RuntimeError); so does covshift, on every backend."""
    x = torch.randn(8, 3)
    w = torch.ones(3, dtype=torch.float64)
    with pytest.raises(RuntimeError):
        F.batch_norm(x, None, None, w, None, training=True)
    for backend in ("auto", "fast", "reference"):
        with use_backend(backend), pytest.raises(RuntimeError, match="weight is torch.float64"):
            _warnings_of(lambda: batch_norm(x, None, None, w, None, training=True))


def test_a_failed_build_warns_once_with_the_reason_and_runs_the_reference(monkeypatch, fresh_warnings):
    """Simulated in this process: a fresh state whose build raises."""

    def broken_compile():
        raise RuntimeError("no C++ compiler here (simulated)")

    monkeypatch.delenv("COVSHIFT_BACKEND", raising=False)
    monkeypatch.setattr(dispatch, "_state", dispatch._State())
    monkeypatch.setattr(build, "_extensions", {})
    monkeypatch.setattr(build, "_compile", lambda name, source: broken_compile())
    monkeypatch.setattr(op_lib, "_fakes_registered", False)
    monkeypatch.setattr(op_lib, "kernel", None)
    x = torch.randn(16, 4, 3, requires_grad=True)
    y, first = _warnings_of(lambda: batch_norm(x, None, None, training=True))
    _, second = _warnings_of(lambda: batch_norm(x, None, None, training=True))
    assert len(first) == 1 and not second
    assert "no C++ compiler here (simulated)" in str(first[0].message)
    assert "reference path" in str(first[0].message)
    assert type(y.grad_fn).__name__ == "BatchNormFunctionBackward"
    status = fast_path_status()
    assert status["loaded"] is False and "simulated" in status["error"]


def test_a_real_failed_build_in_a_fresh_process(tmp_path):
    """A cold cache and a compiler that does not exist: the warning names the failure; results are right."""
    script = textwrap.dedent(
        """
        import warnings, torch
        import torch.nn.functional as F
        from covshift.functional import batch_norm, FastPathWarning
        x = torch.randn(16, 4, 3)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            y = batch_norm(x, None, None, training=True)
            batch_norm(x, None, None, training=True)
        fast = [w for w in caught if issubclass(w.category, FastPathWarning)]
        assert len(fast) == 1, [str(w.message) for w in caught]
        print("WARNING:", fast[0].message)
        torch.testing.assert_close(y, F.batch_norm(x, None, None, training=True), rtol=1e-5, atol=1e-5)
        print("RESULT OK")
        """
    )
    env = {**os.environ, "COVSHIFT_EXTENSIONS_DIR": str(tmp_path), "CXX": str(tmp_path / "no-such-compiler")}
    env.pop("COVSHIFT_BACKEND", None)
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "could not be built" in proc.stdout and "no-such-compiler" in proc.stdout, proc.stdout
    assert "RESULT OK" in proc.stdout


def test_empty_batch_takes_the_reference_path_silently(fresh_warnings):
    x = torch.randn(0, 3, 2, 2, requires_grad=True)
    with use_backend("fast"):
        y, caught = _warnings_of(lambda: batch_norm(x, torch.zeros(3), torch.ones(3), training=True))
    assert y.shape == x.shape and not caught


# --- the switch --------------------------------------------------------------------------------------
def test_set_backend_rejects_unknown_names_and_lists_the_valid_ones():
    before = get_backend()
    with pytest.raises(ValueError, match="'auto', 'fast', 'reference'"):
        set_backend("turbo")
    assert get_backend() == before


def test_set_backend_and_use_backend_restore():
    before = get_backend()
    try:
        set_backend("reference")
        assert get_backend() == "reference"
        with pytest.raises(KeyError), use_backend("fast"):
            assert get_backend() == "fast"
            raise KeyError
        assert get_backend() == "reference"
    finally:
        set_backend(before)


@pytest.mark.parametrize("value,expected", [("reference", "reference"), (" FAST ", "fast"), ("", "auto")])
def test_backend_from_the_environment(monkeypatch, value, expected):
    monkeypatch.setenv("COVSHIFT_BACKEND", value)
    assert dispatch._backend_from_env() == expected


def test_unknown_backend_in_the_environment_warns_and_uses_auto(monkeypatch):
    monkeypatch.setenv("COVSHIFT_BACKEND", "gpu")
    with pytest.warns(FastPathWarning, match="COVSHIFT_BACKEND='gpu'"):
        assert dispatch._backend_from_env() == "auto"


def test_the_kernel_source_ships_with_the_package():
    assert op_lib.SOURCE.is_file() and op_lib.SOURCE.suffix == ".cpp"
