"""covshift.nn.BatchNorm* against torch.nn.BatchNorm* over the grid of modes, shapes and dtypes.

Each case runs the same sequence of train and eval steps through both layers and compares outputs,
gradients of input, weight and bias, running buffers and num_batches_tracked after every step.
"""

import itertools
import zlib

import pytest
import torch

import covshift.nn as cnn

SHAPES = {
    "1d-2D": (torch.nn.BatchNorm1d, cnn.BatchNorm1d, (16, 5), None),
    "1d-3D": (torch.nn.BatchNorm1d, cnn.BatchNorm1d, (8, 5, 7), None),
    "2d": (torch.nn.BatchNorm2d, cnn.BatchNorm2d, (6, 5, 4, 3), None),
    "2d-channels_last": (torch.nn.BatchNorm2d, cnn.BatchNorm2d, (6, 5, 4, 3), torch.channels_last),
    "3d": (torch.nn.BatchNorm3d, cnn.BatchNorm3d, (3, 5, 3, 4, 2), None),
    "3d-channels_last": (torch.nn.BatchNorm3d, cnn.BatchNorm3d, (3, 5, 3, 4, 2), torch.channels_last_3d),
}

# (atol, rtol) per input dtype. bfloat16 keeps 8 significant bits: two implementations that round
# different float32 values to it differ by an ulp, 2^-7 of the largest magnitude (see _close).
TOL = {torch.float64: (1e-9, 1e-9), torch.float32: (1e-4, 1e-4), torch.bfloat16: (3e-2, 2e-2)}

# (train?, input scale, input offset): several train steps in a row, eval in between, train again.
SCHEDULE = [(True, 1.0, 0.0), (True, 2.0, 1.0), (True, 0.5, -3.0), (False, 1.5, 0.5), (True, 3.0, 2.0), (False, 1.0, 0.0)]


def _close(a, b, dtype, what):
    atol, rtol = TOL[dtype]
    if a is None or b is None:
        assert a is None and b is None, f"{what}: one side is None"
        return
    if dtype == torch.bfloat16 and b.numel():
        atol = max(atol, 2.0**-7 * float(b.detach().double().abs().max()))
    assert a.dtype == b.dtype, f"{what}: dtype {a.dtype} vs {b.dtype}"
    torch.testing.assert_close(a.double(), b.double(), atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


def _pair(torch_cls, ours_cls, channels, param_dtype, **kw):
    ref = torch_cls(channels, dtype=param_dtype, **kw)
    ours = ours_cls(channels, dtype=param_dtype, **kw)
    if ref.affine:  # non-trivial affine parameters, identical in both
        with torch.no_grad():
            ref.weight.uniform_(0.5, 1.5)
            ref.bias.uniform_(-0.5, 0.5)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def _run_case(shape_key, dtype, momentum, affine, track, toggle_tracking=False):
    torch_cls, ours_cls, shape, fmt = SHAPES[shape_key]
    param_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    # A stable seed per case (str hashes are salted per process, which made failures unreproducible).
    gen = torch.Generator().manual_seed(zlib.crc32(repr((shape_key, str(dtype), momentum, affine, track)).encode()))
    ref, ours = _pair(torch_cls, ours_cls, shape[1], param_dtype, momentum=momentum, affine=affine, track_running_stats=track)
    if toggle_tracking:  # switched off after construction: buffers kept, no longer updated
        ref.track_running_stats = ours.track_running_stats = False
    for i, (train, scale, offset) in enumerate(SCHEDULE):
        ref.train(train)
        ours.train(train)
        x = (torch.randn(shape, generator=gen, dtype=torch.float64) * scale + offset).to(dtype)
        if fmt is not None:
            x = x.contiguous(memory_format=fmt)
        xr = x.clone().requires_grad_()
        xo = x.clone().requires_grad_()
        yr, yo = ref(xr), ours(xo)
        what = f"step {i} ({'train' if train else 'eval'})"
        _close(yo, yr, dtype, f"{what} output")
        if fmt is not None:
            assert yo.is_contiguous(memory_format=fmt), f"{what}: output lost the input's memory format"
        dy = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
        (yr * dy).sum().backward()
        (yo * dy).sum().backward()
        _close(xo.grad, xr.grad, dtype, f"{what} grad input")
        if affine:
            _close(ours.weight.grad, ref.weight.grad, dtype, f"{what} grad weight")
            _close(ours.bias.grad, ref.bias.grad, dtype, f"{what} grad bias")
            ref.zero_grad()
            ours.zero_grad()
        _close(ours.running_mean, ref.running_mean, dtype, f"{what} running_mean")
        _close(ours.running_var, ref.running_var, dtype, f"{what} running_var")
        if track:
            assert int(ours.num_batches_tracked) == int(ref.num_batches_tracked), what


GRID = list(
    itertools.product(
        SHAPES,
        [torch.float32, torch.float64, torch.bfloat16],
        [0.1, None],
        [True, False],
        [True, False],
    )
)


@pytest.mark.parametrize("shape_key,dtype,momentum,affine,track", GRID, ids=lambda v: str(v).replace("torch.", ""))
def test_matches_torch(shape_key, dtype, momentum, affine, track):
    _run_case(shape_key, dtype, momentum, affine, track)


@pytest.mark.parametrize("shape_key", list(SHAPES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tracking_switched_off_after_construction(shape_key, dtype):
    _run_case(shape_key, dtype, 0.1, True, True, toggle_tracking=True)


def test_float16_input_with_float32_parameters():
    ref, ours = _pair(torch.nn.BatchNorm2d, cnn.BatchNorm2d, 4, torch.float32)
    x = torch.randn(8, 4, 5, 5).half().contiguous(memory_format=torch.channels_last)
    x64 = x.double()
    y = ours(x)
    assert y.dtype == torch.float16 and y.is_contiguous(memory_format=torch.channels_last)
    assert ours.running_mean.dtype == torch.float32 and ours.weight.dtype == torch.float32
    # Reference in float64 from the same (float16-rounded) values.
    ref64 = torch.nn.BatchNorm2d(4).double()
    ref64.load_state_dict(ref.state_dict())
    torch.testing.assert_close(y.double(), ref64(x64), atol=5e-3, rtol=5e-3)
    torch.testing.assert_close(ours.running_var.double(), ref64.running_var, atol=1e-6, rtol=1e-6)


def test_momentum_none_is_the_cumulative_average_of_batch_statistics():
    bn = cnn.BatchNorm1d(3, momentum=None).double()
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(10, 3, generator=gen, dtype=torch.float64) * (i + 1) + i for i in range(5)]
    for x in batches:
        bn(x)
    means = torch.stack([x.mean(0) for x in batches]).mean(0)
    uvars = torch.stack([x.var(0, unbiased=True) for x in batches]).mean(0)
    torch.testing.assert_close(bn.running_mean, means, atol=1e-12, rtol=0)
    torch.testing.assert_close(bn.running_var, uvars, atol=1e-12, rtol=0)
    assert int(bn.num_batches_tracked) == 5


def test_running_var_gets_the_unbiased_variance_and_output_uses_the_biased_one():
    bn = cnn.BatchNorm1d(1, momentum=1.0, affine=False, eps=1e-12).double()  # eps > 0 in training, as torch
    x = torch.tensor([[1.0], [2.0], [3.0], [6.0]], dtype=torch.float64)  # mean 3, biased var 3.5, unbiased 14/3
    y = bn(x)
    assert bn.running_mean.item() == pytest.approx(3.0)
    assert bn.running_var.item() == pytest.approx(14 / 3)
    torch.testing.assert_close(y, (x - 3.0) / 3.5**0.5)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_empty_batch(momentum):
    ref, ours = _pair(torch.nn.BatchNorm2d, cnn.BatchNorm2d, 3, torch.float32, momentum=momentum)
    for m in (ref, ours):
        m(torch.randn(4, 3, 2, 2) + 1)  # non-default statistics first
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    x = torch.randn(0, 3, 2, 2, requires_grad=True)
    y = ours(x)
    ref(torch.randn(0, 3, 2, 2))
    assert y.shape == (0, 3, 2, 2)
    torch.testing.assert_close(ours.running_mean, before["running_mean"])
    torch.testing.assert_close(ours.running_var, before["running_var"])
    assert int(ours.num_batches_tracked) == int(ref.num_batches_tracked) == 2
    y.sum().backward()
    assert x.grad.shape == x.shape
    assert torch.equal(ours.weight.grad, torch.zeros(3)) and torch.equal(ours.bias.grad, torch.zeros(3))


def test_one_sample_with_spatial_extent_trains():
    bn = cnn.BatchNorm1d(3)
    y = bn(torch.randn(1, 3, 2))
    assert y.shape == (1, 3, 2) and int(bn.num_batches_tracked) == 1


@pytest.mark.parametrize("track", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_state_dict_loads_both_ways_strict(affine, track):
    ref = torch.nn.BatchNorm2d(6, affine=affine, track_running_stats=track)
    ours = cnn.BatchNorm2d(6, affine=affine, track_running_stats=track)
    ref.train()(torch.randn(4, 6, 3, 3))
    assert list(ref.state_dict()) == list(ours.state_dict())
    ours.load_state_dict(ref.state_dict(), strict=True)
    for k, v in ref.state_dict().items():
        assert torch.equal(ours.state_dict()[k], v)
    ours(torch.randn(4, 6, 3, 3) * 3)
    ref.load_state_dict(ours.state_dict(), strict=True)
    for k, v in ours.state_dict().items():
        assert torch.equal(ref.state_dict()[k], v)


@pytest.mark.parametrize("kw", [{}, dict(eps=1e-3, momentum=None), dict(affine=False, track_running_stats=False)])
def test_constructor_defaults_repr_and_resets_match_torch(kw):
    ref, ours = torch.nn.BatchNorm3d(7, **kw), cnn.BatchNorm3d(7, **kw)
    assert ours.extra_repr() == ref.extra_repr()
    assert (ours.eps, ours.momentum, ours.affine, ours.track_running_stats) == (ref.eps, ref.momentum, ref.affine, ref.track_running_stats)
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in ref.named_parameters()]
    assert [n for n, _ in ours.named_buffers()] == [n for n, _ in ref.named_buffers()]
    assert isinstance(ours, torch.nn.BatchNorm3d)  # isinstance checks in user code keep working
    ours(torch.randn(2, 7, 2, 2, 2) * 5 + 3)
    if ours.affine:
        with torch.no_grad():
            ours.weight.fill_(2.0)
            ours.bias.fill_(1.0)
    ours.reset_running_stats()
    if ours.track_running_stats:
        assert torch.equal(ours.running_mean, torch.zeros(7)) and torch.equal(ours.running_var, torch.ones(7))
        assert int(ours.num_batches_tracked) == 0
        if ours.affine:
            assert torch.equal(ours.weight, torch.full((7,), 2.0))  # reset_running_stats keeps the affine
    ours.reset_parameters()
    for k, v in ref.state_dict().items():
        assert torch.equal(ours.state_dict()[k], v), k


def test_device_and_dtype_arguments():
    bn = cnn.BatchNorm1d(3, device="cpu", dtype=torch.float64)
    assert bn.weight.dtype == bn.running_mean.dtype == torch.float64
    assert bn.num_batches_tracked.dtype == torch.int64
