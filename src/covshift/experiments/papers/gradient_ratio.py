r"""Gradient explosion with depth: the log ratio of the first layer's gradient norm to the last's.

Yang, Pennington, Rao, Sohl-Dickstein & Schoenholz 2019 ("A Mean Field Theory of Batch
Normalization", arXiv:1902.08129) show that at initialization a deep fully connected network with
BatchNorm has gradients that grow exponentially towards the input, so that

.. math:: r = \ln \frac{\|\nabla_{W_1} L\|_F}{\|\nabla_{W_D} L\|_F}

grows linearly with the depth :math:`D`, while a well-initialized plain network keeps it about
flat. :func:`log_gradient_ratio` computes :math:`r` for two named parameters on one batch, without
changing the model: buffers are cloned (a training-mode BatchNorm does not update its running
statistics), ``.grad`` is never written, and the RNG is restored afterwards.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call

from covshift.monitor import suspend_monitors

__all__ = ["log_gradient_ratio", "gradient_norms"]


def gradient_norms(
    model: nn.Module, loss_fn: Callable[[Any, Any], Tensor], inputs: Tensor, targets: Any, names: list[str]
) -> dict[str, float]:
    """Frobenius norm of ``d loss / d param`` for each parameter in ``names``, on one batch."""
    params = dict(model.named_parameters())
    unknown = [n for n in names if n not in params]
    if unknown:
        raise ValueError(f"names: expected parameter names of the model, got unknown {unknown}; known: {list(params)}.")
    leaves = {n: p.detach().clone().requires_grad_(n in names) for n, p in params.items()}
    state = {n: b.detach().clone() for n, b in model.named_buffers()}
    state.update(leaves)
    with suspend_monitors(), torch.random.fork_rng(devices=[]):
        loss = loss_fn(functional_call(model, state, (inputs,)), targets)
        grads = torch.autograd.grad(loss, [leaves[n] for n in names], allow_unused=True)
    return {n: 0.0 if g is None else float(torch.linalg.vector_norm(g.to(torch.float64))) for n, g in zip(names, grads)}


def log_gradient_ratio(
    model: nn.Module, loss_fn: Callable[[Any, Any], Tensor], inputs: Tensor, targets: Any, first: str, last: str
) -> float:
    r""":math:`\ln(\|\nabla_{first} L\|_F / \|\nabla_{last} L\|_F)` for parameter names ``first`` and ``last``.

    Raises ``ValueError`` when either gradient is zero (the ratio is undefined), naming which.
    """
    norms = gradient_norms(model, loss_fn, inputs, targets, [first, last])
    zero = [n for n, v in norms.items() if not v > 0]
    if zero:
        raise ValueError(f"the gradient of {zero} is zero on this batch, so the log gradient ratio is undefined.")
    return math.log(norms[first] / norms[last])
