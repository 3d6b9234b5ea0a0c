"""covshift.nn.FrozenBatchNorm*, freeze() and unfreeze(): the eval-mode BatchNorm, fixed for good."""

import pytest
import torch

import covshift.nn as cnn


def _trained(layer, shape, steps=3):
    with torch.no_grad():
        if layer.weight is not None:
            layer.weight.uniform_(0.5, 1.5)
        if layer.bias is not None:
            layer.bias.uniform_(-0.5, 0.5)
    layer.train()
    for i in range(steps):
        layer(torch.randn(shape, dtype=layer.running_mean.dtype) * (1 + i) + i)
    return layer


@pytest.mark.parametrize(
    "frozen_cls, torch_cls, shape",
    [
        (cnn.FrozenBatchNorm1d, torch.nn.BatchNorm1d, (5, 3)),
        (cnn.FrozenBatchNorm1d, torch.nn.BatchNorm1d, (5, 3, 4)),
        (cnn.FrozenBatchNorm2d, torch.nn.BatchNorm2d, (4, 3, 2, 3)),
        (cnn.FrozenBatchNorm3d, torch.nn.BatchNorm3d, (2, 3, 2, 2, 2)),
    ],
)
def test_equals_eval_batchnorm_whatever_the_mode(frozen_cls, torch_cls, shape):
    torch.manual_seed(0)
    ref = _trained(torch_cls(3, dtype=torch.float64), shape).eval()
    frozen = frozen_cls(3, dtype=torch.float64)
    frozen.load_state_dict(ref.state_dict(), strict=True)
    state = {k: v.clone() for k, v in frozen.state_dict().items()}
    frozen.train()  # ignored
    assert frozen.training is False
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    y, y_ref = frozen(x), ref(x_ref)
    torch.testing.assert_close(y, y_ref, atol=1e-12, rtol=1e-12)
    y.sum().backward()
    y_ref.sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-12, rtol=1e-12)  # the input still gets its gradient
    assert frozen.weight.grad is None and frozen.bias.grad is None
    assert not any(p.requires_grad for p in frozen.parameters())
    assert all(torch.equal(v, state[k]) for k, v in frozen.state_dict().items())
    torch_cls(3, dtype=torch.float64).load_state_dict(frozen.state_dict(), strict=True)


def test_affine_stays_fixed_even_if_requires_grad_is_switched_back_on():
    frozen = cnn.FrozenBatchNorm1d(3)
    frozen.weight.requires_grad_(True)
    x = torch.randn(4, 3, requires_grad=True)
    frozen(x).sum().backward()
    assert frozen.weight.grad is None and x.grad is not None


class _UserBN(torch.nn.BatchNorm1d):
    pass


def _model():
    return torch.nn.Sequential(
        torch.nn.Conv2d(2, 3, 3, padding=1),
        torch.nn.BatchNorm2d(3),
        torch.nn.Sequential(cnn.BatchNorm2d(3, momentum=None, skip_nonfinite=True), cnn.GhostBatchNorm2d(3, virtual_batch_size=2)),
        cnn.BatchRenorm2d(3, r_max=2.0),
        cnn.SyncBatchNorm(3),
        torch.nn.Flatten(),
        torch.nn.Linear(3 * 4 * 4, 4),
        _UserBN(4),
    ).double()


def test_freeze_and_unfreeze_a_nested_model_keep_state():
    torch.manual_seed(0)
    model = _model()
    for _ in range(2):
        model(torch.randn(4, 2, 4, 4, dtype=torch.float64))
    model[7].bias.requires_grad_(False)  # a user's choice that unfreeze must restore
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    classes = {n: type(m) for n, m in model.named_modules()}
    x = torch.randn(4, 2, 4, 4, dtype=torch.float64)
    expected = model.eval()(x)

    assert cnn.freeze(model.train()) is model
    frozen = {n: type(m) for n, m in model.named_modules() if n in ("1", "2.0", "2.1", "3", "4", "7")}
    assert frozen == {"1": cnn.FrozenBatchNorm2d, "2.0": cnn.FrozenBatchNorm2d, "2.1": cnn.FrozenBatchNorm2d,
                      "3": cnn.FrozenBatchNorm2d, "7": cnn.FrozenBatchNorm1d, "4": type(model[4])}
    assert model[0].training and not any(model[i].training for i in (1, 3, 4, 7))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=0.1)
    model.train()
    out = model(x)  # training mode for the model, eval for the frozen layers
    out.sum().backward()
    opt.step()
    for n, m in model.named_modules():
        if n in frozen:
            assert not m.training and all(p.grad is None for p in m.parameters(recurse=False))
    trained = ("0.", "6.")  # the conv and the linear train; nothing of the frozen layers changes
    for k, v in model.state_dict().items():
        if not k.startswith(trained):
            assert torch.equal(v, state[k]), k
    model.load_state_dict(state)  # undo the step, to compare with the original
    torch.testing.assert_close(model.eval()(x), expected, atol=1e-12, rtol=1e-12)

    model.train()
    assert cnn.unfreeze(model) is model
    assert {n: type(m) for n, m in model.named_modules()} == classes
    assert all(p is params[n] for n, p in model.named_parameters())
    assert all(b is buffers[n] for n, b in model.named_buffers())
    assert model[7].bias.requires_grad is False and model[7].weight.requires_grad is True
    assert all(p.requires_grad for n, p in model.named_parameters() if n != "7.bias")
    assert model[2][0].momentum is None and model[2][0].skip_nonfinite and model[2][1].virtual_batch_size == 2
    assert model[3].r_max == 2.0
    assert all(m.training for m in model.modules())  # the layers follow their parents' mode
    before = model[1].running_mean.clone()
    model(x)
    assert not torch.equal(model[1].running_mean, before)  # training updates statistics again


def test_a_bare_layer_and_a_constructed_one():
    bn = torch.nn.BatchNorm2d(3)
    frozen = cnn.freeze(bn)
    assert type(frozen) is cnn.FrozenBatchNorm2d and frozen.weight is bn.weight
    assert cnn.freeze(frozen) is frozen  # already frozen
    back = cnn.unfreeze(frozen)
    assert type(back) is torch.nn.BatchNorm2d and back.weight.requires_grad and not back.training
    made = cnn.unfreeze(torch.nn.Sequential(cnn.FrozenBatchNorm1d(3)))[0]
    assert type(made) is cnn.BatchNorm1d and made.momentum == 0.1 and made.weight.requires_grad and made.training


def test_freeze_refuses_a_layer_without_running_statistics():
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.BatchNorm1d(3, track_running_stats=False))
    with pytest.raises(ValueError, match=r"freeze: BatchNorm1d at '1' has no running statistics"):
        cnn.freeze(model)


def test_input_errors():
    with pytest.raises(ValueError, match=r"FrozenBatchNorm2d expected 4D input \(got 2D input"):
        cnn.FrozenBatchNorm2d(3)(torch.randn(4, 3))
    with pytest.raises(ValueError, match="expects 3 channels at dim 1, got 2"):
        cnn.FrozenBatchNorm1d(3)(torch.randn(4, 2))
    cnn.FrozenBatchNorm1d(3)(torch.randn(1, 3))  # one value per channel is fine: no batch statistics


def test_skip_nonfinite_is_accepted_and_nothing_is_ever_updated():
    frozen = cnn.FrozenBatchNorm1d(2, skip_nonfinite=True)
    frozen(torch.tensor([[float("nan"), 1.0], [2.0, 3.0]]))
    assert torch.equal(frozen.running_mean, torch.zeros(2)) and int(frozen.num_batches_tracked) == 0
