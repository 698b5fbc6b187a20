"""Estimators by name: :func:`make`, :func:`available`, :func:`register`."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, TypeVar

from bpfree._names import Registry
from bpfree.estimators import variance
from bpfree.estimators.base import Estimator

E = TypeVar("E", bound=type[Estimator])


def _option_names(name: str, cls: type[Estimator]) -> list[str]:
    own = [f.name for f in dataclasses.fields(cls) if f.init and f.name != "schemes"]
    return own + (variance.option_names() if _takes_schemes(cls) else [])


# Every estimator by name (bpfree._names.Registry); its options are the dataclass's fields and,
# for the weight-perturbation estimators, every variance-reduction scheme's.
REGISTRY: Registry = Registry("estimator", options=_option_names)
_REGISTRY = REGISTRY.table  # {name: class}


def register(name: str) -> Callable[[E], E]:
    """Class decorator: register a frozen-dataclass :class:`Estimator` as ``name``."""

    def deco(cls: E) -> E:
        if not dataclasses.is_dataclass(cls):
            raise TypeError(f"{cls.__qualname__} must be a dataclass whose fields are its options")
        REGISTRY.register(name, cls)
        cls.name = name
        return cls

    return deco


def available() -> list[str]:
    """Names of the registered estimators, sorted."""
    return REGISTRY.available()


def option_names(name: str) -> list[str]:
    """The options ``make(name, ...)`` accepts: the estimator's own and, for the weight-perturbation
    estimators, every variance-reduction scheme's (``svrg_every``, ``sparse_fraction``, ``sign``, ...)."""
    return REGISTRY.option_names(name)


def option_types(name: str) -> dict[str, Any]:
    """``{option: annotation}`` of the estimator's own annotated options (for config checks)."""
    return REGISTRY.option_types(name)


def _takes_schemes(cls: type[Estimator]) -> bool:
    return any(f.name == "schemes" for f in dataclasses.fields(cls))


def make(name: str, **options: Any) -> Estimator:
    """Build the estimator registered as ``name`` with ``options``.

    Raises:
        ValueError: unknown name or option (the message lists the valid ones),
            or an option value the estimator rejects.
    """
    cls = REGISTRY.get(name)
    REGISTRY.check_options(name, options)
    if _takes_schemes(cls) and "schemes" not in options:
        schemes, options = variance.build(name, options)
        return cls(**options, schemes=schemes)
    return cls(**options)


def _lookup(name: str) -> type[Estimator]:
    return REGISTRY.get(name)
