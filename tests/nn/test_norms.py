"""The norm registry: every name builds the layer it documents, and bad names list the valid ones."""

import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import covshift.nn as cnn
from covshift.nn import create_norm_layer, get_norm_layer, norm_names, register_norm
from covshift.nn.norms import default_groups


@pytest.mark.parametrize(
    "name, dim, cls",
    [
        ("bn", 1, cnn.BatchNorm1d),
        ("bn", 2, cnn.BatchNorm2d),
        ("bn", 3, cnn.BatchNorm3d),
        ("torch-bn", 1, nn.BatchNorm1d),
        ("torch_bn", 2, nn.BatchNorm2d),
        ("renorm", 1, cnn.BatchRenorm1d),
        ("renorm", 2, cnn.BatchRenorm2d),
        ("ghost", 1, cnn.GhostBatchNorm1d),
        ("ghost", 2, cnn.GhostBatchNorm2d),
        ("layer", 1, nn.LayerNorm),
        ("layer", 2, nn.GroupNorm),
        ("group", 1, nn.GroupNorm),
        ("instance", 2, nn.InstanceNorm2d),
        ("INSTANCE", 3, nn.InstanceNorm3d),
    ],
)
def test_each_name_builds_its_layer(name, dim, cls):
    layer = create_norm_layer(name, 64, dim=dim)
    assert type(layer) is cls
    x = torch.randn(8, 64, *([5] * dim)) if dim > 1 else torch.randn(8, 64)
    assert layer(x).shape == x.shape


def test_torch_bn_is_not_covshift_bn():
    assert type(create_norm_layer("torch-bn", 4)) is nn.BatchNorm1d
    assert type(create_norm_layer("bn", 4)) is cnn.BatchNorm1d  # a subclass of torch's, but covshift's own


def test_none_means_no_layer():
    assert get_norm_layer(None) is None and get_norm_layer("none") is None
    assert isinstance(create_norm_layer("none", 10), nn.Identity)


def test_layer_and_group_normalize_as_documented():
    torch.manual_seed(0)
    x = torch.randn(6, 12) * 3 + 1
    torch.testing.assert_close(create_norm_layer("layer", 12)(x), F.layer_norm(x, (12,)))
    img = torch.randn(4, 12, 3, 3) * 2 - 1
    # "layer" on images: each sample over (C, H, W)
    ref = (img - img.mean((1, 2, 3), keepdim=True)) / torch.sqrt(img.var((1, 2, 3), unbiased=False, keepdim=True) + 1e-5)
    torch.testing.assert_close(create_norm_layer("layer", 12, dim=2)(img), ref, atol=1e-5, rtol=1e-5)
    g = create_norm_layer("group", 12, dim=2, num_groups=3)
    assert g.num_groups == 3
    torch.testing.assert_close(g(img), F.group_norm(img, 3))


@pytest.mark.parametrize("c, groups", [(64, 32), (100, 25), (12, 12), (7, 7), (96, 32), (30, 30), (62, 31)])
def test_default_groups_is_32_or_the_largest_divisor_below(c, groups):
    assert default_groups(c) == groups
    assert create_norm_layer("group", c).num_groups == groups


def test_kwargs_reach_the_layer():
    bn = create_norm_layer("bn", 8, eps=1e-3, momentum=0.5)
    assert (bn.eps, bn.momentum) == (1e-3, 0.5)
    assert create_norm_layer("ghost", 8, virtual_batch_size=4).virtual_batch_size == 4


def test_unknown_name_lists_the_valid_ones():
    with pytest.raises(ValueError) as e:
        get_norm_layer("batchnorm")
    msg = str(e.value)
    assert "'batchnorm'" in msg
    for name in ("none", "bn", "torch-bn", "renorm", "ghost", "layer", "group", "instance"):
        assert name in msg


@pytest.mark.parametrize("name, dim, match", [("instance", 1, "spatial"), ("ghost", 3, "supports dim"), ("bn", 4, "dim must be 1, 2 or 3")])
def test_unsupported_dims_are_errors(name, dim, match):
    with pytest.raises(ValueError, match=match):
        create_norm_layer(name, 8, dim=dim)


def test_classes_and_partials_pass_through():
    assert get_norm_layer(nn.LayerNorm) is nn.LayerNorm
    p = functools.partial(nn.GroupNorm, 4)
    assert get_norm_layer(p) is p
    assert create_norm_layer(p, 8).num_groups == 4
    assert create_norm_layer(nn.BatchNorm1d, 8, eps=0.1).eps == 0.1
    with pytest.raises(TypeError):
        get_norm_layer(3)


def test_register_norm_adds_a_name_and_refuses_duplicates():
    def factory(num_features, *, dim=1, scale=2.0):
        return nn.Identity()

    register_norm("test-only-identity", factory, description="for this test")
    try:
        assert "test-only-identity" in norm_names()
        assert isinstance(create_norm_layer("test_only_identity", 3), nn.Identity)
        with pytest.raises(ValueError, match="already registered"):
            register_norm("test-only-identity", factory)
        register_norm("test-only-identity", factory, overwrite=True)
        with pytest.raises(ValueError, match="other than 'none'"):
            register_norm("none", factory)
    finally:
        from covshift.nn import norms

        norms._REGISTRY.pop("test-only-identity", None)
