"""covshift.functional.batch_norm: gradients, numerics, and the proof that our own maths runs."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import covshift.functional.batchnorm as core
from covshift.functional import ChannelMismatchError, batch_norm


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


@pytest.mark.parametrize("training", [True, False])
def test_never_calls_aten_batch_norm_kernels(training):
    x, w, b, rm, rv = _args((4, 3, 2, 2), dtype=torch.float32)
    with _RecordOps() as rec:
        y = batch_norm(x, rm, rv, w, b, training)
        y.sum().backward()
    assert rec.ops, "the dispatch recorder saw nothing: the test itself is broken"
    assert not [op for op in rec.ops if "batch_norm" in op], sorted(rec.ops)
    # The same recorder does see torch's kernel, so the absence above means something.
    with _RecordOps() as rec_torch:
        F.batch_norm(x.detach(), rm, rv, w.detach(), b.detach(), training)
    assert [op for op in rec_torch.ops if "batch_norm" in op]


def test_variance_does_not_cancel_for_large_mean_float32():
    g = torch.Generator().manual_seed(0)
    x64 = torch.randn(256, 8, 16, generator=g, dtype=torch.float64) * 0.1 + 1e3
    x32 = x64.float()
    # Reference: float64 statistics of the very same float32 values.
    ref = F.batch_norm(x32.double(), None, None, training=True)
    ours = batch_norm(x32, None, None, training=True)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours.double(), ref, atol=1e-2, rtol=0)
    # The naive formula E[x^2] - E[x]^2 in float32 is far off here (that is what the test guards).
    naive_var = (x32 * x32).mean((0, 2)) - x32.mean((0, 2)) ** 2
    true_var = x32.double().var((0, 2), unbiased=False)
    assert (naive_var.double() - true_var).abs().max() > 10 * true_var.max()
    mean, var = core.batch_stats(x32)
    torch.testing.assert_close(var.double(), true_var, rtol=1e-3, atol=0)


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
