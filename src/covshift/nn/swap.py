"""The one module-swap walker behind ``convert``, ``convert_sync_batchnorm``, ``freeze`` and ``unfreeze``.

Two pieces, each written once:

* :func:`swap_class` makes a module of another class out of an existing one, *sharing* its state;
* :func:`replace_modules` walks a model and puts ``fn(name, module)`` in place of each module for
  which ``fn`` returns one.

What a swapped module keeps (the policy every converter inherits):

* **Parameters and buffers**: the same ``Parameter`` and ``Tensor`` objects, so values, device, dtype,
  ``requires_grad``, ``.grad`` and an optimizer's references survive with nothing copied.
* **Children**: the same child modules.
* **Mode and options**: every instance attribute (``training``, ``eps``, ``momentum``, ``process_group``,
  ``virtual_batch_size``, ``qconfig``, ...), unless the converter sets it afterwards.
* **Hooks**: forward, forward-pre, backward and state-dict hooks registered on the old module are
  registered on the new one, and handles returned before the swap still remove them (the hook
  dictionaries are shared, not copied). The old module is left as it was, but should not be used
  again: a hook added to it later would reach the new module too.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

__all__ = ["swap_class", "replace_modules"]

#: ``fn(name, module)``: the module to put in ``module``'s place, or ``None`` to keep it and visit its
#: children. ``name`` is the dotted name from the root (``""`` for the root itself).
Replacement = Callable[[str, torch.nn.Module], Optional[torch.nn.Module]]


def swap_class(module: torch.nn.Module, cls: type) -> torch.nn.Module:
    """A ``cls`` instance holding ``module``'s state: the same parameters, buffers, children and hooks.

    ``cls.__init__`` is not called: the new module is ``module`` re-classed, with its own registries
    (``_parameters``, ``_buffers``, ``_modules``) pointing at the same objects, so later registrations
    on one do not show up on the other.
    """
    new = cls.__new__(cls)
    new.__dict__.update(module.__dict__)
    for registry in ("_parameters", "_buffers", "_modules"):
        new.__dict__[registry] = dict(module.__dict__[registry])
    new.__dict__["_non_persistent_buffers_set"] = set(module.__dict__["_non_persistent_buffers_set"])
    return new


def replace_modules(model: torch.nn.Module, fn: Replacement) -> torch.nn.Module:
    """Replace, in place, every module of ``model`` for which ``fn(name, module)`` returns a module.

    Pre-order walk from the root. Where ``fn`` returns ``None`` the module stays and its children are
    visited; where it returns a module (possibly the same one) that module takes the place and its
    children are not visited. A module registered at several places (shared between parents, or
    under two names) is given to ``fn`` once, and the same replacement goes into every place, so the
    sharing survives. See the module docstring for what a :func:`swap_class` replacement keeps.

    Returns ``model``, or ``fn``'s replacement when the root itself is replaced.
    """
    root = fn("", model)
    if root is not None:
        return root
    replaced: dict[int, torch.nn.Module] = {}  # id(old) -> new, for shared modules
    visited = {id(model)}
    # Iterative (so that a warning raised in fn has a fixed stack depth), in named_modules() order.
    stack = [("", model, name, child) for name, child in reversed(model._modules.items())]
    while stack:
        prefix, parent, name, child = stack.pop()
        if child is None:
            continue
        if id(child) in replaced:
            setattr(parent, name, replaced[id(child)])
            continue
        if id(child) in visited:
            continue
        visited.add(id(child))
        qualified = f"{prefix}.{name}" if prefix else name
        new = fn(qualified, child)
        if new is None:
            stack.extend((qualified, child, n, c) for n, c in reversed(child._modules.items()))
            continue
        replaced[id(child)] = new
        if new is not child:
            setattr(parent, name, new)
    return model
