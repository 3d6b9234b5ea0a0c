"""What the literature experiments share: their networks, a lean training loop, and claim helpers.

* :func:`he_mlp`: the fully connected network of :mod:`covshift.experiments.models` (hidden layers
  ``hidden{i}.linear -> .norm -> .act``, any norm of the registry) with He initialization,
  :math:`W \\sim N(0, 2/\\text{fan-in})` before a ReLU and :math:`N(0, 1/\\text{fan-in})` for the
  output layer, biases 0, drawn from the unit's seed: the "well-initialized" ReLU network of
  Yang et al. 2019 and the usual default of the ReLU networks of Santurkar et al. and Bjorck et al.
* :func:`train_classifier`: plain SGD on mini-batches with test accuracy at checkpoints, a hook
  called before chosen steps (for measurements), and divergence detection (a non-finite loss stops
  the run and is recorded).
* :func:`not_evaluated`: the verdict of a claim that could not be evaluated, with its reason.
* :data:`HE_MLP_READS`, :data:`MONITOR_FIELDS`, :func:`hints`: what the experiments' declarations
  say they read (``Experiment.reads``) and the hints for what they do not.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from covshift.experiments.declaration import COSINE, NON_NEGATIVE, PROBABILITY, ClaimResult, Verdict  # noqa: F401 - the bounds: re-exported
from covshift.experiments.models import MLP

__all__ = ["he_mlp", "he_init_", "train_classifier", "TrainResult", "evaluate", "batch_indices", "not_evaluated", "tensors", "doc_field",
           "HE_MLP_READS", "MONITOR_FIELDS", "EVAL_SCHEDULE_FIELDS", "hints", "PROBABILITY", "NON_NEGATIVE", "COSINE"]

# The config fields he_mlp reads: the widths, the norm, the nonlinearity and the seed (not
# init_std: the weights are He-initialized).
HE_MLP_READS = frozenset({"hidden", "norm", "activation", "seeds"})
# Read only by the toolbox's training loop with its activation monitor and gradient ICS.
MONITOR_FIELDS = ("monitor_every", "ics_every", "units", "probe_size", "tensorboard")
# The training loop's early, finer evaluation grid (train_classifier evaluates every eval_every steps).
EVAL_SCHEDULE_FIELDS = ("eval_every_early", "early_fraction")
HE_INIT = "the networks are He-initialized, N(0, 2/fan-in)"


def hints(groups: dict[str, tuple[str, ...]]) -> dict[str, str]:
    """``Experiment.instead`` from ``{hint: (field, ...)}``: every field of a group gets its hint."""
    return {f: hint for hint, fields in groups.items() for f in fields}


def doc_field(text: str, **kw: Any) -> Any:
    """A config field with its ``--flag`` help text."""
    return field(metadata={"help": text}, **kw)


def he_init_(model: nn.Module, seed: int, last: Optional[nn.Linear] = None) -> nn.Module:
    """Re-draw every ``Linear``/``Conv`` weight from ``N(0, gain/fan_in)`` (gain 2; 1 for ``last``), biases 0,
    from a generator seeded with ``seed``, in module order (the same draws whatever the norm layers)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                fan_in = m.weight[0].numel()
                gain = 1.0 if m is last else 2.0
                m.weight.normal_(0.0, math.sqrt(gain / fan_in), generator=gen)
                if m.bias is not None:
                    m.bias.zero_()
    return model


def he_mlp(config, data) -> nn.Module:
    """:class:`~covshift.experiments.models.MLP` of ``config`` (its widths, norm and activation), He-initialized."""
    model = MLP(data.num_features, config.hidden, data.num_classes, config.norm, config.activation, 1.0)
    return he_init_(model, config.seeds[0], last=model.out)


def batch_indices(n: int, batch_size: int, steps: int, seed: int) -> torch.Tensor:
    """``(steps, batch_size)`` example indices: a fresh permutation per epoch (the short tail skipped)."""
    gen = torch.Generator().manual_seed(seed)
    per_epoch = n // batch_size
    epochs = -(-steps // per_epoch)
    rows = [torch.randperm(n, generator=gen)[: per_epoch * batch_size].view(per_epoch, batch_size) for _ in range(epochs)]
    return torch.cat(rows)[:steps]


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, chunk: int = 2000) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) on ``(x, y)`` in eval mode; the model's mode is restored."""
    was = model.training
    model.eval()
    correct, loss = 0, 0.0
    for i in range(0, len(y), chunk):
        logits = model(x[i : i + chunk])
        correct += int((logits.argmax(1) == y[i : i + chunk]).sum())
        loss += float(F.cross_entropy(logits, y[i : i + chunk], reduction="sum"))
    model.train(was)
    return correct / len(y), loss / len(y)


@dataclass
class TrainResult:
    steps: int  # steps taken (fewer than asked when the run diverged)
    diverged: bool
    test_acc: float
    test_loss: float
    train_loss: float  # mean over the last checkpoint interval (NaN after a divergence)
    seconds: float


def train_classifier(
    model: nn.Module,
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    x_test: torch.Tensor,
    y_test: torch.Tensor,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    momentum: float = 0.0,
    eval_every: int = 0,
    log: Optional[Callable[[dict], None]] = None,
    before_step: Optional[Callable[[int, torch.Tensor, torch.Tensor], None]] = None,
    measure_every: int = 0,
    eval_at_start: bool = True,
    progress: Optional[Callable[[int, int, Optional[float], Optional[float]], None]] = None,
) -> TrainResult:
    """SGD on cross-entropy; test accuracy at step 0 (unless ``eval_at_start=False``), every
    ``eval_every`` steps and at the end.

    ``before_step(step, x, y)`` is called before the update of every ``measure_every``-th step
    (steps ``0, N, 2N, ...``) with that step's batch. A non-finite training loss stops training;
    it, or a test loss at the end that is not finite (e.g. BatchNorm running statistics that
    overflowed) or above 100 times a uniform guess's ``ln C``, marks the run ``diverged``, and the test numbers are those of the diverged network.
    """
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    idx = batch_indices(len(y_train), batch_size, steps, seed)
    t0 = time.perf_counter()
    loss_sum, loss_n, diverged, step = 0.0, 0, False, 0

    def checkpoint(step: int) -> tuple[float, float]:
        acc, tl = evaluate(model, x_test, y_test)
        train_loss = loss_sum / loss_n if loss_n else None
        if log is not None:
            log({"step": step, "test_acc": acc, "test_loss": tl, "train_loss": train_loss, "seconds": time.perf_counter() - t0})
        if progress is not None:
            progress(step, steps, train_loss, acc)
        return acc, tl

    model.train()
    if eval_at_start:
        checkpoint(0)
    last_train = math.nan
    for step in range(steps):
        xb, yb = x_train[idx[step]], y_train[idx[step]]
        if before_step is not None and measure_every and step % measure_every == 0:
            before_step(step, xb, yb)
        loss = F.cross_entropy(model(xb), yb)
        if not torch.isfinite(loss):
            diverged = True
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss_sum += float(loss.detach())
        loss_n += 1
        done = step + 1
        if eval_every and done % eval_every == 0 and done != steps:
            last_train = loss_sum / loss_n
            acc, tl = checkpoint(done)
            loss_sum, loss_n = 0.0, 0
    taken = step if diverged else steps
    if loss_n:
        last_train = loss_sum / loss_n
    acc, tl = checkpoint(taken)
    # A network whose test loss is not finite, or 100 times that of a uniform guess, diverged too.
    blowup = 100 * math.log(max(int(y_test.max()) + 1, 2))
    diverged = diverged or not math.isfinite(tl) or tl > blowup
    return TrainResult(taken, diverged, acc, tl, math.nan if diverged else last_train, time.perf_counter() - t0)


def tensors(data, image_shape: Optional[tuple[int, ...]] = None) -> tuple[torch.Tensor, ...]:
    """``(x_train, y_train, x_test, y_test)`` of a :class:`~covshift.experiments.data.Dataset` as tensors
    (inputs reshaped to ``(N, *image_shape)`` when given)."""
    xs = [torch.from_numpy(data.x_train), torch.from_numpy(data.x_test)]
    if image_shape is not None:
        xs = [x.view(len(x), *image_shape) for x in xs]
    return xs[0], torch.from_numpy(data.y_train), xs[1], torch.from_numpy(data.y_test)


# --- claim helpers --------------------------------------------------------------------------------


def not_evaluated(reason: str) -> ClaimResult:
    return ClaimResult(Verdict.NOT_EVALUATED, "", reason=reason)
