"""The comparison table and the settings tables, as rows (rendered by ``bpfree.report.document``).

Every number comes from a run's ``summary.json`` and ``config.toml``
(``bpfree.runs``); nothing is recomputed.
"""

from __future__ import annotations

import json
from typing import Any, Callable

from bpfree.runs import Run

# (header, summary value, format). Column meanings are in NOTES.
Column = tuple[str, Callable[[Run], Any], Callable[[Any], str]]


def _num(fmt: str) -> Callable[[Any], str]:
    return lambda v: "—" if v is None else format(v, fmt)


def _scaled(v: Any, factor: float) -> Any:
    return None if v is None else v * factor


def _pct(v: Any) -> str:
    return "—" if v is None else f"{100 * v:.2f}%"


def _status(run: Run) -> str:
    s = run.summary
    if s.get("status") == "diverged":
        return f"diverged @ {s.get('diverged_at_step')}"
    return str(s.get("status", "?"))


COLUMNS: list[Column] = [
    ("estimator", lambda r: r.label, str),
    ("status", _status, str),
    ("lr", lambda r: r.summary.get("optimizer", {}).get("lr"), _num(".3g")),
    ("steps", lambda r: r.summary.get("steps"), _num("d")),
    ("ms/step", lambda r: r.summary.get("ms_per_step"), _num(".2f")),
    ("fwd passes/step", lambda r: r.summary.get("forward_passes_per_step"), _num(".3g")),
    ("GFLOP/step", lambda r: _scaled(r.summary.get("flops_per_step"), 1e-9), _num(".3g")),
    ("estimate peak MB", lambda r: r.summary.get("estimate_peak_memory_mb"), _num(".2f")),
    ("step peak MB", lambda r: r.summary.get("peak_memory_mb"), _num(".2f")),
    ("train acc", lambda r: r.summary.get("final_train_accuracy"), _pct),
    ("val loss", lambda r: r.summary.get("final_val_loss"), _num(".4f")),
    ("val acc", lambda r: r.summary.get("final_val_accuracy"), _pct),
    ("test loss", lambda r: r.summary.get("final_test_loss"), _num(".4f")),
    ("test acc", lambda r: r.summary.get("final_test_accuracy"), _pct),
]

NOTES = [
    "lr: the optimizer's initial learning rate for that estimator (each estimator has its own).",
    "ms/step: median wall time of one training step (estimate + clipping + optimizer step), evaluation excluded.",
    "fwd passes/step: the estimator's cost in forward-pass equivalents by analytic accounting "
    "(forward 1, backward 2, jvp 1 + 2 per tangent), averaged over the steps.",
    "GFLOP/step: FLOPs of one estimate counted by torch's FlopCounterMode (matmul-like ops, "
    "jvp tangent ops included). estimate peak MB: peak live tensor memory of one estimate alone "
    "(what the gradient method costs); step peak MB: of one training step (estimate + optimizer "
    "step, the optimizer's state counted). Both by category in Memory below and in summary.json.",
    "train/val/test: mean cross-entropy and accuracy on the whole split after the last step "
    "(train: the training split without the held-out validation part).",
]


def rows(runs: list[Run]) -> list[list[str]]:
    """One formatted row per run, in :data:`COLUMNS` order."""
    return [[fmt(get(r)) for _, get, fmt in COLUMNS] for r in runs]


def headers() -> list[str]:
    return [h for h, _, _ in COLUMNS]


def flat_config(run: Run) -> dict[str, str]:
    """``{"section.key": value as TOML-ish text}`` of a run's resolved config (run.* left out)."""
    out = {}
    for section, table in run.config.items():
        if section in ("run", "compare") or not isinstance(table, dict):
            continue
        for key, value in table.items():
            if f"{section}.{key}" not in ("train.progress",):
                out[f"{section}.{key}"] = json.dumps(value)
    return out


def settings(runs: list[Run]) -> tuple[dict[str, str], list[dict[str, str]]]:
    """``(shared, per_run)``: config values equal in every run, and each run's differing ones."""
    flats = [flat_config(r) for r in runs]
    keys = sorted(set().union(*flats)) if flats else []
    shared = {k: flats[0][k] for k in keys if all(k in f and f[k] == flats[0][k] for f in flats)}
    per_run = [{k: v for k, v in f.items() if k not in shared} for f in flats]
    return shared, per_run
