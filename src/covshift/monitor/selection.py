"""Which modules of a model to watch: by type, by qualified name, by glob, or by predicate."""

from __future__ import annotations

import difflib
import fnmatch
from typing import Callable, Iterable, Optional, Sequence

from torch import nn

from covshift.monitor.config import LayerSpec

__all__ = ["ACTIVATION_TYPES", "NORM_TYPES", "select_modules", "glob_match"]

# Element-wise activation functions (torch.nn.modules.activation minus Softmax & co., whose output
# is a distribution over a dim, and MultiheadAttention, which lives in the same file).
ACTIVATION_TYPES: tuple[type, ...] = tuple(
    getattr(nn, n)
    for n in (
        "ReLU", "ReLU6", "LeakyReLU", "PReLU", "RReLU", "ELU", "SELU", "CELU", "GELU", "SiLU",
        "Mish", "Sigmoid", "Hardsigmoid", "LogSigmoid", "Tanh", "Hardtanh", "Hardswish",
        "Softplus", "Softsign", "Tanhshrink", "Softshrink", "Hardshrink", "Threshold", "GLU",
    )
    if hasattr(nn, n)
)

# Normalization layers. _NormBase is the base of every torch and covshift BatchNorm variant
# (covshift's SyncBatchNorm, BatchRenorm, GhostBatchNorm and FrozenBatchNorm included).
NORM_TYPES: tuple[type, ...] = (nn.modules.batchnorm._NormBase,) + tuple(
    getattr(nn, n)
    for n in (
        "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "LazyBatchNorm1d", "LazyBatchNorm2d",
        "LazyBatchNorm3d", "SyncBatchNorm", "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d",
        "LazyInstanceNorm1d", "LazyInstanceNorm2d", "LazyInstanceNorm3d", "LayerNorm",
        "GroupNorm", "LocalResponseNorm", "RMSNorm",
    )
    if hasattr(nn, n)
)

_GLOB_CHARS = frozenset("*?[")


def glob_match(pattern: str, name: str) -> bool:
    """Match a dotted module name segment by segment.

    ``*``, ``?`` and ``[...]`` work as in :mod:`fnmatch` but never cross a ``.``; a segment ``**``
    matches any number (zero included) of whole segments: ``"layers.*.act"`` matches
    ``"layers.3.act"`` but not ``"layers.3.sub.act"``, which ``"layers.**.act"`` matches.
    """
    return _match(pattern.split("."), name.split(".") if name else [])


def _match(pat: list[str], parts: list[str]) -> bool:
    if not pat:
        return not parts
    head, rest = pat[0], pat[1:]
    if head == "**":
        return any(_match(rest, parts[i:]) for i in range(len(parts) + 1))
    return bool(parts) and fnmatch.fnmatchcase(parts[0], head) and _match(rest, parts[1:])


def _unknown(kind: str, value: str, names: Sequence[str]) -> ValueError:
    close = difflib.get_close_matches(value, names, n=3)
    hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
    shown = ", ".join(repr(n) for n in names[:40]) + (" ..." if len(names) > 40 else "")
    return ValueError(
        f"layers: expected {kind} matching a module of the model, got {value!r}, which matches "
        f"none.{hint} The model's modules are: {shown}."
    )


def select_modules(
    model: nn.Module,
    spec: LayerSpec,
    *,
    candidates: Optional[Iterable[str]] = None,
    default: Optional[Callable[[str, nn.Module], bool]] = None,
) -> list[str]:
    """Qualified names of the modules of ``model`` that ``spec`` selects, in ``named_modules`` order.

    Args:
        model: the model; names are those of ``model.named_modules()`` (the root is ``""``).
        spec: ``None`` (use ``default``), a name, a glob, a module type, a predicate
            ``(name, module) -> bool``, or a sequence of names, globs and types (their union).
        candidates: restrict the choice to these names (e.g. modules that own parameters).
        default: predicate used when ``spec`` is None; by default an activation-function or
            normalization module (:data:`ACTIVATION_TYPES`, :data:`NORM_TYPES`).

    Raises:
        ValueError: a name or glob that selects nothing, or nothing selected at all.
    """
    modules = dict(model.named_modules())
    keep = None if candidates is None else set(candidates)
    allowed = [n for n in modules if keep is None or n in keep]
    if default is None:
        default = lambda _n, m: isinstance(m, ACTIVATION_TYPES + NORM_TYPES)  # noqa: E731

    chosen: set[str] = set()
    if spec is None:
        chosen = {n for n in allowed if default(n, modules[n])}
    elif callable(spec) and not isinstance(spec, type):
        chosen = {n for n in allowed if spec(n, modules[n])}
    else:
        items = spec if isinstance(spec, (list, tuple)) else [spec]
        for item in items:
            if isinstance(item, type):
                chosen |= {n for n in allowed if isinstance(modules[n], item)}
            elif _GLOB_CHARS & set(item):
                hits = {n for n in allowed if glob_match(item, n)}
                if not hits:
                    raise _unknown("a glob", item, allowed)
                chosen |= hits
            else:
                if item not in allowed:
                    raise _unknown("a qualified module name", item, allowed)
                chosen.add(item)
    if not chosen:
        raise ValueError(
            f"layers: expected at least one module to watch, got none for layers={spec!r} in a "
            f"{type(model).__name__}. Pass layers= with module types, names or globs, e.g. "
            "layers=[nn.Linear] or layers='fc*'. (Activations called as functions, like "
            "torch.sigmoid inside forward, are not modules: watch the module before them with "
            "point='output'.)"
        )
    return [n for n in allowed if n in chosen]
