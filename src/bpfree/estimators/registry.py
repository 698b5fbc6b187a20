"""Estimators by name: :func:`make`, :func:`available`, :func:`register`."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, TypeVar

from bpfree._names import check_options, lookup
from bpfree.estimators import variance
from bpfree.estimators.base import Estimator

_REGISTRY: dict[str, type[Estimator]] = {}

E = TypeVar("E", bound=type[Estimator])


def register(name: str) -> Callable[[E], E]:
    """Class decorator: register a frozen-dataclass :class:`Estimator` as ``name``."""

    def deco(cls: E) -> E:
        if name in _REGISTRY:
            raise ValueError(f"estimator {name!r} is already registered by {_REGISTRY[name].__qualname__}")
        if not dataclasses.is_dataclass(cls):
            raise TypeError(f"{cls.__qualname__} must be a dataclass whose fields are its options")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def available() -> list[str]:
    """Names of the registered estimators, sorted."""
    return sorted(_REGISTRY)


def option_names(name: str) -> list[str]:
    """The options ``make(name, ...)`` accepts: the estimator's own and, for the weight-perturbation
    estimators, every variance-reduction scheme's (``svrg_every``, ``sparse_fraction``, ``sign``, ...)."""
    cls = _lookup(name)
    own = [f.name for f in dataclasses.fields(cls) if f.init and f.name != "schemes"]
    return own + (variance.option_names() if _takes_schemes(cls) else [])


def _takes_schemes(cls: type[Estimator]) -> bool:
    return any(f.name == "schemes" for f in dataclasses.fields(cls))


def make(name: str, **options: Any) -> Estimator:
    """Build the estimator registered as ``name`` with ``options``.

    Raises:
        ValueError: unknown name or option (the message lists the valid ones),
            or an option value the estimator rejects.
    """
    cls = _lookup(name)
    check_options("estimator", name, options, option_names(name))
    if _takes_schemes(cls) and "schemes" not in options:
        schemes, options = variance.build(name, options)
        return cls(**options, schemes=schemes)
    return cls(**options)


def _lookup(name: str) -> type[Estimator]:
    return lookup("estimator", name, _REGISTRY)
