"""ActivationMonitor on real models: recorded statistics equal values computed from the tensors."""

import gc
import warnings
import weakref
from collections import defaultdict

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from covshift.monitor import ActivationMonitor, MonitorConfig, stats, suspend_monitors

PCT = (1.0, 15.0, 50.0, 85.0, 99.0)


# -- models --------------------------------------------------------------------------------
def mlp():
    return nn.Sequential(nn.Linear(20, 16), nn.Sigmoid(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))


def cnn():
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(inplace=True),
        nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(inplace=True),
        nn.Flatten(), nn.Linear(4 * 6 * 6, 3),
    )


class Shared(nn.Module):
    """One Linear and one activation module used twice per forward."""

    def __init__(self):
        super().__init__()
        self.inp, self.fc, self.act, self.out = nn.Linear(20, 8), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3)

    def forward(self, x):
        h = self.act(self.fc(self.inp(x)))
        return self.out(self.act(self.fc(h)))


class Split(nn.Module):
    def forward(self, x):
        return x[:, :8] * 2.0, x[:, 8:]


class TupleNet(nn.Module):
    """A module returning a tuple; the sigmoid sees its first element."""

    def __init__(self):
        super().__init__()
        self.fc, self.split, self.act, self.out = nn.Linear(20, 16), Split(), nn.Sigmoid(), nn.Linear(16, 3)

    def forward(self, x):
        a, b = self.split(self.fc(x))
        return self.out(torch.cat([self.act(a), b], dim=1))


def batch(model, t, n=6):
    g = torch.Generator().manual_seed(100 + t)
    shape = (n, 1, 6, 6) if any(isinstance(m, nn.Conv2d) for m in model.modules()) else (n, 20)
    return torch.randn(*shape, generator=g) * 2, torch.randint(0, 3, (n,), generator=g)


def _first(obj):
    return obj if isinstance(obj, torch.Tensor) else _first(obj[0])


def capture(model, names, point="input"):
    """Reference: a clone of what each module sees, per call, taken by hooks registered first."""
    seen = defaultdict(list)
    mods = dict(model.named_modules())
    for n in names:
        if point == "input":
            mods[n].register_forward_pre_hook(lambda m, a, n=n: seen[n].append(a[0].detach().clone()))
        else:
            mods[n].register_forward_hook(lambda m, a, o, n=n: seen[n].append(_first(o).detach().clone()))
    return seen


def train(model, mon, steps, forwards_per_step=1):
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for t in range(steps):
        opt.zero_grad()
        for _ in range(forwards_per_step):
            x, y = batch(model, t)
            F.cross_entropy(model(x), y).backward()
        opt.step()
        mon.step()


def assert_matches(mon, layer, step, x, threshold=3.0):
    v32 = x.detach().reshape(-1).float().numpy()
    v = v32.astype(np.float64)
    got = {r["stat"]: r["value"] for r in mon.table(layers=[layer]) if r["step"] == step}
    assert got, f"nothing recorded for {layer} at step {step}"
    np.testing.assert_allclose(got["mean"], v.mean(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["std"], v.std(), rtol=1e-5, atol=1e-6)
    assert got["min"] == v.min() and got["max"] == v.max() and got["numel"] == v.size
    want_p = np.percentile(v32, PCT)
    np.testing.assert_allclose([got[f"p{q:g}"] for q in PCT], want_p, rtol=1e-5, atol=1e-6)
    assert got["frac_saturated"] == np.mean(np.abs(v) > threshold)
    assert got["frac_zero"] == np.mean(v <= 0)
    h = mon.histograms(layer)
    row = h.counts[list(h.steps).index(step)]
    e = h.edges
    want = np.concatenate([[(v32 < e[0]).sum()], np.histogram(v32, e)[0], [(v32 > e[-1]).sum()]])
    np.testing.assert_array_equal(row, want)


# -- statistics equal the tensors ------------------------------------------------------------
@pytest.mark.parametrize(
    "make, watched",
    [
        (mlp, {"1": "1", "3": "3"}),
        (cnn, {"1": "1", "2": "2", "4": "4", "5": "5"}),
        (Shared, {"act": "act", "act#1": "act"}),
        (TupleNet, {"act": "act"}),
    ],
    ids=["mlp", "cnn-inplace-relu", "shared-layer", "tuple-module"],
)
@pytest.mark.parametrize("fused", [True, False], ids=["cpp", "torch"])
def test_recorded_statistics_equal_direct_values(make, watched, fused):
    # Steps 0 and 2 take the sample path (no edges yet); after the flush at step 3, step 4 takes
    # the fast path (stats.record in the hook) when the C++ kernels are used.
    if fused and not stats.extension().loaded:
        pytest.skip(f"C++ monitor kernels unavailable: {stats.extension().error}")
    torch.manual_seed(0)
    model = make()
    ref = capture(model, sorted(set(watched.values())))
    mon = ActivationMonitor(model, every=2, flush_every=2)
    assert set(watched) - {n for n in watched if "#" in n} <= set(mon.modules)
    with mon, stats.use_extension(fused):
        train(model, mon, 4)
        x, _ = batch(model, 4)
        model(x)  # step 4
        assert mon._pending and all((p.row is not None) == fused for p in mon._pending)
        mon.step()
    for layer, module in watched.items():
        k = int(layer.split("#")[1]) if "#" in layer else 0  # k-th call in one forward
        per_call = len(ref[module]) // 5
        assert list(mon.steps(layer)) == [0, 2, 4]
        for step in (0, 2, 4):
            assert_matches(mon, layer, step, ref[module][step * per_call + k])
    assert mon.layers == list(watched)


def test_tuple_output_is_measured_on_its_first_tensor():
    torch.manual_seed(0)
    model = TupleNet()
    ref = capture(model, ["split"], point="output")
    with ActivationMonitor(model, layers="split", point="output", every=1) as mon:
        model(torch.randn(5, 20))
        mon.step()
    assert_matches(mon, "split", 0, ref["split"][0])


def test_inplace_relu_after_the_watched_output_does_not_change_the_record():
    torch.manual_seed(0)
    model = cnn()
    ref = capture(model, ["1", "4"], point="output")  # BN outputs, then clamped in place by ReLU
    with ActivationMonitor(model, layers=nn.BatchNorm2d, point="output", every=1) as mon:
        train(model, mon, 2)
    for step in (0, 1):
        assert_matches(mon, "1", step, ref["1"][step])
        assert mon.series("1", "min")[1][step] < 0  # a view would have seen the ReLU's zeros


def test_only_the_first_forward_of_a_checkpoint_step_is_recorded():
    torch.manual_seed(0)
    model = mlp()
    ref = capture(model, ["1"])
    with ActivationMonitor(model, layers="1", every=3) as mon:
        train(model, mon, 7, forwards_per_step=2)  # gradient accumulation: 2 forwards per step
    assert list(mon.steps("1")) == [0, 3, 6]
    for step in (0, 3, 6):
        assert_matches(mon, "1", step, ref["1"][2 * step])


def test_no_grad_forwards_are_recorded():
    torch.manual_seed(0)
    model = mlp()
    ref = capture(model, ["1"])
    with ActivationMonitor(model, every=1) as mon, torch.no_grad():
        model(torch.randn(4, 20))
        mon.step()
    assert_matches(mon, "1", 0, ref["1"][0])


def test_inference_mode_forwards_are_recorded_and_flush_restores_threads():
    torch.manual_seed(0)
    model = mlp()
    ref = capture(model, ["1"])
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with ActivationMonitor(model, every=1) as mon, torch.inference_mode():
            model(torch.randn(4, 20))
            mon.step()
        assert torch.get_num_threads() == 2  # the flush runs on one thread, then restores
    finally:
        torch.set_num_threads(threads)
    assert_matches(mon, "1", 0, ref["1"][0])


def test_eval_forwards_are_not_recorded_unless_asked():
    torch.manual_seed(0)
    model = mlp().eval()
    with ActivationMonitor(model, every=1) as mon:
        with pytest.warns(UserWarning, match="record_eval=True"):
            model(torch.randn(4, 20))
            mon.step()
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # warned once only
            model(torch.randn(4, 20))
            mon.step()
    assert len(mon.table()) == 0
    with ActivationMonitor(model, every=1, record_eval=True) as mon:
        model(torch.randn(4, 20))
        mon.step()
    assert list(mon.steps("1")) == [0]


def _hook_dicts(module):
    return [
        getattr(module, a)
        for a in dir(module)
        if a.startswith(("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"))
        and isinstance(getattr(module, a), dict)
    ]


@pytest.mark.parametrize("point", ["input", "output"])
def test_no_hooks_remain_after_detach(point):
    model = cnn()
    mon = ActivationMonitor(model, point=point, per_channel=True, channels={"1": [0]}, probe=torch.randn(2, 1, 6, 6))
    with mon:
        assert any(d for m in model.modules() for d in _hook_dicts(m))
        train(model, mon, 1)
    assert all(not d for m in model.modules() for d in _hook_dicts(m))
    mon.attach()
    mon.attach()  # idempotent
    mon.detach()
    assert all(not d for m in model.modules() for d in _hook_dicts(m))
    assert not mon.attached


class _OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("fused", [True, False], ids=["cpp", "torch"])
def test_hooks_never_sync_and_keep_no_reference_to_the_activation(fused):
    if fused and not stats.extension().loaded:
        pytest.skip(f"C++ monitor kernels unavailable: {stats.extension().error}")
    torch.manual_seed(0)
    model = cnn()
    mon = ActivationMonitor(model, every=1, per_channel=True, sample_size=50)
    refs = []
    model[2].register_forward_pre_hook(lambda m, a: refs.append(weakref.ref(a[0])))
    with mon, stats.use_extension(fused):
        train(model, mon, 1)  # the first forward also draws the (cached) sample positions
        x, y = batch(model, 1)
        with _OpLog() as log:
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        del loss
        gc.collect()
        assert refs[-1]() is None  # the monitor keeps reductions and a sampled copy only
        assert mon._pending, "measurements wait on the device until the flush"
        mon.step()
    measured = ["covshift_monitor.moments.default"] if fused else ["aten.take.default", "aten.amin.default"]
    assert all(op in log.ops for op in measured)  # it did measure, with the kernels asked for
    assert not any("_local_scalar_dense" in op or "sort" in op for op in log.ops)  # no .item(), no sort


def test_per_channel_statistics_and_channel_extras():
    torch.manual_seed(0)
    model = cnn()
    ref = capture(model, ["2", "1"])
    with ActivationMonitor(model, every=1, per_channel=True, channels={"2": [0, 3]}) as mon:
        train(model, mon, 2)
    assert mon.layers[:6] == ["1", "2", "2[0]", "2[3]", "4", "5"]
    for step in (0, 1):
        x = ref["2"][step]
        assert_matches(mon, "2[3]", step, x[:, 3])
        assert_matches(mon, "2[0]", step, x[:, 0])
        v = x.double().numpy()
        cs = mon.channel_stats("2")
        np.testing.assert_allclose(cs.mean[step], v.mean((0, 2, 3)), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(cs.std[step], v.std((0, 2, 3)), rtol=1e-5, atol=1e-6)
        dead = np.mean(v.max((0, 2, 3)) <= 0)
        assert mon.series("2", "frac_dead")[1][step] == dead
        np.testing.assert_allclose(mon.series("2", "channel_std[3]")[1][step], v[:, 3].std(), rtol=1e-5)
    with ActivationMonitor(model, every=1, channels={"2": [9]}) as mon:
        with pytest.raises(ValueError, match="channels"):
            train(model, mon, 1)


def test_one_unit_of_an_mlp_layer():
    # Figure 1 of Ioffe & Szegedy: percentiles of the input of one sigmoid unit over the batch.
    torch.manual_seed(0)
    model = mlp()
    ref = capture(model, ["1"])
    with ActivationMonitor(model, layers=nn.Sigmoid, every=1, channels={"1": [7]}) as mon:
        train(model, mon, 3)
    steps, p15 = mon.series("1[7]", "p15")
    assert list(steps) == [0, 1, 2]
    for step in steps:
        assert_matches(mon, "1[7]", step, ref["1"][step][:, 7])


def test_large_activations_are_subsampled_but_moments_are_exact():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 500), nn.ReLU())
    ref = capture(model, ["1"])
    with ActivationMonitor(model, every=1, sample_size=256, hist_range=(-2.0, 2.0), hist_bins=8) as mon:
        model(torch.randn(40, 20))
        mon.step()
        model(torch.randn(40, 20))
        mon.step()
    x = ref["1"][0].double().numpy().ravel()
    got = {r["stat"]: r["value"] for r in mon.table() if r["step"] == 0}
    np.testing.assert_allclose([got["mean"], got["std"]], [x.mean(), x.std()], rtol=1e-5)
    assert got["min"] == x.min() and got["max"] == x.max() and got["numel"] == x.size
    h = mon.histograms("1")
    assert h.counts.shape == (2, 10) and (h.counts.sum(1) == 256).all()
    np.testing.assert_allclose(h.edges, np.linspace(-2, 2, 9))
    assert abs(got["p50"] - np.median(x)) < 0.15 and abs(got["frac_zero"] - np.mean(x <= 0)) < 0.1


def test_probe_batch_is_recorded_and_leaves_training_unchanged():
    def run(probe, mode, steps=5):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(20, 16), nn.BatchNorm1d(16), nn.Dropout(0.3), nn.Sigmoid(), nn.Linear(16, 3))
        mon = ActivationMonitor(model, every=2, probe=probe, probe_mode=mode, layers=nn.Sigmoid)
        with mon:
            train(model, mon, steps)
        return model, mon

    probe = torch.randn(8, 20, generator=torch.Generator().manual_seed(7))
    base, _ = run(None, "eval")
    for mode in ("eval", "train"):
        model, mon = run(probe, mode)
        for a, b in zip(base.state_dict().values(), model.state_dict().values()):
            assert torch.equal(a, b)  # weights and BN buffers bit-identical
        assert model.training and all(m.training for m in model.modules())
        assert list(mon.steps("3@probe")) == [0, 2, 4] and list(mon.steps("3")) == [0, 2, 4]
    # After 4 steps the probe of step 4 ran on the final weights: compare with a direct forward.
    model, mon = run(probe, "eval", steps=4)
    assert mon.global_step == 4 and list(mon.steps("3@probe")) == [0, 2, 4]
    with mon:  # re-attaching at the same checkpoint does not measure the probe twice
        pass
    assert list(mon.steps("3@probe")) == [0, 2, 4]
    ref = capture(model.eval(), ["3"])
    with torch.no_grad():
        model(probe)
    assert_matches(mon, "3@probe", 4, ref["3"][0])


def test_suspend_monitors_skips_forwards():
    torch.manual_seed(0)
    model = mlp()
    with ActivationMonitor(model, every=1) as mon:
        with suspend_monitors():
            model(torch.randn(4, 20))
        model(torch.randn(4, 20))
        mon.step()
    assert list(mon.steps("1")) == [0] and len(mon.table(stats=["numel"])) == 2


def test_views_flush_pending_results_and_config_object():
    torch.manual_seed(0)
    model = mlp()
    mon = ActivationMonitor(model, MonitorConfig(every=1, flush_every=100, percentiles=(50,)))
    with mon:
        train(model, mon, 3)
        assert mon._pending  # still on the device
        assert len(mon.series("1", "p50")[0]) == 3  # reading a view moves them first
        assert not mon._pending
    assert "p15" not in mon.records.stats("1")
    with pytest.raises(ValueError, match="stat"):
        mon.series("1", "p15")
    with pytest.raises(ValueError, match="layer"):
        mon.series("nope", "mean")


def test_hooks_exist_only_on_checkpoint_steps():
    torch.manual_seed(0)
    model = mlp()
    with ActivationMonitor(model, every=3) as mon:
        seen = []
        for t in range(7):
            seen.append(bool(model[1]._forward_pre_hooks))
            model(torch.randn(4, 20))
            mon.step()
    assert seen == [True, False, False, True, False, False, True]
    assert list(mon.steps("1")) == [0, 3, 6]


def test_changing_batch_size_keeps_records_in_step_order():
    torch.manual_seed(0)
    model = mlp()
    ref = capture(model, ["1"])
    sizes = [6, 4, 6, 4, 5]
    with ActivationMonitor(model, every=1, flush_every=10) as mon:
        for n in sizes:  # records of different sizes are reduced in separate groups
            model(torch.randn(n, 20))
            mon.step()
    assert list(mon.steps("1")) == [0, 1, 2, 3, 4]
    assert list(mon.histograms("1").numel) == [n * 16 for n in sizes]
    for step in range(5):
        assert_matches(mon, "1", step, ref["1"][step])
