"""Variance-reduction schemes: pieces composed around a weight-perturbation estimator.

Every directional estimator (``forward_gradient``, ``spsa``, ``mezo``) runs one
step as draw → evaluate → combine → write (``bpfree.estimators.directional``).
A :class:`Scheme` changes one or two of those stages and owns its state (a
mask, a snapshot, a step counter) — the shape of optax's
``GradientTransformation``s, so ``svrg`` + ``forward_gradient(K=4)`` or sparse
MeZO are compositions, not classes per combination:

=================  =========================================================  =====================
stage              hook                                                       schemes
=================  =========================================================  =====================
draw               :meth:`Scheme.masks` (restrict), :meth:`Scheme.num_candidates`  sparse, adaptive
after evaluate     :meth:`Scheme.select` (keep some directions)               adaptive
weights            :meth:`Scheme.transform` (d_k → t(d_k))                    sign
combine            :meth:`Scheme.correct` (control variate, extra terms)      svrg
after write        :meth:`Scheme.finish` (look at the written gradient)        conservative
=================  =========================================================  =====================

A scheme is reachable from configs and spec strings by its options, named
``{scheme}_{field}`` (``mezo:sparse_fraction=0.01:sparse_rule=smallest``,
``forward_gradient:num_directions=4:svrg_every=50``); its first field switches
it on. Adding a scheme is one file: a frozen dataclass with
``@register_scheme("name")`` that overrides the hooks it needs.
Gradient accumulation is not a scheme (it spans several batches, so it lives in
the loop): :func:`bpfree.estimators.accumulate` and ``train.accumulate = n``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

if TYPE_CHECKING:  # pragma: no cover
    from bpfree.estimators.direction_set import DirectionSet
    from bpfree.estimators.directional import Step

_SCHEMES: dict[str, type[Scheme]] = {}
# Canonical order in which active schemes run (each hook is called in this order).
ORDER = ("sparse", "adaptive", "sign", "svrg", "conservative")


def register_scheme(name: str):
    """Class decorator: register a frozen-dataclass :class:`Scheme` as ``name``."""

    def deco(cls):
        if name in _SCHEMES:
            raise ValueError(f"variance-reduction scheme {name!r} is already registered")
        cls.name = name
        _SCHEMES[name] = cls
        return cls

    return deco


def schemes() -> dict[str, type[Scheme]]:
    """Registered schemes by name (import side effect of this package)."""
    return dict(_SCHEMES)


@dataclass(frozen=True)
class Scheme:
    """Base: every hook is the identity. State lives in ``self.state`` (a plain dict of plain values
    and tensors), saved by :meth:`state_dict`, so a resumed run is bit-identical."""

    name: ClassVar[str] = ""
    # which estimators it composes with (None: all directional ones)
    applies_to: ClassVar[tuple[str, ...] | None] = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "state", {})

    # ---- hooks (override what the scheme needs)
    def masks(self, step: Step) -> dict[int, torch.Tensor]:
        """0/1 masks (parameter index → mask of its shape) the directions are restricted to."""
        return {}

    def num_candidates(self, step: Step) -> int:
        """How many candidates to draw per direction (the step draws K·c and :meth:`select` keeps K)."""
        return 1

    def select(self, step: Step, dirs: DirectionSet, d: torch.Tensor) -> tuple[DirectionSet, torch.Tensor]:
        return dirs, d

    def transform(self, d: torch.Tensor) -> torch.Tensor:
        """d_k → t(d_k) before the combination weights t(d_k)/K (applied to every evaluation)."""
        return d

    def correct(self, step: Step, dirs: DirectionSet, d: torch.Tensor,
                weights: torch.Tensor) -> tuple[torch.Tensor, dict[int, torch.Tensor] | None]:
        """``(weights, extra)``: the gradient is Σ_k weights_k v_k + extra (parameter index → tensor)."""
        return weights, None

    def finish(self, step: Step) -> None:
        """After ``p.grad`` is written (may rewrite it)."""

    # ---- options and state
    def options(self) -> dict[str, Any]:
        """``{f"{name}_{field}": value}`` (a field-less scheme: ``{name: True}``)."""
        fields = dataclasses.fields(self)
        if not fields:
            return {self.name: True}
        return {f"{self.name}_{f.name}": getattr(self, f.name) for f in fields}

    def state_dict(self) -> dict[str, Any]:
        return {k: (v.clone() if isinstance(v, torch.Tensor) else _copy(v)) for k, v in self.state.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state.clear()
        self.state.update({k: (v.clone() if isinstance(v, torch.Tensor) else _copy(v)) for k, v in state.items()})


def _copy(v: Any) -> Any:
    if isinstance(v, list):
        return [_copy(x) for x in v]
    if isinstance(v, dict):
        return {k: _copy(x) for k, x in v.items()}
    if isinstance(v, torch.Tensor):
        return v.clone()
    return v


def _order() -> list[str]:
    """``ORDER``, then any scheme registered later (e.g. a user's own file) in registration order."""
    return [*ORDER, *(n for n in _SCHEMES if n not in ORDER)]


def option_names() -> list[str]:
    """Every scheme option a directional estimator accepts, e.g. ``svrg_every``, ``sign``."""
    out = []
    for name in _order():
        cls = _SCHEMES[name]
        fields = [f for f in dataclasses.fields(cls) if f.init]
        out += [name] if not fields else [f"{name}_{f.name}" for f in fields]
    return out


def build(estimator: str, options: dict[str, Any]) -> tuple[tuple[Scheme, ...], dict[str, Any]]:
    """Split ``options`` into the schemes they switch on (in canonical order) and the rest.

    A scheme is on when its first option is given (and not None/False); its other options
    without the first are an error naming it.
    """
    rest = dict(options)
    built = []
    for name in _order():
        cls = _SCHEMES[name]
        fields = [f for f in dataclasses.fields(cls) if f.init]
        if not fields:
            on = rest.pop(name, False)
            if on not in (True, False):
                raise ValueError(f"{name} is a switch: {name}=true or false, got {on!r}")
            if on:
                built.append(cls())
            continue
        given = {f.name: rest.pop(f"{name}_{f.name}") for f in fields if f"{name}_{f.name}" in rest}
        if given.get(fields[0].name) is None:
            if given:
                extra = ", ".join(f"{name}_{k}" for k in given if k != fields[0].name)
                raise ValueError(f"{extra} needs {name}_{fields[0].name} (which switches {name} on)")
            continue
        built.append(cls(**given))
    for s in built:
        if s.applies_to is not None and estimator not in s.applies_to:
            raise ValueError(f"{s.name} does not compose with {estimator!r}; it works with {', '.join(s.applies_to)}")
    return tuple(built), rest


from bpfree.estimators.variance import adaptive, conservative, sign, sparse, svrg  # noqa: E402,F401  (registers)
