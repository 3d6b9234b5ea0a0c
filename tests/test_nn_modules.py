"""covshift.nn: error messages, convert(), and the non-finite guard."""

import warnings

import pytest
import torch

import covshift.nn as cnn
from covshift.functional import ChannelMismatchError


@pytest.mark.parametrize(
    "cls, shape, expected",
    [
        (cnn.BatchNorm1d, (2, 3, 4, 5), "2D or 3D"),
        (cnn.BatchNorm1d, (3,), "2D or 3D"),
        (cnn.BatchNorm2d, (2, 3, 4), "4D"),
        (cnn.BatchNorm3d, (2, 3, 4, 4), "5D"),
    ],
)
def test_wrong_rank_is_a_value_error_naming_expected_and_received(cls, shape, expected):
    with pytest.raises(ValueError, match=rf"{cls.__name__} expected {expected} input \(got {len(shape)}D input"):
        cls(3)(torch.randn(shape))


@pytest.mark.parametrize("cls, shape", [(cnn.BatchNorm1d, (1, 3)), (cnn.BatchNorm2d, (1, 3, 1, 1)), (cnn.BatchNorm3d, (1, 3, 1, 1, 1))])
def test_one_value_per_channel_in_training(cls, shape):
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        cls(3)(torch.randn(shape))
    cls(3).eval()(torch.randn(shape))  # fine in eval: running statistics are used


def test_wrong_channel_count_names_layer_expected_and_received():
    bn = cnn.BatchNorm2d(3)
    with pytest.raises(ChannelMismatchError, match=r"BatchNorm2d\(3\) expects 3 channels at dim 1, got 4") as info:
        bn(torch.randn(2, 4, 5, 5))
    # Catchable as torch's RuntimeError and as a ValueError.
    assert isinstance(info.value, RuntimeError) and isinstance(info.value, ValueError)
    with pytest.raises(ChannelMismatchError):
        bn.eval()(torch.randn(2, 4, 5, 5))


class _Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(2, 4, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(4)
        self.heads = torch.nn.ModuleDict({"a": torch.nn.BatchNorm1d(4, momentum=None), "b": torch.nn.Identity()})

    def forward(self, x):
        h = torch.relu(self.bn(self.conv(x)))
        return self.heads["a"](h.mean((2, 3)))


class _CustomBN(torch.nn.BatchNorm2d):
    """A user's subclass: its own behaviour must survive convert()."""


def _nested():
    return torch.nn.Sequential(
        _Block(),
        torch.nn.ModuleList([torch.nn.BatchNorm1d(4, affine=False), torch.nn.BatchNorm3d(4, track_running_stats=False)]),
        _CustomBN(4),
    )


def _bns(model):
    return [(n, type(m)) for n, m in model.named_modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


def test_convert_nested_both_ways_keeps_state_mode_dtype_and_identity():
    torch.manual_seed(0)
    model = _nested().double()
    block = model[0]
    block(torch.randn(5, 2, 6, 6, dtype=torch.float64))  # non-trivial running statistics
    model[1][0].eval()  # per-layer mode is kept, not only the root's
    params = {n: p for n, p in model.named_parameters()}
    buffers = {n: b for n, b in model.named_buffers()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ref = _nested().double()
    ref.load_state_dict(model.state_dict())

    out = cnn.convert(model)
    assert out is model
    types = dict(_bns(model))
    assert types == {"0.bn": cnn.BatchNorm2d, "0.heads.a": cnn.BatchNorm1d, "1.0": cnn.BatchNorm1d, "1.1": cnn.BatchNorm3d, "2": _CustomBN}
    for n, p in model.named_parameters():
        assert p is params[n]  # the same Parameter: the optimizer still updates the live weights
    for n, b in model.named_buffers():
        assert b is buffers[n]
    assert model[1][0].training is False and model[1][1].training is True
    assert model[0].heads["a"].momentum is None and model[1][1].running_mean is None
    x = torch.randn(5, 2, 6, 6, dtype=torch.float64)
    torch.testing.assert_close(block(x), ref[0](x), atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(model[0].bn.running_var, ref[0].bn.running_var, atol=1e-12, rtol=0)
    block(x).sum().backward()
    opt.step()  # would raise or silently train stale tensors if parameters had been copied

    back = cnn.convert(model, to="torch")
    assert dict(_bns(back)) == {
        "0.bn": torch.nn.BatchNorm2d,
        "0.heads.a": torch.nn.BatchNorm1d,
        "1.0": torch.nn.BatchNorm1d,
        "1.1": torch.nn.BatchNorm3d,
        "2": _CustomBN,
    }
    assert back[0].bn.weight is params["0.bn.weight"] and back[0].bn.weight.dtype == torch.float64
    assert back[1][0].training is False


def test_convert_a_bare_layer_returns_the_converted_layer():
    bn = torch.nn.BatchNorm1d(3).eval()
    out = cnn.convert(bn)
    assert type(out) is cnn.BatchNorm1d and out.training is False and out.weight is bn.weight
    assert type(cnn.convert(out, to="torch")) is torch.nn.BatchNorm1d


def test_convert_rejects_an_unknown_target():
    with pytest.raises(ValueError, match="expected 'covshift' or 'torch', got 'jax'"):
        cnn.convert(torch.nn.BatchNorm1d(3), to="jax")


def test_nonfinite_guard_skips_the_update_and_warns():
    bn = cnn.BatchNorm2d(3, skip_nonfinite=True)
    assert "skip_nonfinite=True" in repr(bn)
    bn(torch.randn(4, 3, 2, 2))
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    bad = torch.randn(4, 3, 2, 2)
    bad[0, 1, 0, 0] = float("nan")
    bad[1, 2, 0, 0] = float("inf")
    with pytest.warns(cnn.NonFiniteBatchWarning, match="NaN or inf"):
        y = bn(bad)
    assert y.shape == bad.shape and torch.isfinite(y[:, 0]).all()  # channel 0 still normalized
    for k, v in bn.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed on a non-finite batch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bn(torch.randn(4, 3, 2, 2))  # a finite batch: no warning, and the update happens
    assert int(bn.num_batches_tracked) == 2


def test_without_the_guard_one_nonfinite_batch_poisons_running_stats_like_torch():
    ours, ref = cnn.BatchNorm1d(2), torch.nn.BatchNorm1d(2)
    bad = torch.tensor([[1.0, float("nan")], [2.0, 0.0]])
    ours(bad)
    ref(bad)
    assert torch.isnan(ours.running_mean[1]) and torch.isnan(ref.running_mean[1])
