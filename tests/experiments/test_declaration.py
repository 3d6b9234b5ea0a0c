"""Declarations drive everything: a toy experiment with its own arm names, layers, sweep and claims gets
a full report from the unchanged report.py; owned flags are refused on the command line."""

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from covshift.cli import main
from covshift.experiments import (
    Arm,
    Axis,
    Claim,
    ClaimResult,
    ConfigError,
    Experiment,
    ExperimentConfig,
    FigureSpec,
    Layer,
    Metric,
    Role,
    Unit,
    Verdict,
    apply_overrides,
    register,
    results,
)
from covshift.experiments import registry


@dataclass
class ToyConfig(ExperimentConfig):
    lrs: tuple[float, ...] = (0.05, 0.3)


def _final(u):
    return u.final("test_acc")


def _ln_beats_plain(run, tolerance):
    return results.verdict_greater(run.paired(_final, "ln", "plain", point=run.points()[0]), tolerance, "LN minus plain")


def _never(run, tolerance):
    return ClaimResult(Verdict.NOT_EVALUATED, "", reason="this toy measures nothing of the kind")


def _drift(run):
    from covshift.experiments import plots

    return plots.drift_figure(run)


def _ics(run):
    from covshift.experiments import plots

    return plots.gradient_ics_figure(run)


def _acc(run):
    import matplotlib.pyplot as plt

    from covshift.experiments import plots

    fig, ax = plt.subplots()
    plots.accuracy_panel(ax, run)
    return fig


TOY = Experiment(
    name="toy-declared",
    summary="a toy with its own names",
    paper="nobody 2026",
    question="Does LayerNorm help a tiny tanh MLP?",
    config=ToyConfig(hidden=(16, 8), activation="tanh", steps=40, batch_size=20, eval_every=10, eval_every_early=10,
                     monitor_every=10, ics_every=20, units=(0, 1), probe_size=20, progress=False, parallel="no"),
    arms=(
        Arm("plain", Role.BASELINE, "plain tanh net", {"norm": "none"}),
        Arm("ln", Role.TREATMENT, "LayerNorm'd net", {"norm": "layer"}),
        Arm("gn", Role.VARIANT, "GroupNorm'd net", {"norm": "group"}),
    ),
    sweep=(Axis("lr", "lrs", label="learning rate", log=True),),
    layers=(
        Layer("hidden1.act", "input to the first tanh", weights="hidden1.linear"),
        Layer("hidden2.act", "input to the last tanh", record_units=True, weights="hidden2.linear"),
    ),
    metrics=(Metric("final", "final accuracy", _final),),
    claims=(
        Claim("ln", "LayerNorm trains better.", "nobody 2026", _ln_beats_plain, tolerance=0.0, tolerance_text="LN ahead"),
        Claim("never", "Something unmeasurable.", "nobody 2026", _never),
    ),
    figures=(
        FigureSpec("drift.png", "drift of the toy", _drift),
        FigureSpec("gradient_ics.png", "gradient ICS of the toy", _ics),
        FigureSpec("acc.png", "accuracy of the toy", _acc),
    ),
    notes=("the toy differs from nothing",),
)


@pytest.fixture
def toy():
    register(TOY, overwrite=True)
    yield TOY
    registry._REGISTRY.pop(TOY.name, None)


@pytest.fixture
def toy_data(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 12)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64) + (x[:, 1] > 1)
    np.savez(tmp_path / "toy.npz", x_train=x[:150], y_train=y[:150], x_test=x[150:], y_test=y[150:])
    return tmp_path / "toy.npz"


def test_units_are_arms_by_points_by_seeds():
    cfg = apply_overrides(TOY.config, {"seeds": "0,1"})
    units = TOY.units(cfg)
    assert len(units) == 3 * 2 * 2
    assert units[0] == Unit("plain", 0, (("lr", 0.05),)) and units[-1] == Unit("gn", 1, (("lr", 0.3),))
    assert [u.seed for u in units[:6]] == [0] * 6  # seed-major: a partial run has every arm at its first seeds
    assert Unit("ln", 3, (("lr", 0.3),)).path == Path("ln/lr=0.3/seed3")
    assert Unit("bn", 0).path == Path("bn/seed0")
    ucfg = TOY.unit_config(cfg, units[-1])
    assert (ucfg.norm, ucfg.lr, ucfg.seeds) == ("group", 0.3, (1,))
    assert Unit.from_dict(json.loads(json.dumps(units[-1].to_dict()))) == units[-1]


def test_the_declaration_owns_its_fields():
    owned = TOY.owned_fields()
    assert set(owned) == {"norm", "lr"} and "arm 'ln'" in owned["norm"] and "--lrs" in owned["lr"]
    with pytest.raises(ConfigError, match=r"--norm is set by toy-declared's declaration \(arm 'plain' sets 'none'"):
        TOY.check_overrides({"norm": "bn"})
    TOY.check_overrides({"steps": 5})


def test_bad_declarations_are_refused():
    with pytest.raises(ValueError, match="unknown config fields"):
        dataclasses.replace(TOY, arms=(Arm("a", Role.BASELINE, "a", {"nrom": "bn"}),))
    with pytest.raises(ValueError, match="unique"):
        dataclasses.replace(TOY, arms=(Arm("a", Role.BASELINE, "a"), Arm("a", Role.TREATMENT, "b")))
    with pytest.raises(ValueError, match="directory"):
        Arm("a/b", Role.BASELINE, "x")


@pytest.mark.slow
def test_toy_gets_a_full_report_from_its_declaration(toy, toy_data, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", "toy-declared", "--data", str(toy_data), "--lrs", "0.05,0.3", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["metrics"]) == {f"{a} @ lr={lr}" for a in ("plain", "ln", "gn") for lr in (0.05, 0.3)}
    assert all(m["final"]["n"] == 1 for m in summary["metrics"].values())
    verdicts = {c["name"]: c["verdict"] for c in summary["claims"]}
    assert verdicts["never"] == "could not be evaluated"
    assert verdicts["ln"] in ("held", "did not hold")
    assert summary["figures"] == ["drift.png", "gradient_ics.png", "acc.png"]
    html = (out / "report.html").read_text()
    for text in ("LayerNorm&#x27;d net", "GroupNorm&#x27;d net", "plain tanh net", "input to the last tanh", "LayerNorm trains better.",
                 "this toy measures nothing of the kind", "the toy differs from nothing", "Does LayerNorm help a tiny tanh MLP?"):
        assert text in html, text
    for leak in ("without BN", "with BN", "sigmoid"):
        assert leak not in html.replace("activation", ""), leak
    # gradient ICS of the declared weights only, the first layer's by definition (0, 1)
    ics = [json.loads(l) for l in (out / "ln" / "lr=0.05" / "seed0" / "gradient_ics.jsonl").read_text().splitlines()]
    assert {r["layer"] for r in ics} == {"hidden1.linear", "hidden2.linear"} and sorted({r["step"] for r in ics}) == [0, 20]
    assert all((r["l2_diff"], r["cosine"]) == (0.0, 1.0) for r in ics if r["layer"] == "hidden1.linear")
    meta = json.loads((out / "config.json").read_text())
    assert (meta["experiment"], meta["version"]) == ("toy-declared", 1)
    assert "[could not be evaluated] Something unmeasurable." in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--norm", "bn"], "--norm is set by fig1's declaration (arm 'no-bn' sets 'none'; arm 'bn' sets 'bn')"),
        (["--optimizer", "adam", "--momentum", "0.9"], "--momentum applies to SGD only"),
        (["--hidden", "100,,100"], "--hidden has an empty item in '100,,100'"),
        (["--seeds", "0,0"], "--seeds needs distinct non-negative integers"),
        (["--seeds", "a"], "--seeds expects comma-separated integers"),
        (["--ray-address", "x:1"], "--ray-address applies to --executor ray only"),
        (["--ics-every", "150"], "must be a multiple of --monitor-every"),
        (["--workers", "3", "--parallel", "no"], "--workers 3 would do nothing: --parallel no runs the units in this process"),
        (["--workers", "2", "--executor", "ray"], "--workers 2 would do nothing: Ray schedules its own workers"),
    ],
)
def test_fig1_flags_that_do_nothing_or_are_owned_are_errors(argv, match, capsys):
    assert main(["run", "fig1", *argv, "--out", "/nonexistent/never-written"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and match in err, err


def test_list_shows_paper_and_question(capsys):
    assert main(["list"]) == 0
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("fig1 "))
    assert "Ioffe & Szegedy 2015, Figure 1" in line and "?" in line


@pytest.mark.slow
@pytest.mark.parametrize("norm, layer", [("renorm", "BatchRenorm1d"), ("group", "GroupNorm")])
def test_every_norm_trains_from_the_cli(norm, layer, tmp_path):
    out = tmp_path / "run"
    assert main(["run", "mlp", "--norm", norm, "--data", "mnist5k", "--steps", "20", "--eval-every", "10", "--monitor-every", "10",
                 "--ics-every", "10", "--probe-size", "20", "--no-progress", "--parallel", "no", "--out", str(out)]) == 0
    unit = json.loads((out / "net" / "seed0" / "unit.json").read_text())
    assert unit["config"]["norm"] == norm
    from covshift.experiments.models import build_mlp
    from covshift.experiments.data import load_dataset

    model = build_mlp(TOY.config.__class__.__base__(norm=norm), load_dataset("mnist5k"))
    assert type(model.hidden1.norm).__name__ == layer


def test_a_norm_the_network_cannot_take_is_a_one_line_error(tmp_path, capsys):
    assert main(["run", "mlp", "--norm", "instance", "--data", "mnist5k", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "arm 'net' cannot build its network: norm 'instance'" in err, err
    assert main(["run", "mlp", "--norm", "nope", "--out", str(tmp_path / "r")]) == 2
    assert "--norm must be one of none, bn" in capsys.readouterr().err
