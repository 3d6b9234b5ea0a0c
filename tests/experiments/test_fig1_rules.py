"""fig1's documented rules, checked on hand-made records: the typical unit of panels (b, c), identical
initial weights in both networks, and the evaluation grid."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from covshift.experiments.config import ExperimentConfig, apply_overrides
from covshift.experiments.fig1 import typical_unit
from covshift.experiments.models import MLP
from covshift.experiments.train import eval_steps


class _Monitor:
    def __init__(self, moves):
        self.moves = moves  # unit -> |p50(last) - p50(first)|

    def series(self, key, stat):
        return np.array([0, 100]), np.array([0.0, self.moves[key]])


class _Unit:
    def __init__(self, moves):
        self.seed, self.monitor = 0, _Monitor(moves)

    def monitor_key(self, module, unit=None, probe=False):
        return unit if unit in self.monitor.moves else None


def _run(moves_by_arm):
    arms = [SimpleNamespace(name=a) for a in moves_by_arm]
    units = {a: [_Unit(m)] for a, m in moves_by_arm.items()}
    return SimpleNamespace(
        layers=[SimpleNamespace(module="hidden3.act")],
        seeds=lambda: [0],
        config=SimpleNamespace(units=tuple(next(iter(moves_by_arm.values())))),
        arms=arms,
        units_of=lambda name: units[name],
    )


def test_typical_unit_is_the_median_sum_of_ranks_over_both_networks():
    # ranks without BN: u0=0 u1=1 u2=2 u3=3 u4=4; with BN: u0=4 u1=0 u2=1 u3=3 u4=2
    # sums: u0 4, u1 1, u2 3, u3 6, u4 6 -> sorted (u1 1, u2 3, u0 4, u3 6, u4 6): the median is u0
    run = _run({"no-bn": {0: 0.1, 1: 0.2, 2: 0.3, 3: 0.4, 4: 0.5}, "bn": {0: 9.0, 1: 0.01, 2: 0.02, 3: 0.5, 4: 0.3}})
    assert typical_unit(run) == 0
    # one network alone: its median mover
    assert typical_unit(_run({"no-bn": {0: 0.5, 1: 0.1, 2: 0.3}})) == 2
    # the same rule on both networks: swapping them changes nothing
    a = {0: 0.3, 1: 0.1, 2: 0.2, 3: 0.9}
    b = {0: 0.2, 1: 0.3, 2: 0.1, 3: 0.4}
    assert typical_unit(_run({"x": a, "y": b})) == typical_unit(_run({"x": b, "y": a}))


def test_both_networks_start_from_the_same_weights():
    plain = MLP(20, (8, 6), 3, "none", "sigmoid", 0.05, seed=7)
    bn = MLP(20, (8, 6), 3, "bn", "sigmoid", 0.05, seed=7)
    for name in ("hidden1.linear.weight", "hidden2.linear.weight", "out.weight"):
        torch.testing.assert_close(dict(plain.named_parameters())[name], dict(bn.named_parameters())[name], rtol=0, atol=0)
    assert bn.hidden1.linear.bias is None and torch.all(plain.hidden1.linear.bias == 0)
    other = MLP(20, (8, 6), 3, "none", "sigmoid", 0.05, seed=8)
    assert not torch.equal(other.hidden1.linear.weight, plain.hidden1.linear.weight)
    assert plain.hidden1.linear.weight.std().item() == pytest.approx(0.05, rel=0.2)


def test_evaluation_grid_is_fine_early():
    cfg = apply_overrides(ExperimentConfig(), {})
    grid = eval_steps(cfg)
    early = [s for s in grid if s <= 5000]
    assert early == list(range(0, 5001, 100))  # every 100 steps in the first 10% of 50,000
    assert [s for s in grid if s > 5000] == list(range(5500, 50001, 500)) and grid[-1] == 50000
    odd = eval_steps(apply_overrides(ExperimentConfig(), {"steps": "1234", "eval_every": "500", "eval_every_early": "50"}))
    assert odd == [0, 50, 100, 500, 1000, 1234]
