"""torch.func transforms and forward-mode AD: covshift's batch norm against torch's, on both paths.

Under a transform (``vmap``, ``grad``, ``jacrev``, ``jacfwd``, ``hessian``, ``jvp``) or forward-mode AD,
``covshift.functional.batch_norm`` runs its reference ``autograd.Function`` (analytic backward, ``jvp``
rule, generated vmap rule), whichever backend is chosen; these tests run each case with the backend set
to "auto" (the kernel for float32 outside transforms) and "reference", in float32 and float64, and
compare with the same transform of ``torch.nn.functional.batch_norm``. Finite differences check the
tangents independently (gradcheck with ``check_forward_ad``).
"""

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch.func import functional_call, grad, hessian, jacfwd, jacrev, jvp, vmap

import covshift.nn as cnn
from covshift.functional import batch_norm, use_backend

TOL = {torch.float32: dict(atol=2e-4, rtol=2e-4), torch.float64: dict(atol=1e-9, rtol=1e-9)}


def _data(dtype, shape=(5, 3, 4)):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g, dtype=dtype) * 1.5 + 0.5
    w = torch.rand(shape[1], generator=g, dtype=dtype) + 0.5
    b = torch.randn(shape[1], generator=g, dtype=dtype)
    rm = torch.randn(shape[1], generator=g, dtype=dtype)
    rv = torch.rand(shape[1], generator=g, dtype=dtype) + 0.5
    return x, w, b, rm, rv


def _fn(impl, training, rm, rv):
    return lambda x, w, b: impl(x, None if training else rm, None if training else rv, w, b, training)


TRANSFORMS = {
    "vmap": lambda f, x, w, b: vmap(f, in_dims=(0, None, 0))(torch.stack([x, 2 * x - 1]), w, torch.stack([b, -b])),
    "grad": lambda f, x, w, b: grad(lambda *a: (f(*a) ** 2 * torch.arange(a[0].numel()).view_as(a[0])).sum(), argnums=(0, 1, 2))(x, w, b),
    "jacrev": lambda f, x, w, b: jacrev(f, argnums=(0, 1, 2))(x, w, b),
    "jacfwd": lambda f, x, w, b: jacfwd(f, argnums=(0, 1, 2))(x, w, b),
    "hessian": lambda f, x, w, b: hessian(lambda x: (f(x, w, b) ** 3).sum())(x),
    "jvp": lambda f, x, w, b: jvp(f, (x, w, b), (torch.cos(x), torch.sin(w), b.flip(0))),
    "vmap(grad)": lambda f, x, w, b: vmap(grad(lambda x: (f(x, w, b) ** 3).sum()))(torch.stack([x, x.flip(0)])),
}


@pytest.mark.parametrize("name", list(TRANSFORMS))
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_transform_matches_torch(name, training, dtype, backend):
    x, w, b, rm, rv = _data(dtype)
    transform = TRANSFORMS[name]
    with use_backend(backend):
        ours = transform(_fn(batch_norm, training, rm, rv), x, w, b)
    ref = transform(_fn(F.batch_norm, training, rm, rv), x, w, b)
    ours, ref = torch.utils._pytree.tree_leaves(ours), torch.utils._pytree.tree_leaves(ref)
    assert len(ours) == len(ref) > 0
    for a, r in zip(ours, ref):
        torch.testing.assert_close(a, r, **TOL[dtype])


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("backend", ["auto", "fast", "reference"])
def test_forward_ad_tangent_matches_torch(training, dtype, backend):
    """The float32 kernel used to return no tangent at all: every path must give the right one."""
    x, w, b, rm, rv = _data(dtype)
    tx, tw, tb = torch.cos(x), torch.sin(w), b.flip(0)
    out = {}
    for key, impl in (("ours", batch_norm), ("torch", F.batch_norm)):
        with use_backend(backend), fwAD.dual_level():
            duals = [fwAD.make_dual(p, t) for p, t in ((x, tx), (w, tw), (b, tb))]
            y = _fn(impl, training, rm, rv)(*duals)
            out[key] = fwAD.unpack_dual(y).tangent
    assert out["ours"] is not None, "no tangent: a silently wrong derivative"
    torch.testing.assert_close(out["ours"], out["torch"], **TOL[dtype])


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("backend", ["fast", "reference"])
def test_gradcheck_batched_and_forward_ad_float64(training, backend):
    x, w, b, rm, rv = _data(torch.float64, (4, 3, 3))
    args = tuple(t.clone().requires_grad_() for t in (x, w, b))

    def fn(x, w, b):
        with use_backend(backend):
            return batch_norm(x, None if training else rm, None if training else rv, w, b, training)

    assert torch.autograd.gradcheck(
        fn, args, check_batched_grad=True, check_forward_ad=True, check_batched_forward_grad=True
    )
    assert torch.autograd.gradgradcheck(fn, args, check_batched_grad=True, check_fwd_over_rev=True)


def test_the_module_under_functional_call_vmap_ensembles_like_torch():
    """Model ensembling (functorch's recipe): stacked parameters, vmapped functional_call, in eval."""
    models = {"ours": cnn.BatchNorm1d(3), "torch": torch.nn.BatchNorm1d(3)}
    g = torch.Generator().manual_seed(1)
    state = {k: torch.randn(2, 3, generator=g) for k in ("weight", "bias", "running_mean")}
    state["running_var"] = torch.rand(2, 3, generator=g) + 0.5
    x = torch.randn(5, 3, generator=g)
    outs = {}
    for key, m in models.items():
        m.eval()
        outs[key] = vmap(lambda s: functional_call(m, s, (x,)))(state)
    torch.testing.assert_close(outs["ours"], outs["torch"])


def test_vmap_training_with_running_stats_fails_as_torchs_does():
    """torch's layer cannot write batched statistics into unbatched buffers under vmap; neither can ours."""
    x = torch.randn(2, 5, 3)
    for layer in (torch.nn.BatchNorm1d(3), cnn.BatchNorm1d(3)):
        with pytest.raises(RuntimeError):
            vmap(layer)(x)
    # Without running statistics it works, and agrees with torch.
    ours = vmap(cnn.BatchNorm1d(3, track_running_stats=False))(x)
    ref = vmap(torch.nn.BatchNorm1d(3, track_running_stats=False))(x)
    torch.testing.assert_close(ours, ref)
