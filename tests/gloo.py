"""Two-process torch.distributed tests on 127.0.0.1 (gloo): spawn the ranks, wait, collect each one's result.

A worker is ``worker(rank, port, out_dir)``: it joins the group on ``port``, and saves a dict to
``out_dir/rank{rank}.pt`` (with ``"error"`` holding a traceback if it failed, so the parent reports it
instead of hanging). Imported by the test modules as ``gloo`` (tests/ is on sys.path through conftest.py).
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Callable

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(worker: Callable[[int, int, str], None], out_dir: Path, world: int, timeout_s: float) -> list[dict]:
    """Run ``worker`` on ``world`` spawned processes; every rank's saved result, in rank order."""
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=worker, args=(r, port, str(out_dir))) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout_s)
    hung = [p for p in procs if p.is_alive()]
    for p in hung:
        p.kill()
    assert not hung, f"{len(hung)} rank(s) hung for {timeout_s}s"
    results = [torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=False) for r in range(world)]
    for r, res in enumerate(results):
        assert "error" not in res, f"rank {r} failed:\n{res['error']}"
    return results
