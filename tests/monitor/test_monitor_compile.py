"""ActivationMonitor on a model that torch.compile runs.

dynamo does not retrace when module hooks are added or removed (``skip_nnmodule_hook_guards``), and
it traces a hook's Python into the graph once, so a monitor that registers its hooks per armed step
recorded step 0 only, and silently. Given a ``torch.compile`` wrapper the monitor now runs each
checkpoint's forward eagerly; on a model compiled in place it keeps its hooks while attached and makes
them opaque to dynamo. These tests compare its records with an eager run of the same training (same
seed, same batches), check that the wrapper's other steps stay one compiled graph, and check the
warning for a compiled submodule traced before attaching.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from covshift.monitor import ActivationMonitor


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test traces afresh: dynamo's cache would reuse another test's graph (same code, same shapes)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(20, 32), torch.nn.ReLU(), torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, 2)
    )


def _train(mode, tmp_path, every=3, steps=10):
    model = _model()
    forward = {"eager": model, "torch.compile": None, "Module.compile": model}[mode]
    if mode == "torch.compile":
        forward = torch.compile(model)
    elif mode == "Module.compile":
        model.compile()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(1)
    probe = torch.randn(8, 20, generator=torch.Generator().manual_seed(3))  # measured at every checkpoint too
    mon = ActivationMonitor(forward, every=every, log_dir=tmp_path / mode, probe=probe)
    with mon:
        for _ in range(steps):
            loss = forward(torch.randn(16, 20, generator=gen)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            mon.step()
    return {layer.replace("_orig_mod.", ""): (list(mon.steps(layer)), mon.series(layer, "mean")[1], mon.series(layer, "p50")[1]) for layer in mon.layers}


@pytest.mark.parametrize("mode", ["torch.compile", "Module.compile"])
def test_a_compiled_model_is_recorded_at_every_checkpoint_as_in_eager(mode, tmp_path):
    eager = _train("eager", tmp_path)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        got = _train(mode, tmp_path)
    assert not [w for w in seen if "ActivationMonitor" in str(w.message)]  # no "checkpoint recorded nothing"
    assert set(got) == set(eager) == {"1", "3", "1@probe", "3@probe"}
    for layer, (steps, mean, p50) in eager.items():
        assert steps == [0, 3, 6, 9]
        assert got[layer][0] == steps
        torch.testing.assert_close(torch.tensor(got[layer][1]), torch.tensor(mean), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(torch.tensor(got[layer][2]), torch.tensor(p50), rtol=1e-4, atol=1e-5)


def test_a_compiled_submodule_traced_before_the_monitor_attached_warns_instead_of_recording_nothing(tmp_path):
    """The one way left to miss records: the watched layer sits in a compiled submodule whose graph was
    traced before the monitor's hooks existed. The monitor says so rather than staying silent."""
    torch.manual_seed(0)
    inner = torch.nn.Sequential(torch.nn.Linear(20, 32), torch.nn.ReLU())
    model = torch.nn.Sequential(torch.compile(inner), torch.nn.Linear(32, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):  # the submodule is traced now, without the monitor's hooks
        model(torch.randn(16, 20)).pow(2).mean().backward()
    with pytest.warns(UserWarning, match=r"compiled before the monitor was attached"):
        with ActivationMonitor(model, every=2, log_dir=tmp_path, layers=["0._orig_mod.1"]) as mon:
            for _ in range(3):
                loss = model(torch.randn(16, 20)).pow(2).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                mon.step()
    assert not len(mon.steps("0._orig_mod.1"))


def test_a_torch_compile_wrapper_runs_its_checkpoints_eagerly_and_every_other_step_compiled(tmp_path):
    """Given torch.compile(model), the monitor runs only the measured forwards eagerly
    (set_stance("force_eager") from the wrapper's own hooks): the compiled graph has no graph break,
    it was traced before the monitor came, and still every checkpoint is recorded."""
    from torch._dynamo.utils import counters

    model = _model()
    compiled = torch.compile(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    compiled(torch.randn(16, 20)).pow(2).mean().backward()  # traced before the monitor exists
    counters.clear()
    with ActivationMonitor(compiled, every=3, log_dir=tmp_path) as mon:
        for _ in range(10):
            loss = compiled(torch.randn(16, 20)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            mon.step()
    assert [list(mon.steps(layer)) for layer in mon.layers] == [[0, 3, 6, 9]] * 2
    assert not counters["graph_break"] and not counters["recompiles"]
    assert torch._dynamo.eval_frame._stance.stance == "default"  # restored after each measured forward


class _Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin, self.act = torch.nn.Linear(16, 16), torch.nn.ReLU()

    def forward(self, x):
        return x + self.act(self.lin(x))


def _resnet():
    torch.manual_seed(0)
    return torch.nn.Sequential(_Block(), _Block(), _Block(), torch.nn.Linear(16, 3))


@pytest.mark.parametrize("how", ["torch.compile", "Module.compile"])
def test_gradient_ics_and_signal_propagation_of_a_compiled_model_equal_eager(how):
    """Before: gradient_ics of a compiled model returned NaN for every layer (functional_call's
    parameters never reached the compiled graph) and signal_propagation failed inside dynamo. Their
    own forwards now run eagerly (torch.compiler.set_stance("force_eager"))."""
    from torch.nn import functional as F

    from covshift.monitor import gradient_ics, signal_propagation

    x, y = torch.randn(32, 16, generator=torch.Generator().manual_seed(2)), torch.arange(32) % 3
    ref = _resnet()
    model = _resnet()
    if how == "torch.compile":
        run = torch.compile(model)
    else:
        model.compile()
        run = model
    run(x)  # traced before the instruments run, without their hooks
    opt_ref, opt = torch.optim.SGD(ref.parameters(), lr=0.1), torch.optim.SGD(model.parameters(), lr=0.1)
    want = gradient_ics(ref, F.cross_entropy, x, y, opt_ref)
    got = {k.replace("_orig_mod.", ""): v for k, v in gradient_ics(run, F.cross_entropy, x, y, opt).items()}
    assert set(got) == set(want)
    for k, v in want.items():
        assert got[k].cosine == pytest.approx(v.cosine, abs=1e-6) and got[k].l2_diff == pytest.approx(v.l2_diff, rel=1e-5, abs=1e-8)
    sp_ref, sp = signal_propagation(ref, x), signal_propagation(run, x)
    for stat in ("channel_sq_mean", "channel_var", "residual_var"):
        torch.testing.assert_close(torch.as_tensor(sp.statistic(stat)), torch.as_tensor(sp_ref.statistic(stat)))
