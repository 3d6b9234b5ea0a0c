r"""Loss-landscape measures along the gradient (Santurkar et al. 2018, section 3.1, Figure 4).

At parameters :math:`\theta` (a checkpoint during training), with the batch :math:`B` and
:math:`g = \nabla L(\theta; B)`, step along the gradient by each step size :math:`\eta` of a grid:

.. math::

    \theta_\eta = \theta - \eta g, \qquad L_\eta = L(\theta_\eta; B), \qquad g_\eta = \nabla L(\theta_\eta; B)

and record

* **loss variation** (Lipschitzness of the loss, Fig. 4a): the values :math:`L_\eta`, and their range
  :math:`\max_\eta L_\eta - \min_\eta L_\eta` (with :math:`L_0 = L(\theta)` included);
* **gradient predictiveness** (Fig. 4b): :math:`\|g_\eta - g\|_2` for each :math:`\eta`;
* **effective** :math:`\beta` **-smoothness** (Fig. 4c): the largest change of the gradient per
  distance moved, :math:`\max_\eta \|g_\eta - g\|_2 / \|\theta_\eta - \theta\|_2 =
  \max_\eta \|g_\eta - g\|_2 / (\eta \|g\|_2)`.

For a quadratic :math:`L = \tfrac12 \theta^\top A \theta`, :math:`g_\eta - g = -\eta A^2 \theta`,
so the ratio is :math:`\|A (A\theta)\| / \|A\theta\| \le \lambda_{max}(A)` (the smoothness constant
:math:`\beta`), with equality when :math:`\theta` is a top eigenvector; the tests check that case.

The measurement leaves training untouched: it works on :func:`torch.func.functional_call` with
clones of the buffers (a training-mode BatchNorm's running statistics are not updated), never
touches ``.grad`` or the optimizer, runs with every activation monitor suspended, and restores the
RNG before each forward (so dropout or noise masks are the same at every :math:`\eta`, and the
training step draws what it would have drawn).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call

from covshift.monitor import suspend_monitors

__all__ = ["LandscapePoint", "landscape_point"]


@dataclass(frozen=True)
class LandscapePoint:
    """The three measures at one checkpoint, for the step sizes ``step_sizes``."""

    step_sizes: tuple[float, ...]  # eta, ascending, > 0
    loss: float  # L(theta)
    losses: tuple[float, ...]  # L(theta - eta g), per eta
    grad_diffs: tuple[float, ...]  # ||g_eta - g||_2, per eta
    grad_norm: float  # ||g||_2

    @property
    def loss_range(self) -> float:
        """``max - min`` of the losses along the gradient, ``L(theta)`` included."""
        values = (self.loss, *self.losses)
        return max(values) - min(values)

    @property
    def beta_smoothness(self) -> float:
        """``max_eta ||g_eta - g|| / (eta ||g||)``; NaN when the gradient is zero."""
        if not self.grad_norm > 0:
            return math.nan
        return max(d / (eta * self.grad_norm) for d, eta in zip(self.grad_diffs, self.step_sizes))

    def to_dict(self) -> dict[str, Any]:
        return {
            "step_sizes": list(self.step_sizes),
            "loss": self.loss,
            "losses": list(self.losses),
            "grad_diffs": list(self.grad_diffs),
            "grad_norm": self.grad_norm,
            "loss_range": self.loss_range,
            "beta_smoothness": self.beta_smoothness,
        }


def _flat(grads: Sequence[Tensor]) -> Tensor:
    return torch.cat([g.reshape(-1).to(torch.float64) for g in grads])


def landscape_point(
    model: nn.Module,
    loss_fn: Callable[[Any, Any], Tensor],
    inputs: Tensor,
    targets: Any,
    step_sizes: Sequence[float],
) -> LandscapePoint:
    """The landscape measures at the model's current parameters on the batch ``(inputs, targets)``.

    Args:
        model: the network, in the mode training uses (``train()`` for batch statistics).
        loss_fn: ``loss_fn(model(inputs), targets) -> scalar``.
        inputs, targets: the batch the gradient and every loss are computed on.
        step_sizes: the step sizes ``eta > 0`` (multipliers of the gradient).

    Cost: ``1 + len(step_sizes)`` forwards and backwards.
    """
    etas = tuple(float(e) for e in step_sizes)
    if not etas or not all(math.isfinite(e) and e > 0 for e in etas):
        raise ValueError(f"step_sizes: expected one or more finite step sizes > 0, got {list(step_sizes)!r}.")
    etas = tuple(sorted(etas))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    if not names:
        raise ValueError("model: expected at least one parameter with requires_grad=True, got none.")
    params = {n: p.detach() for n, p in model.named_parameters()}
    buffers = {n: b.detach() for n, b in model.named_buffers()}

    def loss_and_grad(theta: dict[str, Tensor]) -> tuple[float, Tensor]:
        leaves = {n: theta[n].clone().requires_grad_(n in names) for n in theta}
        state = {n: b.clone() for n, b in buffers.items()}  # a training-mode BN writes into these
        state.update(leaves)
        rng.reset()
        loss = loss_fn(functional_call(model, state, (inputs,)), targets)
        grads = torch.autograd.grad(loss, [leaves[n] for n in names], allow_unused=True)
        grads = [torch.zeros_like(leaves[n]) if g is None else g for n, g in zip(names, grads)]
        return float(loss.detach()), _flat(grads)

    with suspend_monitors(), torch.random.fork_rng(devices=[]):
        rng = _Rng()
        loss0, g = loss_and_grad(params)
        offsets = np.cumsum([0] + [params[n].numel() for n in names])
        losses, diffs = [], []
        for eta in etas:
            theta = dict(params)
            for n, lo, hi in zip(names, offsets[:-1], offsets[1:]):
                step = g[lo:hi].view(params[n].shape).to(params[n].dtype)
                theta[n] = params[n] - eta * step
            loss_eta, g_eta = loss_and_grad(theta)
            losses.append(loss_eta)
            diffs.append(float(torch.linalg.vector_norm(g_eta - g)))
    return LandscapePoint(etas, loss0, tuple(losses), tuple(diffs), float(torch.linalg.vector_norm(g)))


class _Rng:
    """The CPU generator's state, to replay the same draws before every forward."""

    def __init__(self) -> None:
        self.state = torch.get_rng_state()

    def reset(self) -> None:
        torch.set_rng_state(self.state)
