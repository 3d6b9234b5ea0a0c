"""Graph capture: torch.compile, torch.export, ONNX (onnxruntime), TorchScript, FX, against torch's layer.

A small CNN with covshift's BatchNorm2d/1d and the same CNN with torch's layers, the same weights. Each
capture runs on both and is compared with eager: outputs, input and parameter gradients, buffers.
"""

import copy
import io

import pytest
import torch
import torch.nn.functional as F

import covshift.nn as cnn
from covshift.ops import batch_norm as op_lib


@pytest.fixture(scope="module", autouse=True)
def kernel():
    assert op_lib.load(), op_lib.error()


class Net(torch.nn.Module):
    def __init__(self, bn2d=torch.nn.BatchNorm2d, bn1d=torch.nn.BatchNorm1d, momentum=0.1):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = bn2d(8, momentum=momentum)
        self.fc = torch.nn.Linear(8 * 4 * 4, 16, bias=False)
        self.bn1 = bn1d(16, momentum=momentum)

    def forward(self, x):
        x = F.relu(self.bn(self.conv(x)))
        x = F.avg_pool2d(x, 2).flatten(1)
        return self.bn1(self.fc(x))


def _pair(momentum=0.1):
    torch.manual_seed(0)
    ref = Net(momentum=momentum)
    ours = Net(cnn.BatchNorm2d, cnn.BatchNorm1d, momentum=momentum)
    ours.load_state_dict(ref.state_dict())
    return ours, ref


def _x(n=6, seed=1):
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed)) * 2 + 0.5


def _step(model, x):
    """Output, input gradient, parameter gradients of one forward/backward (grads cleared first)."""
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    y = model(x)
    (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum().backward()
    return y.detach(), x.grad, [p.grad.clone() for p in model.parameters()]


def _assert_same(a, b, atol=2e-5, rtol=2e-5):
    for p, q in zip(torch.utils._pytree.tree_leaves(a), torch.utils._pytree.tree_leaves(b)):
        torch.testing.assert_close(p, q, atol=atol, rtol=rtol)


def _buffers(model):
    return {k: v.clone() for k, v in model.named_buffers()}


# --- torch.compile ----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_compile_fullgraph_runs_the_kernel_and_matches_eager():
    from torch._inductor.utils import run_and_get_code

    ours, ref = _pair()
    eager = copy.deepcopy(ours)
    compiled = torch.compile(ours, fullgraph=True)
    for step in range(2):
        x = _x(seed=step)
        result, code = run_and_get_code(lambda: _step(compiled, x))
        _assert_same(result, _step(eager, x))
        _assert_same(result, _step(ref, x))
        _assert_same(_buffers(ours), _buffers(eager))
        _assert_same(_buffers(ours), _buffers(ref))
    generated = "\n".join(code)
    assert "covshift.batch_norm.default" in generated  # the compiled forward calls the fused kernel
    assert "covshift.batch_norm_backward.default" in generated  # and the compiled backward its own
    assert "native_batch_norm" not in generated
    ours.eval(), eager.eval(), ref.eval()
    x = _x(seed=9)
    with torch.no_grad():
        _assert_same(compiled(x), eager(x))
        _assert_same(compiled(x), ref(x))


def _frames(model, batch_sizes, dynamic, fullgraph):
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, dynamic=dynamic, fullgraph=fullgraph)
    for n in batch_sizes:
        compiled(_x(n)).sum().backward()
    return counter.frame_count


@pytest.mark.parametrize("momentum", [0.1, None])
def test_compile_recompiles_no_more_than_torch_when_the_batch_size_changes(momentum):
    """momentum=None once broke the graph on float(num_batches_tracked) and recompiled per batch size.

    covshift's layer compiles with fullgraph=True in both cases; torch's cannot with momentum=None (its
    float(num_batches_tracked) is data-dependent), so it is counted without fullgraph."""
    sizes = [4, 6, 9, 5]
    ours, ref = _pair(momentum)
    for dynamic in (True, None):
        assert _frames(ours, sizes, dynamic, fullgraph=True) <= _frames(ref, sizes, dynamic, fullgraph=False)
    _assert_same(_buffers(ours), _buffers(ref), atol=1e-5, rtol=1e-4)


# --- torch.export -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])  # the kernel, and the reference path
@pytest.mark.parametrize("training", [True, False])
def test_export_runs_and_matches_eager_including_input_gradients(training, dtype):
    """Training export once gave input gradients off by 0.027: the statistics became constants."""
    ours, ref = _pair()
    for m in (ours, ref):
        m.train(training).to(dtype)
    x = _x().to(dtype)
    ep = torch.export.export(copy.deepcopy(ours).train(training), (x,))
    exported = ep.module()
    ops = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert not [o for o in ops if o.startswith("aten.") and "batch_norm" in o], ops
    if training and dtype == torch.float32:
        assert "covshift.batch_norm.default" in ops, ops
    eager = copy.deepcopy(ours)
    xin = x.clone().requires_grad_()
    y = exported(xin)
    (y * torch.linspace(-1, 1, y.numel(), dtype=dtype).view_as(y)).sum().backward()
    ye, gx, _ = _step(eager, x)
    _assert_same((y.detach(), xin.grad), (ye, gx))
    _assert_same((y.detach(), xin.grad), _step(ref, x)[:2])
    if training:  # the exported program updates its own buffers as eager does
        torch.testing.assert_close(exported.bn.running_mean, eager.bn.running_mean, atol=1e-6, rtol=1e-5)


# --- ONNX ---------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_onnx_export_of_an_eval_model_runs_in_onnxruntime():
    onnxruntime = pytest.importorskip("onnxruntime", reason="onnxruntime is in the dev extra")
    ours, ref = _pair()
    for m in (ours, ref):
        m(_x(8, seed=3))  # non-trivial running statistics
        m.eval()
    x = _x(seed=4)
    onnx_program = torch.onnx.export(ours, (x,), dynamo=True)
    buffer = io.BytesIO()
    onnx_program.save(buffer)
    session = onnxruntime.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(out), ours(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(torch.from_numpy(out), ref(x), atol=1e-5, rtol=1e-5)
    domains = {node.domain for node in onnx_program.model_proto.graph.node}
    assert domains <= {"", "ai.onnx"}, domains  # standard operators only: any runtime can load it


# --- TorchScript ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("training", [True, False])
def test_jit_trace_matches_eager_including_gradients(training):
    ours, ref = _pair()
    for m in (ours, ref):
        m.train(training)
    x = _x()
    traced = torch.jit.trace(copy.deepcopy(ours), (x,), check_trace=False)
    eager = copy.deepcopy(ours)
    result = _step(traced, _x(seed=2))
    _assert_same(result, _step(eager, _x(seed=2)))
    _assert_same(result[:2], _step(ref, _x(seed=2))[:2])


def test_jit_script_explains_the_fix_and_the_fix_works():
    ours, ref = _pair()
    with pytest.raises(RuntimeError, match=r"covshift\.nn\.convert\(model, to='torch'\)"):
        torch.jit.script(ours)
    scripted = torch.jit.script(cnn.convert(copy.deepcopy(ours), to="torch"))
    ours.eval(), ref.eval(), scripted.eval()
    x = _x()
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), ref(x))


# --- FX ---------------------------------------------------------------------------------------------------------
def test_fx_symbolic_trace_keeps_covshift_layers_as_leaves_with_their_modes():
    ours, ref = _pair()
    gm = torch.fx.symbolic_trace(ours)
    called = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    assert {"bn", "bn1"} <= called
    assert isinstance(gm.get_submodule("bn"), cnn.BatchNorm2d)
    eager = copy.deepcopy(ours)
    for training in (True, False, True):  # the mode is read at run time, not baked into the graph
        for m in (gm, eager, ref):
            m.train(training)
        traced = _step(gm, _x(seed=5))
        _assert_same(traced, _step(eager, _x(seed=5)))
        _assert_same(traced, _step(ref, _x(seed=5)))
    _assert_same(_buffers(gm), _buffers(ref))


def test_fx_based_tools_accept_a_converted_model():
    """torch.ao's prepare_fx traces with its own tracer; it must not fail on covshift's layers."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import prepare_fx

    ours, _ = _pair()
    ours.eval()
    prepared = prepare_fx(ours, get_default_qconfig_mapping("x86"), (_x(),))
    with torch.no_grad():
        torch.testing.assert_close(prepared(_x()), ours(_x()))


def test_a_model_compiled_before_any_eager_call_gets_the_kernel():
    """The first use in a process can be inside torch.compile's trace: the kernel loads and is traced."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(
        """
        import torch
        import covshift.nn as cnn
        from covshift.ops import batch_norm as op
        assert not op.loaded()
        graphs = []
        def backend(gm, example_inputs):
            graphs.append(gm)
            return gm
        m = torch.nn.Sequential(torch.nn.Linear(5, 4), cnn.BatchNorm1d(4))
        y = torch.compile(m, backend=backend, fullgraph=True)(torch.randn(8, 5))
        targets = {str(n.target) for g in graphs for n in g.graph.nodes}
        assert op.loaded() and "covshift.batch_norm.default" in targets, targets
        print("OK")
        """
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "OK" in run.stdout, run.stdout + run.stderr[-3000:]
