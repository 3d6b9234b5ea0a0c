"""covshift.nn.BatchRenorm*: equal to BatchNorm at r_max=1, d_max=0; a brute-force reference otherwise."""

import pytest
import torch

import covshift.nn as cnn

LAYERS = {
    "1d-2D": (cnn.BatchRenorm1d, cnn.BatchNorm1d, torch.nn.BatchNorm1d, (12, 3)),
    "1d-3D": (cnn.BatchRenorm1d, cnn.BatchNorm1d, torch.nn.BatchNorm1d, (6, 3, 4)),
    "2d": (cnn.BatchRenorm2d, cnn.BatchNorm2d, torch.nn.BatchNorm2d, (4, 3, 3, 2)),
    "3d": (cnn.BatchRenorm3d, cnn.BatchNorm3d, torch.nn.BatchNorm3d, (3, 3, 2, 2, 2)),
}
# (train?, scale, offset): the statistics move a lot between steps, so r and d hit their bounds.
SCHEDULE = [(True, 1.0, 0.0), (True, 6.0, 4.0), (True, 0.1, -6.0), (False, 2.0, 1.0), (True, 3.0, 2.0), (True, 0.5, 0.0)]


def _init(layer, gen):
    if layer.weight is not None:
        with torch.no_grad():
            layer.weight.uniform_(0.5, 1.5, generator=gen)
            if layer.bias is not None:
                layer.bias.uniform_(-0.5, 0.5, generator=gen)


def _steps(layer, shape, seed, schedule=SCHEDULE):
    """Runs the schedule; yields (y, dx, dw, db, running_mean, running_var, nbt) per step."""
    gen = torch.Generator().manual_seed(seed)
    for train, scale, offset in schedule:
        layer.train(train)
        x = (torch.randn(shape, generator=gen, dtype=torch.float64) * scale + offset).requires_grad_()
        dy = torch.randn(shape, generator=gen, dtype=torch.float64)
        y = layer(x)
        (y * dy).sum().backward()
        grads = [None if p is None or p.grad is None else p.grad.clone() for p in (layer.weight, layer.bias)]
        yield (y.detach(), x.grad, *grads, layer.running_mean.clone(), layer.running_var.clone(), layer.num_batches_tracked.clone())
        layer.zero_grad()


@pytest.mark.parametrize("key", LAYERS)
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("affine, bias", [(True, True), (False, True), (True, False)])
def test_r_max_1_d_max_0_is_batchnorm_exactly(key, momentum, affine, bias):
    renorm_cls, bn_cls, torch_cls, shape = LAYERS[key]
    kw = dict(momentum=momentum, affine=affine, dtype=torch.float64, bias=bias)
    ours = renorm_cls(3, r_max=1.0, d_max=0.0, **kw)
    bn, ref = bn_cls(3, **kw), torch_cls(3, **kw)
    _init(ref, torch.Generator().manual_seed(1))
    ours.load_state_dict(ref.state_dict())
    bn.load_state_dict(ref.state_dict())
    for got, same, exp in zip(_steps(ours, shape, 0), _steps(bn, shape, 0), _steps(ref, shape, 0)):
        for i, (a, b, c) in enumerate(zip(got, same, exp)):
            if a is None:
                assert b is None and c is None
                continue
            assert torch.equal(a, b), f"field {i} differs from covshift's BatchNorm"  # bit for bit
            torch.testing.assert_close(a, c, atol=1e-9, rtol=1e-9)


class _Reference(torch.nn.Module):
    """Ioffe 2017, Algorithm 1, written out with torch autograd (r, d detached) in float64."""

    def __init__(self, c, r_max, d_max, momentum, eps=1e-5):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(c, dtype=torch.float64))
        self.bias = torch.nn.Parameter(torch.zeros(c, dtype=torch.float64))
        self.register_buffer("running_mean", torch.zeros(c, dtype=torch.float64))
        self.register_buffer("running_var", torch.ones(c, dtype=torch.float64))
        self.register_buffer("num_batches_tracked", torch.tensor(0))
        self.r_max, self.d_max, self.momentum, self.eps = r_max, d_max, momentum, eps
        self.clipped = set()

    def forward(self, x):
        dims = [0, *range(2, x.dim())]
        view = (1, -1) + (1,) * (x.dim() - 2)
        if not self.training:
            xhat = (x - self.running_mean.view(view)) / torch.sqrt(self.running_var.view(view) + self.eps)
            return xhat * self.weight.view(view) + self.bias.view(view)
        mu = x.mean(dims)
        sigma_b = torch.sqrt(x.var(dims, unbiased=False) + self.eps)
        sigma = torch.sqrt(self.running_var + self.eps)
        r_raw = (sigma_b / sigma).detach()
        d_raw = ((mu - self.running_mean) / sigma).detach()
        r = r_raw.clamp(1 / self.r_max, self.r_max)
        d = d_raw.clamp(-self.d_max, self.d_max)
        self.clipped |= {"r"} if (r != r_raw).any() else set()
        self.clipped |= {"d"} if (d != d_raw).any() else set()
        xhat = (x - mu.view(view)) / sigma_b.view(view) * r.view(view) + d.view(view)
        with torch.no_grad():
            m = x.numel() // x.shape[1]
            self.num_batches_tracked += 1
            self.running_mean.lerp_(mu, self.momentum)
            self.running_var.lerp_(x.var(dims, unbiased=True), self.momentum)
            assert m > 1
        return xhat * self.weight.view(view) + self.bias.view(view)


@pytest.mark.parametrize("key", ["1d-2D", "2d", "3d"])
def test_against_the_papers_algorithm_with_active_clipping(key):
    renorm_cls, _, _, shape = LAYERS[key]
    ours = renorm_cls(3, momentum=0.3, r_max=1.5, d_max=0.5, dtype=torch.float64)
    ref = _Reference(3, 1.5, 0.5, 0.3)
    _init(ref, torch.Generator().manual_seed(2))
    ours.load_state_dict(ref.state_dict())
    for step, (got, exp) in enumerate(zip(_steps(ours, shape, 3), _steps(ref, shape, 3))):
        for name, a, b in zip(("y", "dx", "dw", "db", "running_mean", "running_var", "nbt"), got, exp):
            torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9, msg=lambda m: f"step {step} {name}: {m}")
    assert ref.clipped == {"r", "d"}, "the schedule never clipped r and d: the test would not see clipping bugs"


def test_inference_is_plain_batchnorm_and_state_loads_into_torch():
    layer = cnn.BatchRenorm2d(3)
    for _ in range(3):
        layer(torch.randn(4, 3, 2, 2) * 2 + 1)
    ref = torch.nn.BatchNorm2d(3)
    ref.load_state_dict(layer.state_dict(), strict=True)
    layer.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(4, 3, 2, 2)
    torch.testing.assert_close(layer.eval()(x), ref.eval()(x))


def test_paper_schedule():
    layer = cnn.BatchRenorm1d(3, **cnn.PAPER_SCHEDULE)
    assert layer.limits(0) == (1.0, 0.0) and layer.limits(4999) == (1.0, 0.0) and layer.limits(5000) == (1.0, 0.0)
    r, d = layer.limits(22_500)  # halfway for r (5k..40k), 7/8 of the way for d (5k..25k)
    assert r == pytest.approx(1 + 2 * 17_500 / 35_000) and d == pytest.approx(5 * 17_500 / 20_000)
    assert layer.limits(25_000) == (pytest.approx(1 + 2 * 20_000 / 35_000), 5.0)
    assert layer.limits(40_000) == (3.0, 5.0) and layer.limits(10**6) == (3.0, 5.0)
    assert cnn.BatchRenorm1d(3).limits(0) == (3.0, 5.0)  # default: no warmup, the bounds from the start


def test_warmup_steps_run_as_batchnorm_then_renormalize():
    renorm = cnn.BatchRenorm1d(2, r_max=1.2, d_max=0.1, warmup_steps=2, dtype=torch.float64)
    bn = cnn.BatchNorm1d(2, dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    outs = []
    for step in range(3):
        x = torch.randn(8, 2, generator=gen, dtype=torch.float64) * (1 + 3 * step) + 2 * step
        assert renorm.limits() == ((1.0, 0.0) if step < 2 else (1.2, 0.1))
        outs.append((renorm(x), bn(x)))
    assert torch.equal(*outs[0]) and torch.equal(*outs[1])
    assert not torch.allclose(*outs[2])


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"r_max": 0.5}, "r_max >= 1"),
        ({"d_max": -1.0}, "d_max >= 0"),
        ({"warmup_steps": -1}, "warmup_steps to be an int >= 0"),
        ({"r_relax_steps": 2.5}, "r_relax_steps to be an int >= 0"),
        ({"d_relax_steps": True}, "d_relax_steps to be an int >= 0"),
    ],
)
def test_constructor_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        cnn.BatchRenorm2d(3, **kw)


def test_input_errors_are_batchnorms():
    with pytest.raises(ValueError, match=r"BatchRenorm2d expected 4D input \(got 3D input"):
        cnn.BatchRenorm2d(3)(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        cnn.BatchRenorm1d(3)(torch.randn(1, 3))


def test_nonfinite_guard_skips_the_update_and_the_schedule_step():
    layer = cnn.BatchRenorm1d(3, skip_nonfinite=True)
    layer(torch.randn(6, 3))
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    bad = torch.randn(6, 3)
    bad[0, 0] = float("inf")
    with pytest.warns(cnn.NonFiniteBatchWarning):
        layer(bad)
    assert all(torch.equal(v, before[k]) for k, v in layer.state_dict().items())


def test_without_running_statistics_it_is_batchnorm():
    ours = cnn.BatchRenorm1d(3, track_running_stats=False, dtype=torch.float64)
    ref = torch.nn.BatchNorm1d(3, track_running_stats=False, dtype=torch.float64)
    _init(ref, torch.Generator().manual_seed(1))
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(6, 3, dtype=torch.float64)
    for mode in (True, False):
        torch.testing.assert_close(ours.train(mode)(x), ref.train(mode)(x), atol=1e-12, rtol=1e-12)
