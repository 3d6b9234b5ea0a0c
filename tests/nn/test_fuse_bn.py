"""covshift.nn.fuse_bn: the folded affine map, and the fused copy equal to the eval-mode original."""

import threading

import pytest
import torch

import covshift.nn as cnn


def _randomize_bn(model):
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                if m.running_mean is not None:
                    m.running_mean.copy_(torch.randn(m.num_features, generator=g))
                    m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.2)
                if m.weight is not None:
                    m.weight.copy_(torch.randn(m.num_features, generator=g))
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.num_features, generator=g))
    return model


def _identities(model):
    return sorted(n for n, m in model.named_modules() if isinstance(m, torch.nn.Identity))


def test_conv_and_linear_chains_fold_and_match_the_eval_original():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Sequential(torch.nn.Conv1d(2, 4, 3), torch.nn.BatchNorm1d(4), torch.nn.Unflatten(2, (2, 2))),
        torch.nn.Conv2d(4, 6, 1, bias=False),  # no bias: the fused layer gets one
        cnn.BatchNorm2d(6, eps=1e-3),
        torch.nn.Conv2d(6, 6, 1, groups=3),
        cnn.FrozenBatchNorm2d(6),
        torch.nn.ReLU(),
        torch.nn.BatchNorm2d(6),  # follows a ReLU: stays
        torch.nn.Unflatten(1, (3, 2)),
        torch.nn.Conv3d(3, 2, 1),
        torch.nn.BatchNorm3d(2, affine=False),
        torch.nn.Flatten(),
        torch.nn.Linear(16, 5),
        cnn.BatchRenorm1d(5),
        torch.nn.Linear(5, 5),
        torch.nn.BatchNorm1d(5, track_running_stats=False),  # batch statistics in eval: stays
    ).double()
    _randomize_bn(model).eval()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(7, 2, 6, dtype=torch.float64)
    fused = cnn.fuse_bn(model)
    assert _identities(fused) == ["0.1", "12", "2", "4", "9"]
    assert fused[1].bias is not None and model[1].bias is None
    assert not fused.training
    torch.testing.assert_close(fused(x), model(x), atol=1e-10, rtol=1e-10)
    assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items()), "the original changed"
    assert type(model[2]) is cnn.BatchNorm2d


def test_folded_weights_are_the_formula():
    conv = torch.nn.Conv2d(3, 4, 2).double()
    bn = _randomize_bn(torch.nn.BatchNorm2d(4, eps=1e-2).double())
    fused = cnn.fuse_bn(torch.nn.Sequential(conv, bn).eval())[0]
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    torch.testing.assert_close(fused.weight, conv.weight * scale.view(-1, 1, 1, 1), atol=1e-14, rtol=1e-14)
    torch.testing.assert_close(fused.bias, (conv.bias - bn.running_mean) * scale + bn.bias, atol=1e-14, rtol=1e-14)


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.bn1 = torch.nn.BatchNorm2d(4)
        self.head = torch.nn.ModuleDict({"fc": torch.nn.Linear(4, 2), "bn": torch.nn.BatchNorm1d(2)})

    def forward(self, x):
        h = torch.relu(self.bn1(self.conv1(x))).mean((2, 3))
        return self.head["bn"](self.head["fc"](h))


def test_named_pairs_for_a_model_that_is_not_a_sequential():
    model = _randomize_bn(_Net().double()).eval()
    x = torch.randn(5, 3, 4, 4, dtype=torch.float64)
    fused = cnn.fuse_bn(model, pairs=[("conv1", "bn1"), ("head.fc", "head.bn")])
    assert _identities(fused) == ["bn1", "head.bn"]
    torch.testing.assert_close(fused(x), model(x), atol=1e-10, rtol=1e-10)


def test_refuses_a_model_in_training_mode():
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.BatchNorm1d(3))
    with pytest.raises(ValueError, match=r"module\(s\) are in training mode \(<root>, 0, 1\)\. Call model.eval\(\) first"):
        cnn.fuse_bn(model)
    model.eval()
    model[1].train()
    with pytest.raises(ValueError, match=r"in training mode \(1\)"):
        cnn.fuse_bn(model)


@pytest.mark.parametrize(
    "pairs, match",
    [
        ([("conv1", "nope")], "no module named 'nope'"),
        ([("bn1", "conv1")], "the first module is a BatchNorm2d, not a Linear or Conv"),
        ([("conv1", "head.fc")], "the second module is a Linear, not a BatchNorm layer"),
        ([("head.fc", "bn1")], "Linear has 2 output channels but the BatchNorm has 4"),
    ],
)
def test_pair_errors(pairs, match):
    with pytest.raises(ValueError, match=match):
        cnn.fuse_bn(_Net().eval(), pairs=pairs)


def test_a_batchnorm_in_two_pairs_is_refused():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.Conv2d(4, 4, 1), torch.nn.BatchNorm2d(4)).eval()
    with pytest.raises(ValueError, match="'2' would be folded twice"):
        cnn.fuse_bn(model, pairs=[("0", "2")])  # the Sequential already pairs ("1", "2")


def test_batchnorm_without_running_statistics_is_refused_as_a_pair():
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.BatchNorm1d(3, track_running_stats=False)).eval()
    with pytest.raises(ValueError, match="no running statistics"):
        cnn.fuse_bn(model, pairs=[("0", "1")])


def test_process_group_handles_are_shared_not_copied():
    handle = threading.Lock()  # like a ProcessGroup: cannot be deep-copied
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), cnn.SyncBatchNorm(3, process_group=handle)).eval()
    fused = cnn.fuse_bn(model)
    assert isinstance(fused[1], torch.nn.Identity) and model[1].process_group is handle
