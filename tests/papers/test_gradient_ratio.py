"""The log gradient-norm ratio against gradients derived by hand, and the model left untouched."""

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from covshift.experiments.papers.gradient_ratio import gradient_norms, log_gradient_ratio
from covshift.nn import BatchNorm1d


def test_two_layer_linear_network_by_hand():
    # f(x) = W2 W1 x, L = 0.5 * sum_n ||f(x_n) - y_n||^2:
    #   dL/dW2 = sum_n e_n (W1 x_n)^T,  dL/dW1 = sum_n W2^T e_n x_n^T,  e_n = f(x_n) - y_n
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3, bias=False), nn.Linear(3, 2, bias=False)).double()
    x, y = torch.randn(7, 4, dtype=torch.float64), torch.randn(7, 2, dtype=torch.float64)
    W1, W2 = model[0].weight.detach().numpy(), model[1].weight.detach().numpy()
    X, Y = x.numpy(), y.numpy()
    H = X @ W1.T  # (n, 3)
    E = H @ W2.T - Y  # (n, 2)
    dW2 = E.T @ H
    dW1 = (E @ W2).T @ X
    loss_fn = lambda out, t: 0.5 * ((out - t) ** 2).sum()  # noqa: E731
    r = log_gradient_ratio(model, loss_fn, x, y, "0.weight", "1.weight")
    assert r == pytest.approx(math.log(np.linalg.norm(dW1) / np.linalg.norm(dW2)), rel=1e-12)
    norms = gradient_norms(model, loss_fn, x, y, ["0.weight", "1.weight"])
    assert norms["0.weight"] == pytest.approx(np.linalg.norm(dW1), rel=1e-12)


def test_leaves_buffers_grads_and_rng_alone():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 6, bias=False), BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3)).train()
    x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
    before = copy.deepcopy(model.state_dict())
    rng = torch.get_rng_state()
    log_gradient_ratio(model, nn.functional.cross_entropy, x, y, "0.weight", "3.weight")
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_unknown_name_and_zero_gradient_are_errors():
    model = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 2))
    x, y = torch.randn(4, 3), torch.randint(0, 2, (4,))
    with pytest.raises(ValueError, match="unknown"):
        log_gradient_ratio(model, nn.functional.cross_entropy, x, y, "0.weight", "9.weight")
    nn.init.zeros_(model[1].weight)  # no gradient reaches layer 0
    with pytest.raises(ValueError, match="zero"):
        log_gradient_ratio(model, nn.functional.cross_entropy, x, y, "0.weight", "1.weight")
