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


O = torch.optim
OPTIMIZERS = {
    "sgd": lambda p: O.SGD(p, lr=0.05),
    "sgd_momentum_wd": lambda p: O.SGD(p, lr=0.05, momentum=0.9, weight_decay=1e-3),
    "sgd_nesterov": lambda p: O.SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
    "adam": lambda p: O.Adam(p, lr=1e-2),
    "adamw": lambda p: O.AdamW(p, lr=1e-2, weight_decay=0.1),
    "adamw_amsgrad": lambda p: O.AdamW(p, lr=1e-2, weight_decay=0.1, amsgrad=True),
    "radam": lambda p: O.RAdam(p, lr=1e-2),
    "radam_decoupled_wd": lambda p: O.RAdam(p, lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True),
    "nadam": lambda p: O.NAdam(p, lr=1e-2, weight_decay=1e-2),
    "adagrad": lambda p: O.Adagrad(p, lr=0.05, lr_decay=1e-2, initial_accumulator_value=0.1),
    "adadelta": lambda p: O.Adadelta(p, lr=1.0, weight_decay=1e-3),
    "adamax": lambda p: O.Adamax(p, lr=1e-2),
    "rmsprop": lambda p: O.RMSprop(p, lr=1e-3, momentum=0.9, centered=True),
    "asgd": lambda p: O.ASGD(p, lr=1e-2, t0=2),
    "rprop": lambda p: O.Rprop(p, lr=1e-2),
}


def _make_opt(kind, params):
    return OPTIMIZERS[kind](params)


def _brute_force(model, opt, x, y, order):
    """Deep copies of model and optimizer together, a real backward and step, and a real backward per
    layer on another deep copy whose earlier layers hold the stepped weights."""
    rng = torch.get_rng_state()
    m1, o1 = copy.deepcopy((model, opt))  # one memo: the copied optimizer steps the copied model
    stepped = [p for g in o1.param_groups for p in g["params"]]
    assert len(stepped) == len(list(m1.parameters())) and all(p is q for p, q in zip(stepped, m1.parameters()))
    torch.set_rng_state(rng)
    m1.zero_grad(set_to_none=True)
    F.cross_entropy(m1(x), y).backward()
    G = {n: p.grad.clone() for n, p in m1.named_parameters()}
    o1.step()
    after = dict(m1.named_parameters())
    out = {}
    for i, layer in enumerate(order):
        m2 = copy.deepcopy(model)
        m2.zero_grad(set_to_none=True)
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
    return out


def _warm_up(model, opt, steps=3):
    for t in range(steps):  # build up momentum / moments / step counts first
        x, y = _batch(t)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


@pytest.mark.parametrize("kind", list(OPTIMIZERS))
def test_matches_brute_force_with_every_optimizer_state_bn_and_dropout(kind):
    model = _net()
    opt = _make_opt(kind, model.parameters())
    _warm_up(model, opt)
    x, y = _batch(3)
    order = forward_order(model, x)
    assert order == ["0", "1", "4", "6"]
    want = _brute_force(model, opt, x, y, order)
    got = gradient_ics(model, F.cross_entropy, x, y, opt)
    assert list(got) == order
    for layer in order:
        assert got[layer].l2_diff == pytest.approx(want[layer][0], rel=1e-4, abs=1e-7), layer
        assert got[layer].cosine == pytest.approx(want[layer][1], rel=1e-5), layer
    assert got["6"].l2_diff > 1e-6 and got["6"].cosine < 1


def test_param_groups_and_a_scheduled_learning_rate_are_used():
    model = _net()
    opt = O.SGD([{"params": model[0].parameters(), "lr": 0.5}, {"params": list(model.parameters())[2:]}], lr=0.01, momentum=0.5)
    sched = O.lr_scheduler.StepLR(opt, step_size=1, gamma=0.3)
    _warm_up(model, opt, steps=2)
    sched.step()
    sched.step()  # the groups' lr now differ from the constructor's
    x, y = _batch(5)
    order = forward_order(model, x)
    want = _brute_force(model, opt, x, y, order)
    got = gradient_ics(model, F.cross_entropy, x, y, opt)
    for layer in order:
        assert got[layer].l2_diff == pytest.approx(want[layer][0], rel=1e-4, abs=1e-7), layer
    # with the constructor's lr instead of the scheduled one the answer would differ
    stale = O.SGD([{"params": model[0].parameters(), "lr": 0.5}, {"params": list(model.parameters())[2:]}], lr=0.01, momentum=0.5)
    stale.load_state_dict({**opt.state_dict(), "param_groups": [dict(g, lr=l) for g, l in zip(opt.state_dict()["param_groups"], (0.5, 0.01))]})
    assert gradient_ics(model, F.cross_entropy, x, y, stale)["1"].l2_diff != pytest.approx(got["1"].l2_diff, rel=1e-3)


def _snapshot(model, opt):
    return (
        copy.deepcopy(model.state_dict()),
        {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()},
        copy.deepcopy(opt.state_dict()),
        torch.get_rng_state(),
    )


def _assert_same(a, b):
    (sa, ga, oa, ra), (sb, gb, ob, rb) = a, b
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k  # parameters and buffers (BN running statistics)
    for k in ga:
        assert (ga[k] is None and gb[k] is None) or torch.equal(ga[k], gb[k]), k
    assert oa["param_groups"] == ob["param_groups"]
    assert oa["state"].keys() == ob["state"].keys()
    for i in oa["state"]:
        for name, v in oa["state"][i].items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(ob["state"][i][name])), (i, name)
    assert torch.equal(ra, rb)


@pytest.mark.parametrize("kind", list(OPTIMIZERS))
def test_parameters_buffers_grads_optimizer_state_and_rng_unchanged(kind):
    model = _net()
    opt = _make_opt(kind, model.parameters())
    _warm_up(model, opt)
    x, y = _batch(7)
    before = _snapshot(model, opt)
    gradient_ics(model, F.cross_entropy, x, y, opt)
    _assert_same(before, _snapshot(model, opt))


def test_lbfgs_and_non_optimizers_give_a_clear_error():
    model = _net()
    x, y = _batch(0)
    with pytest.raises(ValueError, match="LBFGS.*closure"):
        gradient_ics(model, F.cross_entropy, x, y, O.LBFGS(model.parameters()))
    with pytest.raises(TypeError, match="expected a torch.optim.Optimizer"):
        gradient_ics(model, F.cross_entropy, x, y, object())


class _Custom(O.SGD):
    def __init__(self, params, lr, *, tag):  # a required keyword that no group holds
        super().__init__(params, lr=lr)
        self.tag = tag


def test_an_optimizer_that_cannot_be_rebuilt_says_why():
    model = _net()
    x, y = _batch(0)
    with pytest.raises(TypeError, match="rebuilt"):
        gradient_ics(model, F.cross_entropy, x, y, _Custom(model.parameters(), lr=0.1, tag="a"))


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


@pytest.mark.parametrize("kind", ["sgd_momentum_wd", "adamw"])
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
    opt = _make_opt("adamw", model.parameters())
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


def test_a_self_stepping_monitor_does_not_see_the_copied_step():
    # ActivationMonitor(optimizer=) steps itself from the optimizer's step post-hook; the copy that
    # gradient_ics steps is another optimizer, without that hook.
    model = _net()
    opt = _make_opt("adamw", model.parameters())
    x, y = _batch(0)
    with ActivationMonitor(model, every=1, optimizer=opt) as mon:
        F.cross_entropy(model(x), y).backward()
        opt.step()
        assert mon.global_step == 1
        gradient_ics(model, F.cross_entropy, x, y, opt)
        assert mon.global_step == 1
