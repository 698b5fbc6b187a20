"""Recognising the models the fast engines can run by hand: one recogniser for every engine.

The batched K-tangent chain (``_lowrank``), the one-pass zeroth-order chain
(``_chain``) and the guessed-gradient pass (``guessed``) all run the layers'
arithmetic themselves instead of calling each module, so they apply only to a
plain ``nn.Sequential`` of known module types — and never to a module that has
hooks, because a hook would not run (a hook may change the output, as pruning or
quantisation wrappers do, or observe it, as an activation logger does). What a
given engine can carry is its ``allowed`` predicate; everything else about
recognising a model is here, once.
"""

from __future__ import annotations

from typing import Callable

from torch import nn


class DoesNotApply(Exception):
    """An engine cannot stand in for the closure on this model (its structure, a hook, a closure
    that runs the model twice or uses the parameters directly, an unbatched input): the one signal
    every fast engine raises, on which the dispatcher (``engines``) tries the next engine."""


def has_hooks(mod: nn.Module) -> bool:
    """Whether ``mod`` itself has forward / forward-pre / backward hooks (global hooks are not seen)."""
    return bool(mod._forward_hooks or mod._forward_pre_hooks or mod._backward_hooks
                or getattr(mod, "_backward_pre_hooks", None))


def sequential_modules(model: nn.Module, allowed: Callable[[nn.Module], bool]) -> list[nn.Module] | None:
    """The modules of ``model`` in order if it is exactly an ``nn.Sequential`` (not a subclass, which
    may override ``forward``), not empty, with no hooks on it or on any of its modules, and every
    module passes ``allowed``; else None (the caller's engine does not apply)."""
    if type(model) is not nn.Sequential or has_hooks(model):
        return None
    mods = list(model)
    if not mods or any(has_hooks(m) or not allowed(m) for m in mods):
        return None
    return mods


def why_not_sequential(model: nn.Module, allowed: Callable[[nn.Module], bool]) -> str | None:
    """A one-line reason why :func:`sequential_modules` refuses ``model`` (None if it accepts it),
    for error messages of estimators that need the structure (guessed gradients)."""
    if type(model) is not nn.Sequential:
        return f"got a {type(model).__name__}, not an nn.Sequential"
    if has_hooks(model):
        return "the model has hooks, which a pass that runs the layers' arithmetic itself would skip"
    for name, mod in model.named_children():
        if has_hooks(mod):
            return f"module {name!r} has hooks, which a pass that runs the layers' arithmetic itself would skip"
        if not allowed(mod):
            return f"module {name!r} is a {type(mod).__name__}"
    return None if list(model) else "the nn.Sequential is empty"
