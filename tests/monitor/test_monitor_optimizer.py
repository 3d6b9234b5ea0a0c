"""ActivationMonitor(optimizer=...): the optimizer's steps end the monitor's steps."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from covshift.monitor import ActivationMonitor


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 8), nn.Tanh(), nn.Linear(8, 3))


def _batches(n):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(6, 10, generator=g), torch.randint(0, 3, (6,), generator=g)) for _ in range(n)]


def someone_elses_loop(model, optimizer, batches):
    """A training loop that knows nothing about the monitor (as Lightning's or HF Trainer's)."""
    for x, y in batches:
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()


def _explicit(steps):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with ActivationMonitor(model, every=2) as mon:
        for x, y in _batches(steps):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            mon.step()
    return mon


def test_optimizer_steps_the_monitor_in_a_plain_loop():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with ActivationMonitor(model, every=2, optimizer=opt) as mon:
        for x, y in _batches(5):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    ref = _explicit(5)
    assert mon.global_step == ref.global_step == 5
    assert list(mon.steps("1")) == list(ref.steps("1")) == [0, 2, 4]
    assert mon.table() == ref.table()


def test_optimizer_steps_the_monitor_in_someone_elses_loop():
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    mon = ActivationMonitor(model, every=1, optimizer=opt).attach()
    someone_elses_loop(model, opt, _batches(3))
    assert mon.global_step == 3 and list(mon.steps("1")) == [0, 1, 2]
    mon.close()


def test_calling_step_as_well_is_an_error_with_the_fix():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with ActivationMonitor(model, every=1, optimizer=opt) as mon:
        someone_elses_loop(model, opt, _batches(1))
        with pytest.raises(RuntimeError, match=r"optimizer=.*Remove the mon\.step\(\) call"):
            mon.step()
        assert mon.global_step == 1  # the failed call counted nothing


def test_the_optimizer_hook_is_removed_on_detach():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = len(opt._optimizer_step_post_hooks)
    mon = ActivationMonitor(model, every=1, optimizer=opt)
    assert len(opt._optimizer_step_post_hooks) == before  # nothing until attach
    mon.attach()
    assert len(opt._optimizer_step_post_hooks) == before + 1
    mon.attach()  # idempotent
    assert len(opt._optimizer_step_post_hooks) == before + 1
    someone_elses_loop(model, opt, _batches(2))
    mon.close()
    assert len(opt._optimizer_step_post_hooks) == before
    someone_elses_loop(model, opt, _batches(2))
    assert mon.global_step == 2  # later steps are not counted


def test_optimizer_must_be_an_optimizer():
    with pytest.raises(ValueError, match="optimizer: expected a torch.optim.Optimizer"):
        ActivationMonitor(_model(), optimizer=lambda: None)
