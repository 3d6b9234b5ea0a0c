"""examples/ddp_syncbn.py runs under torchrun on 2 CPU processes (gloo), with the monitor on rank 0."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_ddp_example_trains_a_few_steps_under_torchrun(tmp_path):
    log_dir = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        str(ROOT / "examples" / "ddp_syncbn.py"), "--steps", "12", "--monitor-every", "5", "--log-dir", str(log_dir),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"exit {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr[-4000:]}"
    assert "step   12  loss" in proc.stdout
    assert "running statistics agree across 2 ranks" in proc.stdout
    # Rank 0's monitor recorded steps 0, 5 and 10 of the SyncBatchNorm layers and wrote its run.
    rows = [json.loads(line) for line in (log_dir / "monitor.jsonl").read_text().splitlines() if line.strip()]
    assert rows, "the monitor wrote no records"
    assert "monitor (rank 0 shard)   1: input mean" in proc.stdout and "at step 10" in proc.stdout
