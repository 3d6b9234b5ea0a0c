"""covshift.functional.batch_norm: gradients, numerics, and the proof that our own maths runs."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import covshift.functional.batchnorm as core
from covshift.functional import ChannelMismatchError, batch_norm, use_backend


def _args(shape=(5, 3, 4), seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    c = shape[1]
    x = (torch.randn(shape, generator=g, dtype=dtype) * 2 + 1).requires_grad_()
    w = (torch.rand(c, generator=g, dtype=dtype) + 0.5).requires_grad_()
    b = torch.randn(c, generator=g, dtype=dtype).requires_grad_()
    rm = torch.randn(c, generator=g, dtype=dtype)
    rv = torch.rand(c, generator=g, dtype=dtype) + 0.5
    return x, w, b, rm, rv


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape", [(6, 3), (4, 3, 5), (3, 2, 3, 2)])
def test_gradcheck_float64(training, shape):
    x, w, b, rm, rv = _args(shape)
    fn = lambda x, w, b: batch_norm(x, rm.clone(), rv.clone(), w, b, training, 0.1, 1e-5)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w, b))


@pytest.mark.parametrize("training", [True, False])
def test_double_backward_is_supported(training):
    x, w, b, rm, rv = _args((6, 3, 2))
    fn = lambda x, w, b: batch_norm(x, rm.clone(), rv.clone(), w, b, training, 0.1, 1e-5)  # noqa: E731
    assert torch.autograd.gradgradcheck(fn, (x, w, b))


def test_functional_matches_torch_functional_and_updates_buffers_like_it():
    x, w, b, rm, rv = _args((7, 4, 3))
    rm2, rv2 = rm.clone(), rv.clone()
    ours = batch_norm(x, rm, rv, w, b, True, 0.3, 1e-3)
    ref = F.batch_norm(x, rm2, rv2, w, b, True, 0.3, 1e-3)
    torch.testing.assert_close(ours, ref, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(rm, rm2, atol=1e-14, rtol=0)
    torch.testing.assert_close(rv, rv2, atol=1e-14, rtol=0)
    ours_eval = batch_norm(x, rm, rv, w, b, False, 0.3, 1e-3)
    torch.testing.assert_close(ours_eval, F.batch_norm(x, rm2, rv2, w, b, False, 0.3, 1e-3), atol=1e-12, rtol=1e-12)


def test_the_analytic_backward_is_the_one_that_runs(monkeypatch):
    calls = {"elemt": 0, "reduce": 0}
    real_elemt, real_reduce = core.backward_elemt, core.backward_reduce

    def elemt(*a, **k):
        calls["elemt"] += 1
        return real_elemt(*a, **k)

    def reduce(*a, **k):
        calls["reduce"] += 1
        return real_reduce(*a, **k)

    monkeypatch.setattr(core, "backward_elemt", elemt)
    monkeypatch.setattr(core, "backward_reduce", reduce)
    x, w, b, rm, rv = _args()
    y = batch_norm(x, rm, rv, w, b, True)
    assert type(y.grad_fn).__name__ == "BatchNormFunctionBackward"
    y.pow(2).sum().backward()
    assert calls == {"elemt": 1, "reduce": 1}
    # The gradient it produced is the formula's, written out here in float64 by hand.
    xd = x.detach()
    m = xd.numel() // xd.shape[1]
    mu = xd.mean((0, 2), keepdim=True)
    invstd = (xd.var((0, 2), unbiased=False, keepdim=True) + 1e-5).rsqrt()
    xhat = (xd - mu) * invstd
    dy = 2 * (xhat * w.detach().view(1, -1, 1) + b.detach().view(1, -1, 1))
    dgamma, dbeta = (dy * xhat).sum((0, 2)), dy.sum((0, 2))
    dx = w.detach().view(1, -1, 1) * invstd / m * (m * dy - dbeta.view(1, -1, 1) - xhat * dgamma.view(1, -1, 1))
    torch.testing.assert_close(x.grad, dx, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(w.grad, dgamma, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(b.grad, dbeta, atol=1e-12, rtol=1e-12)


class _RecordOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(str(func))
        return func(*args, **(kwargs or {}))


def _aten_batch_norm_ops(ops):
    return [op for op in ops if op.startswith("aten.") and "batch_norm" in op]


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("training", [True, False])
def test_never_calls_aten_batch_norm_kernels(training, dtype, backend):
    x, w, b, rm, rv = _args((4, 3, 2, 2), dtype=dtype)
    with use_backend(backend), _RecordOps() as rec:
        y = batch_norm(x, rm, rv, w, b, training)
        y.sum().backward()
    assert rec.ops, "the dispatch recorder saw nothing: the test itself is broken"
    assert not _aten_batch_norm_ops(rec.ops), sorted(rec.ops)
    # On CPU float32 (auto) covshift's own operator is what runs, forward and backward.
    kernel = {"covshift.batch_norm.default", "covshift.batch_norm_backward.default"}
    if backend == "auto" and dtype == torch.float32:
        assert kernel <= rec.ops, sorted(rec.ops)
    else:
        assert not kernel & rec.ops, sorted(rec.ops)
    # The same recorder does see torch's kernel, so the absence above means something.
    with _RecordOps() as rec_torch:
        F.batch_norm(x.detach(), rm, rv, w.detach(), b.detach(), training)
    assert _aten_batch_norm_ops(rec_torch.ops)


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_large_mean_float32_is_no_less_accurate_than_torch(backend):
    """Mean 1e3, std 0.1: both paths are within torch's own error against float64 (issue 9, item 8)."""
    g = torch.Generator().manual_seed(0)
    x64 = torch.randn(256, 8, 16, generator=g, dtype=torch.float64) * 0.1 + 1e3
    x32 = x64.float()
    # Reference: float64 statistics of the very same float32 values.
    ref = F.batch_norm(x32.double(), None, None, training=True)
    torch_err = (F.batch_norm(x32, None, None, training=True).double() - ref).abs().max().item()
    with use_backend(backend):
        ours = batch_norm(x32, None, None, training=True)
    assert ours.dtype == torch.float32
    err = (ours.double() - ref).abs().max().item()
    assert err <= torch_err, (err, torch_err)
    assert torch_err < 1e-3  # torch's own error here is ~5e-4: the bound is a real one

def test_batch_stats_of_a_large_mean_float32_input():
    g = torch.Generator().manual_seed(0)
    x32 = (torch.randn(256, 8, 16, generator=g, dtype=torch.float64) * 0.1 + 1e3).float()
    # The naive formula E[x^2] - E[x]^2 in float32 is far off here (that is what the test guards).
    naive_var = (x32 * x32).mean((0, 2)) - x32.mean((0, 2)) ** 2
    true_var = x32.double().var((0, 2), unbiased=False)
    assert (naive_var.double() - true_var).abs().max() > 10 * true_var.max()
    mean, var = core.batch_stats(x32)
    torch.testing.assert_close(var.double(), true_var, rtol=1e-3, atol=0)
    # The shifted sum keeps the mean to float32's rounding (ulp(1e3) = 6e-5), the plain sum does not.
    true_mean = x32.double().mean((0, 2))
    assert (mean.double() - true_mean).abs().max() <= 6.2e-5
    plain = x32.sum((0, 2)) / (x32.numel() // 8)
    assert (plain.double() - true_mean).abs().max() > (mean.double() - true_mean).abs().max()


def test_bfloat16_statistics_accumulate_in_float32():
    x = (torch.randn(64, 4, 32) * 0.1 + 100).bfloat16()
    mean, var = core.batch_stats(x)
    assert mean.dtype == var.dtype == torch.float32
    true_var = x.double().var((0, 2), unbiased=False)
    assert (var >= 0).all()
    torch.testing.assert_close(var.double(), true_var, rtol=1e-3, atol=1e-6)
    y = batch_norm(x, None, None, training=True)
    assert y.dtype == torch.bfloat16 and torch.isfinite(y.float()).all()


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: batch_norm(torch.randn(5), None, None, training=True), "at least 2 dimensions"),
        (lambda: batch_norm(torch.randn(4, 3), None, None, training=True, eps=0.0), "eps must be positive"),
        (lambda: batch_norm(torch.randn(4, 3), None, None, training=True, eps=-1.0), "eps must be positive"),
        (lambda: batch_norm(torch.randn(4, 3), torch.zeros(3), torch.ones(3), eps=-1.0), "eps must be non-negative"),
        (lambda: batch_norm(torch.randn(1, 3), None, None, training=True), "more than 1 value per channel"),
        (lambda: batch_norm(torch.randn(4, 3), None, None, training=False), "needs running_mean and running_var"),
        (lambda: batch_norm(torch.randn(4, 3), None, None, training=True, momentum=None), "momentum=None"),
    ],
)
def test_functional_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize("name", ["running_mean", "running_var", "weight", "bias"])
def test_functional_channel_mismatch_names_the_argument(name):
    kw = dict(running_mean=torch.zeros(3), running_var=torch.ones(3), weight=torch.ones(3), bias=torch.zeros(3))
    kw[name] = torch.ones(4)
    with pytest.raises(ChannelMismatchError, match=f"{name} has 4 elements but the input has 3 channels"):
        batch_norm(torch.randn(5, 3), training=True, **kw)


def _torch_error(fn):
    try:
        fn()
    except Exception as error:  # noqa: BLE001 - the type is what is compared
        return type(error)
    return None


_EDGE_CASES = {
    "1-D non-empty, no stats": lambda f: f(torch.randn(5), None, None, training=True),
    "1-D non-empty, with stats": lambda f: f(torch.randn(5), torch.zeros(5), torch.ones(5), training=True),
    "1-D non-empty, eval": lambda f: f(torch.randn(5), torch.zeros(5), torch.ones(5), training=False),
    "eps 0 in training": lambda f: f(torch.randn(4, 3), None, None, training=True, eps=0.0),
    "eps < 0 in eval": lambda f: f(torch.randn(4, 3), torch.zeros(3), torch.ones(3), training=False, eps=-1e-3),
    "one value per channel": lambda f: f(torch.randn(1, 3), None, None, training=True),
    "wrong running_mean size": lambda f: f(torch.randn(4, 3), torch.zeros(2), torch.ones(3), training=True),
    "wrong weight size": lambda f: f(torch.randn(4, 3), None, None, torch.ones(2), training=True),
    "eval without stats": lambda f: f(torch.randn(4, 3), None, None, training=False),
    "int64 input": lambda f: f(torch.ones(4, 3, dtype=torch.long), None, None, training=True),
    "bool input, eval": lambda f: f(torch.ones(4, 3, dtype=torch.bool), torch.zeros(3), torch.ones(3)),
    "float64 input, float32 weight": lambda f: f(torch.randn(4, 3, dtype=torch.float64), None, None, torch.ones(3), training=True),
    "float32 input, float64 stats": lambda f: f(torch.randn(4, 3), torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64), training=True),
    "float32 input, bfloat16 weight": lambda f: f(torch.randn(4, 3), None, None, torch.ones(3, dtype=torch.bfloat16), training=True),
}


@pytest.mark.parametrize("case", list(_EDGE_CASES))
def test_errors_are_instances_of_the_type_torch_raises(case):
    make = _EDGE_CASES[case]
    expected = _torch_error(lambda: make(F.batch_norm))
    assert expected is not None, f"{case}: torch accepts this input; the case is wrong"
    with pytest.raises(expected):
        make(batch_norm)


@pytest.mark.parametrize("stats", [None, 0, 5])
@pytest.mark.parametrize("training", [True, False])
def test_empty_one_dimensional_input_is_returned_like_torch(training, stats):
    x = torch.randn(0)
    rm, rv = (None, None) if stats is None else (torch.zeros(stats), torch.ones(stats))
    ref = F.batch_norm(x, rm, rv, training=training)  # torch accepts all of these
    ours = batch_norm(x, rm, rv, training=training)
    assert ours.shape == ref.shape == (0,) and ours.dtype == ref.dtype


def test_eps_zero_is_valid_in_eval_as_in_torch():
    x, rm, rv = torch.randn(4, 3), torch.zeros(3), torch.rand(3) + 0.5
    torch.testing.assert_close(batch_norm(x, rm, rv, eps=0.0), F.batch_norm(x, rm, rv, eps=0.0))


def test_module_validates_eps_like_torch():
    import covshift.nn as cnn

    for cls, torch_cls in ((cnn.BatchNorm1d, torch.nn.BatchNorm1d), (cnn.BatchNorm2d, torch.nn.BatchNorm2d)):
        x = torch.randn(4, 3) if cls is cnn.BatchNorm1d else torch.randn(4, 3, 2, 2)
        for eps in (0.0, -1.0):
            with pytest.raises(ValueError, match="eps must be positive"):
                cls(3, eps=eps)(x)
            with pytest.raises(ValueError):
                torch_cls(3, eps=eps)(x)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_input_with_float32_parameters_is_accepted_as_in_torch(dtype):
    x = torch.randn(6, 3).to(dtype)
    args = (torch.zeros(3), torch.ones(3), torch.rand(3) + 0.5, torch.randn(3))
    ours = batch_norm(x, *[a.clone() for a in args], training=True)
    ref = F.batch_norm(x, *[a.clone() for a in args], training=True)
    assert ours.dtype == ref.dtype == dtype
    torch.testing.assert_close(ours.float(), ref.float(), atol=2e-2, rtol=2e-2)
