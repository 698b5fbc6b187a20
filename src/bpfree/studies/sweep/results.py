"""A sweep's results, read from the storage alone: per method the trials, the best values,
the final runs' test mean ± std over seeds and their curves (``sweep.json``)."""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from bpfree import provenance, runs, schema
from bpfree.studies.sweep.storage import _ATTR, _safe_url, best_trial
from bpfree.studies.sweep.study import OBJECTIVES, Study, _decode, grid_points

if TYPE_CHECKING:
    from bpfree.studies.sweep.runner import _MethodState


def _fmt(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def curves(run_dir: Path, max_points: int = 200) -> dict[str, list]:
    """Validation curve ``[[step, loss, acc], ...]`` and the training batch loss averaged over
    windows (at most ``max_points``) ``[[last step of window, mean loss], ...]``."""
    if not runs.is_run_dir(run_dir):
        return {"val": [], "train": []}
    r = runs.read_run(run_dir)
    val = [[int(e["step"]), e["loss"], e["accuracy"]] for e in r.evals if e["split"] == "val"]
    steps, losses = r.metrics.get("step", []), r.metrics.get("loss", [])
    window = max(1, math.ceil(len(steps) / max_points))
    train_curve = []
    for i in range(0, len(steps), window):
        chunk = [v for v in losses[i:i + window] if math.isfinite(v)]
        if chunk:
            train_curve.append([int(steps[min(i + window, len(steps)) - 1]), statistics.fmean(chunk)])
    return runs.json_safe({"val": val, "train": train_curve})


def _mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return None, None
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def collect(study: Study, states: list[_MethodState], out: Path, url: str) -> dict[str, Any]:
    """Everything the report needs, from the storage: per method the trials, the best values
    and the final runs (test mean ± std over seeds, curves)."""
    from optuna.trial import TrialState

    direction = OBJECTIVES[study.objective][1]
    methods = []
    for state in states:
        m = state.method
        entry: dict[str, Any] = {"name": m.name, "tags": m.tags, "sampler": m.sampler, "budget": m.budget,
                                 "steps_budget": state.steps_budget, "skipped": state.skipped}
        if state.search is None:
            methods.append(entry)
            continue
        trials = state.search.get_trials(deepcopy=False)
        entry["trials"] = [
            {"number": t.number, "state": t.state.name, "value": t.value,
             "params": {k: _decode(v) for k, v in t.params.items()},
             "run_dir": t.user_attrs.get(_ATTR + "run_dir"),
             "status": schema.Summary(t.user_attrs.get(_ATTR + "summary") or {}).get("status"),
             "retry_of": t.user_attrs.get(_ATTR + "retry_of"),
             "failed_because": t.user_attrs.get(_ATTR + "failed_because")}
            for t in trials
        ]
        entry["n_complete"] = sum(t.state == TrialState.COMPLETE for t in trials)
        entry["n_planned"] = len(grid_points(m)) if m.sampler == "grid" else m.n_trials
        best = best_trial(state.search, direction)
        if best is not None:
            entry["best"] = {"number": best.number, "value": best.value,
                             "params": {k: _decode(v) for k, v in best.params.items()},
                             "summary": schema.Summary(best.user_attrs.get(_ATTR + "summary") or {})}
        finals = []
        if state.final is not None:
            for t in state.final.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
                finals.append({"number": t.number, "seed": t.user_attrs.get(_ATTR + "seed"),
                               "run_dir": t.user_attrs.get(_ATTR + "run_dir"),
                               "summary": schema.Summary(t.user_attrs.get(_ATTR + "summary") or {}),
                               "curves": t.user_attrs.get(_ATTR + "curves") or {}})
        finals.sort(key=lambda f: (f["seed"] if f["seed"] is not None else 0))
        entry["finals"] = finals
        for key in ("test_loss", "test_accuracy", "val_loss", "val_accuracy", "train_loss"):
            mean, std = _mean_std([f["summary"].get(f"final_{key}") for f in finals])
            entry[key] = {"mean": mean, "std": std, "n": len(finals)}
        entry["diverged_finals"] = sum(f["summary"].get("status") == "diverged" for f in finals)
        if finals:
            s = finals[0]["summary"]
            entry["resolved"] = {"optimizer": s.get("optimizer"), "schedule_decay": s.get("schedule_decay"),
                                 "model": s.get("model"), "steps": s.get("steps"),
                                 "steps_per_epoch": s.get("steps_per_epoch"), "data_source": s.get("data_source"),
                                 "ms_per_step": s.get("ms_per_step"), "flops_per_step": s.get("flops_per_step")}
        entry["done"] = bool(best) and len(finals) == len(study.seeds)
        methods.append(entry)
    return {"study": study.name, "title": study.title, "preset": study.preset, "source": study.source,
            "objective": study.objective, "direction": direction, "seeds": list(study.seeds),
            "search_seed": study.search_seed, "storage": _safe_url(url), "out": str(out),
            **provenance.code_version(), "methods": methods}


def mean_curve(finals: Sequence[Mapping[str, Any]], kind: str = "val") -> tuple[list[int], list[float]]:
    """The mean over seeds of a curve at the steps every seed has (``kind`` "val" or "train")."""
    per_seed = []
    for f in finals:
        pts = f.get("curves", {}).get(kind, [])
        per_seed.append({int(p[0]): p[1] for p in pts if p[1] is not None})
    if not per_seed:
        return [], []
    steps = sorted(set.intersection(*(set(d) for d in per_seed)))
    return steps, [statistics.fmean(d[s] for d in per_seed) for s in steps]


def steps_to_reach(steps: Sequence[int], values: Sequence[float], target: float) -> int | None:
    """The first step whose value is at or below ``target`` (None if never)."""
    for s, v in zip(steps, values):
        if v is not None and math.isfinite(v) and v <= target:
            return s
    return None


def pm(stat: Mapping[str, Any] | None, fmt: str = ".4f", scale: float = 1.0) -> str:
    """``mean ± std`` text of a ``{"mean", "std"}`` entry ("—" when missing)."""
    if not stat or stat.get("mean") is None:
        return "—"
    return f"{stat['mean'] * scale:{fmt}} ± {stat['std'] * scale:{fmt}}"
