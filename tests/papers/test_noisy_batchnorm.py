"""NoisyBatchNorm: the noise has the documented distribution, is re-drawn every step, replays, and is off in eval."""

import copy

import numpy as np
import pytest
import torch
from scipy import stats

from covshift.nn import BatchNorm1d, BatchNorm2d
from covshift.nn.noisy_batchnorm import NoisyBatchNorm1d, NoisyBatchNorm2d, draw_noise, step_generator


def _pair(noisy, x):
    """The noisy layer's output and the plain BN output of the same input (same parameters)."""
    plain = (BatchNorm1d if x.dim() < 4 else BatchNorm2d)(noisy.num_features)
    plain.load_state_dict(noisy.state_dict())
    plain.train(noisy.training)
    return noisy(x), plain(x)


def test_noise_is_added_in_training_with_the_documented_form():
    torch.manual_seed(0)
    layer = NoisyBatchNorm1d(6, noise_mean=(-1.0, 2.0), noise_std=(0.3, 0.7), seed=5)
    x = torch.randn(4000, 6) * 3 + 1
    mu, sigma = layer.noise_parameters()  # the next step's distribution
    out, plain = _pair(layer, x)
    noise = (out - plain).detach().double()
    # per channel: i.i.d. N(mu_c, sigma_c^2) over the 4000 samples
    for c in range(6):
        assert stats.kstest(((noise[:, c] - mu[c]) / sigma[c]).numpy(), "norm").pvalue > 1e-3
    torch.testing.assert_close(noise.mean(0), mu, atol=4 * float(sigma.max()) / 4000**0.5, rtol=0)
    torch.testing.assert_close(noise.std(0), sigma, rtol=0.08, atol=0)
    assert int(layer.noise_step) == 1


def test_per_step_parameters_are_uniform_on_the_ranges_and_redrawn_every_step():
    layer = NoisyBatchNorm1d(8, noise_mean=(-0.5, 1.5), noise_std=(0.25, 2.0), seed=11)
    mus, sigmas = zip(*(layer.noise_parameters(t) for t in range(400)))
    mus, sigmas = torch.stack(mus).numpy(), torch.stack(sigmas).numpy()  # (T, C)
    assert stats.kstest(mus.ravel(), "uniform", args=(-0.5, 2.0)).pvalue > 1e-3
    assert stats.kstest(sigmas.ravel(), "uniform", args=(0.25, 1.75)).pvalue > 1e-3
    assert (np.diff(mus, axis=0) != 0).all() and (np.diff(sigmas, axis=0) != 0).all()
    # consecutive steps are independent draws: no correlation between step t and t+1
    assert abs(np.corrcoef(mus[:-1].ravel(), mus[1:].ravel())[0, 1]) < 0.1


def test_training_forwards_use_each_steps_own_parameters():
    layer = NoisyBatchNorm2d(3, seed=2)
    x = torch.randn(64, 3, 5, 5)
    seen = []
    for t in range(3):
        mu, sigma = layer.noise_parameters()
        out, plain = _pair(layer, x)
        noise = (out - plain).detach().double().transpose(0, 1).reshape(3, -1)
        seen.append(noise)
        torch.testing.assert_close(noise.mean(1), mu, atol=5 * float(sigma.max()) / noise.shape[1] ** 0.5, rtol=0)
        assert torch.equal(mu, layer.noise_parameters(t)[0])
    assert not torch.allclose(seen[0], seen[1]) and not torch.allclose(seen[1], seen[2])


def test_same_seed_same_noise_and_extra_forwards_on_cloned_buffers_replay_it():
    x = torch.randn(32, 4)
    a, b = NoisyBatchNorm1d(4, seed=7), NoisyBatchNorm1d(4, seed=7)
    torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)
    # a measurement on a clone of the buffers (as gradient_ics does) sees the step's noise exactly
    clone = copy.deepcopy(a)
    torch.testing.assert_close(clone(x), a(x), rtol=0, atol=0)
    assert int(a.noise_step) == 2
    other = NoisyBatchNorm1d(4, seed=8)
    other.load_state_dict(a.state_dict())
    other.noise_step.fill_(1)
    assert not torch.allclose(other(x), b(x))


def test_seed_none_follows_torchs_global_generator():
    torch.manual_seed(3)
    s1 = NoisyBatchNorm1d(4).seed
    torch.manual_seed(3)
    assert NoisyBatchNorm1d(4).seed == s1
    assert NoisyBatchNorm1d(4).seed != s1


def test_eval_is_plain_batchnorm_and_state_dict_keys_are_torchs():
    layer = NoisyBatchNorm1d(5, seed=0)
    x = torch.randn(16, 5)
    layer(x)
    layer.eval()
    out, plain = _pair(layer, x)
    torch.testing.assert_close(out, plain, rtol=0, atol=0)
    assert set(layer.state_dict()) == set(torch.nn.BatchNorm1d(5).state_dict())


def test_noise_carries_no_gradient_and_gradients_match_batchnorm():
    torch.manual_seed(1)
    x = torch.randn(20, 3, dtype=torch.float64, requires_grad=True)
    layer = NoisyBatchNorm1d(3, seed=4, dtype=torch.float64)
    plain = BatchNorm1d(3, dtype=torch.float64)
    w = torch.randn(20, 3, dtype=torch.float64)
    (g1,) = torch.autograd.grad((layer(x) * w).sum(), x)
    (g2,) = torch.autograd.grad((plain(x) * w).sum(), x)
    torch.testing.assert_close(g1, g2)


def test_draw_noise_shapes_and_generator():
    noise, mu, sigma = draw_noise((10, 4, 3), (0.0, 0.0), (1.0, 1.0), step_generator(0, 0))
    assert noise.shape == (10, 4, 3) and mu.shape == sigma.shape == (4,)
    assert torch.equal(mu, torch.zeros(4, dtype=torch.float64)) and torch.equal(sigma, torch.ones(4, dtype=torch.float64))
    again, _, _ = draw_noise((10, 4, 3), (0.0, 0.0), (1.0, 1.0), step_generator(0, 0))
    assert torch.equal(noise, again)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(noise_mean=(1.0, 0.0)), "noise_mean"),
        (dict(noise_std=(-1.0, 1.0)), "noise_std"),
        (dict(noise_std=(0.5, float("inf"))), "noise_std"),
        (dict(noise_mean=3.0), "noise_mean"),
        (dict(seed=-1), "seed"),
    ],
)
def test_bad_options_are_value_errors_that_name_the_option(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NoisyBatchNorm1d(4, **kwargs)


def test_positional_order_is_torchs():
    layer = NoisyBatchNorm1d(4, 1e-3, 0.2, False, False)
    assert (layer.eps, layer.momentum, layer.affine, layer.track_running_stats) == (1e-3, 0.2, False, False)
    layer(torch.randn(8, 4))  # no running stats: the noise still advances with its own counter
    assert int(layer.noise_step) == 1


def test_registered_as_noisy_bn():
    from covshift.nn.norms import get_norm_layer

    layer = get_norm_layer("noisy-bn", noise_std=(0.1, 0.2), seed=1)(8)
    assert isinstance(layer, NoisyBatchNorm1d) and layer.noise_std == (0.1, 0.2)
    assert isinstance(get_norm_layer("noisy_bn", dim=2)(4), NoisyBatchNorm2d)
    with pytest.raises(ValueError, match="dim"):
        get_norm_layer("noisy-bn", dim=3)(4)
