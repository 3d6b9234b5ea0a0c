"""Run directories: JSON Lines as training goes, atomic npz, reading a run back, TensorBoard."""

import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from covshift.monitor import ActivationMonitor, load
from covshift.monitor.io import JSONL_NAME, META_NAME, NPZ_NAME


def _train(model, mon, steps, start=0):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for t in range(start, start + steps):
        g = torch.Generator().manual_seed(t)
        x, y = torch.randn(8, 10, generator=g), torch.randint(0, 3, (8,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        mon.step()


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 6), nn.Tanh(), nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 3))


def _lines(d):
    return (d / JSONL_NAME).read_text().splitlines()


def test_scalars_are_appended_as_training_goes(tmp_path):
    model = _model()
    mon = ActivationMonitor(model, log_dir=tmp_path, every=1, flush_every=2, histogram_write_interval=0.0)
    mon.attach()
    assert json.loads((tmp_path / META_NAME).read_text())["layers"] == ["1", "3"]
    _train(model, mon, 1)
    assert not (tmp_path / JSONL_NAME).exists()  # still on the device
    _train(model, mon, 1, start=1)  # the 2nd recorded step triggers a flush
    assert len(_lines(tmp_path)) == 4  # 2 steps x 2 layers, readable before the run ends
    assert (tmp_path / NPZ_NAME).exists()
    row = json.loads(_lines(tmp_path)[0])
    assert row["step"] == 0 and row["layer"] == "1" and {"mean", "p15", "frac_zero", "numel"} <= set(row)
    # The process "dies" here: no flush, no close. What was flushed loads back.
    r = load(tmp_path)
    assert list(r.steps("1")) == [0, 1] and r.histograms("3").counts.shape == (2, 66)
    mon.detach()


def test_load_rebuilds_the_same_views(tmp_path):
    model = _model()
    with ActivationMonitor(model, log_dir=tmp_path, every=2, per_channel=True, channels={"3": [1]}) as mon:
        _train(model, mon, 7)
    r = load(tmp_path)
    assert r.layers == mon.layers == ["1", "3", "3[1]"]
    assert r.table() == mon.table()
    for layer in mon.layers:
        for stat in mon.records.stats(layer):
            np.testing.assert_array_equal(r.series(layer, stat)[1], mon.series(layer, stat)[1])
        a, b = r.histograms(layer), mon.histograms(layer)
        for f in ("steps", "edges", "counts", "numel"):
            np.testing.assert_array_equal(getattr(a, f), getattr(b, f))
    np.testing.assert_array_equal(r.channel_stats("3").std, mon.channel_stats("3").std)
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]  # atomic writes left no temp file


def test_truncated_last_line_is_skipped(tmp_path):
    model = _model()
    with ActivationMonitor(model, log_dir=tmp_path, every=1) as mon:
        _train(model, mon, 3)
    with open(tmp_path / JSONL_NAME, "a") as f:
        f.write('{"step": 3, "layer": "1", "mea')  # killed mid-write
    with pytest.warns(UserWarning, match="truncated"):
        r = load(tmp_path)
    assert list(r.steps("1")) == [0, 1, 2]


def test_if_exists(tmp_path):
    model = _model()
    with ActivationMonitor(model, log_dir=tmp_path, every=1) as mon:
        _train(model, mon, 2)
    with pytest.raises(ValueError, match="if_exists"):
        ActivationMonitor(model, log_dir=tmp_path)
    with ActivationMonitor(model, log_dir=tmp_path, every=1, if_exists="append", start_step=2) as mon:
        _train(model, mon, 2, start=2)
        assert list(mon.steps("1")) == [0, 1, 2, 3]
    r = load(tmp_path)
    assert list(r.steps("3")) == [0, 1, 2, 3] and list(r.histograms("3").steps) == [0, 1, 2, 3]
    edges = r.histograms("3").edges
    with ActivationMonitor(model, log_dir=tmp_path, every=1, if_exists="overwrite") as mon:
        _train(model, mon, 1)
    r = load(tmp_path)
    assert list(r.steps("1")) == [0] and r.histograms("3").edges.shape == edges.shape
    with pytest.raises(FileNotFoundError):
        load(tmp_path / "nothing")


def test_histogram_edges_fixed_from_first_measurement_or_user(tmp_path):
    model = _model()
    with ActivationMonitor(model, every=1, hist_bins=10, hist_range={"1": (-1.0, 1.0)}) as mon:
        _train(model, mon, 3)
    np.testing.assert_allclose(mon.histograms("1").edges, np.linspace(-1, 1, 11), rtol=1e-6)
    h = mon.histograms("3")
    first = mon.table(layers=["3"])
    p1 = next(r["value"] for r in first if r["stat"] == "p1")
    p99 = next(r["value"] for r in first if r["stat"] == "p99")
    w = p99 - p1
    np.testing.assert_allclose([h.edges[0], h.edges[-1]], [p1 - 0.5 * w, p99 + 0.5 * w], rtol=1e-5)
    assert h.counts.shape == (3, 12) and (h.counts.sum(1) == h.numel).all()


def test_tensorboard_scalars_and_raw_histograms(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model = _model()
    with ActivationMonitor(model, log_dir=tmp_path, every=1, tensorboard=True, hist_bins=8) as mon:
        _train(model, mon, 2)
    acc = EventAccumulator(str(tmp_path), size_guidance={"histograms": 0, "scalars": 0})
    acc.Reload()
    tags = acc.Tags()
    assert "1/mean" in tags["scalars"] and "3/histogram" in tags["histograms"]
    assert [e.step for e in acc.Scalars("1/p50")] == [0, 1]
    np.testing.assert_allclose(acc.Scalars("1/p50")[1].value, mon.series("1", "p50")[1][1], rtol=1e-6)
    hv = acc.Histograms("3/histogram")[0].histogram_value
    np.testing.assert_array_equal(hv.bucket, mon.histograms("3").counts[0])
    assert len(hv.bucket_limit) == 10 and hv.num == mon.histograms("3").numel[0]
