"""The report orders sweep points by the declared grid (numbers as numbers), and clips a metric's interval
to the range the metric can take; both checked on run directories written by hand (no training)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import pytest

from covshift.experiments import Arm, Axis, Experiment, ExperimentConfig, Metric, Role, Unit, register, registry
from covshift.experiments.report import build_report
from covshift.experiments.results import load_run
from covshift.experiments.stats import CLIPPED_MARK


@dataclass
class _GridConfig(ExperimentConfig):
    lrs: tuple[float, ...] = (0.003, 0.01, 0.1, 1.0, 10.0)
    depths: tuple[int, ...] = (4, 16, 128)
    depth: int = 4


def _acc(u):
    return u.final("test_acc")


def _count(u):
    return u.final("count")


TOY = Experiment(
    name="toy-order",
    summary="hand-written units",
    config=_GridConfig(progress=False),
    arms=(Arm("a", Role.BASELINE, "A"), Arm("b", Role.TREATMENT, "B")),
    sweep=(Axis("lr", "lrs"), Axis("depth", "depths")),
    metrics=(Metric("acc", "accuracy", _acc, bounds=(0.0, 1.0)), Metric("count", "count", _count, digits=2, bounds=(0.0, math.inf)),
             Metric("free", "unbounded", _count, digits=2)),
)


@pytest.fixture
def toy():
    register(TOY, overwrite=True)
    yield TOY
    registry._REGISTRY.pop(TOY.name, None)


def _write_run(tmp_path, values: dict, config: dict | None = None):
    """A run directory with one unit per ``(arm, lr, depth, seed) -> (acc, count)``."""
    run = tmp_path / "run"
    run.mkdir()
    cfg = {**TOY.config.to_dict(), **(config or {})}
    (run / "config.json").write_text(json.dumps({"experiment": TOY.name, "version": TOY.version, "config": cfg, "status": "complete"}))
    for (arm, lr, depth, seed), (acc, count) in values.items():
        unit = Unit(arm, seed, (("lr", lr), ("depth", depth)))
        d = run / unit.path
        d.mkdir(parents=True)
        (d / "unit.json").write_text(json.dumps({"unit": unit.to_dict(), "config": cfg}))
        (d / "status.json").write_text(json.dumps({"status": "complete"}))
        (d / "metrics.jsonl").write_text(json.dumps({"step": 1, "test_acc": acc, "count": count}) + "\n")
    return run


def test_points_follow_the_grid_not_the_directory_names(toy, tmp_path):
    # On disk (and sorted as strings) depth=128 comes before depth=16 and lr=0.01 before lr=0.003.
    vals = {(arm, lr, d, 0): (0.5, 1.0) for arm in ("a", "b") for lr in (10.0, 0.01, 0.003, 1.0, 0.1) for d in (128, 16, 4)}
    run = load_run(_write_run(tmp_path, vals))
    pts = [(dict(p)["lr"], dict(p)["depth"]) for p in run.points()]
    assert pts == [(lr, d) for lr in (0.003, 0.01, 0.1, 1.0, 10.0) for d in (4, 16, 128)]
    labels = [label for _, _, label in run.groups()]
    assert labels[:4] == ["A (lr=0.003, depth=4)", "B (lr=0.003, depth=4)", "A (lr=0.003, depth=16)", "B (lr=0.003, depth=16)"]
    summary = build_report(run.dir)
    assert [r["network"] for r in summary["table"]][:3] == ["A (lr=0.003, depth=4)", "B (lr=0.003, depth=4)", "A (lr=0.003, depth=16)"]


def test_points_follow_a_declared_grid_that_is_not_sorted_and_put_strays_last(toy, tmp_path):
    vals = {("a", lr, d, 0): (0.5, 1.0) for lr in (0.5, 0.1, 2.0, 0.01) for d in (16, 4, 64)}
    run = load_run(_write_run(tmp_path, vals, {"lrs": [2.0, 0.1, 0.01], "depths": [16, 4]}))
    pts = [(dict(p)["lr"], dict(p)["depth"]) for p in run.points()]
    # the grid's order first (2, 0.1, 0.01; 16, 4), then values not in it (copied in from elsewhere) by size
    assert pts == [(lr, d) for lr in (2.0, 0.1, 0.01, 0.5) for d in (16, 4, 64)]


def test_intervals_are_clipped_to_the_metrics_range_and_marked(toy, tmp_path):
    # accuracies 0.99, 1, 1: the t interval reaches 1.0072; counts 0, 0, 0.3 reach -0.37
    vals = {("a", 0.1, 4, s): (acc, count) for s, (acc, count) in enumerate([(0.99, 0.0), (1.0, 0.0), (1.0, 0.3)])}
    run_dir = _write_run(tmp_path, vals)
    summary = build_report(run_dir)
    m = summary["metrics"]["a @ lr=0.1, depth=4"]
    assert m["acc"]["ci95"][1] == 1.0 and m["acc"]["ci95_unclipped"][1] > 1.0 and m["acc"]["ci95"][0] == m["acc"]["ci95_unclipped"][0]
    assert m["acc"]["mean"] == pytest.approx((0.99 + 1 + 1) / 3)
    assert m["count"]["ci95"][0] == 0.0 and m["count"]["ci95_unclipped"][0] < 0.0
    assert m["free"]["ci95"][0] < 0.0 and "ci95_unclipped" not in m["free"]  # no bounds declared: not clipped
    row = summary["table"][0]
    assert row["accuracy"].endswith(f", 1.0000]{CLIPPED_MARK}") and row["count"].endswith(CLIPPED_MARK)
    assert not row["unbounded"].endswith(CLIPPED_MARK)
    assert CLIPPED_MARK in summary["ci_method"]
    html = (run_dir / "report.html").read_text()
    assert "is clipped to it; the mean is not changed" in html


def test_no_note_when_nothing_is_clipped(toy, tmp_path):
    vals = {("a", 0.1, 4, s): (acc, 5.0 + s) for s, acc in enumerate([0.5, 0.6, 0.7])}
    run_dir = _write_run(tmp_path, vals)
    summary = build_report(run_dir)
    assert "ci95_unclipped" not in summary["metrics"]["a @ lr=0.1, depth=4"]["acc"]
    assert "is clipped to it" not in (run_dir / "report.html").read_text()


def test_declared_bounds_of_the_literature_metrics():
    from covshift.experiments.registry import get_experiment

    bounds = {(e, m.name): m.bounds_for(get_experiment(e).config) for e in ("santurkar-noise", "landscape", "lr-sweep", "depth", "batch-size")
              for m in get_experiment(e).metrics}
    assert bounds[("santurkar-noise", "final_test_acc")] == (0.0, 1.0) and bounds[("santurkar-noise", "ics_cosine")] == (-1.0, 1.0)
    assert bounds[("santurkar-noise", "ics_l2")] == (0.0, math.inf) and bounds[("landscape", "beta_smoothness")] == (0.0, math.inf)
    assert bounds[("batch-size", "test_error")] == (0.0, 1.0) and bounds[("lr-sweep", "test_acc")] == (0.0, 1.0)
    assert bounds[("depth", "numerical_rank")] == (0.0, 128.0)  # min(batch 128, width 128)
    assert bounds[("depth", "log_grad_ratio")] is None
