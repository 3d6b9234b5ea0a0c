"""covshift's layers under PyTorch's module machinery behave exactly as torch's own layer does.

Each case pairs a covshift layer with a torch reference holding the same state: ``torch.nn.BatchNorm*``
for the plain layers, ``SyncBatchNorm`` outside a process group, ``BatchRenorm`` with ``r_max=1, d_max=0``
(which is BatchNorm), ``FrozenBatchNorm`` (torch's layer, kept in eval); for ``GhostBatchNorm``, ghost
batches written with ``torch.nn.functional.batch_norm``. Both sides go through the same machinery
(checkpoint, functional_call, autocast, copies, dtype and memory-format conversion) and the same
train/eval schedule, and every output, input gradient, parameter gradient and buffer is compared,
dtype and memory format included.

DDP (gloo, 2 processes on 127.0.0.1): a small conv + covshift-BN model against the same model with
torch's BN, eager and under ``torch.compile`` (slow: one compile per process).
"""

from __future__ import annotations

import copy
import io
import pickle
import traceback
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Callable

import gloo
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.func import functional_call
from torch.utils.checkpoint import checkpoint

import covshift.nn as cnn

C = 3  # channels of every layer here
IN = 2  # channels into the conv / linear layer before it


class _TorchFrozen(torch.nn.BatchNorm2d):
    """torch's layer, fixed: eval whatever ``.train()`` says, no gradient to the affine parameters."""

    def __init__(self, c: int) -> None:
        super().__init__(c)
        for p in self.parameters():
            p.requires_grad_(False)
        self.training = False

    def train(self, mode: bool = True):
        return super().train(False)


class _TorchGhost(torch.nn.BatchNorm2d):
    """Ghost BatchNorm from torch's F.batch_norm per ghost batch, and covshift's documented running rule:
    the count-weighted mean and the pooled unbiased within-ghost-batch variance, once per forward."""

    def __init__(self, c: int, virtual_batch_size: int) -> None:
        super().__init__(c)
        self.virtual_batch_size = virtual_batch_size

    def forward(self, x):
        if not self.training:
            return super().forward(x)
        chunks = x.split(self.virtual_batch_size)
        with torch.no_grad():  # before normalizing, as torch's own op updates
            m = [c.numel() // c.shape[1] for c in chunks]
            dims = [0, *range(2, x.dim())]
            acc = torch.promote_types(x.dtype, torch.float32)
            mean = sum(mi * c.to(acc).mean(dims) for mi, c in zip(m, chunks)) / sum(m)
            pooled = sum(mi * c.to(acc).var(dims, correction=0) for mi, c in zip(m, chunks)) / (sum(m) - len(m))
            self.num_batches_tracked.add_(1)
            f = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
            self.running_mean.lerp_(mean.to(self.running_mean.dtype), f)
            self.running_var.lerp_(pooled.to(self.running_var.dtype), f)
        return torch.cat([F.batch_norm(c, None, None, self.weight, self.bias, True, 0.0, self.eps) for c in chunks])


@dataclass(frozen=True)
class Case:
    name: str
    ours: Callable[[], torch.nn.Module]
    ref: Callable[[], torch.nn.Module]
    shape: tuple  # input of the layer itself, (N, C, *)


CASES = [
    Case("BatchNorm1d_NC", lambda: cnn.BatchNorm1d(C), lambda: torch.nn.BatchNorm1d(C), (6, C)),
    Case("BatchNorm1d_NCL", lambda: cnn.BatchNorm1d(C), lambda: torch.nn.BatchNorm1d(C), (4, C, 5)),
    Case("BatchNorm2d", lambda: cnn.BatchNorm2d(C), lambda: torch.nn.BatchNorm2d(C), (4, C, 3, 4)),
    Case("BatchNorm3d", lambda: cnn.BatchNorm3d(C), lambda: torch.nn.BatchNorm3d(C), (2, C, 2, 3, 3)),
    Case("SyncBatchNorm", lambda: cnn.SyncBatchNorm(C), lambda: torch.nn.BatchNorm2d(C), (4, C, 3, 4)),
    Case("BatchRenorm2d", lambda: cnn.BatchRenorm2d(C, r_max=1.0, d_max=0.0), lambda: torch.nn.BatchNorm2d(C), (4, C, 3, 4)),
    Case("GhostBatchNorm2d", lambda: cnn.GhostBatchNorm2d(C, virtual_batch_size=2), lambda: _TorchGhost(C, 2), (5, C, 3, 2)),
    Case("FrozenBatchNorm2d", lambda: cnn.FrozenBatchNorm2d(C), lambda: _TorchFrozen(C), (4, C, 3, 4)),
]
SCHEDULE = (True, True, False, True)  # train/eval per step


def _set_state(layer: torch.nn.Module) -> None:
    """Non-trivial parameters and running statistics, the same for every layer."""
    with torch.no_grad():
        if layer.weight is not None:
            layer.weight.copy_(torch.linspace(0.5, 1.5, C))
            layer.bias.copy_(torch.linspace(-0.3, 0.4, C))
        layer.running_mean.copy_(torch.linspace(-0.2, 0.3, C))
        layer.running_var.copy_(torch.linspace(0.7, 1.6, C))
        layer.num_batches_tracked.fill_(3)


def _pair(case: Case) -> tuple[torch.nn.Module, torch.nn.Module]:
    ours, ref = case.ours(), case.ref()
    _set_state(ours)
    ref.load_state_dict(ours.state_dict(), strict=True)
    return ours, ref


def _with_conv(layer: torch.nn.Module, shape: tuple) -> torch.nn.Module:
    """``Sequential(Linear or ConvNd, layer)`` with a seeded first layer: a model's input is ``(N, IN, *)``."""
    torch.manual_seed(0)
    rank = len(shape)
    # No bias before BatchNorm, as usual: it would cancel, and its gradient is 0 but for rounding.
    if rank == 2:
        first = torch.nn.Linear(IN, C, bias=False)
    else:
        first = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)[rank - 3](IN, C, 3, padding=1, bias=False)
    return torch.nn.Sequential(first, layer)


def _data(shape: tuple, step: int, dtype=torch.float32, fmt=None, rounded_to=None):
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(shape, generator=g) * (1 + step) + step - 1
    dy = torch.randn(shape[:1] + (C,) + shape[2:], generator=g)
    if rounded_to is not None:  # the same values as a run in that dtype, held in `dtype`
        x, dy = x.to(rounded_to), dy.to(rounded_to)
    x, dy = x.to(dtype), dy.to(dtype)
    if fmt is not None:
        x = x.contiguous(memory_format=fmt)
    return x, dy


def _record(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> list:
    grads = [p.grad.clone() if p.grad is not None else None for p in model.parameters()]
    buffers = [b.clone() for b in model.buffers()]
    fmt = [y.is_contiguous(memory_format=f) for f in (torch.channels_last, torch.channels_last_3d) if y.dim() == (4 if f is torch.channels_last else 5)]
    return [y.detach().clone(), None if x.grad is None else x.grad.clone(), *grads, *buffers, fmt]


def _run(model: torch.nn.Module, shape: tuple, call=None, dtype=torch.float32, fmt=None, rounded_to=None) -> list:
    """The schedule on ``model``: per step output, input grad, parameter grads, buffers, memory format."""
    call = call or (lambda m, x: m(x))
    steps = []
    for step, train in enumerate(SCHEDULE):
        model.train(train)
        x, dy = _data(shape, step, dtype, fmt, rounded_to)
        x.requires_grad_()
        y = call(model, x)
        (y.float() * dy.float()).sum().backward()
        steps.append(_record(model, x, y))
        model.zero_grad(set_to_none=True)
    return steps


def _tolerances(t: torch.Tensor) -> dict:
    if t.dtype in (torch.bfloat16, torch.float16):
        return dict(atol=2e-2, rtol=2e-2)
    if t.dtype == torch.float32:
        return dict(atol=2e-5, rtol=2e-5)
    return dict(atol=1e-10, rtol=1e-10)


def _compare(got: list, exp: list) -> None:
    assert len(got) == len(exp)
    for step, (g_step, e_step) in enumerate(zip(got, exp)):
        assert len(g_step) == len(e_step), f"step {step}: different numbers of parameters/buffers"
        for i, (a, b) in enumerate(zip(g_step, e_step)):
            what = f"step {step} item {i}"
            if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
                assert a == b, f"{what}: {a} != {b}"
                continue
            torch.testing.assert_close(a, b, **_tolerances(b), msg=lambda m: f"{what}: {m}")


ids = [c.name for c in CASES]


# --- torch.utils.checkpoint (non-reentrant) ----------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=ids)
def test_checkpoint_non_reentrant(case):
    # Recomputation in backward runs the forward again: torch's layer then updates its running
    # statistics twice per step, and so must a drop-in.
    ours, ref = _pair(case)

    def call(m, x):
        return checkpoint(m, x, use_reentrant=False)

    got = _run(ours, case.shape, call)
    _compare(got, _run(ref, case.shape, call))
    if case.name != "FrozenBatchNorm2d":
        assert int(got[-1][-2]) == 3 + 2 * sum(SCHEDULE), "num_batches_tracked: one update per forward, recomputation included"


# --- torch.func.functional_call with substituted buffers ----------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=ids)
def test_functional_call_updates_the_substituted_buffers(case):
    def run(layer):
        own = {k: v.clone() for k, v in layer.named_buffers()}
        substituted = {k: v.clone() for k, v in layer.named_buffers()}
        params = dict(layer.named_parameters())

        def call(m, x):
            return functional_call(m, {**params, **substituted}, (x,))

        steps = _run(layer, case.shape, call)
        for k, v in layer.named_buffers():  # the module's own buffers are not touched
            assert torch.equal(v, own[k]), k
        return steps, substituted

    ours, ref = _pair(case)
    (got, got_bufs), (exp, exp_bufs) = run(ours), run(ref)
    _compare(got, exp)
    assert got_bufs.keys() == exp_bufs.keys()
    _compare([list(got_bufs.values())], [list(exp_bufs.values())])
    if case.name != "FrozenBatchNorm2d":  # the frozen layer never updates
        assert int(got_bufs["num_batches_tracked"]) == 3 + sum(SCHEDULE), "the substituted counter"


# --- autocast (bfloat16 on CPU) around a conv + BN model ----------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=ids)
def test_autocast_bfloat16_conv_bn(case):
    ours, ref = _pair(case)
    shape = (case.shape[0], IN) + case.shape[2:]

    def call(m, x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return m(x)

    got = _run(_with_conv(ours, case.shape), shape, call)
    exp = _run(_with_conv(ref, case.shape), shape, call)
    assert got[0][0].dtype == exp[0][0].dtype  # the output's dtype is torch's choice under autocast
    _compare(got, exp)


# --- copies: deepcopy, pickle, torch.save / torch.load ------------------------------------------------


def _torch_save_load(m, **kw):
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    return torch.load(buf, **kw)


COPIES = {
    "deepcopy": copy.deepcopy,
    "pickle": lambda m: pickle.loads(pickle.dumps(m)),
    "torch_save_whole_model": lambda m: _torch_save_load(m, weights_only=False),
}


@pytest.mark.parametrize("how", list(COPIES))
@pytest.mark.parametrize("case", CASES, ids=ids)
def test_copies_of_a_whole_model_are_independent_and_behave_the_same(case, how):
    ours, ref = _pair(case)
    model = _with_conv(ours, case.shape)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    dup = COPIES[how](model)
    assert type(dup[1]) is type(ours) and dup[1].__dict__.keys() == ours.__dict__.keys()
    assert all(dup[1].training == ours.training for _ in (0,)) and dup[1] is not ours
    shape = (case.shape[0], IN) + case.shape[2:]
    got = _run(dup, shape)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()), "the copy shares state"
    _compare(got, _run(COPIES[how](_with_conv(ref, case.shape)), shape))


@pytest.mark.parametrize("case", CASES, ids=ids)
def test_state_dict_through_torch_load_weights_only(case):
    ours, ref = _pair(case)
    buf = io.BytesIO()
    torch.save(ours.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    fresh, fresh_ref = case.ours(), case.ref()
    fresh.load_state_dict(state, strict=True)
    fresh_ref.load_state_dict(state, strict=True)
    assert all(torch.equal(v, ours.state_dict()[k]) for k, v in fresh.state_dict().items())
    _compare(_run(fresh, case.shape), _run(fresh_ref, case.shape))


# --- .to(memory_format=...), .double(), .bfloat16() ---------------------------------------------------


def _channels_last(shape):
    return {4: torch.channels_last, 5: torch.channels_last_3d}.get(len(shape))


CONVERSIONS = {
    "channels_last": (lambda m, shape: m.to(memory_format=_channels_last(shape)), torch.float32),
    "double": (lambda m, shape: m.double(), torch.float64),
    "bfloat16": (lambda m, shape: m.bfloat16(), torch.bfloat16),
}


@pytest.mark.parametrize("how", list(CONVERSIONS))
@pytest.mark.parametrize("case", CASES, ids=ids)
def test_module_conversions(case, how):
    fmt = _channels_last(case.shape) if how == "channels_last" else None
    if how == "channels_last" and fmt is None:
        pytest.skip(f"{case.name}: {len(case.shape)}D input has no channels_last memory format")
    convert, dtype = CONVERSIONS[how]
    ours, ref = _pair(case)
    shape = (case.shape[0], IN) + case.shape[2:]
    model, model_ref = convert(_with_conv(ours, case.shape), case.shape), convert(_with_conv(ref, case.shape), case.shape)
    assert [b.dtype for b in model.buffers()] == [b.dtype for b in model_ref.buffers()]
    exact = copy.deepcopy(model_ref).double()  # float64 run on the same (rounded) values, for bfloat16
    got, exp = _run(model, shape, dtype=dtype, fmt=fmt), _run(model_ref, shape, dtype=dtype, fmt=fmt)
    if fmt is not None:
        assert got[0][-1] == [True], "the output lost the input's channels_last format"
    if dtype != torch.bfloat16:
        _compare(got, exp)
        return
    # bfloat16: both sides round differently, and gradients summed over a batch amplify single-ulp
    # differences; so each side is measured against float64 instead, and covshift's error must stay
    # within twice torch's (plus half an ulp of the tensor's scale).
    truth = _run(exact, shape, dtype=torch.float64, fmt=fmt, rounded_to=torch.bfloat16)
    for step, (g_step, e_step, t_step) in enumerate(zip(got, exp, truth)):
        for i, (a, b, t) in enumerate(zip(g_step, e_step, t_step)):
            if not isinstance(a, torch.Tensor):
                assert a == b
                continue
            assert a.dtype == b.dtype and a.shape == b.shape, f"step {step} item {i}: {a.dtype} {b.dtype}"
            if not a.is_floating_point():
                assert torch.equal(a, b), f"step {step} item {i}"
                continue
            ours, theirs = (a.double() - t).abs().max().item(), (b.double() - t).abs().max().item()
            floor = 2.0**-9 * t.abs().max().item()
            assert ours <= 2 * theirs + floor, f"step {step} item {i}: error {ours:.3g}, torch's {theirs:.3g}"


# --- DDP on gloo, eager and under torch.compile -------------------------------------------------------

WORLD = 2
DDP_STEPS = 3


def _ddp_model(bn_cls) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(IN, C, 3, padding=1), bn_cls(C), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(C * 16, 2)
    )


def _ddp_train(model: torch.nn.Module, rank: int) -> dict:
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    for step in range(DDP_STEPS):
        g = torch.Generator().manual_seed(10 * step + rank)  # each rank its own shard
        x, target = torch.randn(4, IN, 4, 4, generator=g) * (1 + rank), torch.randn(4, 2, generator=g)
        loss = F.mse_loss(ddp(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _ddp_worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    results = {}
    try:
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60)
        )
        results["torch"] = _ddp_train(_ddp_model(torch.nn.BatchNorm2d), rank)
        results["eager"] = _ddp_train(_ddp_model(cnn.BatchNorm2d), rank)
        results["eager_graphs"] = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        results["compiled"] = _ddp_train(torch.compile(_ddp_model(cnn.BatchNorm2d)), rank)
        results["compiled_graphs"] = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:  # report, do not hang the parent
        results["error"] = traceback.format_exc()
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")


def _spawn_ddp(tmp_path: Path, timeout_s: float) -> list:
    return gloo.spawn(_ddp_worker, tmp_path, WORLD, timeout_s)


def _check_ddp(results: list, key: str) -> None:
    for r, res in enumerate(results):
        theirs = res["torch"]
        ours = {k.removeprefix("_orig_mod."): v for k, v in res[key].items()}
        assert ours.keys() == theirs.keys()
        for k in theirs:
            torch.testing.assert_close(ours[k], theirs[k], atol=2e-5, rtol=2e-5, msg=lambda m: f"{key} rank {r} {k}: {m}")
    # DDP keeps the replicas equal: parameters by averaged gradients, buffers broadcast from rank 0.
    for k, v in results[0][key].items():
        if not k.endswith(("running_mean", "running_var", "num_batches_tracked")):
            torch.testing.assert_close(results[1][key][k], v, atol=1e-6, rtol=1e-6)


@pytest.mark.slow
def test_ddp_gloo_eager_and_compiled_match_torchs_batchnorm(tmp_path):
    # One spawn for both (starting two processes costs more than the eager steps); one compile per rank.
    results = _spawn_ddp(tmp_path, timeout_s=400)
    before = _ddp_model(torch.nn.BatchNorm2d).state_dict()
    assert not torch.equal(results[0]["torch"]["0.weight"], before["0.weight"]), "training did not move the weights"
    _check_ddp(results, "eager")
    assert all(r["eager_graphs"] == 0 for r in results)
    _check_ddp(results, "compiled")
    assert all(r["compiled_graphs"] > 0 for r in results), "torch.compile compiled no graph"


# --- torch.fx.symbolic_trace: every variant is a leaf module, as torch's layers are -----------------


@pytest.mark.parametrize("case", CASES, ids=ids)
def test_fx_symbolic_trace_calls_the_layer_and_matches_eager(case):
    ours, _ = _pair(case)
    model = _with_conv(ours, case.shape)
    eager = copy.deepcopy(model)
    traced = torch.fx.symbolic_trace(model)
    assert [n.target for n in traced.graph.nodes if n.op == "call_module"] == ["0", "1"]
    shape = (case.shape[0], IN) + case.shape[2:]
    _compare(_run(traced, shape), _run(eager, shape))


# --- torch.compile(fullgraph=True) of each variant: no graph break, eager's numbers -------------------

COMPILED = {
    "BatchRenorm2d_scheduled": lambda: cnn.BatchRenorm2d(C, r_max=2.0, d_max=0.5, warmup_steps=1, r_relax_steps=2, d_relax_steps=2),
    "BatchRenorm2d_momentum_none": lambda: cnn.BatchRenorm2d(C, momentum=None),
    "GhostBatchNorm2d": lambda: cnn.GhostBatchNorm2d(C, virtual_batch_size=2),
    "FrozenBatchNorm2d": lambda: cnn.FrozenBatchNorm2d(C),
    "SyncBatchNorm": lambda: cnn.SyncBatchNorm(C),
}


@pytest.mark.parametrize("name", list(COMPILED))
def test_compile_fullgraph_matches_eager(name):
    # aot_eager_decomp_partition: Dynamo's capture, AOTAutograd's joint graph and Inductor's min-cut
    # partitioner (where graph breaks and wrong gradients come from: it once recomputed BatchRenorm's d
    # in the backward from the already-updated running_mean), without Inductor's slow code generation.
    layer = COMPILED[name]()
    _set_state(layer)
    eager = copy.deepcopy(layer)
    layer(torch.randn(5, C, 3, 4))  # load covshift's kernel eagerly first (see the report of issue 9)
    layer.load_state_dict(eager.state_dict())
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager_decomp_partition")
    shape = (5, C, 3, 4)
    _compare(_run(compiled, shape), _run(eager, shape))
