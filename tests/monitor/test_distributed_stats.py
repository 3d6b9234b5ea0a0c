"""merge_across_ranks: 2 gloo processes against one process on the concatenated batch, and the pure merges.

One spawn of 2 processes (gloo on 127.0.0.1, a free port, a timeout so a hang fails) runs every case;
each rank builds the LayerStats of its shard of the same activations with `layer_stats` below (an
independent, plain implementation of the LayerStats contract), merges them, and saves the result.
The tests compare it with `layer_stats` of the concatenated batch: counts, histograms, minima and
maxima exactly, means and M2 to float64 rounding, the merged sample as a multiset.
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import gloo
import pytest
import torch
import torch.distributed as dist

from covshift.monitor.distributed import (
    merge_across_ranks,
    merge_moments,
    merge_samples,
    pack,
    percentiles_from_histogram,
    unpack,
)
from covshift.monitor.flush import LayerStats
from covshift.monitor.records import RecordKey

WORLD = 2
TIMEOUT_S = 90
EDGES = np.linspace(-4.0, 8.0, 13)
THRESHOLD = 3.0


def layer_stats(acts, keys, steps, per_channel=False):
    """LayerStats of whole activations (every finite value is in the sample), in plain torch/numpy."""
    rows = []
    for a in acts:
        x = a.reshape(-1)
        f = x[torch.isfinite(x)]
        fd = f.double()
        n = f.numel()
        mean = fd.mean() if n else torch.tensor(0.0, dtype=torch.float64)
        fn = fd.numpy()
        hist = np.concatenate([[(fn < EDGES[0]).sum()], np.histogram(fn, EDGES)[0], [(fn > EDGES[-1]).sum()]])
        row = dict(
            count=n, mean=float(mean), m2=float(((fd - mean) ** 2).sum()),
            min=float(fd.min()) if n else np.inf, max=float(fd.max()) if n else -np.inf,
            n_nonfinite=x.numel() - n, hist=hist, n_saturated=int((fd.abs() > THRESHOLD).sum()),
            n_nonpositive=int((fd <= 0).sum()), sample=f,
        )
        if per_channel:
            c = a.shape[1]
            per = a.double().transpose(0, 1).reshape(c, -1)  # (C, M), every value, NaN included
            m = per.shape[1]
            cm = per.mean(1) if m else torch.full((c,), float("nan"), dtype=torch.float64)
            row.update(
                csize=c, ccount=m, cmean=cm, cm2=((per - cm[:, None]) ** 2).sum(1),
                cmax=per.amax(1) if m else torch.full((c,), -np.inf, dtype=torch.float64),
            )
        rows.append(row)
    k = max([r["count"] for r in rows] + [1])
    dtype = acts[0].dtype
    sample = torch.full((len(rows), k), float("nan"), dtype=dtype)
    for i, r in enumerate(rows):
        sample[i, : r["count"]] = r["sample"]
    i64 = lambda name: torch.tensor([r[name] for r in rows], dtype=torch.int64)  # noqa: E731
    f64 = lambda name: torch.tensor([r[name] for r in rows], dtype=torch.float64)  # noqa: E731
    ch = {}
    if per_channel:
        ch = dict(
            channel_sizes=i64("csize"), channel_count=i64("ccount"),
            channel_mean=torch.cat([r["cmean"] for r in rows]), channel_m2=torch.cat([r["cm2"] for r in rows]),
            channel_max=torch.cat([r["cmax"] for r in rows]),
        )
    return LayerStats(
        keys=list(keys), steps=torch.tensor(steps, dtype=torch.int64),
        count=i64("count"), mean=f64("mean"), m2=f64("m2"), min=f64("min"), max=f64("max"),
        n_nonfinite=i64("n_nonfinite"), hist=torch.tensor(np.stack([r["hist"] for r in rows]), dtype=torch.int64),
        n_saturated=i64("n_saturated"), n_nonpositive=i64("n_nonpositive"), sample=sample,
        sample_count=i64("count"), **ch,
    )


@dataclass(frozen=True)
class Case:
    name: str
    split: tuple  # rows per rank of every activation's batch
    per_channel: bool = False
    nonfinite: bool = False
    sample_width: object = None
    data: str = ""  # the name whose activations it uses (default its own)


CASES = [
    Case("uneven_5_3", (5, 3), per_channel=True),
    Case("uneven_5_3_one_collective", (5, 3), per_channel=True, sample_width=256, data="uneven_5_3"),
    Case("empty_rank_8_0", (8, 0), per_channel=True),
    Case("empty_rank_0_8", (0, 8)),
    Case("nonfinite_on_rank_1", (4, 4), nonfinite=True),
]
SHAPES = [((8, 6), torch.float64), ((8, 4, 3, 2), torch.float32), ((8, 5), torch.float32)]
KEYS = [RecordKey("fc1"), RecordKey("conv.bn"), RecordKey("act", call=1), RecordKey("fc1"), RecordKey("conv.bn"), RecordKey("act", call=1)]
STEPS = [0, 0, 0, 10, 10, 10]


def activations(case: Case):
    """The global batch of every record: 2 steps x 3 layers, far from zero mean (Chan's merge matters)."""
    g = torch.Generator().manual_seed(sum(map(ord, case.data or case.name)))
    acts = []
    for step in range(2):
        for shape, dtype in SHAPES:
            x = (torch.randn(shape, generator=g, dtype=torch.float64) * (2 + step) + 3).to(dtype)
            if case.nonfinite:
                x[5, 0] = float("nan")
                x[6, 1] = float("inf")
                x[7, -1] = -float("inf")
            acts.append(x)
    return acts


def _shard(x, case, rank):
    start = sum(case.split[:rank])
    return x[start : start + case.split[rank]]


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    results = {}
    try:
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD, timeout=timedelta(seconds=45)
        )
        for case in CASES:
            mine = layer_stats([_shard(a, case, rank) for a in activations(case)], KEYS, STEPS, case.per_channel)
            results[case.name] = merge_across_ranks(mine, sample_width=case.sample_width)
        # Rows that do not correspond: the same clear error on both ranks, no hang.
        acts = activations(CASES[0])
        keys = KEYS if rank == 0 else KEYS[:-1] + [RecordKey("act", call=2)]
        try:
            merge_across_ranks(layer_stats([_shard(a, CASES[0], rank) for a in acts], keys, STEPS))
            results["mismatch"] = "no error"
        except RuntimeError as e:
            results["mismatch"] = str(e)
        # End to end: ActivationMonitor(reduce="global") on each rank's shard; only rank 0 writes.
        results["monitor"] = _monitored_run(rank, Path(out_dir) / f"run_rank{rank}")
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:  # report, do not hang the parent
        results["error"] = traceback.format_exc()
    results["out_dir"] = out_dir
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")


# -- end to end: the monitor under reduce="global" ------------------------------------------------------
MON_SPLITS = [(5, 3), (8, 0), (2, 6)]  # rows per rank at steps 0, 1, 2: uneven, an empty rank, uneven


def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(6, 10), torch.nn.Tanh(), torch.nn.Linear(10, 10), torch.nn.Sigmoid(), torch.nn.Linear(10, 3)
    )


def _mon_batch(step):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(8, 6, generator=g) * (1 + step) + step


def _monitored_run(rank, log_dir, reduce="global"):
    """Three recorded steps of forwards on this rank's shard; returns rank's view (rank 0: everything)."""
    from covshift.monitor import ActivationMonitor

    model = _mlp()
    mon = ActivationMonitor(
        model, every=1, reduce=reduce, log_dir=log_dir, hist_range=(-3.0, 3.0), hist_bins=12, per_channel=True
    )
    with mon:
        for step, split in enumerate(MON_SPLITS):
            x = _mon_batch(step)
            if reduce == "global":
                start = sum(split[:rank])
                x = x[start : start + split[rank]]
            model(x)
            mon.step()
    return {"table": mon.table(), "layers": mon.layers}


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return gloo.spawn(_worker, tmp_path_factory.mktemp("merge"), WORLD, TIMEOUT_S)


def _assert_equal_to_single_process(got: LayerStats, want: LayerStats, what: str):
    assert [str(k) for k in got.keys] == [str(k) for k in want.keys] and torch.equal(got.steps, want.steps)
    for f in ("count", "n_nonfinite", "hist", "n_saturated", "n_nonpositive", "sample_count", "min", "max"):
        assert torch.equal(getattr(got, f), getattr(want, f)), f"{what}: {f}"
    torch.testing.assert_close(got.mean, want.mean, rtol=1e-13, atol=1e-13, msg=lambda m: f"{what} mean: {m}")
    torch.testing.assert_close(got.m2, want.m2, rtol=1e-12, atol=1e-12, msg=lambda m: f"{what} m2: {m}")
    assert got.sample.dtype == want.sample.dtype
    for i, n in enumerate(want.sample_count.tolist()):  # the same values, in some order, then padding
        assert torch.equal(got.sample[i, :n].sort().values, want.sample[i, :n].sort().values), f"{what} sample row {i}"
        assert torch.isnan(got.sample[i, n:]).all()
    if want.channel_sizes is None:
        assert got.channel_sizes is None
        return
    assert torch.equal(got.channel_sizes, want.channel_sizes) and torch.equal(got.channel_count, want.channel_count)
    torch.testing.assert_close(got.channel_mean, want.channel_mean, rtol=1e-13, atol=1e-13, equal_nan=True)
    torch.testing.assert_close(got.channel_m2, want.channel_m2, rtol=1e-12, atol=1e-12, equal_nan=True)
    assert torch.equal(got.channel_max, want.channel_max)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_merge_equals_one_process_on_the_concatenated_batch(ranks, case):
    want = layer_stats(activations(case), KEYS, STEPS, case.per_channel)
    for r in range(WORLD):
        _assert_equal_to_single_process(ranks[r][case.name], want, f"{case.name} rank {r}")
    if case.nonfinite:
        per_row = [3 * int(np.prod(shape[2:])) for shape, _ in SHAPES] * 2  # x[5, 0], x[6, 1], x[7, -1]
        assert want.n_nonfinite.tolist() == per_row and not torch.isnan(want.mean).any()


def test_one_collective_and_two_give_the_same_result(ranks):
    a, b = ranks[0]["uneven_5_3"], ranks[0]["uneven_5_3_one_collective"]
    for f in ("count", "mean", "m2", "hist", "sample_count"):
        assert torch.equal(getattr(a, f), getattr(b, f)), f


def test_rows_that_differ_across_ranks_raise_on_every_rank(ranks):
    for r in range(WORLD):
        assert "expected the same records on every rank" in ranks[r]["mismatch"], ranks[r]["mismatch"]
        assert "keys/steps" in ranks[r]["mismatch"]


# -- the pure merges, single process -----------------------------------------------------------------
def test_merge_moments_folds_any_split_including_empty_parts():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, generator=g, dtype=torch.float64) * 1e-3 + 1e6  # |mean| >> std: naive sums cancel
    cuts = [0, 0, 7, 7, 31, 50]  # parts of sizes 0, 7, 0, 24, 19
    parts = [x[a:b] for a, b in zip(cuts[:-1], cuts[1:])]
    count = torch.tensor([[p.numel()] for p in parts])
    mean = torch.tensor([[p.mean().item() if p.numel() else float("nan")] for p in parts], dtype=torch.float64)
    m2 = torch.tensor([[((p - p.mean()) ** 2).sum().item() if p.numel() else float("nan")] for p in parts], dtype=torch.float64)
    n, mu, s = merge_moments(count, mean, m2)
    assert n.item() == 50 and n.dtype == torch.int64
    assert mu.item() == pytest.approx(x.mean().item(), rel=1e-15)
    assert s.item() == pytest.approx(((x - x.mean()) ** 2).sum().item(), rel=1e-9)
    n, mu, s = merge_moments(torch.zeros(3, 1, dtype=torch.int64), torch.full((3, 1), float("nan")), torch.ones(3, 1))
    assert n.item() == 0 and mu.item() == 0 and s.item() == 0


def test_merge_samples_and_pack_round_trip():
    sample = torch.tensor([[[1.0, 2.0, 9.0], [3.0, 9.0, 9.0]], [[4.0, 9.0, 9.0], [9.0, 9.0, 9.0]]])  # (W=2, L=2, K=3)
    counts = torch.tensor([[2, 1], [1, 0]])
    merged, n = merge_samples(sample, counts)
    assert n.tolist() == [3, 1] and merged.shape == (2, 3)
    assert merged[0].tolist() == [1.0, 2.0, 4.0] and merged[1, 0] == 3.0 and torch.isnan(merged[1, 1:]).all()

    acts = activations(CASES[0])
    st = layer_stats(acts, KEYS, STEPS, per_channel=True)
    back = unpack(torch.stack([pack(st, sample_width=200)]), st)
    for f in ("count", "mean", "m2", "min", "max", "hist", "channel_mean", "channel_max", "sample_count"):
        assert torch.equal(getattr(back, f)[0], getattr(st, f)), f
    assert torch.equal(back.sample[0][:, : st.sample.shape[1]].nan_to_num(-7), st.sample.nan_to_num(-7))
    with pytest.raises(ValueError, match="sample_width"):
        pack(st, sample_width=3)


def test_percentiles_from_histogram_are_within_one_bin_width():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5000, generator=g, dtype=torch.float64) * 1.5 + 2.0
    st = layer_stats([x[:, None]], [RecordKey("a")], [0])
    qs = [5.0, 15.0, 50.0, 85.0, 95.0]
    got = percentiles_from_histogram(st.hist, torch.tensor(EDGES), qs, st.min, st.max)[0]
    exact = np.percentile(x.numpy(), qs)
    width = EDGES[1] - EDGES[0]
    assert np.all(np.abs(got.numpy() - exact) <= width)
    assert np.abs(got.numpy() - exact).max() > 1e-3  # it is an approximation, not the sample's percentile
    # a tail percentile interpolates between the edge and the min / max
    low = percentiles_from_histogram(st.hist, torch.tensor(EDGES), [0.0, 100.0], st.min, st.max)[0]
    assert low.tolist() == pytest.approx([float(x.min()), float(x.max())])
    empty = layer_stats([torch.zeros(0, 1, dtype=torch.float64)], [RecordKey("e")], [0])
    assert torch.isnan(percentiles_from_histogram(empty.hist, torch.tensor(EDGES), [50.0], empty.min, empty.max)).all()


def test_monitor_reduce_global_equals_one_process_and_only_rank_0_writes(ranks, tmp_path):
    from covshift.monitor import load

    single = _monitored_run(0, tmp_path / "single", reduce="rank")  # the concatenated batch, one process
    want = {(r["step"], r["layer"], r["stat"]): r["value"] for r in single["table"]}
    got = ranks[0]["monitor"]
    assert got["layers"] == single["layers"]
    rows = {(r["step"], r["layer"], r["stat"]): r["value"] for r in got["table"]}
    assert rows.keys() == want.keys() and {k[0] for k in rows} == {0, 1, 2}
    for k, v in want.items():
        assert rows[k] == pytest.approx(v, rel=1e-6, abs=1e-6, nan_ok=True), k
    assert ranks[1]["monitor"]["table"] == []  # rank 1 holds no merged records

    # rank 0's files hold the global records; rank 1 wrote nothing
    run_dir = Path(ranks[0]["out_dir"]) / "run_rank0"
    disk = load(run_dir)
    ref = load(tmp_path / "single")
    for layer in ref.layers:
        h, hr = disk.histograms(layer), ref.histograms(layer)
        assert np.array_equal(h.counts, hr.counts) and np.array_equal(h.edges, hr.edges), layer
        assert np.array_equal(h.steps, hr.steps)
    assert not (Path(ranks[1]["out_dir"]) / "run_rank1").exists()
