r"""Gradient-based internal covariate shift (Santurkar et al. 2018, Definition 2.1).

For a step :math:`t` with batch :math:`(x_t, y_t)`, weights :math:`W_1^t, \dots, W_k^t` and layer
:math:`i`:

.. math::

    G = \nabla_{W_i} L(W_1^t, \dots, W_k^t;\ x_t, y_t), \qquad
    G' = \nabla_{W_i} L(W_1^{t+1}, \dots, W_{i-1}^{t+1}, W_i^t, \dots, W_k^t;\ x_t, y_t)

and the shift is reported as :math:`\|G - G'\|_2` and :math:`\cos(G, G') = \langle G, G'\rangle /
(\|G\|\,\|G'\|)` (ideal: 0 and 1). :math:`W^{t+1}` is what *this step's* update would give: the
user's optimizer (momentum, Adam moments, weight decay, current learning rate) applied to the
gradient of the same loss on the same batch.

What a "layer" is. Layer :math:`i` is a module that owns parameters directly
(``module.parameters(recurse=False)``: a ``Linear``'s weight and bias, a ``BatchNorm``'s
:math:`\gamma, \beta`), and :math:`W_i` is all of them, flattened and concatenated. A parameter
shared by several modules belongs to the first one in ``named_modules()`` order. "Before
:math:`i`" is the order in which those modules are first *called* in the forward
(:func:`forward_order`), unless ``order=`` gives another.

Training is left exactly as it would have been: the measurement works on clones (parameters,
buffers such as BatchNorm's running statistics, the optimizer's state loaded into a fresh
optimizer), never touches ``.grad``, runs with every :class:`~covshift.monitor.ActivationMonitor`
suspended, and resets the RNG before each of its forwards and afterwards, so its dropout masks are
the ones the real step will draw and the real step draws them again. Call it *before* the training
step on the same batch.
"""

from __future__ import annotations

import copy
import inspect
import math
from typing import Any, Callable, NamedTuple, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call

from covshift.monitor.hooks import _cuda_devices, eager, suspend_monitors
from covshift.monitor.config import LayerSpec
from covshift.monitor.selection import select_modules

__all__ = ["GradientICS", "gradient_ics", "forward_order", "owned_parameters"]


class GradientICS(NamedTuple):
    """One layer's gradient ICS: ``l2_diff`` = :math:`\\|G - G'\\|_2`, ``cosine`` = :math:`\\cos(G, G')`."""

    l2_diff: float
    cosine: float


def owned_parameters(model: nn.Module) -> dict[str, list[str]]:
    """``{module name: [names of the parameters it owns directly]}``, in ``named_modules`` order.

    Names are those of ``model.named_parameters()``; a shared parameter is listed once, under its
    first owner.
    """
    seen: set[int] = set()
    owners: dict[str, list[str]] = {}
    for mname, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            owners.setdefault(mname, []).append(f"{mname}.{pname}" if mname else pname)
    return owners


def _as_args(inputs: Any) -> tuple:
    return tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)


class _Rng:
    """Snapshot of the CPU and CUDA generators, to replay the same random draws."""

    def __init__(self, cuda: list[int]) -> None:
        self.cuda = cuda
        self.cpu = torch.get_rng_state()
        self.gpu = [torch.cuda.get_rng_state(d) for d in cuda]

    def reset(self) -> None:
        torch.set_rng_state(self.cpu)
        for d, s in zip(self.cuda, self.gpu):
            torch.cuda.set_rng_state(s, d)


def _run(model: nn.Module, params: dict[str, Tensor], args: tuple, rng: _Rng) -> Any:
    # Fresh clones of the buffers every time: a training-mode BatchNorm updates them in place.
    state = {n: b.detach().clone() for n, b in model.named_buffers()}
    state.update(params)
    rng.reset()
    return functional_call(model, state, args)


def _trace_order(model: nn.Module, owners: dict[str, list[str]], run: Callable[[], Any]) -> tuple[list[str], Any]:
    modules = dict(model.named_modules())
    order: list[str] = []

    def hook(name: str) -> Callable:
        def record(module: nn.Module, args: tuple) -> None:
            if name not in order:
                order.append(name)

        return record

    handles = [modules[n].register_forward_pre_hook(hook(n)) for n in owners]
    try:
        out = run()
    finally:
        for h in handles:
            h.remove()
    return order, out


def forward_order(model: nn.Module, inputs: Any) -> list[str]:
    """Names of the parameter-owning modules in the order the forward first calls them.

    Runs one forward on ``inputs`` (a tensor, or a tuple of positional arguments) without
    changing the model, its buffers or the RNG. Edit the list and pass it as ``order=`` to
    :func:`gradient_ics` to define "before" differently.
    """
    owners = owned_parameters(model)
    with torch.no_grad(), suspend_monitors(), torch.random.fork_rng(devices=_cuda_devices(model)):
        rng = _Rng(_cuda_devices(model))
        order, _ = _trace_order(model, owners, lambda: _run(model, {}, _as_args(inputs), rng))
    return order


def _check_optimizer(optimizer: Any) -> None:
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"optimizer: expected a torch.optim.Optimizer, got {type(optimizer).__name__}. Pass the "
            "optimizer the training loop steps (unwrap framework wrappers, e.g. Lightning's "
            "LightningOptimizer.optimizer)."
        )
    if isinstance(optimizer, torch.optim.LBFGS):
        raise ValueError(
            "optimizer: expected an optimizer whose step is one update from the current gradient, got "
            "LBFGS, whose step re-evaluates the loss through a closure up to max_iter times (a line "
            "search). Definition 2.1 needs W^{t+1} from a single update; measure gradient ICS with the "
            "first-order optimizer you compare against (e.g. SGD with LBFGS's lr)."
        )


def _copy_optimizer(optimizer: torch.optim.Optimizer, clone_of: dict[int, Tensor]) -> torch.optim.Optimizer:
    """A twin of ``optimizer`` on the clones: built from its ``param_groups``, loaded with its
    ``state_dict`` (momenta, Adam moments, step counts, the groups' current hyperparameters).

    Not from ``optimizer.defaults``: they may hold keys the constructor rejects (AdamW's
    ``decoupled_weight_decay``), and miss what a scheduler or the user changed since. Constructor
    keywords are taken from the first group, filtered by the constructor's signature, so that
    constructor-level flags (``fused``, ``foreach``, ``capturable``) match the original.
    """
    _check_optimizer(optimizer)
    groups = []
    for g in optimizer.param_groups:
        g2 = {k: v for k, v in g.items() if k != "params"}
        g2["params"] = [clone_of[id(p)] for p in g["params"]]
        groups.append(g2)
    cls = type(optimizer)
    try:
        sig = inspect.signature(cls.__init__).parameters
    except (TypeError, ValueError):  # a C-implemented or exotic constructor: groups carry everything
        sig = {}
    named = [
        k for k, v in sig.items()
        if k not in ("self", "params") and v.kind in (v.POSITIONAL_OR_KEYWORD, v.KEYWORD_ONLY)
    ]
    kwargs = {k: groups[0][k] for k in named if groups and k in groups[0]}
    try:
        twin = cls(groups, **kwargs)
    except (TypeError, ValueError) as e:
        raise TypeError(
            f"optimizer: expected a torch.optim-style optimizer that can be rebuilt as "
            f"{cls.__name__}(param_groups, **hyperparameters of its first group), got an error from "
            f"{cls.__name__}'s constructor ({e}). gradient_ics steps such a copy on clones of the "
            "parameters; pass an optimizer whose constructor accepts its own param_groups."
        ) from e
    # deepcopy: load_state_dict keeps the saved tensors when dtype and device already match, and
    # the twin's step would then update the real optimizer's moments in place.
    twin.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    return twin


def _flat(grads: Sequence[Optional[Tensor]], like: Sequence[Tensor]) -> Tensor:
    dtype = torch.float32 if like[0].device.type == "mps" else torch.float64
    return torch.cat(
        [(torch.zeros_like(p) if g is None else g).reshape(-1).to(dtype) for g, p in zip(grads, like)]
    )


def gradient_ics(
    model: nn.Module,
    loss_fn: Callable[[Any, Any], Tensor],
    inputs: Any,
    targets: Any,
    optimizer: torch.optim.Optimizer,
    layers: LayerSpec = None,
    order: Optional[Sequence[str]] = None,
    *,
    before_step: Optional[Callable[[list[Tensor]], None]] = None,
) -> dict[str, GradientICS]:
    """Gradient ICS of each chosen layer at the current step, leaving training untouched.

    Args:
        model: the model, in the mode the training step uses.
        loss_fn: ``loss_fn(model(*inputs), targets) -> scalar``, the training loss.
        inputs: the step's input batch: a tensor, or a tuple of positional arguments.
        targets: passed to ``loss_fn`` as is.
        optimizer: the training optimizer: any ``torch.optim`` optimizer whose ``step()`` needs no
            closure (SGD with or without momentum, Nesterov and weight decay, Adam, AdamW, RAdam,
            NAdam, Adagrad, Adadelta, Adamax, RMSprop, ASGD, Rprop; not LBFGS, which raises), or
            one built the same way. It is copied (from its ``param_groups`` and ``state_dict``),
            never stepped; hooks registered on it (``register_step_post_hook``, e.g. by
            ``ActivationMonitor(optimizer=)``) do not run, global ones
            (``torch.optim.optimizer.register_optimizer_step_post_hook``) see the copy's step.
        layers: which layers to report (names, globs, types, as in :class:`MonitorConfig`);
            default every parameter-owning module.
        order: names of the parameter-owning modules in the order that defines "before"; default
            :func:`forward_order`. It must list every module that receives a gradient.
        before_step: called with the copied parameters (their ``.grad`` set) before the copied
            optimizer steps: put here whatever the loop does between ``backward`` and ``step``,
            e.g. ``lambda ps: torch.nn.utils.clip_grad_norm_(ps, 1.0)``.

    Returns:
        ``{layer name: GradientICS(l2_diff, cosine)}`` in forward order. For the first layer no
        other layer precedes it, so :math:`G' = G` exactly: ``(0.0, 1.0)``. A layer with no
        gradient gets ``(nan, nan)``, as does the cosine when :math:`G` or :math:`G'` is zero.

    Raises:
        ValueError: LBFGS (its step is a line search, not one update), or ``order`` missing a
            module that gets a gradient.
        TypeError: an optimizer that cannot be rebuilt from its ``param_groups``.

    Cost: one forward and backward for :math:`G`, one copy of the optimizer state and one
    optimizer step on clones, and one forward and backward (down to layer :math:`i` only) per
    reported layer after the first: for ``L`` layers about ``L + 1`` training steps' worth of
    compute, so call it every few hundred steps, or pass ``layers=`` to measure a few.
    """
    _check_optimizer(optimizer)
    owners = owned_parameters(model)
    chosen = select_modules(model, layers, candidates=owners, default=lambda n, m: True)
    params = dict(model.named_parameters())
    trainable = [n for n, p in params.items() if p.requires_grad]
    args = _as_args(inputs)
    cuda = _cuda_devices(model)

    with suspend_monitors(), eager(model), torch.random.fork_rng(devices=cuda):
        rng = _Rng(cuda)
        # G for every parameter at W^t, and the forward order
        seen, out = _trace_order(model, owners, lambda: _run(model, {}, args, rng))
        grads = torch.autograd.grad(loss_fn(out, targets), [params[n] for n in trainable], allow_unused=True)
        G = dict(zip(trainable, grads))

        if order is None:
            order = seen
        else:
            order = list(order)
            unknown = [n for n in order if n not in owners]
            missing = [m for m in seen if m not in order and any(G.get(n) is not None for n in owners[m])]
            if unknown or missing:
                raise ValueError(
                    f"order: expected every parameter-owning module that gets a gradient, once, got "
                    f"unknown {unknown} and missing {missing}. Start from forward_order(model, inputs)."
                )
        pos = {m: i for i, m in enumerate(order)}

        # W^{t+1}: this step's update, taken by a twin optimizer on clones of the parameters
        clones = {n: p.detach().clone() for n, p in params.items()}
        clone_of = {id(p): clones[n] for n, p in params.items()}
        for g in optimizer.param_groups:
            for p in g["params"]:
                clone_of.setdefault(id(p), p.detach().clone())  # optimized but not in this model
        twin = _copy_optimizer(optimizer, clone_of)
        for n in trainable:
            clones[n].grad = None if G[n] is None else G[n].detach().clone()
        if before_step is not None:
            before_step([clones[n] for n in trainable])
        twin.step()

        results: dict[str, GradientICS] = {}
        for layer in sorted(chosen, key=lambda m: pos.get(m, math.inf)):
            names = [n for n in owners.get(layer, ()) if n in G]
            g = [G[n] for n in names]
            if layer not in pos or not names or all(x is None for x in g):
                results[layer] = GradientICS(math.nan, math.nan)
                continue
            earlier = [n for m in order if pos[m] < pos[layer] for n in owners[m]]
            if not earlier:  # nothing precedes layer i: G' is G by definition
                results[layer] = GradientICS(0.0, 1.0)
                continue
            out = _run(model, {n: clones[n] for n in earlier}, args, rng)
            g_after = torch.autograd.grad(
                loss_fn(out, targets), [params[n] for n in names], allow_unused=True
            )
            a, b = _flat(g, [params[n] for n in names]), _flat(g_after, [params[n] for n in names])
            l2 = float(torch.linalg.vector_norm(a - b))
            na, nb = float(torch.linalg.vector_norm(a)), float(torch.linalg.vector_norm(b))
            cos = float(torch.dot(a, b)) / (na * nb) if na > 0 and nb > 0 else math.nan
            results[layer] = GradientICS(l2, cos)
    return results
