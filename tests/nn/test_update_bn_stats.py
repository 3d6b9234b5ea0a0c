"""covshift.nn.update_bn_stats: the true average over batches (brute force, and torch's swa_utils.update_bn)."""

import copy

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import covshift.nn as cnn


def _batches(n=4, rows=6, features=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(rows, features, generator=g, dtype=torch.float64) * (1 + i) + i for i in range(n)]


def _mixed_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(3, 4),
        torch.nn.BatchNorm1d(4),  # torch's, momentum 0.1
        torch.nn.ReLU(),
        cnn.BatchNorm1d(4, momentum=None),
        cnn.BatchRenorm1d(4, r_max=2.0, d_max=1.0),
        torch.nn.Linear(4, 4),
        cnn.GhostBatchNorm1d(4, virtual_batch_size=64),  # one ghost batch per batch here
        cnn.FrozenBatchNorm1d(4),
        torch.nn.BatchNorm1d(4, track_running_stats=False),
        torch.nn.Dropout(0.5),
    ).double()


def _brute_force(model, batches, layers):
    """Per layer: the mean over batches of the batch means and of the unbiased batch variances."""
    model = copy.deepcopy(model).train()
    for m in model.modules():
        if isinstance(m, cnn.BatchRenorm1d):
            m.r_max, m.d_max = 1.0, 0.0  # documented: renorm runs as plain BN while re-estimating
    seen = {name: [] for name in layers}
    mods = dict(model.named_modules())
    hooks = [mods[n].register_forward_pre_hook(lambda m, a, n=n: seen[n].append(a[0].detach())) for n in layers]
    torch.manual_seed(123)
    with torch.no_grad():
        for x in batches:
            model(x)
    for h in hooks:
        h.remove()
    return {n: (torch.stack([x.mean(0) for x in xs]).mean(0), torch.stack([x.var(0) for x in xs]).mean(0)) for n, xs in seen.items()}


@pytest.mark.parametrize("as_tuples", [False, True])
def test_mixed_model_gets_the_true_average_and_everything_else_is_restored(as_tuples):
    model = _mixed_model()
    for x in _batches(3, seed=9):  # training leaves lagging EMA statistics and a renorm step count
        model.train()(x)
    model.eval()
    model[3].train()  # a per-layer mode the tool must restore
    frozen_state = {k: v.clone() for k, v in model[7].state_dict().items()}
    renorm_step = int(model[4].num_batches_tracked)
    batches = _batches(5)
    loader = [(x, torch.zeros(len(x))) for x in batches] if as_tuples else batches
    expected = _brute_force(model, batches[:4], ["1", "3", "4", "6"])

    torch.manual_seed(123)
    assert cnn.update_bn_stats(model, loader, num_batches=4) is None

    for name, (mean, var) in expected.items():
        layer = dict(model.named_modules())[name]
        torch.testing.assert_close(layer.running_mean, mean, atol=1e-10, rtol=1e-10, msg=lambda m: f"{name}: {m}")
        torch.testing.assert_close(layer.running_var, var, atol=1e-10, rtol=1e-10, msg=lambda m: f"{name}: {m}")
    assert int(model[1].num_batches_tracked) == 4 and int(model[6].num_batches_tracked) == 4
    assert [model[i].momentum for i in (1, 3, 4, 6)] == [0.1, None, 0.1, 0.1]
    assert [m.training for m in model] == [False, False, False, True] + [False] * 6
    assert int(model[4].num_batches_tracked) == renorm_step and (model[4].r_max, model[4].d_max) == (2.0, 1.0)
    assert all(torch.equal(v, frozen_state[k]) for k, v in model[7].state_dict().items())
    assert model[8].running_mean is None


def test_matches_torch_swa_update_bn_on_a_torch_model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(2, 3, 3), torch.nn.BatchNorm2d(3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(12, 5),
        torch.nn.BatchNorm1d(5, momentum=0.3),
    ).double()
    g = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(20, 2, 4, 4, generator=g, dtype=torch.float64), torch.zeros(20))
    loader = DataLoader(data, batch_size=5)
    ref = copy.deepcopy(model)
    torch.optim.swa_utils.update_bn(loader, ref)
    cnn.update_bn_stats(model, loader)
    for (k, a), (_, b) in zip(model.state_dict().items(), ref.state_dict().items()):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12, msg=lambda m: f"{k}: {m}")
    assert model[5].momentum == 0.3


@pytest.mark.parametrize("num_batches", [0, -1, 1.5, True])
def test_bad_num_batches(num_batches):
    with pytest.raises(ValueError, match="num_batches to be None or an int >= 1"):
        cnn.update_bn_stats(_mixed_model(), _batches(), num_batches=num_batches)


def test_an_empty_loader_or_a_failing_forward_leaves_everything_as_it_was():
    model = _mixed_model()
    model(_batches(1, seed=5)[0])
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="the loader yielded no batches"):
        cnn.update_bn_stats(model, [])
    with pytest.raises(RuntimeError):  # wrong feature count fails inside the second batch's forward
        cnn.update_bn_stats(model, [torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 7, dtype=torch.float64)])
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert model[3].momentum is None and model[1].momentum == 0.1 and all(m.training for m in model if not isinstance(m, cnn.FrozenBatchNorm1d))


def test_a_model_without_batchnorm_is_left_alone():
    model = torch.nn.Linear(3, 2)
    cnn.update_bn_stats(model, _batches())
    assert model.training
