"""covshift.nn.GhostBatchNorm*: BatchNorm when one ghost batch; brute force over the ghost batches otherwise."""

import warnings

import pytest
import torch
import torch.nn.functional as F

import covshift.nn as cnn

SCHEDULE = [(True, 1.0, 0.0), (True, 2.0, 1.0), (False, 1.0, 0.5), (True, 0.5, -2.0)]


def _init(layer, seed=1):
    gen = torch.Generator().manual_seed(seed)
    if layer.weight is not None:
        with torch.no_grad():
            layer.weight.uniform_(0.5, 1.5, generator=gen)
            layer.bias.uniform_(-0.5, 0.5, generator=gen)


def _steps(layer, shape, seed=0, fmt=None):
    gen = torch.Generator().manual_seed(seed)
    for train, scale, offset in SCHEDULE:
        layer.train(train)
        x = torch.randn(shape, generator=gen, dtype=torch.float64) * scale + offset
        if fmt is not None:
            x = x.contiguous(memory_format=fmt)
        x.requires_grad_()
        dy = torch.randn(shape, generator=gen, dtype=torch.float64)
        y = layer(x)
        (y * dy).sum().backward()
        grads = [None if p is None else p.grad.clone() for p in (layer.weight, layer.bias)]
        buffers = [None if b is None else b.clone() for b in (layer.running_mean, layer.running_var, layer.num_batches_tracked)]
        yield (y.detach(), x.grad, *grads, *buffers)
        layer.zero_grad()


def _compare(got_steps, exp_steps):
    names = ("y", "dx", "dw", "db", "running_mean", "running_var", "nbt")
    for step, (got, exp) in enumerate(zip(got_steps, exp_steps)):
        for name, a, b in zip(names, got, exp):
            if a is None or b is None:
                assert a is None and b is None, f"step {step} {name}"
                continue
            torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9, msg=lambda m: f"step {step} {name}: {m}")


class _Reference(torch.nn.Module):
    """Ghost BatchNorm written out with torch: F.batch_norm per ghost batch; the documented running rule."""

    def __init__(self, c, sizes, momentum=0.1, affine=True, track=True):
        super().__init__()
        self.sizes, self.momentum = sizes, momentum
        self.weight = torch.nn.Parameter(torch.ones(c, dtype=torch.float64)) if affine else None
        self.bias = torch.nn.Parameter(torch.zeros(c, dtype=torch.float64)) if affine else None
        buffers = dict(running_mean=torch.zeros(c, dtype=torch.float64), running_var=torch.ones(c, dtype=torch.float64),
                       num_batches_tracked=torch.tensor(0))
        for k, v in buffers.items():
            self.register_buffer(k, v if track else None)

    def forward(self, x):
        if not self.training and self.running_mean is not None:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False)
        chunks = x.split(self.sizes)
        y = torch.cat([F.batch_norm(c, None, None, self.weight, self.bias, True) for c in chunks])
        if self.training and self.running_mean is not None:
            with torch.no_grad():
                dims = [0, *range(2, x.dim())]
                m = [c.numel() // c.shape[1] for c in chunks]
                pooled = sum(mk * c.var(dims, unbiased=False) for mk, c in zip(m, chunks)) / (sum(m) - len(m))
                self.num_batches_tracked += 1
                mom = 1 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.lerp_(x.mean(dims), mom)
                self.running_var.lerp_(pooled, mom)
        return y


@pytest.mark.parametrize(
    "cls, torch_cls, shape, vbs",
    [
        (cnn.GhostBatchNorm1d, torch.nn.BatchNorm1d, (8, 3), 8),
        (cnn.GhostBatchNorm1d, torch.nn.BatchNorm1d, (8, 3, 4), 100),
        (cnn.GhostBatchNorm2d, torch.nn.BatchNorm2d, (6, 3, 2, 2), 6),
    ],
)
@pytest.mark.parametrize("momentum", [0.1, None])
def test_one_ghost_batch_is_batchnorm(cls, torch_cls, shape, vbs, momentum):
    ours = cls(3, virtual_batch_size=vbs, momentum=momentum, dtype=torch.float64)
    ref = torch_cls(3, momentum=momentum, dtype=torch.float64)
    _init(ref)
    ours.load_state_dict(ref.state_dict(), strict=True)
    _compare(_steps(ours, shape), _steps(ref, shape))


@pytest.mark.parametrize(
    "cls, shape, vbs, sizes",
    [
        (cnn.GhostBatchNorm1d, (12, 3), 4, [4, 4, 4]),
        (cnn.GhostBatchNorm1d, (10, 3), 4, [4, 4, 2]),  # the remainder is its own ghost batch
        (cnn.GhostBatchNorm1d, (9, 3), 4, [4, 5]),  # a lone row would have one value per channel: merged
        (cnn.GhostBatchNorm1d, (5, 3, 3), 2, [2, 2, 1]),  # one row of length 3 is enough on its own
        (cnn.GhostBatchNorm2d, (7, 3, 2, 3), 3, [3, 3, 1]),
    ],
)
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("affine", [True, False])
def test_against_brute_force_over_ghost_batches(cls, shape, vbs, sizes, momentum, affine):
    ours = cls(3, virtual_batch_size=vbs, momentum=momentum, affine=affine, dtype=torch.float64)
    ref = _Reference(3, sizes, momentum, affine)
    _init(ref)
    ours.load_state_dict(ref.state_dict(), strict=True)
    _compare(_steps(ours, shape), _steps(ref, shape))


def test_without_running_stats_eval_uses_ghost_statistics():
    ours = cnn.GhostBatchNorm1d(3, virtual_batch_size=4, track_running_stats=False, dtype=torch.float64)
    ref = _Reference(3, [4, 4, 2], track=False)
    _init(ref)
    ours.load_state_dict(ref.state_dict(), strict=True)
    _compare(_steps(ours, (10, 3)), _steps(ref, (10, 3)))


def test_channels_last_is_kept():
    layer = cnn.GhostBatchNorm2d(3, virtual_batch_size=2)
    x = torch.randn(5, 3, 4, 4).contiguous(memory_format=torch.channels_last)
    assert layer(x).is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("vbs", [0, -2, 2.5, True, "4", None])
def test_bad_virtual_batch_size(vbs):
    with pytest.raises(ValueError, match=r"GhostBatchNorm2d expected virtual_batch_size to be a positive int"):
        cnn.GhostBatchNorm2d(3, virtual_batch_size=vbs)


def test_ghost_batches_of_one_value_per_channel_are_refused():
    layer = cnn.GhostBatchNorm1d(3, virtual_batch_size=1)
    with pytest.raises(ValueError, match="ghost batches of one value per channel"):
        layer(torch.randn(4, 3))
    layer(torch.randn(4, 3, 2))  # (N, C, L): one sample holds L values per channel, which is fine


def test_input_errors_and_repr():
    layer = cnn.GhostBatchNorm1d(3, virtual_batch_size=4)
    assert "virtual_batch_size=4" in repr(layer)
    with pytest.raises(ValueError, match=r"GhostBatchNorm1d expected 2D or 3D input \(got 4D input"):
        layer(torch.randn(8, 3, 2, 2))


def test_nonfinite_guard():
    layer = cnn.GhostBatchNorm1d(3, virtual_batch_size=2, skip_nonfinite=True)
    layer(torch.randn(6, 3))
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    bad = torch.randn(6, 3)
    bad[5, 2] = float("nan")
    with pytest.warns(cnn.NonFiniteBatchWarning):
        y = layer(bad)
    assert torch.isfinite(y[:4]).all()  # other ghost batches are unaffected
    assert all(torch.equal(v, before[k]) for k, v in layer.state_dict().items())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer(torch.randn(6, 3))
    assert int(layer.num_batches_tracked) == 2
