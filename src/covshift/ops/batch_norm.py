r"""``torch.ops.covshift.batch_norm``: the fused CPU kernel as a PyTorch operator.

The C++ file ``covshift/csrc/batch_norm_cpu.cpp`` defines two operators with ``TORCH_LIBRARY``:

``covshift::batch_norm(input, weight?, bias?, running_mean(a!)?, running_var(b!)?, training, momentum, eps) -> (y, mean, invstd)``
    The contract of ``aten::native_batch_norm``. Training: the batch's mean and
    ``invstd = 1/sqrt(var + eps)``, ``y = (x - mean) * invstd * weight + bias``, and, when the running
    buffers are given, their update in the same sweep (``running += momentum * (stat - running)``, the
    unbiased variance into ``running_var``: :func:`covshift.functional.batchnorm.update_running_stats`'s
    rule, which the tests hold it to). Inference: normalizes with the running statistics.
    The buffers are declared mutated (``Tensor(a!)``), so ``torch.compile`` and ``torch.export``
    functionalize the update like any in-place op.
``covshift::batch_norm_backward(grad_out, input, weight?, mean, invstd, training, output_mask) -> (dx, dgamma, dbeta)``
    The analytic backward; a gradient not asked for is a ``(0,)`` tensor.

Its kernels are registered for CPU, and an **Autograd** kernel written in C++ wires the analytic
backward (and, when the backward itself is differentiated, ``create_graph=True``, the same formula in
differentiable ATen ops). This module adds what the rest of PyTorch needs to see the operators as
opaque, shape-aware nodes: *fake* (meta) implementations, so ``torch.compile`` (``fullgraph``, dynamic
shapes), ``torch.export`` and FakeTensor tracing run them without data. Forward-mode AD and
``torch.func`` transforms are not the operator's job: :func:`covshift.functional.batch_norm` sends
those calls to the reference path, whose ``autograd.Function`` has ``jvp`` and vmap rules, and the
operator itself refuses a dual tensor rather than drop its tangent.
"""

from __future__ import annotations

from typing import Optional

import torch

from covshift.ops import build

__all__ = ["LIBRARY", "SOURCE", "load", "loaded", "error", "kernel"]

LIBRARY = "covshift_batch_norm"  # the shared object's name; its operators live in torch.ops.covshift
SOURCE = build.CSRC / "batch_norm_cpu.cpp"

_fakes_registered = False
kernel = None  # torch.ops.covshift.batch_norm.default, once loaded (looked up once: the hot path calls it)


def _register_fakes() -> None:
    global _fakes_registered
    if _fakes_registered:
        return

    @torch.library.register_fake("covshift::batch_norm")
    def _batch_norm_fake(input, weight, bias, running_mean, running_var, training, momentum, eps):
        channels = input.shape[1]
        # y keeps the input's memory format, as the kernel's empty_like does
        return torch.empty_like(input), input.new_empty((channels,)), input.new_empty((channels,))

    @torch.library.register_fake("covshift::batch_norm_backward")
    def _batch_norm_backward_fake(grad_out, input, weight, mean, invstd, training, output_mask):
        channels = input.shape[1]
        dx = torch.empty_like(input) if output_mask[0] else input.new_empty((0,))
        dgamma = input.new_empty((channels,)) if output_mask[1] else input.new_empty((0,))
        dbeta = input.new_empty((channels,)) if output_mask[2] else input.new_empty((0,))
        return dx, dgamma, dbeta

    _fakes_registered = True


def load() -> bool:
    """Build (first time on this machine) and load the operators; True when they can be called. Never raises."""
    if _fakes_registered:
        return True
    global kernel
    ext = build.load_library(LIBRARY, SOURCE, namespace="covshift", probe="batch_norm")
    if ext.loaded:
        _register_fakes()
        kernel = torch.ops.covshift.batch_norm.default
    return ext.loaded


def loaded() -> bool:
    """Whether the operators are registered in this process (without trying to build them)."""
    return _fakes_registered


def error() -> Optional[str]:
    """Why the operators could not be built or loaded, or None."""
    ext = build.status(LIBRARY)
    return None if ext is None else ext.error
