r"""Which implementation a :func:`covshift.functional.batch_norm` call runs.

``"auto"`` (default)
    the operator ``torch.ops.covshift.batch_norm`` (the fused C++ kernel, :mod:`covshift.ops.batch_norm`)
    for CPU float32 input that is contiguous, channels_last or channels_last_3d, with float32 (or absent)
    parameters and buffers; the reference path otherwise. Other dtypes (float64, the verification dtype;
    float16/bfloat16) and devices run the reference path by design, silently. A float32 CPU call that
    cannot take the kernel (its strides, its parameters' dtype, or a kernel that failed to build) warns
    once per reason with :class:`FastPathWarning`.
``"fast"``
    the kernel wherever it can run, float64 included; every fallback warns once per reason.
``"reference"``
    always the plain PyTorch implementation (:mod:`covshift.functional.batchnorm`).

Whatever the backend, these calls run the reference path, by design and silently, because it is the
one that can: forward-mode AD (dual tensors), ``torch.func`` transforms (``vmap``, ``grad``, ``jacrev``,
``jacfwd``, ``hessian``: its ``autograd.Function`` has ``jvp`` and vmap rules), and empty batches.
Inference under ``torch.export``/``torch.onnx.export``/``torch.jit.trace`` is traced as the plain affine
map, so exported graphs need no custom operator there.

Process-wide: :func:`set_backend`, :func:`use_backend`, or ``COVSHIFT_BACKEND`` in the environment at import.
"""

from __future__ import annotations

import contextlib
import os
import threading
import warnings
from typing import Iterator, Literal, Optional

import torch
from torch import Tensor
from torch.autograd import forward_ad

from covshift.ops import batch_norm as _op

__all__ = [
    "Backend",
    "BACKENDS",
    "FastPathWarning",
    "set_backend",
    "get_backend",
    "use_backend",
    "fast_path_status",
    "use_kernel",
    "dense",
    "transformed",
    "tracing_inference",
]

Backend = Literal["auto", "fast", "reference"]
BACKENDS: tuple[Backend, ...] = ("auto", "fast", "reference")

# dtypes each backend sends to the kernel.
_KERNEL_DTYPES = {"auto": (torch.float32,), "fast": (torch.float32, torch.float64)}


class FastPathWarning(UserWarning):
    """covshift's fast CPU kernel could not be used for a call; the reference path ran instead.

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


class _State:
    def __init__(self) -> None:
        self.backend: Backend = _backend_from_env()
        self.warned: set[str] = set()  # reasons already warned about
        self.lock = threading.Lock()


_state = _State()


def set_backend(backend: Backend) -> None:
    """Choose the path of every later :func:`covshift.functional.batch_norm` call in this process.

    Args:
        backend: ``"auto"`` (the kernel for CPU float32, the default), ``"fast"`` (the kernel wherever it
            can run, warning on each kind of fallback) or ``"reference"`` (plain PyTorch).

    Raises:
        ValueError: an unknown name.
    """
    if backend not in BACKENDS:
        raise ValueError(
            f"unknown covshift backend {backend!r}; expected one of {', '.join(map(repr, BACKENDS))}."
        )
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


def fast_path_status() -> dict:
    """What the kernel is doing in this process: backend, whether it is loaded, and why not."""
    from covshift.ops import build

    ext = build.status(_op.LIBRARY)
    return {
        "backend": _state.backend,
        "loaded": _op.loaded(),
        "error": None if ext is None else ext.error,
        "library": None if ext is None else ext.library,
        "build_directory": str(build.build_directory() / _op.LIBRARY),
        "source": str(_op.SOURCE),
    }


def _warn_once(key: str, reason: str) -> None:
    """Warn about a fallback once per kind of reason (``key``) and process."""
    if key in _state.warned:
        return
    _state.warned.add(key)
    warnings.warn(
        f"covshift.functional.batch_norm: {reason}; running the reference path.", FastPathWarning, stacklevel=4
    )


_is_wrapped = torch._C._functorch.is_functorch_wrapped_tensor
_is_compiling = torch.compiler.is_compiling  # bound once: eager_float32 runs on every step of every layer
_F32 = torch.float32


def transformed(*tensors: Optional[Tensor]) -> bool:
    """Whether a call sees forward-mode AD or a ``torch.func`` transform: the reference path's cases.

    Inside ``torch.compile`` the answer is no: dynamo traces the tensors themselves (and composes with
    ``torch.func`` on its own terms), so the compiled graph calls the operator."""
    if torch.compiler.is_compiling():
        return False
    if forward_ad._current_level >= 0:  # inside forward_ad.dual_level(): some input may be dual
        return True
    return any(t is not None and _is_wrapped(t) for t in tensors)


def tracing_inference() -> bool:
    """Whether an inference call is being captured by export, ONNX export or the TorchScript tracer."""
    return torch.compiler.is_exporting() or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()


def dense(t: Tensor) -> bool:
    """Whether the kernel reads ``t`` as laid out: contiguous, channels_last or channels_last_3d."""
    if t.is_contiguous():
        return True
    if t.dim() == 4:
        return t.is_contiguous(memory_format=torch.channels_last)
    return t.dim() == 5 and t.is_contiguous(memory_format=torch.channels_last_3d)


def eager_float32(
    input: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor],
    bias: Optional[Tensor],
) -> bool:
    """The common case, decided in a few attribute reads (it runs on every step of every layer): eager,
    backend "auto", the kernel loaded, contiguous CPU float32 input and float32 CPU parameters, no
    forward-mode AD and no ``torch.func`` transform. Everything else goes through :func:`use_kernel`."""
    if _is_compiling():  # first: under compile, dynamo must not read (and guard on) the handle
        return False
    f32 = _F32
    return (
        input.dtype is f32
        and _op.kernel is not None
        and _state.backend == "auto"
        and input.is_cpu
        and input.is_contiguous()
        and (weight is None or (weight.dtype is f32 and weight.is_cpu))
        and (bias is None or (bias.dtype is f32 and bias.is_cpu))
        and (running_mean is None or (running_mean.dtype is f32 and running_mean.is_cpu))
        and (running_var is None or (running_var.dtype is f32 and running_var.is_cpu))
        and forward_ad._current_level < 0
        and not (_is_wrapped(input) or (weight is not None and _is_wrapped(weight)) or (bias is not None and _is_wrapped(bias)))
    )


def use_kernel(
    input: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor],
    bias: Optional[Tensor],
) -> bool:
    """Whether this call runs the kernel (warning once per reason where it should and cannot).

    The caller has validated the arguments and ruled out empty batches.
    """
    return eager_float32(input, running_mean, running_var, weight, bias) or _slow_use_kernel(input, running_mean, running_var, weight, bias)


def _slow_use_kernel(input, running_mean, running_var, weight, bias) -> bool:
    backend = _state.backend
    if backend == "reference" or transformed(input, weight, bias):
        return False
    dtype = input.dtype
    if dtype not in _KERNEL_DTYPES[backend] or input.device.type != "cpu" or input.layout != torch.strided:
        if backend == "fast":  # in "auto" these are the reference path's by design: no warning
            if input.device.type == "cpu" and input.layout == torch.strided:
                _warn_once(f"dtype {dtype}", f"the fast path supports float32 and float64 input, got {dtype}")
            else:
                where = f"a {input.layout} tensor on {input.device.type}"
                _warn_once(where, f"the fast path runs on dense CPU tensors, got {where}")
        return False
    if not dense(input):  # functional.batch_norm copies other strides into one of these first
        return False
    for name, t in (("weight", weight), ("bias", bias), ("running_mean", running_mean), ("running_var", running_var)):
        if t is not None and (t.dtype != dtype or t.device.type != "cpu"):
            _warn_once(
                f"{name} {t.dtype} {t.device.type}",
                f"the fast path needs {name} on the CPU and of the input's dtype {dtype}; "
                f"got {t.dtype} on {t.device.type}",
            )
            return False
    if not _kernel_available():
        _warn_once("build", _op.error() or "the fast CPU kernel is unavailable")
        return False
    return True


def _kernel_available() -> bool:
    """Build or load the kernel (first use in a process). Run for real even while ``torch.compile`` traces
    (its result is a constant to dynamo), so a model compiled before any eager call still gets the kernel."""
    return _op.loaded() or _op.load()


# What torch.compiler.assume_constant_result(_kernel_available) does, without importing torch._dynamo
# (1.5-2 s) whenever covshift is imported: dynamo reads this mark when it traces the call.
# tests/ops/test_capture.py checks that the decorator still sets exactly this attribute.
_kernel_available._dynamo_marked_constant = True  # type: ignore[attr-defined]
