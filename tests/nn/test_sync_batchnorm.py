"""covshift.nn.SyncBatchNorm: 2 processes on gloo against torch's BatchNorm on the concatenated batch.

One spawn of 2 processes (gloo on 127.0.0.1, a free port, a timeout so a hang fails) runs every
scenario; each rank saves what it saw, and the tests here compare the concatenation with the reference:
outputs, input gradients, summed weight/bias gradients, running statistics, num_batches_tracked.
"""

from __future__ import annotations

import traceback
import warnings
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import gloo
import pytest
import torch
import torch.distributed as dist

import covshift.nn as cnn
from covshift.functional import ChannelMismatchError
from covshift.nn.sync_batchnorm import merge_stats

WORLD = 2
TIMEOUT_S = 90  # the whole spawn; the gloo timeout below is shorter, so a hang fails instead of blocking


@dataclass(frozen=True)
class Case:
    name: str
    shape: tuple  # the global batch
    split: tuple  # rows per rank
    steps: tuple = (True, True, False, True)  # train/eval schedule
    kw: dict = field(default_factory=dict)
    channels_last: bool = False


CASES = [
    Case("uneven_5_3_1d", (8, 3), (5, 3)),
    Case("uneven_5_3_2d_momentum_none", (8, 4, 3, 2), (5, 3), kw={"momentum": None}),
    Case("empty_rank_8_0_2d", (8, 4, 3, 2), (8, 0)),
    Case("empty_rank_0_8_3d_input", (8, 3, 5), (0, 8)),
    Case("one_row_on_a_rank_1_3", (4, 3), (1, 3)),  # one value per channel locally, 4 globally
    Case("channels_last_no_affine_2_4", (6, 3, 2, 2), (2, 4), kw={"affine": False}, channels_last=True),
    Case("no_running_stats_3_5", (8, 2, 3), (3, 5), steps=(True, True), kw={"track_running_stats": False}),
]


def _data(case: Case, step: int):
    g = torch.Generator().manual_seed(1000 * step + sum(map(ord, case.name)))
    x = torch.randn(case.shape, generator=g, dtype=torch.float64) * (1 + step) + step - 1
    dy = torch.randn(case.shape, generator=g, dtype=torch.float64)
    if case.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, dy


def _init_affine(layer: torch.nn.Module) -> None:
    if layer.weight is not None:
        with torch.no_grad():
            c = layer.num_features
            layer.weight.copy_(torch.linspace(0.5, 1.5, c, dtype=layer.weight.dtype))
            layer.bias.copy_(torch.linspace(-0.3, 0.4, c, dtype=layer.bias.dtype))


def _shard(t: torch.Tensor, case: Case, rank: int) -> torch.Tensor:
    start = sum(case.split[:rank])
    return t[start : start + case.split[rank]]


def _run_layer(layer, case: Case, rank=None):
    """Runs the case's schedule; returns per step (y, dx, dw, db, running_mean, running_var, nbt)."""
    record = []
    for step, train in enumerate(case.steps):
        layer.train(train)
        x, dy = _data(case, step)
        if rank is not None:
            x, dy = _shard(x, case, rank), _shard(dy, case, rank)
        x = x.clone().requires_grad_()
        y = layer(x)
        (y * dy).sum().backward()
        grads = [None if p is None or p.grad is None else p.grad.clone() for p in (layer.weight, layer.bias)]
        buffers = [None if b is None else b.clone() for b in (layer.running_mean, layer.running_var, layer.num_batches_tracked)]
        record.append((y.detach().clone(), x.grad.clone(), *grads, *buffers, y.is_contiguous(memory_format=torch.channels_last)))
        layer.zero_grad()
    return record


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    results = {}
    try:
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD, timeout=timedelta(seconds=45)
        )
        for case in CASES:
            layer = cnn.SyncBatchNorm(case.shape[1], dtype=torch.float64, **case.kw)
            _init_affine(layer)
            results[case.name] = _run_layer(layer, case, rank)

        # A model converted from torch's layers synchronizes too.
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4)).double()
        model = cnn.SyncBatchNorm.convert_sync_batchnorm(model)
        x = torch.randn(8, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
        results["converted"] = model(_shard(x, Case("", (8, 3), (5, 3)), rank)).detach()

        # One value per channel over the global batch: the same ValueError on every rank, no hang.
        try:
            cnn.SyncBatchNorm(3, dtype=torch.float64)(torch.randn((1, 3) if rank == 0 else (0, 3), dtype=torch.float64))
            results["single_value"] = "no error"
        except ValueError as e:
            results["single_value"] = str(e)

        # The non-finite guard: a NaN on rank 1 only; both ranks must skip the update and warn.
        layer = cnn.SyncBatchNorm(3, dtype=torch.float64, skip_nonfinite=True)
        layer(torch.randn(4, 3, dtype=torch.float64))
        before = {k: v.clone() for k, v in layer.state_dict().items()}
        bad = torch.randn(4, 3, dtype=torch.float64)
        if rank == 1:
            bad[2, 1] = float("nan")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            layer(bad)
        results["guard"] = (
            [str(w.category.__name__) for w in caught],
            all(torch.equal(v, before[k]) for k, v in layer.state_dict().items()),
        )
        # Double backward: the global statistics cannot be recomputed from the local input.
        x = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
        (gx,) = torch.autograd.grad(cnn.SyncBatchNorm(2, dtype=torch.float64)(x).pow(3).sum(), x, create_graph=True)
        try:
            gx.sum().backward()
            results["double_backward"] = "no error"
        except RuntimeError as e:
            results["double_backward"] = str(e)
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:  # report, do not hang the parent
        results["error"] = traceback.format_exc()
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return gloo.spawn(_worker, tmp_path_factory.mktemp("syncbn"), WORLD, TIMEOUT_S)


def _close(a, b, what):
    if a is None or b is None:
        assert a is None and b is None, f"{what}: one side is None"
        return
    torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_matches_batchnorm_on_the_concatenated_batch(ranks, case):
    ref = torch.nn.BatchNorm1d if len(case.shape) < 4 else torch.nn.BatchNorm2d
    ref = ref(case.shape[1], dtype=torch.float64, **case.kw)
    _init_affine(ref)
    expected = _run_layer(ref, case)
    got = [ranks[r][case.name] for r in range(WORLD)]
    for step, exp in enumerate(expected):
        what = f"step {step} ({'train' if case.steps[step] else 'eval'})"
        y = torch.cat([g[step][0] for g in got])
        dx = torch.cat([g[step][1] for g in got])
        _close(y, exp[0], f"{what} output")
        _close(dx, exp[1], f"{what} grad input")
        for i, name in ((2, "weight"), (3, "bias")):
            summed = None if got[0][step][i] is None else sum(g[step][i] for g in got)
            _close(summed, exp[i], f"{what} grad {name} summed over ranks")
        for r in range(WORLD):
            for i, name in ((4, "running_mean"), (5, "running_var")):
                _close(got[r][step][i], exp[i], f"{what} rank {r} {name}")
            _close(got[r][step][6], exp[6], f"{what} rank {r} num_batches_tracked")
        if case.channels_last:
            assert all(g[step][7] for g in got), "the output lost the input's channels_last format"


def test_converted_model_synchronizes(ranks):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4)).double()
    x = torch.randn(8, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    _close(torch.cat([ranks[0]["converted"], ranks[1]["converted"]]), model(x).detach(), "converted model output")


def test_one_value_per_channel_over_the_global_batch_raises_on_every_rank(ranks):
    for r in range(WORLD):
        assert "Expected more than 1 value per channel when training" in ranks[r]["single_value"], ranks[r]["single_value"]


def test_nonfinite_guard_agrees_across_ranks(ranks):
    for r in range(WORLD):
        categories, unchanged = ranks[r]["guard"]
        assert categories == ["NonFiniteBatchWarning"], f"rank {r}: {categories}"
        assert unchanged, f"rank {r} updated its running statistics on a non-finite global batch"


# ---- single process ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape, torch_cls",
    [((6, 3), torch.nn.BatchNorm1d), ((4, 3, 5), torch.nn.BatchNorm1d), ((3, 3, 2, 4), torch.nn.BatchNorm2d), ((2, 3, 2, 2, 3), torch.nn.BatchNorm3d)],
)
@pytest.mark.parametrize("momentum", [0.1, None])
def test_outside_a_process_group_it_is_batchnorm(shape, torch_cls, momentum):
    assert not dist.is_initialized()
    ours = cnn.SyncBatchNorm(3, momentum=momentum, dtype=torch.float64)
    ref = torch_cls(3, momentum=momentum, dtype=torch.float64)
    _init_affine(ours)
    _init_affine(ref)
    case = Case("single", shape, (shape[0],))
    for exp, got in zip(_run_layer(ref, case), _run_layer(ours, case)):
        for i, (a, b) in enumerate(zip(got[:7], exp[:7])):
            _close(a, b, f"field {i}")


def test_state_dict_loads_both_ways_with_torch():
    ref = torch.nn.BatchNorm2d(4)
    ref.running_mean.add_(1.0)
    ours = cnn.SyncBatchNorm(4)
    ours.load_state_dict(ref.state_dict(), strict=True)
    torch.nn.SyncBatchNorm(4).load_state_dict(ours.state_dict(), strict=True)
    assert torch.equal(ours.running_mean, ref.running_mean)


def test_a_given_process_group_without_torch_distributed_is_an_error():
    layer = cnn.SyncBatchNorm(3, process_group=object())  # e.g. a group kept after destroy_process_group()
    with pytest.raises(cnn.ProcessGroupError, match="torch.distributed is not initialised"):
        layer(torch.randn(4, 3))
    layer.eval()(torch.randn(4, 3))  # eval never synchronizes, so it does not need the group


def test_input_errors():
    layer = cnn.SyncBatchNorm(3)
    with pytest.raises(ValueError, match=r"SyncBatchNorm expected at least 2D input \(got 1D input"):
        layer(torch.randn(3))
    with pytest.raises(ChannelMismatchError, match=r"SyncBatchNorm\(3\) expects 3 channels at dim 1, got 4"):
        layer(torch.randn(2, 4))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        layer(torch.randn(1, 3))


@pytest.mark.parametrize("split", [(5, 3), (8, 0), (0, 8), (1, 2, 0, 5)])
def test_merge_stats_is_the_statistics_of_the_union(split):
    x = torch.randn(8, 3, dtype=torch.float64) * 3 + 2
    parts = x.split(list(split))
    counts = torch.tensor([float(len(p)) for p in parts], dtype=torch.float64)
    means = torch.stack([p.mean(0) if len(p) else torch.zeros(3, dtype=torch.float64) for p in parts])
    m2s = torch.stack([p.var(0, unbiased=False) * len(p) if len(p) else torch.zeros(3, dtype=torch.float64) for p in parts])
    n, mean, var = merge_stats(counts, means, m2s)
    assert n == 8
    _close(mean, x.mean(0), "mean")
    _close(var, x.var(0, unbiased=False), "var")


class _UserBN(torch.nn.BatchNorm2d):
    pass


def test_convert_sync_batchnorm_keeps_weights_buffers_mode_and_options():
    model = torch.nn.Sequential(
        torch.nn.Conv2d(2, 4, 3),
        torch.nn.BatchNorm2d(4),
        torch.nn.Sequential(cnn.BatchNorm2d(4, momentum=None, skip_nonfinite=True), torch.nn.SyncBatchNorm(4)),
        cnn.FrozenBatchNorm2d(4),
        cnn.GhostBatchNorm2d(4, virtual_batch_size=2),
        _UserBN(4),
    )
    model[1](torch.randn(3, 4, 5, 5))  # non-trivial running statistics
    model[2][0].eval()
    params = {n: p for n, p in model.named_parameters()}
    buffers = {n: b for n, b in model.named_buffers()}
    group = object()
    with pytest.warns(UserWarning) as caught:
        out = cnn.SyncBatchNorm.convert_sync_batchnorm(model, process_group=group)
    messages = " | ".join(str(w.message) for w in caught)
    assert "GhostBatchNorm2d at '4'" in messages and "_UserBN at '5'" in messages and "Frozen" not in messages
    assert out is model
    assert [type(m) for m in (model[1], model[2][0], model[2][1])] == [cnn.SyncBatchNorm] * 3
    assert type(model[3]) is cnn.FrozenBatchNorm2d and type(model[4]) is cnn.GhostBatchNorm2d and type(model[5]) is _UserBN
    assert all(model[i].process_group is group for i in (1,)) and model[2][1].process_group is group
    assert model[2][0].skip_nonfinite and model[2][0].momentum is None and not model[2][0].training
    assert not model[1].skip_nonfinite and model[1].training
    assert all(p is params[n] for n, p in model.named_parameters())
    assert all(b is buffers[n] for n, b in model.named_buffers())
    bare = cnn.SyncBatchNorm.convert_sync_batchnorm(torch.nn.BatchNorm1d(3).eval())
    assert type(bare) is cnn.SyncBatchNorm and not bare.training and bare.process_group is None


def test_ddp_accepts_it_on_cpu_where_it_refuses_torchs():
    # DistributedDataParallel refuses torch.nn.SyncBatchNorm on CPU modules; ours is not one.
    assert not isinstance(cnn.SyncBatchNorm(3), torch.nn.SyncBatchNorm)
    assert isinstance(cnn.SyncBatchNorm(3), torch.nn.modules.batchnorm._BatchNorm)


def test_double_backward_is_refused_clearly(ranks):
    for r in range(WORLD):
        assert "once_differentiable" in ranks[r]["double_backward"], ranks[r]["double_backward"]
