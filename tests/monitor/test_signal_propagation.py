"""signal_propagation: brute force on hand-built ResNets, known values on constructed inputs, ranks of
matrices of known rank, block and channel-axis rules, and no side effects."""

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from covshift.monitor import numerical_rank, signal_propagation, stable_rank
from covshift.monitor.signal_propagation import (
    SignalPropagation,
    find_blocks,
    mean_cosine_similarity,
    plot_signal_propagation,
    singular_values,
)


# -- ranks and similarity ------------------------------------------------------------------------------
def _orthonormal(n, k, g):
    q, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
    return q


@pytest.mark.parametrize("k", [1, 3, 7])
def test_rank_functions_on_matrices_of_known_rank(k):
    g = torch.Generator().manual_seed(k)
    s = torch.linspace(5.0, 0.5, k, dtype=torch.float64)  # singular values, all far above the tolerance
    a = _orthonormal(12, k, g) @ torch.diag(s) @ _orthonormal(40, k, g).T  # (12, 40), rank k
    assert numerical_rank(a) == k
    assert stable_rank(a) == pytest.approx(float((s**2).sum() / s[0] ** 2), rel=1e-12)
    # the same matrix in float32: rounding noise (~1e-7 relative) is below float32's tolerance
    assert numerical_rank(a.float()) == k
    # a (N, C, H, W) batch is flattened to one row per sample
    assert numerical_rank(a.reshape(12, 2, 4, 5)) == k
    # an absolute tolerance above the smallest singular value drops it
    assert numerical_rank(a, atol=1.01 * float(s[-1])) == k - 1


@pytest.mark.parametrize("shape", [(6, 200), (200, 6), (7, 9)])
def test_singular_values_through_qr_equal_the_svd(shape):
    a = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    torch.testing.assert_close(singular_values(a), torch.linalg.svdvals(a), rtol=1e-12, atol=1e-12)


def test_rank_of_full_rank_zero_and_rounding_level_matrices():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(8, 30, generator=g, dtype=torch.float64)
    assert numerical_rank(a) == 8 and 1 < stable_rank(a) < 8
    assert numerical_rank(torch.zeros(5, 4)) == 0 and stable_rank(torch.zeros(5, 4)) == 0.0
    # a rank-1 matrix plus a 1e-9 perturbation: rank 1 with float32's eps, full rank with float64's
    b = torch.outer(torch.arange(1.0, 7.0, dtype=torch.float64), torch.ones(9, dtype=torch.float64))
    b = b + 1e-9 * torch.randn(6, 9, generator=g, dtype=torch.float64)
    assert numerical_rank(b, eps_dtype=torch.float32) == 1 and numerical_rank(b) == 6
    assert stable_rank(b) == pytest.approx(1.0, abs=1e-12)
    with pytest.raises(ValueError, match="one row per sample"):
        numerical_rank(torch.ones(4))


def test_mean_cosine_similarity_known_values():
    assert mean_cosine_similarity(torch.eye(5)) == pytest.approx(0.0, abs=1e-15)  # orthogonal samples
    assert mean_cosine_similarity(torch.ones(4, 3) * torch.arange(1.0, 5.0)[:, None]) == pytest.approx(1.0)
    x = torch.tensor([[1.0, 2.0], [-1.0, -2.0]])
    assert mean_cosine_similarity(x) == pytest.approx(-1.0)
    # rows [1,0], [1,1], [0,0]: the zero row is left out, one pair with cosine 1/sqrt(2)
    assert mean_cosine_similarity(torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]])) == pytest.approx(2**-0.5)
    assert math.isnan(mean_cosine_similarity(torch.tensor([[1.0, 0.0], [0.0, 0.0]])))


# -- a hand-built ResNet and its brute force -------------------------------------------------------------
class Basic(nn.Module):
    """torchvision's BasicBlock pattern: out = relu(bn2(conv2(relu(bn1(conv1 x)))) + skip(x))."""

    def __init__(self, cin, cout, stride=1, bn=True):
        super().__init__()
        norm = nn.BatchNorm2d if bn else (lambda c: nn.Identity())
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=not bn)
        self.bn1 = norm(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=not bn)
        self.bn2 = norm(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), norm(cout))

    def branch(self, x):
        return self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))

    def skip(self, x):
        return x if self.downsample is None else self.downsample(x)

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity  # in place: the branch is gone after this line
        return self.relu(out)


class ResNet(nn.Module):
    def __init__(self, bn=True, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.layer1 = nn.Sequential(Basic(8, 8, bn=bn), Basic(8, 8, bn=bn))
        self.layer2 = nn.Sequential(Basic(8, 16, 2, bn=bn), Basic(16, 16, bn=bn))
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        x = self.layer2(self.layer1(self.stem(x)))
        return self.head(x.mean((2, 3)))


def _brute(model, x):
    """Runs the blocks by hand on a deep copy; every statistic in float64 numpy."""
    m = copy.deepcopy(model)
    out = {}
    with torch.no_grad():
        h = m.stem(x)
        for name in ["layer1.0", "layer1.1", "layer2.0", "layer2.1"]:
            block = m.get_submodule(name)
            br = block.branch(h)
            h = torch.relu(br + block.skip(h))
            y = h.double().numpy()
            per_c = y.transpose(1, 0, 2, 3).reshape(y.shape[1], -1)  # (C, M)
            b = br.double().numpy().transpose(1, 0, 2, 3).reshape(y.shape[1], -1)
            Y = y.reshape(y.shape[0], -1)
            s = np.linalg.svd(Y, compute_uv=False)
            U = Y / np.linalg.norm(Y, axis=1, keepdims=True)
            C = U @ U.T
            out[name] = dict(
                channel_sq_mean=(per_c.mean(1) ** 2).mean(),
                channel_var=per_c.var(1).mean(),
                residual_var=b.var(1).mean(),
                numerical_rank=int((s > s[0] * max(Y.shape) * np.finfo(np.float32).eps).sum()),
                stable_rank=(s**2).sum() / s[0] ** 2,
                cosine_similarity=(C.sum() - np.trace(C)) / (len(C) * (len(C) - 1)),
            )
    return out


@pytest.mark.parametrize("bn", [True, False])
def test_matches_brute_force_on_a_resnet_with_and_without_bn(bn):
    model = ResNet(bn=bn)
    x = torch.randn(12, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    res = signal_propagation(model, x)
    want = _brute(model, x)
    assert res.blocks == tuple(want) and res.residual.all()
    assert res.shapes[2] == (12, 16, 4, 4) and res.channel_axes == (1, 1, 1, 1)
    for i, name in enumerate(res.blocks):
        for stat, value in want[name].items():
            assert res.statistic(stat)[i] == pytest.approx(value, rel=1e-9), (name, stat)
    if bn:  # each BN branch is normalized over the batch: its channel variance is 1 - eps/(var+eps)
        assert np.allclose(res.residual_var, 1.0, atol=1e-3)
    # the residual variance is the branch's own, not the block output's (timm reports the latter)
    assert not np.allclose(res.residual_var, res.channel_var, rtol=0.05)


class Twice(nn.Module):
    """out = x + f(x): f is the identity, so out = 2x."""

    def forward(self, x):
        return x + nn.functional.relu(x) - nn.functional.relu(-x)  # the skip add comes first


class Double(nn.Module):
    def __init__(self):
        super().__init__()
        self.f = nn.Identity()

    def forward(self, x):
        return self.f(x.clone()) + x  # the skip is the right operand


def test_known_values_on_identity_blocks_and_constructed_inputs():
    # Inputs with exactly known channel means m_c and variances v_c: m_c + sqrt(v_c) * z, z standardized
    n, c = 32, 3
    g = torch.Generator().manual_seed(0)
    z = torch.randn(n, c, 5, generator=g, dtype=torch.float64)
    z = (z - z.mean((0, 2), keepdim=True)) / z.std((0, 2), unbiased=False, keepdim=True)
    m = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    v = torch.tensor([1.0, 4.0, 0.25], dtype=torch.float64)
    x = m[None, :, None] + v.sqrt()[None, :, None] * z
    model = nn.Sequential(Double(), Double(), Double())
    res = signal_propagation(model, x, channel_axis=1)
    assert res.blocks == ("0", "1", "2") and res.channel_axes == (1, 1, 1)
    k = np.arange(1, 4)
    assert np.allclose(res.channel_sq_mean, 4.0**k * float((m**2).mean()), rtol=1e-12)
    assert np.allclose(res.channel_var, 4.0**k * float(v.mean()), rtol=1e-12)
    assert np.allclose(res.residual_var, 4.0 ** (k - 1) * float(v.mean()), rtol=1e-12)  # the branch is the input

    # constant input: no variance, every sample the same (rank 1, cosine 1)
    res = signal_propagation(model, torch.full((8, 4, 3), 2.0, dtype=torch.float64), channel_axis=1)
    assert np.all(res.channel_var == 0) and np.all(res.residual_var == 0)
    assert np.allclose(res.channel_sq_mean, 4.0 ** (k + 1), rtol=1e-12)  # (2 * 2^k)^2
    assert np.all(res.numerical_rank == 1) and np.allclose(res.stable_rank, 1) and np.allclose(res.cosine_similarity, 1)

    # rank-k input: 16 samples in a 3-dim subspace stay rank 3 through linear blocks
    basis = torch.randn(3, 20, generator=g, dtype=torch.float64)
    coef = torch.randn(16, 3, generator=g, dtype=torch.float64)
    res = signal_propagation(model, coef @ basis)  # (N, C): axis 1
    assert np.all(res.numerical_rank == 3)
    # orthogonal samples: cosine 0, full rank, stable rank = N
    res = signal_propagation(nn.Sequential(Twice(), Twice()), torch.eye(6, dtype=torch.float64))
    assert np.allclose(res.cosine_similarity, 0) and np.all(res.numerical_rank == 6) and np.allclose(res.stable_rank, 6)
    assert np.allclose(res.residual_var, [np.var(np.eye(6), axis=0).mean(), 4 * np.var(np.eye(6), axis=0).mean()])


# -- which modules are blocks ------------------------------------------------------------------------
class Shortcut(nn.Module):
    """timm-style: shortcut = self.shortcut(x) (a projection), branch called on x as well."""

    def __init__(self, cin, cout):
        super().__init__()
        self.shortcut = nn.Conv1d(cin, cout, 1)
        self.body = nn.Sequential(nn.Conv1d(cin, cout, 3, padding=1), nn.ReLU(), nn.Conv1d(cout, cout, 3, padding=1))

    def forward(self, x):
        return torch.add(self.body(x), self.shortcut(x))


class PreAct(nn.Module):
    """Pre-activation block (timm/He et al. 2016): the projection shortcut reads norm1(x), not x, and
    the branch uses a functional ReLU (a chain of modules broken by a function)."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.norm1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1)
        self.norm2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1)
        self.downsample = nn.Conv2d(cin, cout, 1, stride) if stride != 1 or cin != cout else None

    def branch(self, x):
        return self.conv2(torch.relu(self.norm2(self.conv1(torch.relu(self.norm1(x))))))

    def forward(self, x):
        shortcut = x
        x = torch.relu(self.norm1(x))
        if self.downsample is not None:
            shortcut = self.downsample(x)
        x = self.conv1(x)
        x = self.conv2(torch.relu(self.norm2(x)))
        return x + shortcut


class TokenBlock(nn.Module):
    """A pre-norm transformer-style MLP block on (N, L, C) tokens: two adds, the first is the skip."""

    def __init__(self, c):
        super().__init__()
        self.ln = nn.LayerNorm(c)
        self.fc = nn.Linear(c, c)

    def forward(self, x):
        y = x + self.fc(self.ln(x))
        return y + 0.5 * y


class Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = Double()

    def forward(self, x):
        return self.inner(x) + x


class AddsAtRoot(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)

    def forward(self, x):
        return self.b(self.a(x) + 1.0) + x  # the model itself: not a block


def test_default_blocks_rule():
    assert find_blocks(ResNet(), torch.randn(2, 3, 8, 8)) == ["layer1.0", "layer1.1", "layer2.0", "layer2.1"]
    net = nn.Sequential(Shortcut(2, 4), Shortcut(4, 4))
    assert find_blocks(net, torch.randn(3, 2, 10)) == ["0", "1"]
    res = signal_propagation(net, torch.randn(3, 2, 10))
    with torch.no_grad():  # the skip is the projection (fewer parameters); the branch is `body`
        x = torch.randn(3, 2, 10, generator=torch.Generator().manual_seed(3))
        res = signal_propagation(net, x)
        b0 = net[0].body(x)
        assert res.residual_var[0] == pytest.approx(float(b0.double().var((0, 2), unbiased=False).mean()), rel=1e-9)
    # pre-activation blocks, with and without a projection shortcut read after norm1
    torch.manual_seed(0)
    pre = nn.Sequential(PreAct(3, 4, 2), PreAct(4, 4, 1))
    x = torch.randn(6, 3, 8, 8, dtype=torch.float64)
    pre = pre.double()
    assert find_blocks(pre, x) == ["0", "1"]
    res = signal_propagation(pre, x)
    with torch.no_grad():
        b0 = copy.deepcopy(pre[0]).branch(x)
    assert res.residual.all()
    assert res.residual_var[0] == pytest.approx(float(b0.var((0, 2, 3), unbiased=False).mean()), rel=1e-12)
    # only the outermost residual module
    assert find_blocks(nn.Sequential(Outer(), Outer()), torch.randn(2, 4)) == ["0", "1"]
    # no residual module: the children of the longest nn.Sequential
    mlp = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh())
    assert find_blocks(mlp, torch.randn(2, 4)) == ["0", "1", "2", "3"]
    res = signal_propagation(mlp, torch.randn(5, 4))
    assert not res.residual.any() and np.isnan(res.residual_var).all()
    with pytest.raises(ValueError, match="blocks="):
        find_blocks(AddsAtRoot(), torch.randn(2, 4))
    # user-named blocks: names, globs or types
    res = signal_propagation(ResNet(), torch.randn(4, 3, 8, 8), blocks="layer2.*")
    assert res.blocks == ("layer2.0", "layer2.1")
    res = signal_propagation(mlp, torch.randn(4, 4), blocks=nn.Tanh)
    assert res.blocks == ("1", "3")
    with pytest.raises(ValueError, match="layers"):
        signal_propagation(mlp, torch.randn(4, 4), blocks="nope")


def test_channel_axis_tokens_channels_last_and_ambiguity():
    torch.manual_seed(0)
    net = nn.Sequential(TokenBlock(6), TokenBlock(6)).double()
    x = torch.randn(4, 5, 6, dtype=torch.float64)  # (N, L, C)
    res = signal_propagation(net, x)
    assert res.channel_axes == (2, 2) and res.residual.all()
    with torch.no_grad():
        y0 = net[0](x)
        br = net[0].fc(net[0].ln(x))
    assert res.channel_var[0] == pytest.approx(float(y0.var((0, 1), unbiased=False).mean()), rel=1e-12)
    assert res.channel_sq_mean[0] == pytest.approx(float(y0.mean((0, 1)).square().mean()), rel=1e-12)
    assert res.residual_var[0] == pytest.approx(float(br.var((0, 1), unbiased=False).mean()), rel=1e-12)
    # the user can say which axis; a wrong one gives other numbers
    assert signal_propagation(net, x, channel_axis=-1).channel_var == pytest.approx(res.channel_var)
    assert not np.allclose(signal_propagation(net, x, channel_axis=1).channel_var, res.channel_var)

    # channels_last is a memory format: the same logical (N, C, H, W) numbers
    model = ResNet()
    x = torch.randn(6, 3, 8, 8)
    a = signal_propagation(model, x)
    b = signal_propagation(model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last))
    for s in ("channel_sq_mean", "channel_var", "residual_var", "stable_rank"):
        assert np.allclose(a.statistic(s), b.statistic(s), rtol=1e-4), s

    # 3-dim output of a block with no telling layers: ambiguous, so an error that names the fix
    with pytest.raises(ValueError, match="channel_axis=1 or channel_axis=-1"):
        signal_propagation(nn.Sequential(Double()), torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="Axis 0 is the batch"):
        signal_propagation(net, torch.randn(4, 5, 6, dtype=torch.float64), channel_axis=0)


# -- no side effects ---------------------------------------------------------------------------------
class Boom(nn.Module):
    def forward(self, x):
        raise RuntimeError("boom")


def _hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_modes_buffers_rng_and_hooks_restored_even_on_error():
    model = ResNet()
    model.layer1.append(nn.Dropout(0.5))
    model.train()
    model.layer2.eval()  # a mixed mode is restored as it was
    before = copy.deepcopy(model.state_dict())
    x = torch.randn(4, 3, 8, 8)
    rng = torch.get_rng_state()
    grad_mode = torch.is_grad_enabled()
    res = signal_propagation(model, x, training=True)
    assert res.training
    assert model.training and model.layer1.training and not model.layer2.training and not model.layer2[0].bn1.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # BN running statistics and num_batches_tracked
    assert torch.equal(torch.get_rng_state(), rng) and torch.is_grad_enabled() == grad_mode
    assert _hooks(model) == 0
    assert not signal_propagation(model, torch.randn(4, 3, 8, 8), training=False).training

    broken = nn.Sequential(Double(), Boom())
    with pytest.raises(RuntimeError, match="boom"):
        signal_propagation(broken, torch.randn(2, 3))
    with pytest.raises(RuntimeError, match="boom"):
        signal_propagation(broken, torch.randn(2, 3), blocks=["0"])
    assert _hooks(broken) == 0
    assert torch.add(torch.ones(1), torch.ones(1)).item() == 2  # no function mode left active
    assert torch._C._len_torch_function_stack() == 0


# -- files and figure --------------------------------------------------------------------------------
def test_npz_round_trip_tensorboard_and_figure(tmp_path):
    x = torch.randn(8, 3, 8, 8)
    a = signal_propagation(ResNet(bn=True), x, label="BN")
    b = signal_propagation(ResNet(bn=False), x, label="no BN")
    a.save_npz(tmp_path / "bn.npz")
    back = SignalPropagation.load_npz(tmp_path / "bn.npz")
    assert back.blocks == a.blocks and back.shapes == a.shapes and back.label == "BN"
    for s in ("channel_var", "residual", "numerical_rank"):
        assert np.array_equal(getattr(back, s), getattr(a, s)), s

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    a.write_tensorboard(tmp_path / "tb")
    ev = EventAccumulator(str(tmp_path / "tb"))
    ev.Reload()
    pts = ev.Scalars("signal_propagation/channel_var")
    assert [p.step for p in pts] == [1, 2, 3, 4]
    assert np.allclose([p.value for p in pts], a.channel_var, rtol=1e-6)

    fig = plot_signal_propagation([a, b], stats=("channel_sq_mean", "channel_var", "residual_var", "stable_rank"))
    assert len(fig.axes) == 4
    assert [line.get_label() for line in fig.axes[1].get_lines()] == ["BN", "no BN"]
    assert np.allclose(fig.axes[1].get_lines()[1].get_ydata(), b.channel_var)
    with pytest.raises(ValueError, match="stats"):
        plot_signal_propagation(a, stats=("nope",))
