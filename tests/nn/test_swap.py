"""covshift.nn.swap: the one walker behind convert, convert_sync_batchnorm, freeze and unfreeze."""

import warnings

import pytest
import torch

import covshift.nn as cnn
from covshift.nn.swap import replace_modules, swap_class


def _nested():
    shared = torch.nn.BatchNorm1d(4)
    inner = torch.nn.Sequential(torch.nn.Linear(4, 4), shared)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), shared, inner, torch.nn.ModuleDict({"a": shared}))
    return model, shared


def test_fn_sees_every_module_once_in_named_modules_order():
    model, _ = _nested()
    seen = []
    replace_modules(model, lambda name, m: seen.append((name, m)))
    assert [(n, m) for n, m in seen] == list(model.named_modules())


def test_a_shared_module_gets_one_replacement_everywhere():
    model, shared = _nested()
    calls = []

    def fn(name, m):
        if isinstance(m, torch.nn.BatchNorm1d):
            calls.append(name)
            return swap_class(m, cnn.BatchNorm1d)
        return None

    assert replace_modules(model, fn) is model
    assert calls == ["1"]
    new = model[1]
    assert type(new) is cnn.BatchNorm1d and model[2][1] is new and model[3]["a"] is new
    assert new.weight is shared.weight and new.running_mean is shared.running_mean


def test_a_module_under_two_names_of_one_parent_is_replaced_under_both():
    bn = torch.nn.BatchNorm1d(2)
    parent = torch.nn.Module()
    parent.a = bn
    parent.b = bn
    cnn.convert(parent)
    assert type(parent.a) is cnn.BatchNorm1d and parent.b is parent.a


def test_the_root_can_be_replaced_and_its_children_are_then_not_visited():
    model = torch.nn.Sequential(torch.nn.BatchNorm1d(2))
    seen = []
    out = replace_modules(model, lambda name, m: seen.append(name) or torch.nn.Identity())
    assert seen == [""] and isinstance(out, torch.nn.Identity) and type(model[0]) is torch.nn.BatchNorm1d


def test_swap_class_keeps_tensors_mode_options_and_hooks():
    bn = torch.nn.BatchNorm2d(3, momentum=None, dtype=torch.float64).eval()
    bn.weight.grad = torch.ones(3, dtype=torch.float64)
    bn.qconfig = "kept"
    bn.register_buffer("extra", torch.zeros(1), persistent=False)
    calls = []
    pre = bn.register_forward_pre_hook(lambda m, args: calls.append("pre"))
    bn.register_forward_hook(lambda m, args, out: calls.append("post"))
    bn.register_full_backward_hook(lambda m, gin, gout: calls.append("backward"))
    new = swap_class(bn, cnn.BatchNorm2d)
    assert type(new) is cnn.BatchNorm2d and not new.training and new.momentum is None and new.qconfig == "kept"
    assert all(getattr(new, k) is getattr(bn, k) for k in ("weight", "bias", "running_mean", "running_var", "extra"))
    assert new.weight.grad is bn.weight.grad and new.weight.dtype == torch.float64
    assert "extra" not in new.state_dict()  # still non-persistent
    x = torch.randn(2, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    new(x).sum().backward()
    assert calls == ["pre", "post", "backward"]
    pre.remove()  # a handle taken before the swap still works on the new module
    calls.clear()
    new(x)
    assert calls == ["post"]
    # The registries are the new module's own: registering on it leaves the old one unchanged.
    new.register_buffer("more", torch.ones(1))
    new.register_parameter("p", torch.nn.Parameter(torch.ones(1)))
    assert "more" not in dict(bn.named_buffers()) and "p" not in dict(bn.named_parameters())


def test_every_converter_keeps_a_shared_layer_shared():
    model, _ = _nested()
    cnn.convert(model)
    assert type(model[1]) is cnn.BatchNorm1d and model[2][1] is model[1] and model[3]["a"] is model[1]
    cnn.freeze(model)
    assert type(model[1]) is cnn.FrozenBatchNorm1d and model[2][1] is model[1] and model[3]["a"] is model[1]
    cnn.unfreeze(model)
    assert type(model[1]) is cnn.BatchNorm1d and model[2][1] is model[1] and model[3]["a"] is model[1]
    cnn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert type(model[1]) is cnn.SyncBatchNorm and model[2][1] is model[1] and model[3]["a"] is model[1]
    cnn.convert(model, to="torch")  # covshift's SyncBatchNorm is not a plain BatchNorm*: left as it is
    assert type(model[1]) is cnn.SyncBatchNorm


def test_convert_sync_batchnorm_warns_at_the_callers_line():
    model = torch.nn.Sequential(torch.nn.Sequential(cnn.GhostBatchNorm1d(3, virtual_batch_size=2)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cnn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert len(caught) == 1 and caught[0].filename == __file__, [(w.filename, str(w.message)) for w in caught]


def test_freeze_names_the_nested_layer_it_refuses():
    model = torch.nn.Sequential(
        torch.nn.BatchNorm1d(2), torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.BatchNorm1d(3, track_running_stats=False))
    )
    with pytest.raises(ValueError, match=r"at '1.1' has no running statistics"):
        cnn.freeze(model)
    assert type(model[0]) is torch.nn.BatchNorm1d  # refused before anything changed


def test_convert_a_bare_layer_and_back_keeps_its_tensors_and_mode():
    bn = torch.nn.BatchNorm2d(3, momentum=None).eval()
    ours = cnn.convert(bn)
    assert type(ours) is cnn.BatchNorm2d and ours.weight is bn.weight and not ours.training and ours.momentum is None
    back = cnn.convert(ours, to="torch")
    assert type(back) is torch.nn.BatchNorm2d and back.running_var is bn.running_var
    with pytest.raises(ValueError, match="expected 'covshift' or 'torch'"):
        cnn.convert(bn, to="jax")


def test_convert_warns_about_an_uninitialized_lazy_batchnorm_and_swaps_it_once_materialized():
    import warnings

    import covshift.nn as cnn

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.LazyBatchNorm2d(), torch.nn.ReLU())
    with pytest.warns(UserWarning, match=r"convert: 1 is an uninitialized torch.nn.LazyBatchNorm"):
        cnn.convert(model)
    assert type(model[1]) is torch.nn.LazyBatchNorm2d  # left as torch's, as the warning says
    x = torch.randn(4, 3, 8, 8)
    model(x)  # materializes it into torch's BatchNorm2d
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cnn.convert(model)
    assert type(model[1]) is cnn.BatchNorm2d
