"""examples/ddp_syncbn.py runs under torchrun on 2 CPU processes (gloo); its monitor records the global batch."""

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
    # The monitor (reduce="global", optimizer=) recorded steps 0, 5 and 10 of the SyncBatchNorm layers,
    # merged over both ranks: each record of the first BN's input holds both shards, 2 x 32 samples of
    # (8, 12, 12). Rank 0 wrote the run, once.
    rows = [json.loads(line) for line in (log_dir / "monitor.jsonl").read_text().splitlines() if line.strip()]
    bn1 = [r for r in rows if r["layer"] == "1"]
    assert [r["step"] for r in bn1] == [0, 5, 10], rows
    assert all(r["numel"] == 2 * 32 * 8 * 12 * 12 for r in bn1), [r["numel"] for r in bn1]
    assert "monitor (global batch)   1: input mean" in proc.stdout and "at step 10, 73728 values" in proc.stdout
