"""The small pieces the literature experiments are built from, against hand-derived cases."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from covshift.experiments.papers.batch_size import SmallCNN, renorm_schedule
from covshift.experiments.papers.common import batch_indices, he_init_, train_classifier
from covshift.experiments.papers.depth import fit_line


def test_fit_line_recovers_a_line_and_scores_noise():
    x = np.array([4.0, 8.0, 16.0, 32.0])
    slope, intercept, r2 = fit_line(x, 0.25 * x - 1.0)
    assert (slope, intercept, r2) == (pytest.approx(0.25), pytest.approx(-1.0), pytest.approx(1.0))
    y = np.array([1.0, -1.0, 1.0, -1.0])
    _, _, r2 = fit_line(x, y)  # for a line fit, R^2 is the squared correlation
    assert r2 == pytest.approx(np.corrcoef(x, y)[0, 1] ** 2) and r2 < 0.3


def test_renorm_schedule_is_the_papers_fractions_of_the_run():
    s = renorm_schedule(160_000)
    assert s == {"r_max": 3.0, "d_max": 5.0, "warmup_steps": 5_000, "r_relax_steps": 35_000, "d_relax_steps": 20_000}
    s = renorm_schedule(1_600)  # 1/100 of the paper's run
    assert (s["warmup_steps"], s["warmup_steps"] + s["r_relax_steps"], s["warmup_steps"] + s["d_relax_steps"]) == (50, 400, 250)


def test_batch_indices_are_one_permutation_per_epoch():
    idx = batch_indices(10, 3, 7, seed=0)  # 3 batches per epoch (the tail of 1 skipped)
    assert idx.shape == (7, 3)
    for e in range(2):
        epoch = idx[3 * e : 3 * e + 3].reshape(-1)
        assert len(set(epoch.tolist())) == 9  # no repeats within an epoch
    assert torch.equal(idx, batch_indices(10, 3, 7, seed=0))


def test_he_init_std_and_identical_draws_whatever_the_norm():
    a = he_init_(nn.Sequential(nn.Linear(400, 300), nn.ReLU(), nn.Linear(300, 10)), seed=1)
    assert float(a[0].weight.detach().std()) == pytest.approx(math.sqrt(2 / 400), rel=0.02)
    b = he_init_(SmallCNN("bn", (4, 8)), seed=3)
    c = he_init_(SmallCNN("group", (4, 8), num_groups=2), seed=3)
    assert torch.equal(b.conv1.weight, c.conv1.weight) and torch.equal(b.out.weight, c.out.weight)


def test_train_classifier_learns_and_detects_divergence():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 5, generator=g)
    y = (x[:, 0] > 0).long()  # linearly separable
    torch.manual_seed(0)
    model = nn.Linear(5, 2)
    res = train_classifier(model, x, y, x, y, steps=200, batch_size=20, lr=0.5, seed=0)
    assert not res.diverged and res.test_acc > 0.95 and res.steps == 200
    model = nn.Sequential(nn.Linear(5, 50), nn.ReLU(), nn.Linear(50, 50), nn.ReLU(), nn.Linear(50, 2))
    res = train_classifier(model, x * 100, y, x, y, steps=200, batch_size=20, lr=1e6, seed=0)
    assert res.diverged and res.steps < 200 and math.isnan(res.train_loss)
