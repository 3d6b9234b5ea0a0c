"""covshift's BatchNorm1d/2d/3d on PyTorch's own test material: the ModuleInfo entries of
``torch.testing._internal.common_modules.module_db`` (the samples torch's ``test_modules.py`` runs
on its own layers: affine or not, tracking or not, ``momentum=None``, ``bias=False``, 3-D input,
an empty batch).

For every sample, in training and in eval, float32 and float64, a covshift layer and torch's layer
built from the same constructor arguments and holding the same (randomized) state run the same
two steps; outputs (values and strides), input and parameter gradients and every buffer must agree.
And the samples of the ``nn.functional.batch_norm`` OpInfo (``op_db``) through
``covshift.functional.batch_norm``. The same again with the input non-contiguous (torch's ``noncontiguous_like``) and, for 4-D and 5-D
samples, channels_last; and ``gradcheck``/``gradgradcheck`` in float64 through ``functional_call``,
as torch's ``test_grad``/``test_gradgrad`` do (their fast mode: random projections of the Jacobian).
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch.func import functional_call

import covshift.nn as cnn

common_modules = pytest.importorskip(
    "torch.testing._internal.common_modules", reason="torch's test helpers need expecttest (in the dev extra)"
)
from torch.testing._internal.common_utils import noncontiguous_like  # noqa: E402

_NAMES = ("nn.BatchNorm1d", "nn.BatchNorm2d", "nn.BatchNorm3d")
_INFOS = [m for m in common_modules.module_db if m.name in _NAMES]


def _samples(dtype: torch.dtype, training: bool):
    out = []
    for info in _INFOS:
        for i, s in enumerate(info.module_inputs_func(info, device="cpu", dtype=dtype, requires_grad=True, training=training)):
            out.append(pytest.param(info, s, id=f"{info.name[3:]}-{s.desc or i}"))
    return out


def test_torch_still_has_the_samples():
    """The parametrizations below are not silently empty (a torch upgrade renaming its entries)."""
    assert sorted(m.name for m in _INFOS) == sorted(_NAMES)
    assert len(_samples(torch.float32, True)) >= 15


def _pair(info, sample, dtype, training, seed=0):
    a, k = sample.constructor_input.args, sample.constructor_input.kwargs
    ref = info.module_cls(*a, **k).to(dtype)
    ours = getattr(cnn, info.name[3:])(*a, **k).to(dtype)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.rand(p.shape, generator=g, dtype=dtype) + 0.5)
        if ref.running_mean is not None:
            ref.running_mean.copy_(torch.rand(ref.running_mean.shape, generator=g, dtype=dtype) * 2 - 1)
            ref.running_var.copy_(torch.rand(ref.running_var.shape, generator=g, dtype=dtype) + 0.5)
    ours.load_state_dict(ref.state_dict())
    ref.train(training), ours.train(training)
    return ref, ours


def _tol(dtype):
    return dict(atol=2e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=1e-10, rtol=1e-9)


def _compare(info, sample, dtype, training, layout=None):
    ref, ours = _pair(info, sample, dtype, training)
    x0 = sample.forward_input.args[0].detach()
    if layout == "noncontiguous":
        x0 = noncontiguous_like(x0)
    elif layout == "channels_last":
        x0 = x0.contiguous(memory_format=torch.channels_last if x0.dim() == 4 else torch.channels_last_3d)
    tol = _tol(dtype)
    for step in range(2):  # the second step sees the running statistics the first one left
        x1, x2 = x0.clone().requires_grad_(), x0.clone().requires_grad_()
        y1, y2 = ref(x1), ours(x2)
        torch.testing.assert_close(y2, y1, **tol)
        assert y2.stride() == y1.stride(), f"step {step}: output strides {y2.stride()}, torch's {y1.stride()}"
        g = torch.randn(y1.shape, dtype=dtype, generator=torch.Generator().manual_seed(step))
        y1.backward(g), y2.backward(g)
        torch.testing.assert_close(x2.grad, x1.grad, **tol)
        for (name, p1), p2 in zip(ref.named_parameters(), ours.parameters()):
            torch.testing.assert_close(p2.grad, p1.grad, **tol, msg=lambda m: f"{name}.grad: {m}")
        for (name, b1), b2 in zip(ref.named_buffers(), ours.buffers()):
            torch.testing.assert_close(b2, b1, **tol, msg=lambda m: f"buffer {name}: {m}")
    assert set(ours.state_dict()) == set(ref.state_dict())
    assert repr(ours).partition("(")[2] == repr(ref).partition("(")[2]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_every_sample_matches_torch(dtype, training):
    for p in _samples(dtype, training):
        info, sample = p.values
        _compare(info, sample, dtype, training)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", ["noncontiguous", "channels_last"])
def test_every_sample_in_another_layout_matches_torch(layout, training):
    ran = 0
    for p in _samples(torch.float32, training):
        info, sample = p.values
        if layout == "channels_last" and sample.forward_input.args[0].dim() not in (4, 5):
            continue
        _compare(info, sample, torch.float32, training, layout)
        ran += 1
    assert ran > 0


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradcheck_and_gradgradcheck_on_every_sample(training):
    for p in _samples(torch.float64, training):
        info, sample = p.values
        _, ours = _pair(info, sample, torch.float64, training)
        x = sample.forward_input.args[0].detach().requires_grad_()
        if x.numel() == 0:
            continue
        names = [n for n, _ in ours.named_parameters()]
        params = tuple(q.detach().requires_grad_() for q in ours.parameters())
        buffers = {n: b for n, b in ours.named_buffers()}

        def f(x, *ps):
            # fresh buffers each call: gradcheck evaluates f many times, and training mutates them
            state = {**{n: b.clone() for n, b in buffers.items()}, **dict(zip(names, ps))}
            return functional_call(ours, state, (x,))

        assert torch.autograd.gradcheck(f, (x, *params), fast_mode=True), p.id
        assert torch.autograd.gradgradcheck(f, (x, *params), fast_mode=True), p.id


def test_a_sampled_layer_copies_pickles_and_reloads():
    info, sample = _samples(torch.float32, True)[0].values
    _, ours = _pair(info, sample, torch.float32, True)
    buf = io.BytesIO()
    torch.save(ours, buf)
    buf.seek(0)
    for other in (copy.deepcopy(ours), torch.load(buf, weights_only=False)):
        assert type(other) is type(ours)
        for k, v in ours.state_dict().items():
            torch.testing.assert_close(other.state_dict()[k], v)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_functional_batch_norm_on_torchs_opinfo_samples(dtype):
    """``covshift.functional.batch_norm`` on the samples of torch's ``nn.functional.batch_norm``
    OpInfo (``op_db``): the same output, the same running statistics after the call, the same
    gradients, and no warning."""
    import warnings

    from torch.testing._internal.common_methods_invocations import op_db

    import covshift.functional as cf

    infos = [o for o in op_db if o.name == "nn.functional.batch_norm"]
    assert infos
    tol = _tol(dtype)
    ran = 0
    for info in infos:
        for s in info.sample_inputs("cpu", dtype, requires_grad=True):

            def clone(t):
                return t.detach().clone().requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor) else t

            ref_in = [clone(s.input), *map(clone, s.args)], {k: clone(v) for k, v in s.kwargs.items()}
            our_in = [clone(s.input), *map(clone, s.args)], {k: clone(v) for k, v in s.kwargs.items()}
            y1 = info.op(*ref_in[0], **ref_in[1])
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                y2 = cf.batch_norm(*our_in[0], **our_in[1])
            torch.testing.assert_close(y2, y1, **tol)
            flat1 = [*ref_in[0], *ref_in[1].values()]
            flat2 = [*our_in[0], *our_in[1].values()]
            for a, b in zip(flat1, flat2):  # running statistics, updated in place
                if isinstance(a, torch.Tensor):
                    torch.testing.assert_close(b, a, **tol)
            if y1.requires_grad:
                g = torch.randn_like(y1)
                y1.backward(g), y2.backward(g)
                for a, b in zip(flat1, flat2):
                    if isinstance(a, torch.Tensor) and a.requires_grad:
                        torch.testing.assert_close(b.grad, a.grad, **tol)
            ran += 1
    assert ran >= 10
