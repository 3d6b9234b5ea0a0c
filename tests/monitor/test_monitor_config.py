"""MonitorConfig validation and layer selection."""

import pytest
import torch
from torch import nn

import covshift.nn
from covshift.monitor import ActivationMonitor, MonitorConfig, select_modules
from covshift.monitor.selection import glob_match


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(every=0), "every: expected an int >= 1"),
        (dict(every=True), "every: expected an int"),
        (dict(every=2.5), "every: expected an int"),
        (dict(percentiles=(15, 150)), "percentiles"),
        (dict(percentiles=(15, 15)), "percentiles"),
        (dict(percentiles=()), "percentiles"),
        (dict(percentiles="abc"), "percentiles"),
        (dict(hist_bins=0), "hist_bins"),
        (dict(hist_range=(1.0, 1.0)), "hist_range"),
        (dict(hist_range={"a": (0, float("inf"))}), "hist_range"),
        (dict(saturation_threshold=0), "saturation_threshold"),
        (dict(saturation_threshold=-1.0), "saturation_threshold"),
        (dict(hist_pad=float("nan")), "hist_pad"),
        (dict(sample_size=1), "sample_size"),
        (dict(sample_size=2**25), "sample_size"),
        (dict(point="middle"), "point"),
        (dict(probe_mode="test"), "probe_mode"),
        (dict(channels={"a": []}), "channels"),
        (dict(channels={"a": [-1]}), "channels"),
        (dict(channels=[1, 2]), "channels"),
        (dict(layers=[3]), "layers"),
        (dict(layers=3), "layers"),
    ],
)
def test_invalid_options_raise_value_error_naming_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match) as info:
        MonitorConfig(**kwargs)
    assert "expected" in str(info.value) and "got" in str(info.value)


def test_defaults_and_normalization():
    c = MonitorConfig(percentiles=[50, 15], layers=["a", nn.ReLU], channels={"x": [3, 1, 3]})
    assert MonitorConfig().every == 10 and MonitorConfig().percentiles == (1, 15, 50, 85, 99)
    assert c.percentiles == (50.0, 15.0) and c.layers == ("a", nn.ReLU) and c.channels == {"x": (3, 1)}
    d = c.to_dict()
    assert d["layers"] == ["a", "torch.nn.modules.activation.ReLU"] and d["channels"] == {"x": [3, 1]}


def test_monitor_keyword_overrides_and_unknown_keyword():
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    assert ActivationMonitor(model, MonitorConfig(every=3), per_channel=True).config.every == 3
    assert ActivationMonitor(model, every=5).config.every == 5
    with pytest.raises(ValueError, match="evry"):
        ActivationMonitor(model, evry=5)
    with pytest.raises(ValueError, match="every"):
        ActivationMonitor(model, every=0)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 2, 3)
        self.bn = covshift.nn.BatchNorm2d(2)
        self.layers = nn.ModuleList(
            nn.ModuleDict({"fc": nn.Linear(2, 2), "act": nn.Sigmoid(), "sub": nn.Sequential(nn.Tanh())})
            for _ in range(2)
        )
        self.ln = nn.LayerNorm(2)
        self.soft = nn.Softmax(dim=1)


def test_default_selection_is_activations_and_norms_in_module_order():
    names = select_modules(Net(), None)
    assert names == [
        "bn", "layers.0.act", "layers.0.sub.0", "layers.1.act", "layers.1.sub.0", "ln",
    ]  # covshift's BatchNorm included, Softmax excluded


@pytest.mark.parametrize(
    "spec, want",
    [
        ("layers.*.act", ["layers.0.act", "layers.1.act"]),
        ("layers.**.0", ["layers.0", "layers.0.sub.0", "layers.1.sub.0"]),  # ** may match nothing
        ("**.fc", ["layers.0.fc", "layers.1.fc"]),
        ("layers.[1].*", ["layers.1.fc", "layers.1.act", "layers.1.sub"]),
        (nn.Tanh, ["layers.0.sub.0", "layers.1.sub.0"]),
        (["stem", nn.LayerNorm, "layers.1.act"], ["stem", "layers.1.act", "ln"]),
        (lambda name, m: name.endswith("fc"), ["layers.0.fc", "layers.1.fc"]),
    ],
)
def test_selection_by_glob_type_name_predicate(spec, want):
    assert select_modules(Net(), spec) == want


def test_glob_segments():
    assert glob_match("layers.*.act", "layers.3.act")
    assert not glob_match("layers.*.act", "layers.3.sub.act")
    assert glob_match("layers.**.act", "layers.act") and glob_match("layers.**.act", "layers.1.2.act")
    assert glob_match("fc?", "fc1") and not glob_match("fc?", "fc12")


def test_unknown_name_suggests_close_matches():
    with pytest.raises(ValueError, match="Did you mean 'layers.0.act'"):
        select_modules(Net(), "layers.0.actt")
    with pytest.raises(ValueError, match="glob"):
        select_modules(Net(), "nothing.*")
    with pytest.raises(ValueError, match="at least one module"):
        select_modules(nn.Linear(2, 2), None)


def test_channels_and_hist_range_must_name_watched_layers():
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    with pytest.raises(ValueError, match="channels: expected names of watched layers"):
        ActivationMonitor(model, channels={"0": [1]})
    with pytest.raises(ValueError, match="hist_range"):
        ActivationMonitor(model, hist_range={"0": (0.0, 1.0)})
    with pytest.raises(ValueError, match="tensorboard"):
        ActivationMonitor(model, tensorboard=True)
    torch.manual_seed(0)  # nothing above consumed randomness or registered hooks
    assert not model[1]._forward_pre_hooks


def test_reduce_is_per_rank_by_default_and_global_needs_a_process_group():
    assert MonitorConfig().reduce == "rank"
    with pytest.raises(ValueError, match="reduce"):
        MonitorConfig(reduce="all")
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        pytest.skip("a process group is initialized in this process")
    with pytest.raises(ValueError, match="init_process_group"):
        ActivationMonitor(nn.Sequential(nn.Linear(2, 2), nn.ReLU()), reduce="global")
