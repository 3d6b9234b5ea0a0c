r"""The fast CPU path of :func:`covshift.functional.batch_norm`: a C++ kernel, compiled once per machine.

The formulas are the reference's (:mod:`covshift.functional.batchnorm`); the kernel
(``covshift/csrc/batch_norm_cpu.cpp``) changes how often the data is read. BatchNorm is
memory-bound, and the reference (like ATen's kernel) makes separate passes over the whole tensor for
the mean, the variance and the output, and in the backward for the two sums and ``dx``. For
``(N, C, *)`` contiguous input the kernel gives each thread whole channels and does all of a
channel's passes back to back, while the channel is still in cache:

* forward, training: ``mean``, ``var`` (two-pass), ``y`` and the running-statistics update;
* backward: ``sum(dy)``, ``sum(dy * (x - mean))``, then ``dx``, ``dgamma`` and ``dbeta``.

For channels-innermost input (``(N, C)``, channels_last) it streams blocks of rows instead and merges
per-block statistics with Chan et al.'s formulas. Partial sums are folded into double; results agree
with the reference to about 1e-6 in float32.

**Which path runs** (process-wide: :func:`set_backend`, :func:`use_backend`, or ``COVSHIFT_BACKEND``
in the environment at import):

``"auto"`` (default)
    the fast path for CPU float32 input that is contiguous, channels_last or channels_last_3d, with
    float32 (or absent) parameters and buffers; the reference path otherwise. Other dtypes
    (float64, the verification dtype; float16/bfloat16) and devices run the reference path by
    design, silently. A float32 CPU call that cannot take the fast path (its strides, its parameters'
    dtype, or a kernel that failed to build) warns once per reason with :class:`FastPathWarning`.
``"fast"``
    the fast path wherever it can run, float64 included; every fallback warns once per reason.
``"reference"``
    always the plain PyTorch implementation.

Double backward (``create_graph=True``) runs the reference backward, which is differentiable.

**Build.** The kernel is compiled by :func:`torch.utils.cpp_extension.load` (with the ``ninja``
package) on first use, into ``$COVSHIFT_EXTENSIONS_DIR`` (default ``~/.cache/covshift/extensions``),
one folder per torch version, Python version and CPU capability. ``make setup`` builds it ahead of
time (:func:`main`); later processes only load the shared library. One
file lock serializes concurrent builds (``pytest -n 2``); a build that fails leaves covshift on the
reference path, with a warning that says why. The kernel handles any shape without recompiling.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import warnings
from pathlib import Path
from typing import Iterator, Literal, Optional

import torch
from torch import Tensor

from covshift.ops import build as _build

__all__ = [
    "Backend",
    "FastPathWarning",
    "set_backend",
    "get_backend",
    "use_backend",
    "fast_path_status",
    "build",
]

Backend = Literal["auto", "fast", "reference"]
BACKENDS: tuple[Backend, ...] = ("auto", "fast", "reference")

SOURCE = Path(__file__).resolve().parent.parent / "csrc" / "batch_norm_cpu.cpp"
LIBRARY_NAME = "covshift_fast"  # also the operator namespace: torch.ops.covshift_fast.*

# dtypes each backend sends to the kernel.
_FAST_DTYPES = {"auto": (torch.float32,), "fast": (torch.float32, torch.float64)}


class FastPathWarning(UserWarning):
    """covshift's fast CPU path could not be used for a call; the reference path ran instead.

    Issued once per reason and process. Silence it with ``warnings.filterwarnings("ignore",
    category=FastPathWarning)``, or choose the path explicitly with :func:`set_backend`.
    """


def _backend_from_env() -> Backend:
    value = os.environ.get("COVSHIFT_BACKEND", "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        warnings.warn(
            f"COVSHIFT_BACKEND={value!r} is not one of {', '.join(BACKENDS)}; using 'auto'.", FastPathWarning, stacklevel=2
        )
        return "auto"
    return value  # type: ignore[return-value]


class _Ops:
    """The kernel's operators (torch.ops.covshift_fast.*.default), looked up once after loading."""

    fwd_train = fwd_eval = bwd = None

    def bind(self) -> None:
        ns = torch.ops.covshift_fast
        self.fwd_train, self.fwd_eval, self.bwd = ns.fwd_train.default, ns.fwd_eval.default, ns.bwd.default


_ops = _Ops()


class _State:
    def __init__(self) -> None:
        self.backend: Backend = _backend_from_env()
        self.loaded = False  # the operators are registered in this process
        self.error: Optional[str] = None  # why building or loading failed, once it has
        self.library: Optional[str] = None  # path of the shared library
        self.warned: set[str] = set()  # reasons already warned about
        self.lock = threading.Lock()


_state = _State()


def set_backend(backend: Backend) -> None:
    """Choose the path of every later :func:`covshift.functional.batch_norm` call in this process.

    Args:
        backend: ``"auto"`` (fast path for CPU float32, the default), ``"fast"`` (fast path wherever
            it can run, warning on each kind of fallback) or ``"reference"`` (plain PyTorch).

    Raises:
        ValueError: an unknown name.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown covshift backend {backend!r}; expected one of {', '.join(map(repr, BACKENDS))}.")
    _state.backend = backend


def get_backend() -> Backend:
    """The backend in force: ``"auto"``, ``"fast"`` or ``"reference"``."""
    return _state.backend


@contextlib.contextmanager
def use_backend(backend: Backend) -> Iterator[None]:
    """Context manager: :func:`set_backend` inside the block, the previous backend after it."""
    previous = _state.backend
    set_backend(backend)
    try:
        yield
    finally:
        _state.backend = previous


def _warn_once(key: str, reason: str) -> None:
    """Warn about a fallback once per kind of reason (``key``) and process."""
    if key in _state.warned:
        return
    _state.warned.add(key)
    warnings.warn(f"covshift.functional.batch_norm: {reason}; running the reference path.", FastPathWarning, stacklevel=4)


# ------------------------------------------------------------------------------------------------
# Building and loading the kernel
# ------------------------------------------------------------------------------------------------


def build_directory() -> Path:
    """Where the kernel is compiled and cached (:func:`covshift.ops.build.build_directory`)."""
    return _build.build_directory()


def build() -> bool:
    """Build (if needed) and load the kernel in this process. True when the fast path is available.

    Called on the first call that wants the fast path; call it earlier to take the one-time build
    (tens of seconds on a cold cache) off the first training step. Never raises: a failure is recorded,
    and :func:`fast_path_status` reports it.
    """
    if _state.loaded:
        return True
    if _state.error is not None:
        return False
    ext = _build.load_library(LIBRARY_NAME, SOURCE, probe="fwd_train")
    with _state.lock:
        if ext.loaded and not _state.loaded:
            _ops.bind()
            _state.loaded = True
        _state.library, _state.error = ext.library, ext.error
    return _state.loaded


def fast_path_status() -> dict:
    """What the fast path is doing in this process: backend, whether the kernel is loaded, why not."""
    return {
        "backend": _state.backend,
        "loaded": _state.loaded,
        "error": _state.error,
        "library": _state.library,
        "build_directory": str(build_directory()),
        "source": str(SOURCE),
    }


# ------------------------------------------------------------------------------------------------
# Dispatch
# ------------------------------------------------------------------------------------------------


_is_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", lambda: False)  # torch >= 2.3


def _memory_format(t: Tensor) -> Optional[torch.memory_format]:
    """The dense layout the kernel reads ``t`` in, or None when it has another layout."""
    if t.is_contiguous():
        return torch.contiguous_format
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if t.dim() == 5 and t.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return None


def accepts(
    input: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor],
    bias: Optional[Tensor],
) -> bool:
    """Whether this call runs the fast path (warning once per reason where it should and cannot)."""
    backend = _state.backend
    if backend == "reference":
        return False
    dtype = input.dtype
    if dtype not in _FAST_DTYPES[backend] or not input.is_cpu or input.layout != torch.strided:
        if backend == "fast":  # in "auto" these are the reference path's by design: no warning
            if input.is_cpu and input.layout == torch.strided:
                _warn_once(f"dtype {dtype}", f"the fast path supports float32 and float64 input, got {dtype}")
            else:
                where = f"a {input.layout} tensor on {input.device.type}"
                _warn_once(where, f"the fast path runs on dense CPU tensors, got {where}")
        return False
    if input.numel() == 0 or _is_compiling() or torch.jit.is_tracing():
        return False  # empty batches and graph capture take the reference path, by design
    if _memory_format(input) is None:
        _warn_once(
            "layout",
            "the fast path needs contiguous, channels_last or channels_last_3d input, got strides "
            f"{tuple(input.stride())} for shape {tuple(input.shape)} (call .contiguous() first)",
        )
        return False
    for name, t in (("weight", weight), ("bias", bias), ("running_mean", running_mean), ("running_var", running_var)):
        if t is not None and (t.dtype != dtype or not t.is_cpu or not t.is_contiguous()):
            _warn_once(
                f"{name} {t.dtype} {t.device.type}",
                f"the fast path needs {name} contiguous, on the CPU and of the input's dtype {dtype}; "
                f"got {t.dtype} on {t.device.type}",
            )
            return False
    if not build():
        _warn_once("build", _state.error or "the fast CPU kernel is unavailable")
        return False
    return True


def _forward(input, weight, bias, running_mean, running_var, training: bool, momentum: float, eps: float):
    """(y, mean, invstd) from the kernel; in training it also updates the running buffers in place."""
    if training:  # statistics, running update and y in one sweep
        return _ops.fwd_train(input, weight, bias, running_mean, running_var, momentum, eps)
    y, invstd = _ops.fwd_eval(input, running_mean, running_var, weight, bias, eps)
    return y, running_mean, invstd


class FastBatchNormFunction(torch.autograd.Function):
    """The fast path in autograd: the fused kernels forward and backward, the reference for double backward.

    It saves what :class:`~covshift.functional.batchnorm.BatchNormFunction` saves (``input``,
    ``weight``, ``mean``, ``invstd``), so that when the backward itself must be differentiable
    (``create_graph=True``) it hands the same context to the reference backward.
    """

    @staticmethod
    def forward(ctx, input, weight, bias, running_mean, running_var, training: bool, momentum: float, eps: float):
        y, mean, invstd = _forward(input, weight, bias, running_mean, running_var, training, momentum, eps)
        ctx.save_for_backward(input, weight, mean, invstd)
        ctx.training = training
        ctx.eps = eps
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx, grad_output):
        nones = (None,) * 5  # running_mean, running_var, training, momentum, eps
        if torch.is_grad_enabled():  # create_graph=True: the reference backward is differentiable
            from covshift.functional.batchnorm import BatchNormFunction

            return (*BatchNormFunction.backward(ctx, grad_output)[:3], *nones)
        input, weight, mean, invstd = ctx.saved_tensors
        need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
        if not (need_input or need_weight or need_bias):
            return (None, None, None, *nones)
        fmt = _memory_format(input)
        if grad_output.dtype != input.dtype or not grad_output.is_contiguous(memory_format=fmt):
            grad_output = grad_output.to(input.dtype).contiguous(memory_format=fmt)
        dx, dgamma, dbeta = _ops.bwd(grad_output, input, mean, invstd, weight, ctx.training, need_input, need_weight or need_bias)
        return (
            dx if need_input else None,
            dgamma if need_weight else None,
            dbeta if need_bias else None,
            *nones,
        )


def _needs_graph(*tensors: Optional[Tensor]) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def batch_norm(
    input: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    training: bool,
    momentum: float,
    eps: float,
) -> Tensor:
    """:func:`covshift.functional.batch_norm` on the fast path; the caller has validated the arguments
    and checked :func:`accepts`. Updates the running buffers in place in training."""
    momentum, eps = float(momentum), float(eps)
    if _needs_graph(input, weight, bias):
        return FastBatchNormFunction.apply(input, weight, bias, running_mean, running_var, training, momentum, eps)
    return _forward(input, weight, bias, running_mean, running_var, training, momentum, eps)[0]  # no graph to record


def main() -> int:
    """Build the kernel now and say so; ``make setup`` runs this. Returns 0 even when it fails."""
    import time

    start = time.perf_counter()
    ok = build()
    status = fast_path_status()
    if ok:
        print(f"covshift fast CPU path ready in {time.perf_counter() - start:.1f} s: {status['library'] or 'already loaded'}")
    else:
        print(f"covshift fast CPU path unavailable, the reference path will run: {status['error']}")
    return 0  # covshift works either way
