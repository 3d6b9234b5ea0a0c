"""Every covshift layer takes torch's arguments in torch's order, and fails with torch's error types.

The signature rule (issue 9, item 7): the torch counterpart's parameters come first, with the same
names, kinds (positional or keyword-only) and defaults; whatever covshift adds is keyword-only. So
any call that builds a torch layer builds the covshift one with the same meaning.
"""

import inspect

import pytest
import torch

import covshift.nn as cnn

P = inspect.Parameter

# Every BatchNorm layer covshift.nn exports (found, so that a new variant is checked too) -> its torch
# counterpart: torch.nn.SyncBatchNorm, or plain torch BatchNorm of the same rank.
_EXPORTED = [getattr(cnn, name) for name in cnn.__all__]
_LAYERS = sorted(
    (c for c in _EXPORTED if isinstance(c, type) and issubclass(c, torch.nn.modules.batchnorm._BatchNorm)),
    key=lambda c: c.__name__,
)
COUNTERPARTS = {
    c: torch.nn.SyncBatchNorm if c.__name__ == "SyncBatchNorm" else getattr(torch.nn, f"BatchNorm{c.__name__[-2:]}")
    for c in _LAYERS
}


def test_every_layer_is_checked():
    expected = {"BatchNorm", "SyncBatchNorm", "BatchRenorm", "GhostBatchNorm", "FrozenBatchNorm"}
    assert expected <= {c.__name__.rstrip("123d") if c.__name__ != "SyncBatchNorm" else "SyncBatchNorm" for c in COUNTERPARTS}
    assert len(COUNTERPARTS) >= 12


PLAIN = (cnn.BatchNorm1d, cnn.BatchNorm2d, cnn.BatchNorm3d)  # the lead's mixin-based layers (issue 9)
REQUIRED = {cnn.GhostBatchNorm1d: {"virtual_batch_size": 2}, cnn.GhostBatchNorm2d: {"virtual_batch_size": 2}}


def _shape(p):
    return (p.name, p.kind, p.default)


@pytest.mark.parametrize(
    "cls", [pytest.param(c, id=c.__name__) for c in COUNTERPARTS]
)
def test_torchs_parameters_first_in_torchs_order_and_the_rest_keyword_only(cls):
    theirs = list(inspect.signature(COUNTERPARTS[cls]).parameters.values())
    ours = list(inspect.signature(cls).parameters.values())
    positional = [_shape(p) for p in theirs if p.kind is not P.KEYWORD_ONLY]
    assert [_shape(p) for p in ours[: len(positional)]] == positional
    ours_kw = {p.name: p for p in ours[len(positional):]}
    for p in theirs:
        if p.kind is P.KEYWORD_ONLY:  # torch 2.13's `bias`
            assert p.name in ours_kw and _shape(ours_kw[p.name]) == _shape(p), p.name
    extra = [p for p in ours[len(positional):] if p.name not in {q.name for q in theirs}]
    assert all(p.kind is P.KEYWORD_ONLY for p in extra), [(p.name, p.kind) for p in extra]
    if cls in PLAIN:
        assert [p.name for p in extra] == ["skip_nonfinite"]


ARGS = (5, 1e-3, 0.3, False, True, "cpu", torch.float64)
SYNC_ARGS = (5, 1e-3, 0.3, False, True, None, "cpu", torch.float64)


@pytest.mark.parametrize("cls", list(COUNTERPARTS), ids=lambda c: c.__name__)
def test_torchs_positional_call_builds_the_same_layer(cls):
    args = SYNC_ARGS if cls is cnn.SyncBatchNorm else ARGS
    ours, theirs = cls(*args, **REQUIRED.get(cls, {})), COUNTERPARTS[cls](*args)
    for attr in ("num_features", "eps", "momentum", "affine", "track_running_stats"):
        assert getattr(ours, attr) == getattr(theirs, attr), attr
    assert ours.running_mean.dtype == torch.float64 and ours.weight is None
    assert ours.state_dict().keys() == theirs.state_dict().keys()


def test_the_calls_of_the_issue_mean_what_they_mean_for_torch():
    renorm = cnn.BatchRenorm2d(8, 1e-5, 0.1, True, True)
    assert (renorm.r_max, renorm.d_max, renorm.track_running_stats) == (3.0, 5.0, True)  # not r_max=1
    frozen = cnn.FrozenBatchNorm2d(8, 1e-5, 0.1)
    assert frozen.affine is True and frozen.momentum == 0.1 and frozen.weight is not None  # not affine=0.1
    with pytest.raises(TypeError, match="virtual_batch_size"):  # the old positional form fails loudly
        cnn.GhostBatchNorm1d(4, 8)


def test_a_frozen_layer_needs_running_statistics():
    with pytest.raises(ValueError, match=r"FrozenBatchNorm1d expected track_running_stats=True"):
        cnn.FrozenBatchNorm1d(3, 1e-5, 0.1, True, False)


# --- error types: an instance of what torch raises for the same input (ValueError also allowed) ------

VARIANTS = {  # name -> (covshift layer factory, torch layer factory, a good 4D input's channel count)
    "BatchRenorm2d": (lambda **kw: cnn.BatchRenorm2d(3, **kw), lambda **kw: torch.nn.BatchNorm2d(3, **kw)),
    "GhostBatchNorm2d": (
        lambda **kw: cnn.GhostBatchNorm2d(3, virtual_batch_size=2, **kw),
        lambda **kw: torch.nn.BatchNorm2d(3, **kw),
    ),
    "FrozenBatchNorm2d": (lambda **kw: cnn.FrozenBatchNorm2d(3, **kw), lambda **kw: torch.nn.BatchNorm2d(3, **kw).eval()),
    "SyncBatchNorm": (lambda **kw: cnn.SyncBatchNorm(3, **kw), lambda **kw: torch.nn.BatchNorm2d(3, **kw)),
}

BAD = {  # name -> (layer kwargs, input, train)
    "wrong_rank": ({}, torch.randn(4, 3), True),
    "wrong_channels": ({}, torch.randn(4, 2, 2, 2), True),
    "wrong_channels_eval": ({}, torch.randn(4, 2, 2, 2), False),
    "one_value_per_channel": ({}, torch.randn(1, 3, 1, 1), True),
    "eps_0_training": ({"eps": 0.0}, torch.randn(4, 3, 2, 2), True),
    "eps_negative_training": ({"eps": -1e-3}, torch.randn(4, 3, 2, 2), True),
    "eps_negative_eval": ({"eps": -1e-3}, torch.randn(4, 3, 2, 2), False),
}


def _raised(fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - the type is what is compared
        return e
    return None


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("case", list(BAD))
def test_errors_are_instances_of_torchs_type(variant, case):
    make_ours, make_theirs = VARIANTS[variant]
    kw, x, train = BAD[case]
    if variant == "SyncBatchNorm" and case == "wrong_rank":
        x = torch.randn(4)  # SyncBatchNorm takes any (N, C, *); torch's refuses 1D as well
        make_theirs = lambda **kw: torch.nn.SyncBatchNorm(3, **kw)  # noqa: E731
    theirs = make_theirs(**kw)
    ours = make_ours(**kw)
    if variant != "FrozenBatchNorm2d":
        theirs.train(train)
        ours.train(train)
    err_theirs = _raised(lambda: theirs(x.clone()))
    err_ours = _raised(lambda: ours(x.clone()))
    if err_theirs is None:  # e.g. a frozen layer, always in eval, has no batch statistics to refuse
        assert err_ours is None, err_ours
        return
    assert err_ours is not None, f"torch raises {type(err_theirs).__name__}: {err_theirs}; covshift raised nothing"
    assert isinstance(err_ours, type(err_theirs)), (type(err_ours).__mro__, type(err_theirs))
    assert str(err_ours) != ""


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_a_refused_eps_leaves_the_state_as_it_was(variant):
    make_ours, _ = VARIANTS[variant]
    frozen = variant == "FrozenBatchNorm2d"  # always in eval, where eps = 0 is allowed
    layer = make_ours(eps=-1e-3 if frozen else 0.0)
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    layer.train()
    with pytest.raises(ValueError, match="eps must be non-negative" if frozen else "eps must be positive"):
        layer(torch.randn(4, 3, 2, 2))
    assert all(torch.equal(v, state[k]) for k, v in layer.state_dict().items())
