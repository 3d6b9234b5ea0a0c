r"""``NoisyBatchNorm1d/2d``: BatchNorm followed by noise whose distribution changes at every step.

Santurkar, Tsipras, Ilyas & Madry 2018, "How Does Batch Normalization Help Optimization?"
(arXiv:1805.11604), section 2.1: to make the layer inputs of a BatchNorm network *less* stable
than those of an unnormalized one, they "perturb each activation for each sample in the batch
using i.i.d. noise sampled from a non-zero mean and non-unit variance distribution", with the
noise distribution itself changing at every training step. (The exact noise parameters are in
their appendix, which covshift could not consult; the form and ranges below are covshift's choice.)

In training, with :math:`y = \mathrm{BN}(x)` the layer's usual output and :math:`t` the layer's
training step (:attr:`noise_step`, the number of training forwards before this one):

.. math::

    \mu_{t,c} \sim U(a, b), \qquad \sigma_{t,c} \sim U(c, d) \qquad \text{(once per step and channel)}

    \tilde y_{n,c,\dots} = y_{n,c,\dots} + \mu_{t,c} + \sigma_{t,c}\, z_{n,c,\dots},
    \qquad z \overset{iid}{\sim} N(0, 1) \qquad \text{(every activation of every sample)}

so every activation gets i.i.d. noise :math:`N(\mu_{t,c}, \sigma_{t,c}^2)` whose mean and
variance are re-drawn at every step. ``(a, b)`` is ``noise_mean`` and ``(c, d)`` is
``noise_std``. Defaults ``noise_mean=(-0.5, 0.5)``, ``noise_std=(0.5, 1.0)``: BN's output has unit
variance per channel, so every step moves each channel's mean by up to half its std and adds
noise of between a half and a whole std: the layer input's distribution changes at every step by
a sizeable fraction of its own spread, while the signal stays at least as strong as the noise.
The noise is a constant for autograd (no gradient flows into it).

**Reproducible and replayable.** The draws of step :math:`t` come from a generator seeded with
``(seed, t)`` only: the same seed gives the same noise, a new step gives new noise, and any
number of extra forwards at the same step (a measurement on clones of the buffers, such as
:func:`covshift.monitor.gradient_ics` or the monitor's train-mode probe) see exactly the noise
the training forward sees. :attr:`noise_step` is a *non-persistent* buffer, so ``state_dict``
keys stay those of ``torch.nn.BatchNorm*``; a resumed model restarts the noise sequence at 0.
With ``seed=None`` the seed is drawn from torch's global generator at construction, so
``torch.manual_seed`` before building the model fixes it.

**Inference** (``.eval()``) adds no noise: the layer is exactly :class:`covshift.nn.BatchNorm*`.

Args:
    num_features, eps, momentum, affine, track_running_stats, device, dtype: as
        ``torch.nn.BatchNorm*``, in torch's positional order.
    bias: keyword-only, as ``torch.nn.BatchNorm*``.
    noise_mean: keyword-only, ``(a, b)`` with ``a <= b``: the range of the per-step, per-channel
        noise mean. Default ``(-0.5, 0.5)``.
    noise_std: keyword-only, ``(c, d)`` with ``0 <= c <= d``: the range of the per-step,
        per-channel noise std. Default ``(0.5, 1.0)``.
    seed: keyword-only, the seed of the noise sequence, an int ``>= 0``, or ``None`` (drawn from
        torch's global generator).
    skip_nonfinite: keyword-only, as :class:`covshift.nn.BatchNorm1d`.

Raises:
    ValueError: a range that is not two finite numbers in order, a negative std, a negative
        seed; and as :class:`covshift.nn.BatchNorm*` for the input.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import torch
from torch import Tensor

from covshift.nn.batchnorm import BatchNorm1d, BatchNorm2d

__all__ = ["NoisyBatchNorm1d", "NoisyBatchNorm2d", "draw_noise", "step_generator"]

_DOC = __doc__
_MIX = 0x9E3779B97F4A7C15  # an odd 64-bit constant (the golden ratio): spreads (seed, step) over seeds


def step_generator(seed: int, step: int) -> torch.Generator:
    """A CPU generator determined by ``(seed, step)`` alone, different for every step."""
    return torch.Generator().manual_seed((seed * _MIX + step) % (2**63 - 1))


def _draw_parameters(
    channels: int, noise_mean: tuple[float, float], noise_std: tuple[float, float], generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    u = torch.rand(2, channels, generator=generator, dtype=torch.float64)  # drawn first, so z follows
    return noise_mean[0] + (noise_mean[1] - noise_mean[0]) * u[0], noise_std[0] + (noise_std[1] - noise_std[0]) * u[1]


def draw_noise(
    shape: Sequence[int],
    noise_mean: tuple[float, float],
    noise_std: tuple[float, float],
    generator: torch.Generator,
    dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor, Tensor]:
    r"""One step's noise for an input of ``shape`` ``(N, C, ...)``, on the CPU.

    Returns ``(noise, mu, sigma)``: ``mu`` and ``sigma`` ``(C,)`` drawn from ``U(noise_mean)`` and
    ``U(noise_std)``, and ``noise = mu[c] + sigma[c] * z`` with ``z`` i.i.d. ``N(0, 1)`` of ``shape``.
    """
    channels = shape[1]
    mu, sigma = _draw_parameters(channels, noise_mean, noise_std, generator)
    z = torch.randn(tuple(shape), generator=generator, dtype=dtype)
    view = (1, channels) + (1,) * (len(shape) - 2)
    noise = mu.to(dtype).view(view) + sigma.to(dtype).view(view) * z
    return noise, mu, sigma


def _check_range(owner: str, name: str, value: Any, low: Optional[float]) -> tuple[float, float]:
    try:
        a, b = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{owner} expected {name} to be a pair (low, high) of numbers, got {value!r}.") from None
    if not (math.isfinite(a) and math.isfinite(b) and a <= b) or (low is not None and a < low):
        floor = f" and low >= {low}" if low is not None else ""
        raise ValueError(
            f"{owner} expected {name} = (low, high) with finite low <= high{floor}, got {value!r}. "
            f"Pass e.g. {name}=(0.5, 1.0)."
        )
    return a, b


class _NoisyMixin:
    """BatchNorm's forward, then the step's noise in training. Placed first in the MRO."""

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: Any = None,
        dtype: Optional[torch.dtype] = None,
        *,
        bias: bool = True,
        noise_mean: tuple[float, float] = (-0.5, 0.5),
        noise_std: tuple[float, float] = (0.5, 1.0),
        seed: Optional[int] = None,
        skip_nonfinite: bool = False,
    ) -> None:
        owner = type(self).__name__
        noise_mean = _check_range(owner, "noise_mean", noise_mean, None)
        noise_std = _check_range(owner, "noise_std", noise_std, 0.0)
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,)))
        elif isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"{owner} expected seed to be an int >= 0 or None, got {seed!r}.")
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias, skip_nonfinite=skip_nonfinite
        )
        self.noise_mean, self.noise_std, self.seed = noise_mean, noise_std, seed
        # The noise's own step counter: in a buffer, so measurements on cloned buffers replay it.
        self.register_buffer("noise_step", torch.zeros((), dtype=torch.long, device=device), persistent=False)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", noise_mean={self.noise_mean}, noise_std={self.noise_std}, seed={self.seed}"

    def noise_parameters(self, step: Optional[int] = None) -> tuple[Tensor, Tensor]:
        """``(mu, sigma)``, ``(C,)`` float64: the noise distribution of ``step`` (default: the next one)."""
        step = int(self.noise_step) if step is None else step
        return _draw_parameters(self.num_features, self.noise_mean, self.noise_std, step_generator(self.seed, step))

    def forward(self, input: Tensor) -> Tensor:
        out = super().forward(input)
        if not self.training or input.numel() == 0:
            return out
        step = int(self.noise_step)
        self.noise_step.add_(1)
        noise, _, _ = draw_noise(out.shape, self.noise_mean, self.noise_std, step_generator(self.seed, step))
        return out + noise.to(device=out.device, dtype=out.dtype)


class NoisyBatchNorm1d(_NoisyMixin, BatchNorm1d):
    __doc__ = "BatchNorm over ``(N, C)`` or ``(N, C, L)`` input, plus per-step noise in training.\n" + _DOC


class NoisyBatchNorm2d(_NoisyMixin, BatchNorm2d):
    __doc__ = "BatchNorm over ``(N, C, H, W)`` input, plus per-step noise in training.\n" + _DOC


def _noisy_bn(num_features: int, *, dim: int = 1, **kwargs: Any) -> torch.nn.Module:
    classes = {1: NoisyBatchNorm1d, 2: NoisyBatchNorm2d}
    if dim not in classes:
        raise ValueError(f"norm 'noisy-bn' supports dim 1 and 2, got dim={dim}")
    return classes[dim](num_features, **kwargs)


def _register() -> None:
    from covshift.nn.norms import register_norm

    register_norm(
        "noisy-bn",
        _noisy_bn,
        description="BatchNorm plus noise re-drawn every step (Santurkar et al. 2018)",
        overwrite=True,  # idempotent under importlib.reload
    )


_register()
