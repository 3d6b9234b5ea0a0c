"""The statistics kernels against NumPy brute force, and the C++ kernels against the torch reference."""

import math

import numpy as np
import pytest
import torch

from covshift.monitor import stats

QS = (0.0, 1.0, 15.0, 50.0, 85.0, 99.0, 100.0)
PATHS = [pytest.param(True, id="cpp"), pytest.param(False, id="torch")]


def _need(fused):
    if fused and not stats.extension().loaded:
        pytest.skip(f"C++ monitor kernels unavailable: {stats.extension().error}")


def _x(*shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * 2 + 0.5).to(dtype)


def _poison(x, seed=0):
    """Put NaN, +inf and -inf at a few random places of ``x`` (in place)."""
    flat = x.view(-1)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(flat.numel(), generator=g)[: max(3, flat.numel() // 50)]
    vals = torch.tensor([math.nan, math.inf, -math.inf], dtype=x.dtype)
    flat[idx] = vals[torch.arange(len(idx)) % 3]
    return x


def _brute_moments(v):
    """[n, mean, M2, min, max, n_nonfinite] over the finite values, in float64 NumPy."""
    v = np.asarray(v, np.float64).ravel()
    f = v[np.isfinite(v)]
    if f.size == 0:
        return [0, 0.0, 0.0, math.inf, -math.inf, v.size]
    return [f.size, f.mean(), ((f - f.mean()) ** 2).sum(), f.min(), f.max(), v.size - f.size]


def _check_moments(got, want, dtype):
    got = got.tolist()
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    assert got[0] == want[0] and got[5] == want[5]
    assert got[3] == want[3] and got[4] == want[4]  # exact: min and max of the finite values
    np.testing.assert_allclose(got[1], want[1], rtol=tol, atol=tol)
    np.testing.assert_allclose(got[2], want[2], rtol=tol * 10, atol=tol)


@pytest.mark.parametrize("fused", PATHS)
@pytest.mark.parametrize("shape", [(1,), (7,), (5, 13), (4, 3, 6, 5), (3, 5000)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("poison", [False, True])
def test_moments_equal_brute_force_over_finite_values(fused, shape, dtype, poison):
    _need(fused)
    x = _x(*shape, dtype=dtype)
    if poison:
        _poison(x)
    pos = torch.arange(x.numel())
    mom, sample = stats.moments(x, pos, use_extension=fused)
    _check_moments(mom, _brute_moments(x.numpy()), dtype)
    np.testing.assert_array_equal(sample.numpy(), x.numpy().ravel())


@pytest.mark.parametrize("fused", PATHS)
def test_moments_of_nothing_finite_and_of_an_empty_tensor(fused):
    _need(fused)
    for x in (torch.full((10,), math.nan), torch.tensor([math.inf, -math.inf]), torch.zeros(0)):
        mom, _ = stats.moments(x, None, use_extension=fused)
        assert mom.tolist() == [0, 0.0, 0.0, math.inf, -math.inf, x.numel()]


@pytest.mark.parametrize("fused", PATHS)
def test_variance_does_not_cancel_for_large_mean(fused):
    # E[x^2] - E[x]^2 in float32 loses every digit here; the two-pass form keeps them.
    _need(fused)
    x = 1000.0 + 0.01 * _x(10_000, seed=1)
    ref = x.numpy().astype(np.float64).std()
    mom, _ = stats.moments(x, None, use_extension=fused)
    np.testing.assert_allclose(math.sqrt(mom[2] / mom[0]), ref, rtol=1e-4)


def test_reduce_half_and_int_inputs_are_measured_in_float32():
    for x in (_x(50).half(), torch.arange(10)):
        r = stats.reduce(x, torch.arange(x.numel()))
        assert r.sample.dtype == torch.float32
        np.testing.assert_allclose(float(r.moments[1]), x.double().mean().item(), rtol=1e-3)
        assert stats.reduce(x).sample.dtype == torch.float32 and stats.reduce(x).moments is None


def test_sample_is_a_copy_not_a_view():
    x = _x(100)
    r, r_sub = stats.reduce(x), stats.reduce(x, torch.arange(100))
    x.zero_()  # an in-place op after the hook must not change what was measured
    assert r.sample.abs().sum() > 0 and r_sub.sample.abs().sum() > 0 and float(r_sub.moments[4]) > 0


def test_per_channel_moments_equal_numpy():
    x = _x(6, 5, 4, 3)
    c_mean, c_var, c_max = stats.reduce(x, per_channel=True).channel
    v = x.numpy().astype(np.float64)
    np.testing.assert_allclose(c_mean.numpy(), v.mean((0, 2, 3)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(c_var.numpy(), v.var((0, 2, 3)), rtol=1e-5)
    np.testing.assert_allclose(c_max.numpy(), v.max((0, 2, 3)))
    assert stats.reduce(_x(9), per_channel=True).channel is None  # no channel dim


def test_sample_positions_are_distinct_sorted_deterministic_and_use_no_global_rng():
    state = torch.get_rng_state()
    p = stats.sample_positions(1000, 100, seed=3, device=torch.device("cpu"))
    assert torch.equal(torch.get_rng_state(), state)
    assert p.numel() == 100 and p.unique().numel() == 100
    assert torch.equal(p, p.sort().values) and int(p.min()) >= 0 and int(p.max()) < 1000
    assert torch.equal(p, stats.sample_positions(1000, 100, seed=3, device=torch.device("cpu")))
    assert not torch.equal(p, stats.sample_positions(1000, 100, seed=4, device=torch.device("cpu")))


@pytest.mark.parametrize("fused", PATHS)
def test_subsample_reads_the_values_at_the_positions_even_for_strided_input(fused):
    _need(fused)
    x = _x(8, 30).t()  # non-contiguous
    pos = stats.sample_positions(x.numel(), 50, 0, torch.device("cpu"))
    r = stats.reduce(x, pos, use_extension=fused)
    np.testing.assert_array_equal(r.sample.numpy(), x.contiguous().numpy().ravel()[pos.numpy()])
    assert float(r.moments[4]) == float(x.max())  # moments still use every value


def _brute_rows(x, valid, edges, t):
    """Per row: (moments, hist with tails, [n_sat, n_nonpos], finite values in order)."""
    out = []
    for row, n in zip(x.numpy(), valid.tolist()):
        v = row[:n]
        f = v[np.isfinite(v)].astype(np.float64)
        inner = np.histogram(f, edges)[0]
        h = np.concatenate([[(f < edges[0]).sum()], inner, [(f > edges[-1]).sum()]])
        out.append((_brute_moments(v), h, [(np.abs(f) > t).sum(), (f <= 0).sum()], f))
    return out


@pytest.mark.parametrize("fused", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rows_equal_numpy_histogram_with_tails_and_fractions(fused, dtype):
    _need(fused)
    x = _x(4, 500, dtype=dtype)
    x[0, :6] = torch.tensor([-2.0, 3.0, -2.5, 0.0, 0.0, 2.5])  # on edges, at 0, at the threshold
    _poison(x[1:3])
    x[3, 400:] = math.nan  # beyond valid[3] anyway
    valid = torch.tensor([500, 500, 450, 400])
    edges = stats.fixed_edges(-2.0, 3.0, 10, dtype)
    mom, hist, flags, compact = stats.rows(x, valid, torch.tensor(edges), 2.5, use_extension=fused)
    for r, (m, h, fl, f) in enumerate(_brute_rows(x, valid, edges, 2.5)):
        _check_moments(mom[r], m, dtype)
        np.testing.assert_array_equal(hist[r].numpy(), h)
        assert flags[r].tolist() == fl and hist[r].sum() == f.size
        np.testing.assert_array_equal(compact[r, : f.size].numpy(), f)  # finite first, in order
        assert torch.isnan(compact[r, f.size :]).all()


def test_rows_cpp_equal_torch_reference_exactly_but_for_rounding():
    _need(True)
    x = _poison(_x(6, 3000, seed=2))
    x[5] = math.inf
    valid = torch.tensor([3000, 2999, 3000, 17, 0, 3000])
    e = torch.tensor(stats.fixed_edges(-3.0, 4.0, 64, torch.float32))
    a = stats.rows(x, valid, e, 3.0, use_extension=True)
    b = stats.rows(x, valid, e, 3.0, use_extension=False)
    for u, v in zip(a[1:], b[1:]):
        torch.testing.assert_close(u, v, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(a[0][:, [0, 3, 4, 5]], b[0][:, [0, 3, 4, 5]], rtol=0, atol=0)
    torch.testing.assert_close(a[0], b[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("fused", PATHS)
@pytest.mark.parametrize("n", [1, 2, 3, 10, 101, 4000])
def test_percentiles_equal_numpy_linear(fused, n):
    _need(fused)
    rows = torch.stack([_x(n, seed=s) for s in range(3)])
    counts = torch.tensor([n, max(n - 1, 1), n])
    want = [np.percentile(r[:c].numpy().astype(np.float64), QS) for r, c in zip(rows, counts.tolist())]
    got = stats.percentiles_(rows.clone(), counts, QS, use_extension=fused).numpy()
    np.testing.assert_allclose(got, np.stack(want), rtol=1e-12, atol=1e-12)


def test_percentiles_cpp_equal_torch_reference_exactly():
    _need(True)
    rows = torch.stack([_x(777, seed=s) for s in range(4)])
    counts = torch.tensor([777, 500, 1, 0])
    a = stats.percentiles_(rows.clone(), counts, QS, use_extension=True)
    b = stats.percentiles_(rows.clone(), counts, QS, use_extension=False)
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    assert torch.isnan(a[3]).all()  # no values: no percentiles


def test_percentiles_permute_the_row_in_place_only():
    _need(True)
    row = _x(1, 300)
    work = row.clone()
    stats.percentiles_(work, torch.tensor([300]), QS, use_extension=True)
    np.testing.assert_array_equal(np.sort(work.numpy()), np.sort(row.numpy()))


def test_use_extension_true_insists_and_false_avoids():
    if stats.extension().loaded:
        with pytest.raises(RuntimeError, match="use_extension=True"):
            stats.moments(torch.arange(3), None, use_extension=True)  # int64: no kernel for it
    with pytest.raises(RuntimeError, match="use_extension"):
        with stats.use_extension(True):
            stats.moments(torch.zeros(3, dtype=torch.float16), None)


def test_auto_edges_from_first_measurement():
    s = np.sort(np.random.default_rng(0).normal(2.0, 3.0, 5000)).astype(np.float32)
    e = stats.auto_edges(s, 20, 0.5, torch.float32)
    p1, p99 = np.percentile(s, [1, 99])
    w = p99 - p1
    assert e.shape == (21,) and np.all(np.diff(e) > 0)
    np.testing.assert_allclose([e[0], e[-1]], [p1 - 0.5 * w, p99 + 0.5 * w], rtol=1e-5)
    np.testing.assert_array_equal(e, e.astype(np.float32).astype(np.float64))  # representable
    # degenerate samples still get a usable range
    for row in (np.zeros(10, np.float32), np.full(3, np.nan, np.float32), np.full(4, 1e6, np.float32)):
        e = stats.auto_edges(row, 8, 0.5, torch.float32)
        assert np.all(np.isfinite(e)) and np.all(np.diff(e) > 0)


def test_fixed_edges_rejects_a_range_too_narrow_for_the_dtype():
    with pytest.raises(ValueError, match="hist_range"):
        stats.fixed_edges(1e6, 1e6 + 1e-3, 64, torch.float32)


def test_to_host_groups_by_dtype_and_restores_shapes():
    ts = [torch.arange(6.0).view(2, 3), torch.tensor([1, 2], dtype=torch.int64), torch.tensor(7.0)]
    out = stats.to_host(ts)
    for t, o in zip(ts, out):
        np.testing.assert_array_equal(o, t.numpy())
        assert o.shape == tuple(t.shape)


def _record_cases():
    g = torch.Generator().manual_seed(7)
    uniform = stats.fixed_edges(-2.0, 2.0, 16, torch.float32)
    # bins a few ulps wide at 1000: the edges are far from evenly spaced in float32, so the
    # vectorized guess is off by more than one bin and the scalar path must take over
    uneven = stats.fixed_edges(1000.0, 1000.0 + 64 * 2e-4, 64, torch.float32)
    on_edges = torch.tensor(uniform, dtype=torch.float32)[torch.randint(0, 17, (3001,), generator=g)]
    near = 1000.0 + torch.rand(5000, generator=g) * 64 * 2.4e-4 - 1e-3
    return [
        ("randn", torch.randn(7, 999, generator=g), uniform),
        ("values on every edge", on_edges, uniform),
        ("uneven edges", near, uneven),
        ("relu zeros", torch.relu(torch.randn(4000, generator=g)), uniform),
        ("poisoned", _poison(torch.randn(2000, generator=g)), uniform),
    ]


@pytest.mark.parametrize("sampled", [False, True], ids=["every value", "sampled"])
@pytest.mark.parametrize("case", range(5), ids=[c[0] for c in _record_cases()])
def test_record_cpp_equals_reference_and_brute_force(case, sampled):
    _need(True)
    _, x, edges = _record_cases()[case]
    pos = stats.sample_positions(x.numel(), 500, 1, torch.device("cpu")) if sampled else None
    e = torch.tensor(edges)
    a = stats.record(x, pos, e, 2.5, QS, use_extension=True)
    b = stats.record(x, pos, e, 2.5, QS, use_extension=False)
    torch.testing.assert_close(a[[0, 3, 4, 5]], b[[0, 3, 4, 5]], rtol=0, atol=0)
    torch.testing.assert_close(a[6:], b[6:], rtol=0, atol=0, equal_nan=True)  # counts, histogram, percentiles
    torch.testing.assert_close(a[1:3], b[1:3], rtol=1e-6, atol=1e-6)
    s = (x.reshape(-1) if pos is None else x.reshape(-1)[pos]).numpy()
    f = s[np.isfinite(s)]
    B = len(edges) - 1
    want = np.concatenate([[(f < edges[0]).sum()], np.histogram(f, edges)[0], [(f > edges[-1]).sum()]])
    np.testing.assert_array_equal(a[9 : 9 + B + 2].numpy(), want)
    np.testing.assert_allclose(a[9 + B + 2 :].numpy(), np.percentile(f.astype(np.float64), QS), rtol=1e-12)
    assert a[8] == f.size and a[6] == (np.abs(f) > 2.5).sum() and a[7] == (f <= 0).sum()


# -- adversarial inputs for the fused record kernel's shortcuts ------------------------------------
def _brute_record(x, pos, edges, threshold, qs):
    """Counts, histogram with tails and percentiles of the finite sample values, by NumPy."""
    s = (x.reshape(-1) if pos is None else x.reshape(-1)[pos]).double().numpy()
    f = s[np.isfinite(s)]
    hist = np.concatenate([[(f < edges[0]).sum()], np.histogram(f, edges)[0], [(f > edges[-1]).sum()]])
    pct = np.percentile(f, qs) if f.size else np.full(len(qs), np.nan)
    return f, hist, pct


def _edge_configs():
    return [
        ("uniform", stats.fixed_edges(-2.0, 2.0, 64, torch.float32)),
        ("far from zero", stats.fixed_edges(1000.0, 1000.5, 64, torch.float32)),
        ("negative", stats.fixed_edges(-7.0, -3.0, 64, torch.float32)),
        ("wide", stats.fixed_edges(-1e30, 1e30, 64, torch.float32)),
        ("relu auto", stats.auto_edges(np.sort(np.maximum(np.random.default_rng(0).standard_normal(4000), 0)), 64, 0.5, torch.float32)),
    ]


def _around_edges(edges, dtype, n, seed):
    """Values on every edge, one ulp either side of it, and a few far outside, shuffled."""
    e = torch.tensor(edges, dtype=dtype)
    inf = torch.tensor(math.inf, dtype=dtype)
    vals = torch.cat([e, torch.nextafter(e, inf), torch.nextafter(e, -inf),
                      torch.tensor([edges[0] - 1e6, edges[-1] + 1e6, 0.0], dtype=dtype)])
    g = torch.Generator().manual_seed(seed)
    return vals[torch.randint(0, vals.numel(), (n,), generator=g)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("sampled", [False, True], ids=["every value", "sampled"])
@pytest.mark.parametrize("cfg", range(5), ids=[c[0] for c in _edge_configs()])
def test_record_bins_values_on_and_beside_every_edge_exactly(cfg, sampled, dtype):
    _need(True)
    _, edges = _edge_configs()[cfg]
    x = _around_edges(edges, dtype, 3001, cfg)
    pos = stats.sample_positions(x.numel(), 777, 3, torch.device("cpu")) if sampled else None
    e = torch.tensor(edges)
    a = stats.record(x, pos, e, 2.5, QS, use_extension=True)
    b = stats.record(x, pos, e, 2.5, QS, use_extension=False)
    f, hist, pct = _brute_record(x, pos, edges, 2.5, QS)
    B = len(edges) - 1
    np.testing.assert_array_equal(a[9 : 11 + B].numpy(), hist)
    np.testing.assert_array_equal(a[11 + B :].numpy(), pct)  # exact order statistics
    torch.testing.assert_close(a[6:], b[6:], rtol=0, atol=0, equal_nan=True)
    assert a[0] == b[0] and a[3] == b[3] and a[4] == b[4]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [1, 2, 3, 17, 100, 20000])
def test_record_of_one_repeated_value_and_of_ties(n, dtype):
    _need(True)
    edges = stats.fixed_edges(-1.0, 1.0, 64, dtype)
    e = torch.tensor(edges)
    g = torch.Generator().manual_seed(n)
    for x in (torch.full((n,), 0.3, dtype=dtype), torch.tensor([-0.5, 0.0, 0.5], dtype=dtype)[torch.randint(0, 3, (n,), generator=g)]):
        pos = stats.sample_positions(n, 16384, 0, torch.device("cpu")) if n > 16384 else None
        a = stats.record(x, pos, e, 2.5, QS, use_extension=True)
        f, hist, pct = _brute_record(x, pos, edges, 2.5, QS)
        np.testing.assert_array_equal(a[9 : 9 + 66].numpy(), hist)
        np.testing.assert_array_equal(a[9 + 66 :].numpy(), pct)
        _check_moments(a[:6], _brute_moments(x.numpy()), dtype)


@pytest.mark.parametrize("where", [0, 1, 37, 4095, 4096, 9999])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_moments_find_one_nonfinite_value_anywhere_in_a_long_tensor(where, bad):
    _need(True)
    x = _x(10000)
    x[where] = bad
    mom, _ = stats.moments(x, None, use_extension=True)
    _check_moments(mom, _brute_moments(x.numpy()), torch.float32)


def test_moments_of_finite_float32_values_whose_float32_sum_overflows():
    _need(True)
    x = torch.full((5000,), 3e38, dtype=torch.float32)
    x[::7] = -3e38
    mom, _ = stats.moments(x, None, use_extension=True)
    want = _brute_moments(x.numpy())
    assert mom[5] == 0 and mom[0] == 5000  # every value is finite
    _check_moments(mom, want, torch.float32)


def _selection_cases():
    """Samples whose bins hold hundreds or thousands of values, the shapes that the fused kernel's
    selection (counting sub-ranges, recursively) has to get exactly right."""
    g = torch.Generator().manual_seed(11)
    n = 6000
    cauchy = torch.randn(n, generator=g) / torch.randn(n, generator=g)  # heavy tails: min and max far out
    return [
        ("all below the edges", torch.rand(n, generator=g) * -50.0 - 3.0),
        ("heavy tails", cauchy),
        ("two tight clusters", torch.cat([1e-4 * torch.randn(n // 2, generator=g), 1.0 + 1e-4 * torch.randn(n // 2, generator=g)])),
        ("duplicates and outliers", torch.cat([torch.full((n - 3,), 0.25), torch.tensor([-1e9, 1e9, 0.2500001])])),
        ("a few wide bins", torch.randn(20000, generator=g)),
        ("clustered inside one sub-range", torch.cat([torch.tensor([-1.0, 1.0]), 1e-6 * torch.randn(n, generator=g)])),
        # each refinement level only peels off one pair of outliers, so the selection reaches its depth
        # limit (3) and finishes with a plain select on the rest
        ("nested clusters", torch.cat([torch.tensor([-1e-3, 1e-3, -1e-6, 1e-6, -1e-9, 1e-9, -1e-12, 1e-12]), 1e-15 * torch.randn(1000, generator=g)])),
    ]


@pytest.mark.parametrize("case", range(7), ids=[c[0] for c in _selection_cases()])
def test_record_percentiles_are_exact_order_statistics_on_crowded_bins(case):
    _need(True)
    _, x = _selection_cases()[case]
    x = x[torch.randperm(x.numel(), generator=torch.Generator().manual_seed(case))]
    qs = [0.0, 0.5, 1.0, 7.5, 15.0, 33.3, 50.0, 66.6, 85.0, 99.0, 99.9, 100.0]
    bins = 4 if "wide" in _selection_cases()[case][0] else 64
    edges = stats.fixed_edges(-2.0, 2.0, bins, torch.float32)
    a = stats.record(x, None, torch.tensor(edges), 2.5, qs, use_extension=True)
    f, hist, pct = _brute_record(x, None, edges, 2.5, qs)
    np.testing.assert_array_equal(a[9 : 11 + bins].numpy(), hist)
    np.testing.assert_allclose(a[11 + bins :].numpy(), pct, rtol=1e-9, atol=0)  # NumPy's interpolation rounds differently
    # exactly: the two order statistics around each rank, interpolated as the kernel does
    s = np.sort(f)
    h = (s.size - 1) * np.asarray(qs) / 100.0
    lo = np.floor(h).astype(np.int64)
    hi = np.minimum(lo + 1, s.size - 1)
    want = s[lo] + (s[hi] - s[lo]) * (h - lo)
    np.testing.assert_array_equal(a[11 + bins :].numpy(), want)
