"""The local process executor: every unit completes through worker processes that leave with
os._exit (no event may be lost), and the runner's on_idle hook fires once, when a core is free."""

from __future__ import annotations

import json

import pytest

from covshift.experiments.config import apply_overrides
from covshift.experiments.executors import run_processes
from covshift.experiments.registry import get_experiment


@pytest.mark.slow
def test_workers_deliver_every_unit_and_on_idle_fires_once(tmp_path):
    exp = get_experiment("fig1")
    cfg = apply_overrides(exp.config, {"data": "mnist5k", "steps": 10, "eval_every": 5, "eval_every_early": 5,
                                       "monitor_every": 5, "ics_every": 5, "probe_size": 20, "seeds": (0, 1)})
    units = exp.units(cfg)  # 2 arms x 2 seeds = 4 units on 2 workers
    jobs = [(u, exp.unit_config(cfg, u)) for u in units]
    calls: list[int] = []
    run_processes(exp, jobs, tmp_path, None, workers=2, on_idle=lambda: calls.append(1))
    assert calls == [1]  # once: after the third unit, one unit left on two workers
    for u in units:
        status = json.loads((tmp_path / u.path / "status.json").read_text())
        assert status["status"] == "complete" and status["step"] == 10
        assert (tmp_path / u.path / "metrics.jsonl").read_text().count("\n") >= 3


def test_an_unreachable_ray_address_is_a_config_error_not_a_traceback(monkeypatch, tmp_path):
    """ray.init's ConnectionError (no cluster at --ray-address) becomes the CLI's one-line error."""
    ray = pytest.importorskip("ray", reason="the Ray executor needs the ray extra")
    from covshift.experiments.config import ConfigError
    from covshift.experiments.executors import run_ray

    def refuse(*a, **k):
        raise ConnectionError("Failed to connect to Ray cluster at 192.0.2.1:6379")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", refuse)
    with pytest.raises(ConfigError, match=r"--ray-address 192.0.2.1:6379: .*ray start --head"):
        run_ray(get_experiment("fig1"), [], tmp_path, "192.0.2.1:6379")
