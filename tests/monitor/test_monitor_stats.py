"""The statistics kernels against NumPy on the same values."""

import numpy as np
import pytest
import torch

from covshift.monitor import stats

QS = (0.0, 1.0, 15.0, 50.0, 85.0, 99.0, 100.0)


def _x(*shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * 2 + 0.5).to(dtype)


def _moments(x, path):
    """(mean, std, min, max, sample) from the hook (subsampled path) or from the sample at flush."""
    if path == "hook":  # positions covering every value take the subsampling code path
        r = stats.reduce(x, torch.arange(x.numel()))
        m = [float(r.mean), float(r.sq_dev), float(r.min), float(r.max)]
    else:
        r = stats.reduce(x)
        assert r.mean is None and r.min is None  # deferred to the flush
        m = stats.moments_sorted(stats.sort_rows(r.sample[None]))[0].tolist()
    return m[0], np.sqrt(m[1] / r.numel), m[2], m[3], r


@pytest.mark.parametrize("shape", [(1,), (7,), (5, 13), (4, 3, 6, 5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("path", ["hook", "flush"])
def test_moments_equal_numpy(shape, dtype, path):
    x = _x(*shape, dtype=dtype)
    mean, std, mn, mx, r = _moments(x, path)
    v = x.numpy().astype(np.float64).ravel()
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    assert r.numel == v.size
    np.testing.assert_allclose(mean, v.mean(), rtol=tol, atol=tol)
    np.testing.assert_allclose(std, v.std(), rtol=tol, atol=tol)
    assert mn == v.min() and mx == v.max()
    np.testing.assert_array_equal(np.sort(r.sample.numpy()), np.sort(x.numpy().ravel()))


@pytest.mark.parametrize("path", ["hook", "flush"])
def test_variance_does_not_cancel_for_large_mean(path):
    # E[x^2] - E[x]^2 in float32 loses every digit here; the two-pass form keeps them.
    x = 1000.0 + 0.01 * _x(10_000, seed=1)
    ref = x.numpy().astype(np.float64).std()
    np.testing.assert_allclose(_moments(x, path)[1], ref, rtol=1e-3)


def test_reduce_half_and_int_inputs_are_measured_in_float32():
    for x in (_x(50).half(), torch.arange(10)):
        mean, _, _, _, r = _moments(x, "hook")
        assert r.mean.dtype == torch.float32 and r.sample.dtype == torch.float32
        np.testing.assert_allclose(mean, x.double().mean().item(), rtol=1e-3)
        assert stats.reduce(x).sample.dtype == torch.float32


def test_sample_is_a_copy_not_a_view():
    x = _x(100)
    r, r_sub = stats.reduce(x), stats.reduce(x, torch.arange(100))
    x.zero_()  # an in-place op after the hook must not change what was measured
    assert r.sample.abs().sum() > 0 and r_sub.sample.abs().sum() > 0 and float(r_sub.max) > 0


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


def test_subsample_reads_the_values_at_the_positions_even_for_strided_input():
    x = _x(8, 30).t()  # non-contiguous
    pos = stats.sample_positions(x.numel(), 50, 0, torch.device("cpu"))
    r = stats.reduce(x, pos)
    np.testing.assert_array_equal(r.sample.numpy(), x.contiguous().numpy().ravel()[pos.numpy()])
    assert float(r.max) == float(x.max())  # moments still use every value


@pytest.mark.parametrize("n", [1, 2, 3, 10, 101])
def test_percentiles_equal_numpy_linear(n):
    rows = torch.stack([_x(n, seed=s) for s in range(3)])
    s = stats.sort_rows(rows)
    got = stats.percentiles_sorted(s, QS).numpy()
    want = np.percentile(rows.numpy(), QS, axis=1).T
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_sort_rows_matches_torch_sort_and_puts_nan_last():
    x = _x(4, 33)
    x[1, 5] = float("nan")
    want = torch.sort(x, dim=1).values
    s = stats.sort_rows(x)
    torch.testing.assert_close(s, want, equal_nan=True)
    assert torch.isnan(s[1, -1]) and not torch.isnan(x[1, -1])  # x itself untouched
    assert stats.sort_rows(x, inplace=True) is x
    torch.testing.assert_close(x, want, equal_nan=True)


@pytest.mark.parametrize("inplace", [False, True])
def test_moments_sorted_inplace_equals_copy(inplace):
    s = stats.sort_rows(_x(3, 50))
    ref = stats.moments_sorted(s.clone())
    v = s.numpy().astype(np.float64)
    got = stats.moments_sorted(s, inplace=inplace)
    np.testing.assert_allclose(got[:, 0], v.mean(1), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(got[:, 1], ((v - v.mean(1, keepdims=True)) ** 2).sum(1), rtol=1e-5)
    np.testing.assert_array_equal(got[:, 2:], v[:, [0, -1]])
    torch.testing.assert_close(got, ref)


def _counts(s, edges, threshold):
    probes = torch.tensor(stats.search_probes(edges, threshold, s.dtype), dtype=s.dtype)
    return stats.counts_sorted(s, probes, None if edges is None else len(edges) - 1)


def test_counts_equal_numpy_histogram_with_tails_and_fractions():
    x = _x(3, 500)
    x[0, :5] = torch.tensor([-2.0, 3.0, -2.5, 0.0, 0.0])  # values exactly on edges and at 0
    edges_np = stats.fixed_edges(-2.0, 3.0, 10, torch.float32)
    s = stats.sort_rows(x)
    hist, n_sat, n_nonpos = _counts(s, edges_np, 2.5)
    for row, h, ns, nz in zip(x.numpy(), hist, n_sat, n_nonpos):
        inner = np.histogram(row, edges_np)[0]
        want = np.concatenate([[(row < edges_np[0]).sum()], inner, [(row > edges_np[-1]).sum()]])
        np.testing.assert_array_equal(h, want)
        assert h.sum() == row.size
        assert ns == (np.abs(row) > 2.5).sum() and nz == (row <= 0).sum()
    none_hist, n_sat2, _ = _counts(s, None, 2.5)
    assert none_hist is None and np.array_equal(n_sat2, n_sat)


def test_nan_is_counted_as_overflow():
    x = torch.tensor([[0.5, float("nan"), -5.0]])
    hist, n_sat, n_nonpos = _counts(stats.sort_rows(x), np.array([0.0, 1.0]), 3.0)
    assert hist.tolist() == [[1, 1, 1]] and n_sat.tolist() == [2] and n_nonpos.tolist() == [1]
    assert stats.search_sorted(stats.sort_rows(x), torch.tensor([np.inf])).tolist() == [[2]]


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


def test_search_probes_are_next_values_above_for_inclusive_counts():
    p = stats.search_probes(np.array([0.0, 1.0]), 2.0, torch.float32)
    assert p[0] == 0.0 and p[2] == -2.0
    assert p[1] == np.nextafter(np.float32(1), np.float32(2)) and p[3] == np.nextafter(np.float32(2), np.float32(3))
    assert p[4] == np.nextafter(np.float32(0), np.float32(1)) > 0
    assert stats.search_probes(None, 2.0, torch.float64).shape == (3,)


def test_fixed_edges_rejects_a_range_too_narrow_for_the_dtype():
    with pytest.raises(ValueError, match="hist_range"):
        stats.fixed_edges(1e6, 1e6 + 1e-3, 64, torch.float32)


def test_to_host_groups_by_dtype_and_restores_shapes():
    ts = [torch.arange(6.0).view(2, 3), torch.tensor([1, 2], dtype=torch.int64), torch.tensor(7.0)]
    out = stats.to_host(ts)
    for t, o in zip(ts, out):
        np.testing.assert_array_equal(o, t.numpy())
        assert o.shape == tuple(t.shape)
