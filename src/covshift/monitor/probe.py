"""The probe batch's forward: run through the model with its state and the RNG left as they were.

:class:`~covshift.monitor.ActivationMonitor` measures a fixed batch at every checkpoint
(``probe=``) inside :func:`probe_state`, so that the probe changes neither the training (no
gradients, no running-statistics update kept, no random numbers drawn from the user's generators)
nor the model's modes.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Literal

import torch
from torch import nn

from covshift.monitor.hooks import _cuda_devices

__all__ = ["probe_state"]


@contextlib.contextmanager
def probe_state(model: nn.Module, mode: Literal["eval", "train"]) -> Iterator[None]:
    """Within this block: ``torch.no_grad()``, the CPU and CUDA RNG forked, and ``model`` in eval
    mode (``mode="eval"``) or in its own modes with its buffers restored on exit (``"train"``:
    a BatchNorm's running statistics move during the probe and are put back). Every module's
    ``training`` flag is restored on exit, even on error."""
    modes = {m: m.training for m in model.modules()}
    buffers = [b.detach().clone() for b in model.buffers()] if mode == "train" else []
    with torch.no_grad(), torch.random.fork_rng(devices=_cuda_devices(model)):
        try:
            if mode == "eval":
                model.eval()
            yield
        finally:
            for m, training in modes.items():
                m.training = training
            for b, saved in zip(model.buffers(), buffers):
                b.copy_(saved)
