"""Gradient ICS (Santurkar et al. Definition 2.1): hand-derived answers, brute force, no side effects."""

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from covshift.monitor import ActivationMonitor, forward_order, gradient_ics


def _mse(out, y):
    return 0.5 * ((out - y) ** 2).sum(dim=1).mean()


def _linear_net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 4, bias=False), nn.Linear(4, 3, bias=False)).double()


def _data(seed=1, n=7):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g, dtype=torch.float64), torch.randn(n, 3, generator=g, dtype=torch.float64)


def _grads(W1, W2, X, Y):
    # L = 1/(2N) sum_n ||W2 W1 x_n - y_n||^2  ->  dL/dW2 = R^T H / N,  dL/dW1 = (R W2)^T X / N
    N = X.shape[0]
    H = X @ W1.T
    R = H @ W2.T - Y
    return (R @ W2).T @ X / N, R.T @ H / N


def _ics(g, gp):
    return np.linalg.norm(g - gp), float((g * gp).sum() / (np.linalg.norm(g) * np.linalg.norm(gp)))


def test_two_layer_linear_net_against_hand_derived_gradients():
    model = _linear_net()
    x, y = _data()
    lr = 0.3
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    res = gradient_ics(model, _mse, x, y, opt)

    W1, W2 = (p.detach().numpy().copy() for p in model.parameters())
    X, Y = x.numpy(), y.numpy()
    G1, G2 = _grads(W1, W2, X, Y)
    _, G2_after = _grads(W1 - lr * G1, W2, X, Y)  # layer 0 took its SGD step first
    assert list(res) == ["0", "1"]
    assert res["0"] == (0.0, 1.0)  # nothing precedes the first layer
    l2, cos = _ics(G2, G2_after)
    assert res["1"].l2_diff == pytest.approx(l2, rel=1e-9) and l2 > 1e-3
    assert res["1"].cosine == pytest.approx(cos, rel=1e-12)

    # "before" is the user's order when given: reversed, layer 1 moves first
    res = gradient_ics(model, _mse, x, y, opt, order=["1", "0"])
    G1_after, _ = _grads(W1, W2 - lr * G2, X, Y)
    assert list(res) == ["1", "0"] and res["1"] == (0.0, 1.0)
    assert res["0"].l2_diff == pytest.approx(_ics(G1, G1_after)[0], rel=1e-9)
    assert res["0"].cosine == pytest.approx(_ics(G1, G1_after)[1], rel=1e-12)


def _net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(10, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.2),
        nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3),
    )


def _batch(t):
    g = torch.Generator().manual_seed(1000 + t)
    return torch.randn(12, 10, generator=g), torch.randint(0, 3, (12,), generator=g)


def _make_opt(kind, params):
    if kind == "sgd":
        return torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=1e-3)
    return torch.optim.Adam(params, lr=1e-2)


def _brute_force(model, opt, x, y, order):
    """Deep copies of model and optimizer, a real step, and a real backward per layer."""
    rng = torch.get_rng_state()
    owners = {m: [p for p in dict(model.named_modules())[m].parameters(recurse=False)] for m in order}
    m1 = copy.deepcopy(model)
    o1 = type(opt)(m1.parameters(), **opt.defaults)
    o1.load_state_dict(copy.deepcopy(opt.state_dict()))
    torch.set_rng_state(rng)
    F.cross_entropy(m1(x), y).backward()
    G = {n: p.grad.clone() for n, p in m1.named_parameters()}
    o1.step()
    after = dict(m1.named_parameters())
    out = {}
    for i, layer in enumerate(order):
        m2 = copy.deepcopy(model)
        params = dict(m2.named_parameters())
        with torch.no_grad():
            for earlier in order[:i]:
                for n, _ in dict(m2.named_modules())[earlier].named_parameters(recurse=False):
                    params[f"{earlier}.{n}"].copy_(after[f"{earlier}.{n}"])
        torch.set_rng_state(rng)
        F.cross_entropy(m2(x), y).backward()
        names = [f"{layer}.{n}" for n, _ in dict(m2.named_modules())[layer].named_parameters(recurse=False)]
        g = torch.cat([G[n].reshape(-1) for n in names]).double()
        gp = torch.cat([params[n].grad.reshape(-1) for n in names]).double()
        out[layer] = (float((g - gp).norm()), float(g @ gp / (g.norm() * gp.norm())))
    torch.set_rng_state(rng)
    assert owners
    return out


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_matches_brute_force_with_momentum_state_bn_and_dropout(kind):
    model = _net()
    opt = _make_opt(kind, model.parameters())
    for t in range(3):  # build up momentum / Adam moments first
        x, y = _batch(t)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    x, y = _batch(3)
    order = forward_order(model, x)
    assert order == ["0", "1", "4", "6"]
    want = _brute_force(model, opt, x, y, order)
    got = gradient_ics(model, F.cross_entropy, x, y, opt)
    assert list(got) == order
    for layer in order:
        assert got[layer].l2_diff == pytest.approx(want[layer][0], rel=1e-4, abs=1e-7)
        assert got[layer].cosine == pytest.approx(want[layer][1], rel=1e-5)
    assert got["6"].l2_diff > 0 and got["6"].cosine < 1


def _train(kind, measure, steps=20):
    model = _net(seed=3)
    opt = _make_opt(kind, model.parameters())
    mon = ActivationMonitor(model, every=1)
    torch.manual_seed(123)  # dropout masks come from the global RNG
    with mon:
        for t in range(steps):
            x, y = _batch(t)
            if measure:
                gradient_ics(model, F.cross_entropy, x, y, opt, layers=["4", "6"])
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            mon.step()
    return model, opt, mon, torch.get_rng_state()


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_measuring_leaves_training_bit_identical(kind):
    base, base_opt, base_mon, base_rng = _train(kind, measure=False)
    model, opt, mon, rng = _train(kind, measure=True)
    for (n, a), b in zip(base.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), n  # weights and BN running statistics
    for sa, sb in zip(base_opt.state_dict()["state"].values(), opt.state_dict()["state"].values()):
        for k in sa:
            assert torch.equal(torch.as_tensor(sa[k]), torch.as_tensor(sb[k])), k
    assert torch.equal(base_rng, rng)  # the RNG is where training alone leaves it
    assert base_mon.table() == mon.table()  # the monitor saw none of the extra forwards


def test_grad_and_optimizer_state_untouched_and_layer_selection():
    model = _net()
    opt = _make_opt("adam", model.parameters())
    x, y = _batch(0)
    F.cross_entropy(model(x), y).backward()
    opt.step()
    marker = {n: p.grad.clone() for n, p in model.named_parameters()}
    state = copy.deepcopy(opt.state_dict())
    res = gradient_ics(model, F.cross_entropy, x, y, opt, layers=nn.Linear)
    assert list(res) == ["0", "4", "6"]
    for n, p in model.named_parameters():
        assert torch.equal(p.grad, marker[n])
    for k, v in opt.state_dict()["state"].items():
        for name in v:
            assert torch.equal(torch.as_tensor(v[name]), torch.as_tensor(state["state"][k][name]))
    with pytest.raises(ValueError, match="order"):
        gradient_ics(model, F.cross_entropy, x, y, opt, order=["0", "4"])
    with pytest.raises(ValueError, match="order"):
        gradient_ics(model, F.cross_entropy, x, y, opt, order=["0", "1", "4", "6", "2"])


class _Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Linear(6, 6, bias=False)
        self.mid = nn.Linear(6, 6)
        self.head = nn.Linear(6, 6, bias=False)
        self.head.weight = self.emb.weight  # shared: belongs to its first owner, "emb"
        self.unused = nn.Linear(2, 2)

    def forward(self, x):
        return self.head(torch.tanh(self.mid(self.emb(x))))


def test_shared_parameters_unused_layers_and_before_step():
    torch.manual_seed(0)
    model = _Tied()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(4, 6), torch.randint(0, 6, (4,))
    res = gradient_ics(model, F.cross_entropy, x, y, opt)
    assert list(res)[:2] == ["emb", "mid"] and res["emb"] == (0.0, 1.0)
    assert math.isnan(res["unused"].l2_diff)  # no gradient
    assert res["mid"].l2_diff > 0
    # before_step sees the twin's parameters with their gradients; zeroing them freezes the update
    res = gradient_ics(model, F.cross_entropy, x, y, opt, before_step=lambda ps: [p.grad.zero_() for p in ps if p.grad is not None])
    assert res["mid"] == pytest.approx((0.0, 1.0))
