"""A training budget, parsed once: ``bpfree compare --budget steps=200,seconds=60`` and a study
file's ``budget = { epochs = 8 }`` both become ``{unit: amount}``, then the ``train.*`` keys.

Units: ``steps`` (optimizer steps, whole), ``epochs`` (whole), ``seconds`` (training wall
time, evaluation excluded) and, in study files, ``flops`` (counted FLOPs of one estimate ×
steps: converted to steps per method by counting one step, ``bpfree.measure.flops``). Several
units at once (``--budget``) stop the run at whichever ends first (``bpfree.train``).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping

from bpfree.config import ConfigError

UNITS = ("steps", "epochs", "seconds", "flops")
TRAIN_KEYS = {"steps": "train.max_steps", "epochs": "train.epochs", "seconds": "train.max_seconds"}
WHOLE = ("steps", "epochs")


def _amount(unit: str, value: Any, where: str, *, whole: bool) -> float | int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ConfigError(f"{where}: budget {unit} must be a positive number, got {value!r}")
    if whole and unit in WHOLE and not float(value).is_integer():
        raise ConfigError(f"{where}: budget {unit} must be a whole number, got {value!r}")
    return value


def parse_text(text: str, where: str, *, units: tuple[str, ...] = UNITS) -> dict[str, float | int]:
    """``{unit: amount}`` of ``"steps=200,seconds=60"`` (the command line): amounts positive,
    steps and epochs whole; several units stop at whichever ends first."""
    from bpfree import config as config_lib
    from bpfree.studies.compare import split_top_level

    if not isinstance(text, str) or not text.strip():
        raise ConfigError(f"{where} is empty; give e.g. steps=200 ({' | '.join(units)})")
    table: dict[str, Any] = {}
    for part in split_top_level(text, ","):
        key, sep, value = part.partition("=")
        key = key.strip()
        if key not in units or not sep:
            raise ConfigError(f"{where} expects {', '.join(f'{u}=N' for u in units)} (comma-combinable), got {part!r}")
        table[key] = _amount(key, config_lib.parse_value(value.strip()), where, whole=True)
    return {k: (float(v) if k == "seconds" else int(v)) for k, v in table.items()}


def parse_table(budget: Any, where: str, *, units: tuple[str, ...] = UNITS) -> dict[str, float | int]:
    """``{unit: amount}`` of a study file's ``budget = { steps = 1000 }``: exactly one unit, positive."""
    if not isinstance(budget, Mapping) or len(budget) != 1:
        raise ConfigError(f"{where}: give one budget, e.g. budget = {{ steps = 1000 }} ({' | '.join(units)})")
    (key, value), = budget.items()
    if key not in units:
        raise ConfigError(f"{where}: unknown budget {key!r}; use one of {', '.join(units)}")
    return {key: _amount(key, value, where, whole=False)}


def train_overrides(budget: Mapping[str, float | int],
                    flops_per_step: Callable[[], float] | None = None) -> dict[str, Any]:
    """The ``train.*`` keys of ``budget``, every budget key set (unset ones ``None``), so the
    budget replaces whatever the config had. ``flops`` becomes ``train.max_steps`` =
    ``flops // flops_per_step()`` (at least 1; 1 when the count is not finite)."""
    out: dict[str, Any] = {key: None for key in TRAIN_KEYS.values()}
    for unit, amount in budget.items():
        if unit == "flops":
            if flops_per_step is None:
                raise ConfigError("a flops budget needs flops_per_step (the FLOPs of one counted step)")
            per_step = flops_per_step()
            out["train.max_steps"] = max(1, int(amount // per_step)) if math.isfinite(per_step) else 1
        elif unit == "seconds":
            out[TRAIN_KEYS[unit]] = float(amount)
        else:
            out[TRAIN_KEYS[unit]] = int(amount)
    return out


__all__ = ["TRAIN_KEYS", "UNITS", "parse_table", "parse_text", "train_overrides"]
