"""Train one arm of an experiment: a plain PyTorch loop with the activation monitor attached.

Reads top to bottom: seed, data, model, optimizer, then ``steps`` mini-batches, with test accuracy
every ``eval_every`` steps (and at step 0) appended to ``<arm>/metrics.jsonl`` as it goes.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from covshift._io import append_jsonl, atomic_write_json
from covshift.experiments.config import ExperimentConfig
from covshift.experiments.data import Dataset, load_dataset
from covshift.experiments.registry import get_experiment
from covshift.monitor import ActivationMonitor, MonitorConfig

__all__ = ["train_arm", "ProgressFn", "HIST_RANGE"]

# (arm, step, train loss, last test accuracy or None)
ProgressFn = Callable[[str, int, float, Optional[float]], None]

# Fixed histogram edges for every watched layer of every arm, so heatmaps share one y-axis.
HIST_RANGE = (-12.0, 12.0)
HIST_BINS = 96


def make_optimizer(config: ExperimentConfig, params) -> torch.optim.Optimizer:
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr)
    return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum)


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


@torch.no_grad()
def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) on the whole set, in eval mode."""
    was_training = model.training
    model.eval()
    logits = model(x)
    model.train(was_training)
    return float((logits.argmax(1) == y).float().mean()), float(F.cross_entropy(logits, y))


def train_arm(
    experiment: str,
    config: ExperimentConfig,
    arm: str,
    run_dir: Path,
    progress: Optional[ProgressFn] = None,
    data: Optional[Dataset] = None,
) -> dict:
    """Train arm ``arm`` of ``experiment`` under ``run_dir/arm``; returns its final numbers.

    One thread per arm: the networks are small enough that threads do not pay, and a fixed thread
    count makes the metrics identical whether the arms run one after another or in parallel.
    A KeyboardInterrupt stops the loop cleanly: what was measured is flushed, the status is
    recorded as ``interrupted``, and the interrupt propagates.
    """
    torch.set_num_threads(1)
    exp = get_experiment(experiment)
    cfg = exp.arm_config(config, arm)
    arm_dir = Path(run_dir) / arm
    arm_dir.mkdir(parents=True, exist_ok=True)
    data = data if data is not None else load_dataset(cfg.data)
    x_train, y_train = torch.from_numpy(data.x_train), torch.from_numpy(data.y_train)
    x_test, y_test = torch.from_numpy(data.x_test), torch.from_numpy(data.y_test)

    torch.manual_seed(cfg.seed)
    model = exp.build_model(cfg, data)
    optimizer = make_optimizer(cfg, model.parameters())
    batches = _Batches(len(y_train), cfg.batch_size, cfg.seed)
    unit_layer = exp.unit_layer(cfg) if exp.unit_layer else None
    monitor = ActivationMonitor(
        model,
        config=MonitorConfig(
            every=cfg.monitor_every,
            layers=list(exp.watch),
            hist_range=HIST_RANGE,
            hist_bins=HIST_BINS,
            channels={unit_layer: list(cfg.units)} if unit_layer else None,
        ),
        log_dir=arm_dir / "monitor",
        probe=x_test[: cfg.probe_size] if cfg.probe_size else None,
        tensorboard=cfg.tensorboard,
        if_exists="overwrite",
    )
    tb = None
    if cfg.tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        tb = SummaryWriter(str(arm_dir / "tensorboard"))

    metrics_path = arm_dir / "metrics.jsonl"
    metrics_path.unlink(missing_ok=True)
    status = {"arm": arm, "status": "running", "step": 0}
    atomic_write_json(arm_dir / "status.json", status)
    t0 = time.perf_counter()
    loss_sum, loss_n, acc, step = 0.0, 0, None, 0

    def checkpoint(step: int, train_loss: Optional[float]) -> float:
        test_acc, test_loss = evaluate(model, x_test, y_test)
        record = {"step": step, "train_loss": train_loss, "test_acc": test_acc, "test_loss": test_loss, "seconds": time.perf_counter() - t0}
        append_jsonl(metrics_path, record)
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
                loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                monitor.step()
                loss_sum += loss.detach()
                loss_n += 1
                if step % cfg.eval_every == 0 or step == cfg.steps:
                    train_loss = float(loss_sum) / loss_n
                    loss_sum, loss_n = 0.0, 0
                    acc = checkpoint(step, train_loss)
                    if progress:
                        progress(arm, step, train_loss, acc)
                elif progress and step % max(cfg.steps // 200, 1) == 0:
                    progress(arm, step, float(loss.detach()), None)
        status.update(status="complete", step=cfg.steps)
    except KeyboardInterrupt:
        status.update(status="interrupted", step=step)
        raise
    finally:
        if tb is not None:
            tb.close()
        status.update(seconds=time.perf_counter() - t0, final_test_acc=acc)
        atomic_write_json(arm_dir / "status.json", status)
    return status
