"""The default unit of work: train one network with the activation monitor attached.

Reads top to bottom: data, model, optimizer, then ``steps`` mini-batches. Test accuracy is
appended to ``metrics.jsonl`` at step 0, every ``eval_every_early`` steps during the first
``early_fraction`` of training, every ``eval_every`` steps after, and at the last step. Every
``ics_every`` steps (at the monitor's checkpoints), before that step's update, the gradient ICS of
each declared layer's weights is appended to ``gradient_ics.jsonl``.

The unit runs on whatever thread count its caller set (the runner: one per unit, restored
afterwards); it seeds torch from the unit's seed, so a seed gives the same metrics anywhere.
"""

from __future__ import annotations

import time
from typing import Optional

import torch
import torch.nn.functional as F

from covshift._io import append_jsonl
from covshift.experiments.config import ExperimentConfig
from covshift.experiments.declaration import UnitContext
from covshift.monitor import ActivationMonitor, MonitorConfig, gradient_ics

__all__ = ["train_unit", "eval_steps", "make_optimizer", "HIST_RANGE", "HIST_BINS"]

# Fixed histogram edges for every watched layer of every arm, so heatmaps share one y-axis.
HIST_RANGE = (-12.0, 12.0)
HIST_BINS = 96


def make_optimizer(config: ExperimentConfig, params) -> torch.optim.Optimizer:
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr)
    return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum)


def eval_steps(config: ExperimentConfig) -> list[int]:
    """The steps at which test accuracy is measured: 0, a fine grid early, a coarser one after, the last."""
    early_end = int(config.early_fraction * config.steps)
    fine = range(0, early_end + 1, config.eval_every_early)
    coarse = range(0, config.steps + 1, config.eval_every)
    return sorted({*fine, *coarse, config.steps})


class _Batches:
    """An endless stream of mini-batch indices: a fresh permutation per epoch, from its own generator."""

    def __init__(self, n: int, batch_size: int, seed: int) -> None:
        self.n, self.batch_size = n, batch_size
        self.gen = torch.Generator().manual_seed(seed)
        self.perm, self.pos = torch.randperm(n, generator=self.gen), 0

    def next(self) -> torch.Tensor:
        if self.pos + self.batch_size > self.n:  # the short tail of an epoch is skipped, not mixed
            self.perm, self.pos = torch.randperm(self.n, generator=self.gen), 0
        idx = self.perm[self.pos : self.pos + self.batch_size]
        self.pos += self.batch_size
        return idx


def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) on the whole set, in eval mode."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():  # no autograd bookkeeping at all (the test set is 10,000 rows)
            logits = model(x)
    finally:
        model.train(was_training)
    return float((logits.argmax(1) == y).float().mean()), float(F.cross_entropy(logits, y))


def train_unit(ctx: UnitContext) -> dict:
    """Train the unit's network under ``ctx.dir``; returns its final numbers.

    A KeyboardInterrupt stops the loop: the monitor flushes what it measured (its context exits)
    and the interrupt propagates to the runner, which records the unit as interrupted.
    """
    cfg, exp, out = ctx.config, ctx.experiment, ctx.dir
    if cfg.batch_size > len(ctx.data.y_train):
        from covshift.experiments.config import ConfigError

        raise ConfigError(f"--batch-size {cfg.batch_size} is larger than the training set ({len(ctx.data.y_train)} examples)")
    data = ctx.data
    x_train, y_train = torch.from_numpy(data.x_train), torch.from_numpy(data.y_train)
    x_test, y_test = torch.from_numpy(data.x_test), torch.from_numpy(data.y_test)

    torch.manual_seed(ctx.seed)
    model = exp.build_model(cfg, data)
    params = list(model.parameters())
    optimizer = make_optimizer(cfg, params)
    batches = _Batches(len(y_train), cfg.batch_size, ctx.seed)
    layers = exp.layers_for(cfg)
    unit_layers = {l.module: list(cfg.units) for l in layers if l.record_units}
    ics_layers = [l.weights for l in layers if l.weights]
    monitor = ActivationMonitor(
        model,
        config=MonitorConfig(
            every=cfg.monitor_every,
            layers=list(exp.watch_for(cfg)),
            hist_range=HIST_RANGE,
            hist_bins=HIST_BINS,
            channels=unit_layers or None,
        ),
        log_dir=out / "monitor",
        probe=x_test[: cfg.probe_size] if cfg.probe_size else None,
        tensorboard=cfg.tensorboard,
        if_exists="overwrite",
    )
    tb = None
    if cfg.tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        tb = SummaryWriter(str(out / "tensorboard"))

    metrics_path, ics_path = out / "metrics.jsonl", out / "gradient_ics.jsonl"
    evals = set(eval_steps(cfg))
    t0 = time.perf_counter()
    loss_sum, loss_n, acc = 0.0, 0, None
    progress_every = max(cfg.steps // 200, 1)

    def checkpoint(step: int, train_loss: Optional[float]) -> float:
        test_acc, test_loss = evaluate(model, x_test, y_test)
        append_jsonl(metrics_path, {"step": step, "train_loss": train_loss, "test_acc": test_acc, "test_loss": test_loss, "seconds": time.perf_counter() - t0})
        if tb is not None:
            tb.add_scalar("test/accuracy", test_acc, step)
            tb.add_scalar("test/loss", test_loss, step)
            if train_loss is not None:
                tb.add_scalar("train/loss", train_loss, step)
        return test_acc

    try:
        with monitor:
            acc = checkpoint(0, None)
            for step in range(1, cfg.steps + 1):
                idx = batches.next()
                # index_select: the same rows as x_train[idx], without advanced indexing's Python-side cost
                xb, yb = x_train.index_select(0, idx), y_train.index_select(0, idx)
                done = step - 1  # updates so far: the monitor's step number of this forward
                if ics_layers and cfg.ics_every and done % cfg.ics_every == 0:
                    for layer, g in gradient_ics(model, F.cross_entropy, xb, yb, optimizer, layers=ics_layers).items():
                        append_jsonl(ics_path, {"step": done, "layer": layer, "l2_diff": g.l2_diff, "cosine": g.cosine})
                loss = F.cross_entropy(model(xb), yb)
                for p in params:  # optimizer.zero_grad(set_to_none=True), without its per-call profiler scope
                    p.grad = None
                loss.backward()
                optimizer.step()
                monitor.step()
                ctx.step = step
                loss_sum += loss.detach()
                loss_n += 1
                if step in evals:
                    train_loss = float(loss_sum) / loss_n
                    loss_sum, loss_n = 0.0, 0
                    acc = checkpoint(step, train_loss)
                    if ctx.progress:
                        ctx.progress(step, cfg.steps, train_loss, acc)
                elif ctx.progress and step % progress_every == 0:
                    ctx.progress(step, cfg.steps, float(loss.detach()), None)
    finally:
        if tb is not None:
            tb.close()
    return {"final_test_acc": acc, "train_seconds": time.perf_counter() - t0}
