"""Small pieces the monitor's hooks share with the other instruments (gradient ICS, signal propagation).

* :func:`suspend_monitors`: forwards inside it are recorded by no monitor;
* :func:`_first_float_tensor`: what a hook measures in a module's arguments or output;
* :func:`_one_cpu_thread`, :func:`_cuda_devices`: the flush's thread setting, the RNG devices to fork;
* :func:`compiled`, :func:`compile_wrapper`, :func:`eager_hook`, :func:`eager`: hooks and extra
  forwards on a model that ``torch.compile`` runs.
"""

from __future__ import annotations

import contextlib
import contextvars
import sys
from typing import Any, Iterator, Mapping, Optional

import torch
from torch import Tensor, nn

__all__ = ["suspend_monitors", "suspended"]

_SUSPENDED: contextvars.ContextVar[int] = contextvars.ContextVar("covshift_monitor_suspended", default=0)


@contextlib.contextmanager
def suspend_monitors() -> Iterator[None]:
    """Forwards run inside this block are recorded by no :class:`ActivationMonitor`.

    :func:`covshift.monitor.gradient_ics` uses it for its extra forwards; use it for your own
    extra forwards (a validation pass in training mode, say) during an armed step.
    """
    token = _SUSPENDED.set(_SUSPENDED.get() + 1)
    try:
        yield
    finally:
        _SUSPENDED.reset(token)


def _first_float_tensor(obj: Any) -> Optional[Tensor]:
    """The first floating-point tensor in ``obj``, depth-first through tuples, lists and dicts."""
    if isinstance(obj, Tensor):
        return obj if obj.is_floating_point() else None
    if isinstance(obj, (tuple, list)):
        items = obj
    elif isinstance(obj, Mapping):
        items = obj.values()
    else:
        return None
    for item in items:
        t = _first_float_tensor(item)
        if t is not None:
            return t
    return None


@contextlib.contextmanager
def _one_cpu_thread() -> Iterator[None]:
    # The flush runs many small ops on (R, n) samples. Split over intra-op threads they gain
    # nothing, and on a busy machine each one waits for a descheduled worker (we measured the
    # MLP's every=1 overhead going from ~40% to ~460% with 2 threads under load). The setting
    # is OpenMP's per-calling-thread one; it is restored on exit.
    n = torch.get_num_threads()
    if n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _cuda_devices(model: nn.Module) -> list[int]:
    return sorted({t.device.index or 0 for t in model.parameters() if t.device.type == "cuda"})


def suspended() -> bool:
    """Whether the caller is inside :func:`suspend_monitors`."""
    return _SUSPENDED.get() != 0


def compiled(model: nn.Module) -> bool:
    """Whether ``torch.compile`` runs ``model`` or a module in it: an ``OptimizedModule`` (what
    ``torch.compile(module)`` returns), or a module compiled in place (``Module.compile()``)."""
    if "torch._dynamo" not in sys.modules:  # nothing can have been compiled in this process
        return False
    from torch._dynamo.eval_frame import OptimizedModule

    return any(isinstance(m, OptimizedModule) or getattr(m, "_compiled_call_impl", None) is not None for m in model.modules())


def compile_wrapper(model: nn.Module) -> bool:
    """Whether ``model`` is what ``torch.compile(module)`` returns (an ``OptimizedModule``): its own
    hooks run as Python around the compiled call, outside the graph."""
    if "torch._dynamo" not in sys.modules:
        return False
    from torch._dynamo.eval_frame import OptimizedModule

    return isinstance(model, OptimizedModule)


def eager_hook(fn):
    """``fn`` as a hook that a compiled forward calls as Python, every time (a graph break), instead of
    tracing it once into the graph, where its side effects (the monitor's records) would happen only
    while tracing."""
    return torch.compiler.disable(fn, recursive=True)


@contextlib.contextmanager
def eager(model: nn.Module, is_compiled: Optional[bool] = None) -> Iterator[None]:
    """Within this block, ``model``'s forwards run as plain Python even if ``torch.compile`` runs it
    (``torch.compiler.set_stance("force_eager")``). The instruments' own extra forwards (gradient
    ICS, signal propagation, the monitor's probe) need their hooks called and their parameters swapped
    (``functional_call``), which a compiled graph traced without them ignores, and a one-off forward
    gains nothing from compiling (its ``no_grad`` or eval mode would only add graphs).
    ``is_compiled``: the caller's :func:`compiled` answer, if it has one (the walk over the modules
    is then skipped)."""
    if not (compiled(model) if is_compiled is None else is_compiled):
        yield
        return
    with torch.compiler.set_stance("force_eager"):
        yield
