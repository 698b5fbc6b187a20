"""Looking things up by name, with errors that name the valid choices.

One place for the "unknown X 'foo' (did you mean 'bar'?); available: ..."
messages, and the one shape of the estimator, model and data-set registries
(:class:`Registry`: name → builder with options, ``available()``, nearest-name errors).
"""

from __future__ import annotations

import difflib
import inspect
import typing
from typing import Any, Callable, Generic, Iterable, Mapping, TypeVar

V = TypeVar("V")


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """``" (did you mean 'x'?)"`` for the closest choice, or ``""``."""
    close = difflib.get_close_matches(str(name), list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def lookup(kind: str, name: str, table: Mapping[str, V]) -> V:
    """``table[name]``, or ``ValueError`` naming the closest and all valid names."""
    try:
        return table[name]
    except KeyError:
        raise ValueError(
            f"unknown {kind} {name!r}{did_you_mean(name, table)}; available: {', '.join(sorted(table))}"
        ) from None


def check_options(kind: str, name: str, given: Iterable[str], valid: list[str]) -> None:
    """``ValueError`` listing the unknown options of ``kind`` ``name`` and the valid ones."""
    unknown = [k for k in given if k not in valid]
    if unknown:
        hints = ", ".join(f"{k!r}{did_you_mean(k, valid)}" for k in unknown)
        raise ValueError(
            f"unknown option(s) for {kind} {name!r}: {hints}; valid options: {', '.join(valid) or '(none)'}"
        )


class Registry(Generic[V]):
    """Builders by name: the one shape of the estimator, data-set and model registries.

    A builder is a callable whose keyword parameters are its options (a data set's loader,
    an architecture's builder, an estimator's dataclass). ``skip`` names the parameters the
    caller passes itself (a model's ``input_shape``, a loader's ``root``), which are not
    options; ``options`` replaces the signature where a builder takes more (the estimators'
    variance-reduction options). Every unknown name or option is a ``ValueError`` naming the
    nearest valid one (:func:`lookup`, :func:`check_options`).
    """

    def __init__(self, kind: str, *, skip: Iterable[str] = (),
                 options: Callable[[str, Any], list[str]] | None = None):
        self.kind = kind
        self.skip = tuple(skip)
        self.table: dict[str, V] = {}
        self._options = options

    def register(self, name: str, builder: V | None = None) -> Any:
        """Register ``builder`` as ``name``; without ``builder``, a decorator. A name is registered once."""
        if builder is None:
            return lambda b: self.register(name, b)
        if name in self.table:
            have = getattr(self.table[name], "__qualname__", repr(self.table[name]))
            raise ValueError(f"{self.kind} {name!r} is already registered by {have}")
        self.table[name] = builder
        return builder

    def get(self, name: str) -> V:
        """The builder of ``name``, or ``ValueError`` naming the nearest and all valid names."""
        return lookup(self.kind, name, self.table)

    def __contains__(self, name: object) -> bool:
        return name in self.table

    def available(self) -> list[str]:
        """The registered names, sorted."""
        return sorted(self.table)

    def _parameters(self, name: str) -> dict[str, inspect.Parameter]:
        params = inspect.signature(self.get(name)).parameters
        return {k: p for k, p in params.items() if k not in self.skip and p.kind is not p.VAR_KEYWORD}

    def option_names(self, name: str) -> list[str]:
        """The options the builder of ``name`` accepts."""
        if self._options is not None:
            return self._options(name, self.get(name))
        return list(self._parameters(name))

    def option_defaults(self, name: str) -> dict[str, Any]:
        """``{option: default}`` of the builder's options that have one (from its signature)."""
        return {k: p.default for k, p in self._parameters(name).items() if p.default is not inspect.Parameter.empty}

    def option_types(self, name: str) -> dict[str, Any]:
        """``{option: annotation}`` of the builder's annotated options (``{}`` when its
        annotations do not evaluate: then names are checked, types are not)."""
        builder = self.get(name)
        try:
            hints = typing.get_type_hints(builder)
        except Exception:
            return {}
        valid = set(self.option_names(name))
        return {k: v for k, v in hints.items() if k in valid}

    def check_options(self, name: str, options: Iterable[str]) -> None:
        """``ValueError`` listing the unknown options of ``name`` and the valid ones."""
        check_options(self.kind, name, options, self.option_names(name))
