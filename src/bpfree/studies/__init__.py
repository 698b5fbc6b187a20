"""Studies built on the training loop: comparisons (``compare``), sweeps and paper reproductions.

Paper reproductions are registered in :data:`STUDIES` and run with
``bpfree study run NAME --preset PRESET``; each module has a
``run_study(preset, out, *, overwrite, log)`` and ships its study file under
``studies/configs/``.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Callable

from bpfree.config import ConfigError

# name -> (module, what it reproduces, default preset)
STUDIES: dict[str, tuple[str, str, str]] = {
    "wang2025": ("bpfree.studies.wang2025",
                 "seed 001: guessed gradients (W^T, W-perp, ...) vs width on MNIST-1D", "cpu"),
    "rike2024": ("bpfree.studies.rike2024",
                 "seed 002: forward gradient vs backprop on MNIST (Table I), every method tuned by its own sweep",
                 "quick"),
}


def available() -> list[str]:
    return sorted(STUDIES)


def run_study(name: str, preset: str | None, out: str | Path, *, overwrite: bool = False,
              log: Callable[[str], None] | None = None, **options: Any) -> dict[str, Any]:
    """Run the registered study ``name`` (``preset`` None: its default) into ``out``."""
    if name not in STUDIES:
        raise ConfigError(f"unknown study {name!r}; available: {', '.join(available())}")
    module, _, default = STUDIES[name]
    return importlib.import_module(module).run_study(preset or default, out, overwrite=overwrite, log=log, **options)


def rebuild_report(name: str, out: str | Path, preset: str | None = None) -> dict[str, Any]:
    """Rewrite the report of the finished study ``name`` in ``out`` from its saved results."""
    if name not in STUDIES:
        raise ConfigError(f"unknown study {name!r}; available: {', '.join(available())}")
    module = importlib.import_module(STUDIES[name][0])
    if hasattr(module, "rebuild"):  # sweeps rebuild from their storage, which the preset names
        return module.rebuild(preset or STUDIES[name][2], Path(out))
    return module.rebuild_report(out)
