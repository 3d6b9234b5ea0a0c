"""An option that does nothing in an experiment is an error, and every option an experiment accepts does something.

``Experiment.reads`` declares which config fields an experiment's units, metrics and claims read. Here every
registered built-in experiment is checked both ways on tiny units run in this process:

* each field it reads (other than execution fields and ``data``), changed from a tiny base config, changes what
  one unit writes, or else (fields only claims read) what the claims and findings say about a tiny run;
* each field it does not read, forced into the config past the CLI, leaves the unit's files and the claims
  exactly as they were, and the CLI rejects it: one line, exit 2, naming the experiment and the fix.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from covshift.cli import main
from covshift.experiments import Arm, ConfigError, Experiment, ExperimentConfig, Metric, Role, register
from covshift.experiments import registry
from covshift.experiments.config import EXECUTION_FIELDS, apply_overrides
from covshift.experiments.executors import run_unit
from covshift.experiments.registry import get_experiment

BUILTIN = ("fig1", "mlp", "santurkar-noise", "landscape", "lr-sweep", "depth", "batch-size")

_LOOP = {"data": "mnist5k", "hidden": "8,8", "steps": "6", "batch_size": "16", "eval_every": "3", "eval_every_early": "1",
         "early_fraction": "0.5", "monitor_every": "2", "ics_every": "2", "units": "0,1", "probe_size": "10", "seeds": "0",
         "progress": "false", "parallel": "no"}
# A tiny config per experiment, small enough for a unit in well under a second.
BASE = {
    "fig1": _LOOP,
    "mlp": _LOOP,
    "santurkar-noise": {**_LOOP, "hidden": "8,8,8"},
    "landscape": {"data": "mnist5k", "hidden": "8,8", "steps": "4", "batch_size": "16", "eval_every": "2", "landscape_every": "2",
                  "step_sizes": "0.1,0.2", "seeds": "0", "progress": "false", "parallel": "no"},
    "lr-sweep": {"data": "mnist5k", "hidden": "8", "steps": "4", "batch_size": "16", "eval_every": "2", "lrs": "0.1,3",
                 "seeds": "0", "progress": "false", "parallel": "no"},
    "depth": {"data": "mnist5k", "depths": "2,3,4", "width": "8", "batch_size": "16", "seeds": "0", "progress": "false", "parallel": "no"},
    "batch-size": {"data": "mnist5k", "batch_sizes": "4,8", "samples": "32", "channels": "2,4", "groups": "2", "seeds": "0",
                   "progress": "false", "parallel": "no"},
}
# A different valid value of every field that some experiment may read or ignore (must differ from every BASE
# and default value above). A new config field must get one here, so that it is checked too.
CHANGED = {
    "hidden": "9,8", "activation": "tanh", "init_std": "0.3", "steps": "5", "batch_size": "12", "optimizer": "adam",
    "lr": "0.07", "momentum": "0.5", "eval_every": "4", "eval_every_early": "2", "early_fraction": "0.2",
    "monitor_every": "1", "ics_every": "200", "units": "0", "probe_size": "5", "tensorboard": "true",
    "step_sizes": "0.1,0.3", "landscape_every": "3", "lrs": "0.1", "trains_threshold": "0.001", "width": "6",
    "depths": "2,4", "flat_slope": "5", "batch_sizes": "4", "samples": "24", "base_batch": "16", "channels": "3,4",
    "converged_error": "0.9", "groups": "1", "norm": "layer",
}
# Which arm's unit shows a field's effect (default: the first arm).
ARM = {("batch-size", "groups"): "group"}
SKIP = set(EXECUTION_FIELDS) | {"data"}


def _config(exp: Experiment, extra: dict) -> ExperimentConfig:
    return apply_overrides(exp.config, {**BASE[exp.name], **extra})


def _pair(field: str) -> tuple[dict, dict]:
    """The base and the changed settings for ``field``: Adam takes no momentum (the config refuses the
    pair), so --optimizer adam is compared with SGD at the same momentum 0."""
    base = {"momentum": "0"} if field == "optimizer" else {}
    return base, {**base, field: CHANGED[field]}


def _fingerprint(d: Path) -> dict:
    """What a unit wrote, without what depends on time or the process: every JSON value (timings and
    the config copy in unit.json left out), every array, and the names of other (binary) files' folders."""
    out: dict = {}
    for p in sorted(d.rglob("*")):
        if not p.is_file() or p.name == "unit.json":
            continue
        rel = p.relative_to(d).as_posix()
        if p.suffix in (".json", ".jsonl"):
            lines = p.read_text().splitlines() if p.suffix == ".jsonl" else [p.read_text()]
            out[rel] = [_strip(json.loads(l)) for l in lines if l.strip()]
        elif p.suffix == ".npz":
            with np.load(p) as z:
                out[rel] = {k: z[k].tolist() for k in sorted(z.files)}
        else:  # tensorboard event files are named by time and host
            out.setdefault(p.parent.relative_to(d).as_posix() + "/*", 0)
            out[p.parent.relative_to(d).as_posix() + "/*"] += 1
    return out


def _strip(obj):
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items() if "seconds" not in k and k not in ("pid", "time", "wall_time")}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


_CACHE: dict = {}


def _unit_output(exp: Experiment, extra: dict, arm: str, tmp: Path) -> dict:
    key = (exp.name, json.dumps(extra, sort_keys=True), arm)
    if key not in _CACHE:
        cfg = _config(exp, extra)
        unit = next(u for u in exp.units(cfg) if u.arm == arm)
        d = tmp / f"u{len(_CACHE)}"
        status = run_unit(exp, exp.unit_config(cfg, unit), unit, d)
        assert status["status"] == "complete", status
        _CACHE[key] = _fingerprint(d / unit.path)
    return _CACHE[key]


def _claims_output(exp: Experiment, extra: dict, tmp_path_factory) -> str:
    """The claims and findings on a tiny full run of the base config, judged as if ``extra`` were set."""
    from covshift.experiments.report import evaluate_claims
    from covshift.experiments.results import load_run
    from covshift.experiments.runner import run_experiment

    key = ("run", exp.name)
    if key not in _CACHE:
        out = tmp_path_factory.mktemp(exp.name)
        run_experiment(exp.name, dataclasses.replace(_config(exp, {}), out=str(out)))
        _CACHE[key] = out
    run = load_run(_CACHE[key])
    run.meta["config"].update({k: v for k, v in dataclasses.asdict(_config(exp, extra)).items() if k in extra})
    findings = exp.findings(run) if exp.findings else []
    return json.dumps([[c["verdict"], c["summary"], c["reason"]] for c in evaluate_claims(run)] + findings, default=str)


def _cases(read: bool):
    for name in BUILTIN:
        exp = get_experiment(name)
        owned = exp.owned_fields()
        for f in dataclasses.fields(exp.config):
            if f.name in SKIP or f.name in owned or exp.accepts(f.name) != read:
                continue
            yield pytest.param(name, f.name, id=f"{name}:{f.name}")


@pytest.mark.parametrize("name, field", list(_cases(read=True)))
def test_every_option_an_experiment_reads_changes_something(name, field, tmp_path, tmp_path_factory):
    exp = get_experiment(name)
    assert field in CHANGED, f"no changed value for {field!r}: add one to CHANGED"
    base_extra, changed_extra = _pair(field)
    if any(isinstance(a.values, str) and a.values == field for a in exp.sweep):  # a sweep's grid: which units there are
        assert exp.units(_config(exp, changed_extra)) != exp.units(_config(exp, base_extra))
        return
    arm = ARM.get((name, field), exp.arms[0].name)
    tmp = tmp_path_factory.getbasetemp() / "reads"
    tmp.mkdir(exist_ok=True)
    if _unit_output(exp, changed_extra, arm, tmp) == _unit_output(exp, base_extra, arm, tmp):  # read by the claims or findings only?
        assert _claims_output(exp, changed_extra, tmp_path_factory) != _claims_output(exp, base_extra, tmp_path_factory), (
            f"--{field} changes neither {name}'s units nor its claims: it should not be in its reads")


@pytest.mark.parametrize("name, field", list(_cases(read=False)))
def test_every_option_an_experiment_ignores_changes_nothing_and_is_rejected(name, field, tmp_path_factory, capsys):
    exp = get_experiment(name)
    assert field in CHANGED, f"no changed value for {field!r}: add one to CHANGED"
    tmp = tmp_path_factory.getbasetemp() / "reads"
    tmp.mkdir(exist_ok=True)
    base_extra, changed_extra = _pair(field)
    for arm in exp.arms[:2]:
        assert _unit_output(exp, changed_extra, arm.name, tmp) == _unit_output(exp, base_extra, arm.name, tmp), (
            f"--{field} changes what {name}'s {arm.name} unit writes, yet {name} declares that it does not read it")
    flag = "--" + field.replace("_", "-")
    given = [flag] if CHANGED[field] == "true" else [flag, CHANGED[field]]  # a bool is a --flag / --no-flag
    assert main(["run", name, *given, "--out", "/nonexistent/never-written"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert f"{flag} does nothing in {name} (" in err and "); drop it" in err, err


@pytest.mark.parametrize(
    "argv, match",
    [
        (["depth", "--hidden", "50"], "--hidden does nothing in depth (depth's networks are --width wide and --depths deep); drop it"),
        (["depth", "--monitor-every", "7"], "--monitor-every does nothing in depth"),
        (["landscape", "--probe-size", "10"], "--probe-size does nothing in landscape"),
        (["batch-size", "--hidden", "7"], "--hidden does nothing in batch-size"),
        (["batch-size", "--steps", "7"], "batch-size trains on --samples examples"),
        (["lr-sweep", "--optimizer", "adam"], "--optimizer does nothing in lr-sweep (lr-sweep trains with SGD"),
        (["santurkar-noise", "--init-std", "0.1"], "--init-std does nothing in santurkar-noise (the networks are He-initialized"),
    ],
)
def test_ignored_options_are_one_line_errors(argv, match, capsys):
    assert main(["run", *argv, "--out", "/nonexistent/never-written"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and match in err, err


def test_a_read_option_still_runs_where_others_are_ignored():
    # lr-sweep reads --hidden but records no single units: a narrow network is valid (the default --units
    # would be out of range for it, and --units cannot be given there)
    exp = get_experiment("lr-sweep")
    exp.check_overrides({"hidden": "4"})
    assert apply_overrides(exp.config, {"hidden": "4"}).hidden == (4,)
    for name in ("lr-sweep", "depth", "batch-size"):  # execution fields and data are accepted everywhere
        get_experiment(name).check_overrides({"seeds": "0", "out": "x", "workers": "2", "progress": "false", "data": "mnist5k"})


def test_help_lists_only_the_options_that_apply(capsys):
    with pytest.raises(SystemExit):
        main(["run", "depth", "--help"])
    out = capsys.readouterr().out
    usage_and_options, _, epilog = out.partition("options that do nothing in depth (rejected):")
    assert "--width" in usage_and_options and "--hidden" not in usage_and_options and "--monitor-every" not in usage_and_options
    assert "--hidden" in epilog and "--monitor-every" in epilog.replace("\n", "").replace("-\n", "-")


@dataclasses.dataclass
class _ProbeConfig(ExperimentConfig):
    scale: float = 1.0


def _probe_unit(ctx):
    return {"value": ctx.config.scale * ctx.config.hidden[0]}


def test_a_toy_with_its_own_unit_function_declares_what_it_reads(capsys):
    toy = Experiment(
        name="toy-reads", summary="reads two fields", config=_ProbeConfig(), needs_data=False,
        arms=(Arm("a", Role.BASELINE, "a"),), unit_fn=_probe_unit, reads={"scale", "hidden"},
        instead={"steps": "the toy does not train"},
        metrics=(Metric("value", "value", lambda u: (u.status.get("result") or {}).get("value")),),
    )
    assert toy.reads == frozenset({"scale", "hidden"}) and toy.accepts("seeds") and not toy.accepts("data")
    assert "lr" in toy.ignored_fields() and "scale" not in toy.ignored_fields()
    toy.check_overrides({"scale": "2", "hidden": "3", "seeds": "0,1"})
    with pytest.raises(ConfigError, match=r"--steps does nothing in toy-reads \(the toy does not train\); drop it"):
        toy.check_overrides({"steps": "3"})
    with pytest.raises(ConfigError, match=r"--data does nothing in toy-reads \(none of its units, metrics or claims reads it\)"):
        toy.check_overrides({"data": "mnist5k"})
    register(toy, overwrite=True)
    try:
        assert main(["run", "toy-reads", "--lr", "0.5", "--out", "/nonexistent/never-written"]) == 2
        assert "--lr does nothing in toy-reads" in capsys.readouterr().err
    finally:
        registry._REGISTRY.pop("toy-reads", None)
    with pytest.raises(ValueError, match="unknown config fields"):
        dataclasses.replace(toy, reads={"scael"})
    with pytest.raises(ValueError, match="instead= is for fields it does not read"):
        dataclasses.replace(toy, instead={"scale": "x"})


def test_run_experiment_warns_about_a_setting_that_would_do_nothing(tmp_path):
    """The Python API's counterpart of the CLI's rejection: a changed field that an arm overwrites,
    or that the experiment never reads, runs with a warning that names it (not silently)."""
    import dataclasses

    from covshift.experiments.registry import get_experiment
    from covshift.experiments.runner import _warn_unused_settings

    fig1 = get_experiment("fig1")
    with pytest.warns(UserWarning, match=r"run_experiment\('fig1'\): --norm is set by fig1's declaration \(arm 'no-bn'"):
        _warn_unused_settings(fig1, dataclasses.replace(fig1.config, norm="renorm"))
    depth = get_experiment("depth")
    with pytest.warns(UserWarning, match=r"--hidden does nothing in depth"):
        _warn_unused_settings(depth, dataclasses.replace(depth.config, hidden=(7,)))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # settings it reads, and where it runs, are silent
        _warn_unused_settings(fig1, dataclasses.replace(fig1.config, steps=10, out=str(tmp_path), progress=False))
        _warn_unused_settings(depth, dataclasses.replace(depth.config, width=8))


def test_run_experiment_itself_gives_that_warning():
    import dataclasses

    from covshift.experiments.registry import get_experiment
    from covshift.experiments.runner import RunDirError, run_experiment

    cfg = dataclasses.replace(get_experiment("fig1").config, norm="renorm", out="/proc/covshift-cannot-write-here")
    with pytest.warns(UserWarning, match="--norm is set by fig1's declaration"), pytest.raises(RunDirError):
        run_experiment("fig1", cfg)  # warned before anything runs (the unwritable --out stops it there)
