"""torch.ops.covshift.batch_norm as a PyTorch operator: schema, fake kernel, autograd, and its contract."""

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F

from covshift.ops import batch_norm as op_lib


@pytest.fixture(scope="module", autouse=True)
def kernel():
    assert op_lib.load(), op_lib.error()


def _case(shape=(8, 3, 4, 4), dtype=torch.float32, fmt=torch.contiguous_format, affine=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = shape[1]
    x = (torch.randn(shape, generator=g, dtype=dtype) * 2 + 1).to(memory_format=fmt).requires_grad_()
    w = (torch.rand(c, generator=g, dtype=dtype) + 0.5).requires_grad_() if affine else None
    b = torch.randn(c, generator=g, dtype=dtype).requires_grad_() if affine else None
    rm, rv = torch.randn(c, generator=g, dtype=dtype), torch.rand(c, generator=g, dtype=dtype) + 0.5
    return x, w, b, rm, rv


OPCHECK_CASES = {
    "train, running stats": dict(training=True, stats=True),
    "train, no stats": dict(training=True, stats=False),
    "eval": dict(training=False, stats=True),
    "train, no affine, channels_last": dict(training=True, stats=True, affine=False, fmt=torch.channels_last),
    "train, float64 (N, C)": dict(training=True, stats=False, dtype=torch.float64, shape=(6, 5)),
}


@pytest.mark.parametrize("name", list(OPCHECK_CASES))
def test_opcheck(name):
    """Schema (mutation declared), fake kernel, autograd registration and AOT dispatch with dynamic shapes."""
    case = dict(OPCHECK_CASES[name])
    training, stats = case.pop("training"), case.pop("stats")
    x, w, b, rm, rv = _case(**case)
    args = (x, w, b, rm if stats else None, rv if stats else None, training, 0.1, 1e-5)
    result = torch.library.opcheck(torch.ops.covshift.batch_norm.default, args)
    assert set(result.values()) == {"SUCCESS"}, result


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_the_operator_matches_aten_native_batch_norm(training, fmt):
    """Same contract as aten::native_batch_norm: (y, save_mean, save_invstd), buffers updated in training."""
    x, w, b, rm, rv = _case(fmt=fmt)
    rm2, rv2 = rm.clone(), rv.clone()
    y, mean, invstd = torch.ops.covshift.batch_norm(x, w, b, rm, rv, training, 0.3, 1e-4)
    y2, mean2, invstd2 = torch.native_batch_norm(x, w, b, rm2, rv2, training, 0.3, 1e-4)
    tol = dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y, y2, **tol)
    assert y.is_contiguous(memory_format=fmt)
    torch.testing.assert_close(rm, rm2, **tol)
    torch.testing.assert_close(rv, rv2, **tol)
    if training:
        torch.testing.assert_close(mean, mean2, **tol)
        torch.testing.assert_close(invstd, invstd2, **tol)
    dy = torch.randn_like(y)
    ours = torch.autograd.grad(y, (x, w, b), dy)
    ref = torch.autograd.grad(y2, (x, w, b), dy)
    for a, r in zip(ours, ref):
        torch.testing.assert_close(a, r, atol=1e-4, rtol=1e-4)


def test_fake_kernel_gives_shapes_dtypes_and_memory_format():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(4, 3, 5, 5).to(memory_format=torch.channels_last)
        y, mean, invstd = torch.ops.covshift.batch_norm(x, None, None, None, None, True, 0.1, 1e-5)
        dx, dw, db = torch.ops.covshift.batch_norm_backward(y, x, None, mean, invstd, True, [True, False, True])
    assert y.shape == x.shape and y.is_contiguous(memory_format=torch.channels_last)
    assert mean.shape == invstd.shape == db.shape == (3,) and dw.shape == (0,) and dx.shape == x.shape


def test_the_operator_refuses_a_dual_tensor_instead_of_dropping_its_tangent():
    x = torch.randn(6, 3)
    with fwAD.dual_level():
        dual = fwAD.make_dual(x, torch.ones_like(x))
        with pytest.raises(RuntimeError, match="no forward-mode AD formula"):
            torch.ops.covshift.batch_norm(dual, None, None, None, None, True, 0.1, 1e-5)


def test_backward_output_mask_leaves_out_what_was_not_asked_for():
    x, w, b, rm, rv = _case(shape=(6, 3, 2))
    _, mean, invstd = torch.ops.covshift.batch_norm(x.detach(), None, None, None, None, True, 0.1, 1e-5)
    dy = torch.randn_like(x)
    dx, dw, db = torch.ops.covshift.batch_norm_backward(dy, x.detach(), w.detach(), mean, invstd, True, [True, False, False])
    assert dx.shape == x.shape and dw.numel() == 0 and db.numel() == 0
    ref = torch.autograd.grad(F.batch_norm(x, None, None, w, b, True), x, dy)[0]
    torch.testing.assert_close(dx, ref, atol=1e-5, rtol=1e-5)


def test_double_backward_through_the_operator_is_the_formula():
    x, w, b, _, _ = _case(shape=(6, 3, 2), dtype=torch.float64)

    def fn(x, w, b):
        return torch.ops.covshift.batch_norm(x, w, b, None, None, True, 0.1, 1e-5)[0]

    assert torch.autograd.gradgradcheck(fn, (x, w, b))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_operator_in_eval_takes_an_empty_strided_batch_forward_and_backward(dtype):
    """Called directly (not through functional.batch_norm, which handles an empty batch itself): the
    backward used to refuse autograd's contiguous grad_output for the empty sliced input ("must have
    the input's shape, strides and dtype"). An empty tensor's strides are not read."""
    x = torch.randn(0, 5, 18, dtype=dtype)[:, :, ::2].requires_grad_()
    w, b = torch.ones(5, dtype=dtype, requires_grad=True), torch.zeros(5, dtype=dtype, requires_grad=True)
    rm, rv = torch.zeros(5, dtype=dtype), torch.ones(5, dtype=dtype)
    y = torch.ops.covshift.batch_norm(x, w, b, rm, rv, False, 0.1, 1e-5)[0]
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad.shape == x.shape
    torch.testing.assert_close(w.grad, torch.zeros(5, dtype=dtype))
    torch.testing.assert_close(b.grad, torch.zeros(5, dtype=dtype))
