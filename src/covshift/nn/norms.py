"""Normalization layers by name: one registry, in the style of timm's ``get_norm_layer``.

``get_norm_layer(norm, dim=1, **kwargs)`` turns a name, a class, a ``functools.partial`` or ``None``
into a *layer constructor*: a callable ``ctor(num_features) -> nn.Module`` (or ``None`` for no
normalization). ``create_norm_layer`` builds the layer at once (``nn.Identity`` for ``"none"``).

=============  ============================================================================
name           layer (``dim`` = 1 for ``(N, C)`` / ``(N, C, L)``, 2 for images, 3 for volumes)
=============  ============================================================================
``none``       no normalization (``get_norm_layer`` returns ``None``)
``bn``         covshift's ``BatchNorm{dim}d`` (the formula, analytic backward)
``torch-bn``   ``torch.nn.BatchNorm{dim}d``
``renorm``     covshift's ``BatchRenorm{dim}d`` (Ioffe 2017)
``ghost``      covshift's ``GhostBatchNorm{dim}d``; ``virtual_batch_size`` defaults to 32
``layer``      LayerNorm over every axis but the batch: ``nn.LayerNorm(C)`` for ``dim=1``,
               ``nn.GroupNorm(1, C)`` for images (the same statistics, over ``(C, H, W)``)
``group``      ``nn.GroupNorm(num_groups, C)``; ``num_groups`` defaults to 32 (Wu & He), or the
               largest divisor of ``C`` below 32 when 32 does not divide it
``instance``   ``nn.InstanceNorm{dim}d(C, affine=True)``; needs spatial axes (``dim >= 2``)
=============  ============================================================================

Other entries (for example ``noisy-bn``) are added with :func:`register_norm`. A name that is
not registered is a ``ValueError`` listing the valid names.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Optional, Union

from torch import nn

__all__ = ["get_norm_layer", "create_norm_layer", "register_norm", "norm_names", "NormFactory"]

# factory(num_features, *, dim, **kwargs) -> nn.Module
NormFactory = Callable[..., nn.Module]
NormSpec = Union[str, type, functools.partial, Callable[..., nn.Module], None]

_REGISTRY: dict[str, NormFactory] = {}
_DESCRIPTIONS: dict[str, str] = {}


def _key(name: str) -> str:
    return name.strip().lower().replace("_", "-")


def register_norm(name: str, factory: NormFactory, *, description: str = "", overwrite: bool = False) -> None:
    """Add ``name`` to the registry.

    Args:
        name: the name users pass (``--norm NAME``); case and ``_``/``-`` are ignored.
        factory: ``factory(num_features, *, dim, **kwargs) -> nn.Module``; raise ``ValueError`` for
            a ``dim`` the layer does not support.
        description: one line, for listings.
        overwrite: replace an existing entry (otherwise that is a ``ValueError``).
    """
    key = _key(name)
    if not key or key == "none":
        raise ValueError(f"register_norm: name must be a non-empty name other than 'none', got {name!r}")
    if key in _REGISTRY and not overwrite:
        raise ValueError(f"register_norm: {key!r} is already registered; pass overwrite=True to replace it")
    if not callable(factory):
        raise TypeError(f"register_norm: factory must be callable, got {type(factory).__name__}")
    _REGISTRY[key] = factory
    _DESCRIPTIONS[key] = description


def norm_names() -> list[str]:
    """Every valid name, ``"none"`` first."""
    return ["none", *sorted(_REGISTRY)]


def _unknown(name: str) -> ValueError:
    return ValueError(f"unknown normalization {name!r}; valid names: {', '.join(norm_names())}")


def get_norm_layer(norm: NormSpec, *, dim: int = 1, **kwargs: Any) -> Optional[Callable[..., nn.Module]]:
    """A constructor ``ctor(num_features) -> nn.Module`` for ``norm``, or ``None`` for no normalization.

    Args:
        norm: a registered name (``"bn"``, ``"group"``, ...), ``"none"`` or ``None``; or a layer class
            or ``functools.partial``/callable taking ``num_features`` first, returned as is (with
            ``kwargs`` bound when given).
        dim: 1 for ``(N, C)`` or ``(N, C, L)`` inputs, 2 for ``(N, C, H, W)``, 3 for ``(N, C, D, H, W)``.
            Ignored for classes and partials.
        kwargs: keyword arguments for the layer (``eps=``, ``momentum=``, ``num_groups=``, ...).

    Raises:
        ValueError: an unknown name (the message lists the valid ones) or an unsupported ``dim``.
    """
    if norm is None:
        return None
    if isinstance(norm, str):
        key = _key(norm)
        if key == "none":
            return None
        if key not in _REGISTRY:
            raise _unknown(norm)
        if dim not in (1, 2, 3):
            raise ValueError(f"get_norm_layer: dim must be 1, 2 or 3, got {dim}")
        return functools.partial(_REGISTRY[key], dim=dim, **kwargs)
    if callable(norm):  # a class, a partial, or a plain function
        return functools.partial(norm, **kwargs) if kwargs else norm
    raise TypeError(f"get_norm_layer: expected a name, a layer class, a partial or None, got {type(norm).__name__}")


def create_norm_layer(norm: NormSpec, num_features: int, *, dim: int = 1, **kwargs: Any) -> nn.Module:
    """``get_norm_layer(norm, dim=dim, **kwargs)(num_features)``, or ``nn.Identity()`` for no normalization."""
    ctor = get_norm_layer(norm, dim=dim, **kwargs)
    return nn.Identity() if ctor is None else ctor(num_features)


# --- the built-in entries -------------------------------------------------------------------------


def _by_dim(name: str, classes: dict[int, type]) -> NormFactory:
    def factory(num_features: int, *, dim: int = 1, **kwargs: Any) -> nn.Module:
        if dim not in classes:
            raise ValueError(f"norm {name!r} supports dim {sorted(classes)}, got dim={dim}")
        return classes[dim](num_features, **kwargs)

    return factory


def _bn(num_features: int, *, dim: int = 1, **kwargs: Any) -> nn.Module:
    from covshift.nn.batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d

    return _by_dim("bn", {1: BatchNorm1d, 2: BatchNorm2d, 3: BatchNorm3d})(num_features, dim=dim, **kwargs)


def _renorm(num_features: int, *, dim: int = 1, **kwargs: Any) -> nn.Module:
    from covshift.nn.batch_renorm import BatchRenorm1d, BatchRenorm2d, BatchRenorm3d

    return _by_dim("renorm", {1: BatchRenorm1d, 2: BatchRenorm2d, 3: BatchRenorm3d})(num_features, dim=dim, **kwargs)


def _ghost(num_features: int, *, dim: int = 1, virtual_batch_size: int = 32, **kwargs: Any) -> nn.Module:
    from covshift.nn.ghost_batchnorm import GhostBatchNorm1d, GhostBatchNorm2d

    return _by_dim("ghost", {1: GhostBatchNorm1d, 2: GhostBatchNorm2d})(num_features, dim=dim, virtual_batch_size=virtual_batch_size, **kwargs)


def _layer(num_features: int, *, dim: int = 1, **kwargs: Any) -> nn.Module:
    # (N, C): normalize over C. Images: over (C, H, W) of each sample, which is GroupNorm with one
    # group (nn.LayerNorm would need the spatial size up front).
    return nn.LayerNorm(num_features, **kwargs) if dim == 1 else nn.GroupNorm(1, num_features, **kwargs)


def default_groups(num_features: int, preferred: int = 32) -> int:
    """``preferred`` groups when they divide ``num_features``, else the largest divisor below it."""
    return max(g for g in range(1, min(preferred, num_features) + 1) if num_features % g == 0)


def _group(num_features: int, *, dim: int = 1, num_groups: Optional[int] = None, **kwargs: Any) -> nn.Module:
    groups = default_groups(num_features) if num_groups is None else num_groups
    if num_features % groups:
        raise ValueError(f"norm 'group': num_groups={groups} must divide num_features={num_features} (gcd: {math.gcd(groups, num_features)})")
    return nn.GroupNorm(groups, num_features, **kwargs)


def _instance(num_features: int, *, dim: int = 1, affine: bool = True, **kwargs: Any) -> nn.Module:
    if dim == 1:
        raise ValueError(
            "norm 'instance' normalizes each sample's channel over its spatial axes; (N, C) features have none "
            "(use dim=2 for images, or 'layer' for vectors)"
        )
    return _by_dim("instance", {2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d})(num_features, dim=dim, affine=affine, **kwargs)


register_norm("bn", _bn, description="covshift BatchNorm (the formula, analytic backward)")
register_norm("torch-bn", _by_dim("torch-bn", {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}), description="torch.nn.BatchNorm")
register_norm("renorm", _renorm, description="Batch Renormalization (Ioffe 2017)")
register_norm("ghost", _ghost, description="Ghost BatchNorm (Hoffer et al. 2017), virtual batches of 32")
register_norm("layer", _layer, description="LayerNorm (per sample, over features)")
register_norm("group", _group, description="GroupNorm (Wu & He 2018), 32 groups")
register_norm("instance", _instance, description="InstanceNorm (per sample and channel, over space)")
