"""Landscape measures against a quadratic with known constants, a brute force on a real network, and
the promise to leave training untouched."""

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from covshift.experiments.papers.landscape import landscape_point
from covshift.nn import BatchNorm1d

ETAS = (0.05, 0.1, 0.2, 0.4)


class Quadratic(nn.Module):
    """L(theta) = 0.5 theta^T A theta: gradient A theta, smoothness beta = lambda_max(A)."""

    def __init__(self, A: torch.Tensor, theta: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("A", A)
        self.theta = nn.Parameter(theta.clone())

    def forward(self, x):  # the input is ignored: the loss is a function of theta alone
        return 0.5 * self.theta @ self.A @ self.theta


def _loss(out, target):
    return out


def _spd(seed=0, n=5):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    lam = torch.tensor([3.0, 1.5, 1.0, 0.5, 0.2], dtype=torch.float64)[:n]
    return q @ torch.diag(lam) @ q.T, q, lam


def test_quadratic_along_the_top_eigenvector_gives_the_closed_forms():
    A, q, lam = _spd()
    s = 2.0
    point = landscape_point(Quadratic(A, s * q[:, 0]), _loss, torch.zeros(1), None, ETAS)
    L = float(lam[0])
    # theta - eta g = s (1 - eta L) v: loss 0.5 L s^2 (1 - eta L)^2, gradient change eta L^2 s
    expected_losses = [0.5 * L * s**2 * (1 - e * L) ** 2 for e in ETAS]
    np.testing.assert_allclose(point.losses, expected_losses, rtol=1e-12)
    np.testing.assert_allclose(point.grad_diffs, [e * L**2 * s for e in ETAS], rtol=1e-12)
    assert point.grad_norm == pytest.approx(L * s, rel=1e-12)
    assert point.beta_smoothness == pytest.approx(L, rel=1e-12)  # beta = lambda_max exactly
    all_losses = [0.5 * L * s**2, *expected_losses]
    assert point.loss_range == pytest.approx(max(all_losses) - min(all_losses), rel=1e-12)


def test_quadratic_general_point_is_bounded_by_beta_and_matches_the_formula():
    A, _, lam = _spd(seed=1)
    theta = torch.tensor([1.0, -2.0, 0.5, 3.0, -1.0], dtype=torch.float64)
    point = landscape_point(Quadratic(A, theta), _loss, torch.zeros(1), None, ETAS)
    g = A @ theta
    ratio = float(torch.linalg.vector_norm(A @ g) / torch.linalg.vector_norm(g))  # ||A^2 theta|| / ||A theta||
    assert point.beta_smoothness == pytest.approx(ratio, rel=1e-12)
    assert point.beta_smoothness <= float(lam.max()) + 1e-12
    for e, loss in zip(ETAS, point.losses):
        t = theta - e * g
        assert loss == pytest.approx(float(0.5 * t @ A @ t), rel=1e-12)


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8, bias=False), BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.3), nn.Linear(8, 3))


def test_network_matches_a_brute_force_on_copies():
    model = _net().double().train()
    x, y = torch.randn(16, 6, dtype=torch.float64), torch.randint(0, 3, (16,))
    loss_fn = nn.functional.cross_entropy
    torch.manual_seed(123)
    point = landscape_point(model, loss_fn, x, y, ETAS)

    def brute(m):  # the same forward on a deep copy, with the RNG state the measurement started from
        torch.manual_seed(123)
        loss = loss_fn(m(x), y)
        grads = torch.autograd.grad(loss, list(m.parameters()))
        return float(loss.detach()), torch.cat([g.reshape(-1) for g in grads])

    loss0, g = brute(copy.deepcopy(model))
    assert point.loss == pytest.approx(loss0, rel=1e-12)
    for eta, loss_eta, diff in zip(ETAS, point.losses, point.grad_diffs):
        m = copy.deepcopy(model)
        with torch.no_grad():
            offset = 0
            for p in m.parameters():
                p -= eta * g[offset : offset + p.numel()].view_as(p)
                offset += p.numel()
        l_eta, g_eta = brute(m)
        assert loss_eta == pytest.approx(l_eta, rel=1e-10)
        assert diff == pytest.approx(float(torch.linalg.vector_norm(g_eta - g)), rel=1e-8)


def test_training_state_and_rng_are_left_untouched():
    model = _net().train()
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    before = copy.deepcopy(model.state_dict())
    opt_before = copy.deepcopy(opt.state_dict())
    rng = torch.get_rng_state()
    a = landscape_point(model, nn.functional.cross_entropy, x, y, ETAS)
    b = landscape_point(model, nn.functional.cross_entropy, x, y, ETAS)
    assert a == b  # the same dropout masks every time
    assert torch.equal(torch.get_rng_state(), rng)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in model.parameters())
    assert str(opt.state_dict()) == str(opt_before)
    assert model.training


@pytest.mark.parametrize("etas", [(), (0.1, -0.1), (0.1, math.nan)])
def test_bad_step_sizes_are_value_errors(etas):
    with pytest.raises(ValueError, match="step_sizes"):
        landscape_point(_net(), nn.functional.cross_entropy, torch.randn(4, 6), torch.zeros(4, dtype=torch.long), etas)
