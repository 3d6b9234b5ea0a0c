"""The flush (LayerStats -> RecordBatch), the fast path, and non-finite values, against brute force."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from covshift.monitor import ActivationMonitor, MonitorConfig, flush, stats
from covshift.monitor.records import RecordKey

PCT = (1.0, 15.0, 50.0, 85.0, 99.0)
CFG = MonitorConfig(hist_bins=12, saturation_threshold=1.5)


def _need_cpp():
    if not stats.extension().loaded:
        pytest.skip(f"C++ monitor kernels unavailable: {stats.extension().error}")


def _poisoned(shape, seed=0, frac=0.05):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g)
    flat = x.view(-1)
    idx = torch.randperm(flat.numel(), generator=g)[: max(3, int(frac * flat.numel()))]
    flat[idx] = torch.tensor([math.nan, math.inf, -math.inf])[torch.arange(len(idx)) % 3]
    return x


def _brute(x, sample, edges, t=1.5):
    """The documented statistics: non-finite values counted, every other statistic over finite ones."""
    v = x.double().numpy().ravel()
    f = v[np.isfinite(v)]
    s = sample.double().numpy().ravel()
    fs = s[np.isfinite(s)]
    hist = np.concatenate([[(fs < edges[0]).sum()], np.histogram(fs, edges)[0], [(fs > edges[-1]).sum()]])
    out = {
        "mean": f.mean(), "std": f.std(), "min": f.min(), "max": f.max(),
        **{f"p{q:g}": p for q, p in zip(PCT, np.percentile(fs, PCT))},
        "frac_saturated": np.mean(np.abs(fs) > t), "frac_zero": np.mean(fs <= 0),
        "frac_nonfinite": (v.size - f.size) / v.size, "numel": v.size,
    }
    return out, hist


def _check(batch, i, want, hist):
    got = batch.scalars(i)
    assert set(got) == set(want)
    for k in ("min", "max", "numel", "frac_saturated", "frac_zero", "frac_nonfinite", *(f"p{q:g}" for q in PCT)):
        np.testing.assert_allclose(got[k], want[k], rtol=1e-6 if k.startswith("p") else 0, atol=0, err_msg=k)
    np.testing.assert_allclose([got["mean"], got["std"]], [want["mean"], want["std"]], rtol=1e-5)
    np.testing.assert_array_equal(batch.hist[i], hist)


@pytest.mark.parametrize("fused", [True, False], ids=["cpp", "torch"])
@pytest.mark.parametrize("sampled", [False, True], ids=["exact", "sampled"])
def test_non_finite_values_are_counted_and_excluded_the_same_way_on_every_path(fused, sampled):
    # Before: the exact path took min from the sorted sample (NaN last: -inf or a number) while the
    # sampled path took torch.aminmax of everything (NaN). Now all paths follow one definition.
    if fused:
        _need_cpp()
    x = _poisoned((40, 50))
    edges = stats.fixed_edges(-2.0, 2.0, CFG.hist_bins, torch.float32)
    cfg = MonitorConfig(hist_bins=12, saturation_threshold=1.5, percentiles=PCT)
    pos = stats.sample_positions(x.numel(), 700, 0, torch.device("cpu")) if sampled else None
    key = RecordKey("a")
    with stats.use_extension(fused):
        # the sample path: stage 1 in the hook, stage 2 at flush
        p = flush.Pending(3, key, stats.reduce(x, pos))
        ls = flush.layer_stats([p], {key: edges}, cfg)
        b1 = flush.finish(ls, {key: edges}, cfg)
        # the fast path: the whole record in one call
        row = stats.record(x, pos, torch.tensor(edges), 1.5, PCT)
        b2 = flush.finish_rows([flush.Pending(3, key, None, row, None, x.numel())], {key: edges}, cfg)
    sample = x.view(-1) if pos is None else x.view(-1)[pos]
    want, hist = _brute(x, sample, edges)
    for b in (b1, b2):
        _check(b, 0, want, hist)
    assert ls.count.item() + ls.n_nonfinite.item() == x.numel()
    assert ls.hist.sum().item() == ls.sample_count.item() == np.isfinite(sample.numpy()).sum()


@pytest.mark.parametrize("fused", [True, False], ids=["cpp", "torch"])
def test_a_record_without_finite_values_has_nan_statistics_and_an_empty_histogram(fused):
    if fused:
        _need_cpp()
    key = RecordKey("a")
    edges = stats.fixed_edges(-1.0, 1.0, CFG.hist_bins, torch.float32)
    x = torch.tensor([math.nan, math.inf, -math.inf, math.nan])
    with stats.use_extension(fused):
        ls = flush.layer_stats([flush.Pending(0, key, stats.reduce(x))], {key: edges}, CFG)
        b = flush.finish(ls, {key: edges}, CFG)
    got = b.scalars(0)
    assert got["frac_nonfinite"] == 1.0 and got["numel"] == 4
    assert all(math.isnan(got[k]) for k in ("mean", "std", "min", "max", "p50", "frac_zero"))
    assert b.hist[0].sum() == 0


def test_the_monitor_records_frac_nonfinite_and_finite_statistics():
    class Poison(nn.Module):
        def forward(self, x):
            x = x.clone()
            x[0, :3] = torch.tensor([math.nan, math.inf, -math.inf])
            return x

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 20), Poison(), nn.Tanh())
    x = torch.randn(8, 10)
    with ActivationMonitor(model, every=1, flush_every=1, layers=[nn.Tanh]) as mon:
        for _ in range(3):  # step 0: sample path; steps 1, 2: fast path (edges fixed)
            model(x)
            mon.step()
    v = Poison()(model[0](x)).detach().double().numpy().ravel()
    f = v[np.isfinite(v)]
    for stat, want in (("frac_nonfinite", 3 / 160), ("min", f.min()), ("max", f.max()), ("numel", 160)):
        np.testing.assert_allclose(mon.series("2", stat)[1], [want] * 3, rtol=1e-7, err_msg=stat)
    np.testing.assert_allclose(mon.series("2", "mean")[1], [f.mean()] * 3, rtol=1e-5)
    assert (mon.histograms("2").counts.sum(1) == f.size).all()


def test_fast_and_sample_paths_give_the_same_records_through_the_monitor():
    _need_cpp()

    def run(fused):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(20, 300), nn.ReLU(), nn.Linear(300, 40), nn.Sigmoid())
        g = torch.Generator().manual_seed(1)
        xs = [torch.randn(32, 20, generator=g) for _ in range(4)]
        with stats.use_extension(fused), ActivationMonitor(
            model, every=1, flush_every=1, sample_size=4000, per_channel=True
        ) as mon:
            for x in xs:
                model(x)
                mon.step()
        return mon

    a, b = run(True), run(False)
    assert a.layers == b.layers
    for layer in a.layers:
        ta = {(r["step"], r["stat"]): r["value"] for r in a.table([layer])}
        tb = {(r["step"], r["stat"]): r["value"] for r in b.table([layer])}
        assert ta.keys() == tb.keys()
        for k in ta:
            np.testing.assert_allclose(ta[k], tb[k], rtol=2e-6, atol=1e-7, err_msg=f"{layer} {k}")
        np.testing.assert_array_equal(a.histograms(layer).counts, b.histograms(layer).counts)


def test_layer_stats_rows_are_grouped_and_finish_restores_step_order():
    key_a, key_b = RecordKey("a"), RecordKey("b", channel=2)
    edges = {k: stats.fixed_edges(-2.0, 2.0, CFG.hist_bins, torch.float32) for k in (key_a, key_b)}
    g = torch.Generator().manual_seed(0)
    pend = [flush.Pending(s, k, stats.reduce(torch.randn(n, generator=g))) for s in (0, 1) for k, n in ((key_a, 30), (key_b, 7))]
    ls = flush.layer_stats(pend, edges, CFG)
    assert ls.keys == [key_a, key_a, key_b, key_b] and ls.steps.tolist() == [0, 1, 0, 1]
    assert ls.sample.shape == (4, 30) and torch.isnan(ls.sample[2:, 7:]).all()  # NaN padding
    b = flush.finish(ls, edges, CFG)
    assert [(int(s), k) for s, k in zip(b.steps, b.keys)] == [(0, key_a), (0, key_b), (1, key_a), (1, key_b)]
    assert b.values[:, b.names.index("numel")].tolist() == [30, 7, 30, 7]


def test_concat_fills_a_missing_frac_dead_column():
    key = RecordKey("a")
    e = {key: stats.fixed_edges(-1.0, 1.0, CFG.hist_bins, torch.float32)}
    x = torch.randn(4, 3)
    plain = flush.finish(flush.layer_stats([flush.Pending(1, key, stats.reduce(x))], e, CFG), e, CFG)
    chan = flush.finish(flush.layer_stats([flush.Pending(0, key, stats.reduce(x, per_channel=True))], e, CFG), e, CFG)
    both = flush.concat([plain, chan])
    assert both.steps.tolist() == [0, 1] and "frac_dead" in both.names
    assert "frac_dead" in both.scalars(0) and "frac_dead" not in both.scalars(1)
    np.testing.assert_allclose(both.channel_std[0], x.double().std(0, unbiased=False).numpy(), rtol=1e-6)
