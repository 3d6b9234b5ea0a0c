"""Finding a model's residual blocks, and running a forward that leaves no trace.

A module is *residual* when its own ``forward`` adds two different tensors of the same shape, one of
which is a *skip* (its input, or a tensor computed from its input through its direct children): the
rule is spelled out in :mod:`covshift.monitor.signal_propagation`. :class:`_SkipFinder`, a
``TorchFunctionMode``, attributes every addition to the innermost module running; :func:`find_blocks`
keeps the outermost residual modules, in call order. :func:`_untouched` runs a forward under
``no_grad`` with every monitor suspended and restores modes, buffers and the RNG afterwards.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Iterator, Optional

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from covshift.monitor.hooks import _cuda_devices, _first_float_tensor, eager, suspend_monitors

__all__ = ["find_blocks"]


_ADDS = (torch.add, torch.Tensor.add, torch.Tensor.add_)


@dataclasses.dataclass
class _Frame:
    name: str
    module: nn.Module
    input: Optional[Tensor]
    # tensors made by chains of direct children from `input`: id -> (calls from input, last child);
    # `keep` holds them so that their ids stay unique while the module runs
    depth: dict = dataclasses.field(default_factory=dict)
    keep: list = dataclasses.field(default_factory=list)
    skip_found: bool = False


class _SkipFinder(TorchFunctionMode):
    """Attributes every addition to the innermost module running and reports skip additions.

    ``on_skip(frame, branch)`` is called before the addition runs (an in-place ``out += identity``
    would overwrite the branch), once per module call, for the first skip addition.
    """

    def __init__(self, on_skip) -> None:
        super().__init__()
        self.stack: list[_Frame] = []
        self.on_skip = on_skip

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _ADDS and len(args) >= 2 and self.stack:
            frame = self.stack[-1]
            a, b = args[0], args[1]
            if not frame.skip_found and isinstance(a, Tensor) and isinstance(b, Tensor) and a.shape == b.shape:
                branch = _branch_operand(frame, a, b)
                if branch is not None:
                    frame.skip_found = True
                    alpha = kwargs.get("alpha", 1)
                    self.on_skip(frame, branch if alpha == 1 else branch * alpha)
        out = func(*args, **kwargs)
        if self.stack and self.stack[-1].input is not None and isinstance(out, Tensor):
            # a function of tracked tensors, run by this module's own forward: as far from the input
            # as its nearest tracked argument (functions are not counted, only child calls)
            frame = self.stack[-1]
            ds = [d for d in (_depth(frame, t) for t in args if isinstance(t, Tensor)) if d is not None]
            if ds and out is not frame.input and id(out) not in frame.depth:
                frame.depth[id(out)] = min(ds, key=lambda d: d[0])
                frame.keep.append(out)
        return out


def _branch_operand(frame: _Frame, a: Tensor, b: Tensor) -> Optional[Tensor]:
    """The residual branch of ``a + b`` run by ``frame``'s module, or None if it is no skip addition.

    The skip is the operand reached from the module's input through the fewest direct-child calls
    (0: the input itself); the branch is the other one, which must be deeper or not reached that
    way (a functional op broke the chain). Equal depths: the skip is the output of the child with
    fewer parameters (a projection is smaller than the branch it bypasses).
    """
    if frame.input is None or frame.module is None or a is b:
        return None
    if a is frame.input or b is frame.input:  # the identity skip, whatever the branch's chain
        return b if a is frame.input else a
    da, db = _depth(frame, a), _depth(frame, b)
    if da is None and db is None:
        return None
    if db is None or (da is not None and da[0] < db[0]):
        return b
    if da is None or db[0] < da[0]:
        return a
    if da[1] is None or db[1] is None or da[1] is db[1]:
        return None
    size = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    return b if size(da[1]) <= size(db[1]) else a


def _depth(frame: _Frame, t: Tensor) -> Optional[tuple[int, Optional[nn.Module]]]:
    return (0, None) if t is frame.input else frame.depth.get(id(t))


@contextlib.contextmanager
def _tracking(model: nn.Module, on_skip, on_output, on_call=None) -> Iterator[_SkipFinder]:
    """Hooks on every module (a call stack, children fed the caller's input, outputs) and the
    skip finder; all removed on exit, even on error."""
    finder = _SkipFinder(on_skip)
    handles = []
    root = model

    def pre(name: str, module: nn.Module, args: tuple) -> None:
        finder.stack.append(_Frame(name, None if module is root else module, _first_float_tensor(args)))
        if on_call is not None:
            on_call(name)

    def post(name: str, module: nn.Module, args: tuple, output: Any) -> None:
        if not finder.stack or finder.stack[-1].name != name:
            return  # an error unwound the stack; the forward is failing anyway
        frame = finder.stack.pop()
        out = _first_float_tensor(output)
        if finder.stack and out is not None and frame.input is not None:
            parent = finder.stack[-1]  # the caller: record how far `out` is from its input
            d = _depth(parent, frame.input) if parent.input is not None else None
            if d is not None and id(out) not in parent.depth and out is not parent.input:
                parent.depth[id(out)] = (d[0] + 1, module)
                parent.keep.append(out)
        on_output(frame, out)

    try:
        for name, m in model.named_modules():
            handles.append(m.register_forward_pre_hook(lambda mod, a, _n=name: pre(_n, mod, a)))
            handles.append(m.register_forward_hook(lambda mod, a, o, _n=name: post(_n, mod, a, o), always_call=True))
        with finder:
            yield finder
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def _untouched(model: nn.Module, training: Optional[bool]) -> Iterator[None]:
    """No grad, monitors suspended; modes, buffers and the RNG restored afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        with torch.no_grad(), suspend_monitors(), torch.random.fork_rng(devices=_cuda_devices(model)):
            if training is not None:
                model.train(training)
            yield
    finally:
        for m, t in modes:
            m.training = t
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)


def _as_args(inputs: Any) -> tuple:
    return tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)


def find_blocks(model: nn.Module, inputs: Any, *, training: Optional[bool] = None) -> list[str]:
    """The default blocks of :func:`signal_propagation` (rule in the module docstring), in call order.

    Raises:
        ValueError: the model has no residual module and no ``nn.Sequential`` with children.
    """
    residual: list[str] = []
    called: list[str] = []

    def on_skip(frame: _Frame, branch: Tensor) -> None:
        if frame.name not in residual:
            residual.append(frame.name)

    def on_call(name: str) -> None:
        if name not in called:
            called.append(name)

    with _untouched(model, training), eager(model):  # a compiled graph would not call the tracking hooks
        with _tracking(model, on_skip, lambda frame, out: None, on_call):
            model(*_as_args(inputs))
    outer = [n for n in residual if n and not any(_is_ancestor(o, n) for o in residual if o != n)]
    if outer:
        return sorted(outer, key=called.index)
    seqs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Sequential) and len(m) > 0]
    if not seqs:
        raise ValueError(
            f"blocks: found no residual block (a module whose forward adds a skip) and no nn.Sequential "
            f"in this {type(model).__name__}. Pass blocks= with the module names to measure."
        )
    name, seq = max(seqs, key=lambda nm: len(nm[1]))
    prefix = f"{name}." if name else ""
    return [f"{prefix}{child}" for child, _ in seq.named_children()]


def _is_ancestor(a: str, b: str) -> bool:
    return a == "" or b.startswith(a + ".")
