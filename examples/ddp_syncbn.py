"""Train a small CNN with DistributedDataParallel and covshift's SyncBatchNorm, on CPU with gloo.

Run it on 2 processes (CPU is enough)::

    torchrun --standalone --nproc_per_node 2 examples/ddp_syncbn.py --steps 200 --log-dir runs/ddp_syncbn

or without torchrun as a single process (``python examples/ddp_syncbn.py``), where SyncBatchNorm is plain
BatchNorm.

What it shows, top to bottom:

1. A model written with ``torch.nn.BatchNorm2d`` is converted with
   ``covshift.nn.SyncBatchNorm.convert_sync_batchnorm``: in training every BN layer normalizes with the
   statistics of the *global* batch (all ranks' shards, merged by count), and its running statistics are
   identical on every rank. ``torch.nn.SyncBatchNorm`` cannot do this here: it needs GPUs, and DDP
   refuses it on CPU modules.
2. ``DistributedDataParallel`` averages the parameter gradients (the BN layers' weight and bias
   gradients included); covshift's SyncBatchNorm all-reduces only the two reductions its input gradient
   needs.
3. The activation monitor runs on **every rank** with ``MonitorConfig(reduce="global")``: each rank
   measures its own shard, and at every flush the ranks merge their records (one ``all_gather`` per
   flush, never one per hook: exact counts, means and variances by Chan's formula, min/max, summed
   histogram counts, percentiles from the pooled samples). What is recorded is therefore the
   distribution of the **global batch**, the one SyncBatchNorm normalizes with, and only rank 0 writes
   the run directory. ``optimizer=`` makes the monitor step itself after every ``optimizer.step()``.
   (The default, ``reduce="rank"``, records each process's own shard with no communication.)
4. Evaluation runs on rank 0 alone, in eval mode, where SyncBatchNorm never communicates.
"""

from __future__ import annotations

import argparse
import os
import socket

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import covshift.nn as cnn
from covshift.monitor import ActivationMonitor, MonitorConfig


def make_data(n: int, seed: int = 0) -> TensorDataset:
    """Images (1, 12, 12) of noise with a bright 4x4 blob in one of 4 quadrants; the label is the quadrant."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 12, 12, generator=g)
    y = torch.randint(0, 4, (n,), generator=g)
    for i, label in enumerate(y.tolist()):
        r, c = 6 * (label // 2) + 1, 6 * (label % 2) + 1
        x[i, 0, r : r + 4, c : c + 4] += 0.8
    return TensorDataset(x, y)


def make_model() -> torch.nn.Module:
    """A plain torch CNN; BatchNorm layers are converted below."""
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, padding=1, bias=False),  # (B, 8, 12, 12)
        torch.nn.BatchNorm2d(8),
        torch.nn.ReLU(),
        torch.nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False),  # (B, 16, 6, 6)
        torch.nn.BatchNorm2d(16),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(2),  # (B, 16, 2, 2): keeps where the blob was
        torch.nn.Flatten(),
        torch.nn.Linear(64, 4),
    )


def init_distributed() -> tuple[int, int]:
    """Join the torchrun group (gloo), or make a group of one when started without torchrun."""
    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(s.getsockname()[1]))
    dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=32, help="samples per rank per step")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--log-dir", default=None, help="where rank 0's monitor writes its run (default: in memory)")
    parser.add_argument("--monitor-every", type=int, default=10, help="record activations every N steps")
    args = parser.parse_args()

    torch.set_num_threads(1)  # one core per process
    rank, world = init_distributed()
    torch.manual_seed(0)  # the same initial weights everywhere (DDP also broadcasts rank 0's)

    model = cnn.SyncBatchNorm.convert_sync_batchnorm(make_model())
    ddp = DDP(model)  # CPU module: no device_ids
    optimizer = torch.optim.SGD(ddp.parameters(), lr=args.lr, momentum=0.9)
    train = make_data(2048, seed=0)
    sampler = DistributedSampler(train, num_replicas=world, rank=rank, shuffle=True, seed=0)
    loader = DataLoader(train, batch_size=args.batch_size, sampler=sampler, drop_last=True)

    # ---- activation monitor: on every rank, statistics of the global batch, files from rank 0 ---------
    # SyncBatchNorm is a _NormBase, so the default layers would include it; naming them keeps the run
    # to the inputs of the BN layers and the ReLUs. Each rank records the same modules at the same
    # steps (a requirement of reduce="global"); the flushes (every flush_every recorded steps, and on
    # leaving the with block) are collectives. log_dir is used by rank 0 only.
    config = MonitorConfig(every=args.monitor_every, layers=[cnn.SyncBatchNorm, torch.nn.ReLU], reduce="global")
    monitor = ActivationMonitor(model, config=config, log_dir=args.log_dir, if_exists="overwrite", optimizer=optimizer)
    # --------------------------------------------------------------------------------------------------

    step, epoch = 0, 0
    with monitor:
        while step < args.steps:
            sampler.set_epoch(epoch)
            for x, y in loader:
                loss = torch.nn.functional.cross_entropy(ddp(x), y)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()  # also ends the monitor's step (optimizer=)
                step += 1
                if step % 20 == 0 or step == args.steps:
                    mean_loss = loss.detach().clone()
                    dist.all_reduce(mean_loss)  # every rank takes part
                    if rank == 0:
                        print(f"step {step:4d}  loss {mean_loss.item() / world:.4f}", flush=True)
                if step == args.steps:
                    break
            epoch += 1

    # The running statistics are the same on every rank: they were updated from the global batch.
    for name, m in model.named_modules():
        if isinstance(m, cnn.SyncBatchNorm):
            mine = torch.cat([m.running_mean, m.running_var])
            gathered = [torch.empty_like(mine) for _ in range(world)]
            dist.all_gather(gathered, mine)
            assert all(torch.equal(g, mine) for g in gathered), f"{name}: running statistics differ across ranks"

    if rank == 0:
        model.eval()  # eval-mode SyncBatchNorm never communicates: rank 0 may evaluate alone
        test = make_data(512, seed=1)
        with torch.no_grad():
            accuracy = (model(test.tensors[0]).argmax(1) == test.tensors[1]).float().mean().item()
        print(f"running statistics agree across {world} ranks; test accuracy {accuracy:.3f}")
        for layer in monitor.layers:  # rank 0 holds the merged records
            steps, means = monitor.series(layer, "mean")
            _, numel = monitor.series(layer, "numel")
            if len(steps):
                print(f"monitor (global batch) {layer:>3}: input mean {means[0]:+.3f} at step {int(steps[0])}, "
                      f"{means[-1]:+.3f} at step {int(steps[-1])}, {int(numel[-1])} values per record")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
