"""Running a sweep: each method's search, then its best values re-run over the seeds, one
claimed trial at a time, with progress and an ETA (``bpfree.studies.sweep``)."""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from bpfree import config as config_lib
from bpfree import data, paths, runs, schema, train
from bpfree.config import ConfigError
from bpfree.studies.sweep.report import build_report
from bpfree.studies.sweep.results import _fmt, collect, curves
from bpfree.studies.sweep.storage import (_ATTR, WORKER, _claim_waiting, claim_lock, _counted, _create_or_load, _Heartbeat,
                                          _requeue, _running, _safe_url, _space_hash, _clear_locked, best_trial,
                                          close_storage, default_storage, open_storage, prepare_out, recover,
                                          worker_lock)
from bpfree.studies.sweep.study import (OBJECTIVES, Method, Study, _decode, budget_overrides, grid_points,
                                        method_config, suggest)


class Progress:
    """Trials done / left, the best so far and an ETA, as one log line per trial
    (and a tqdm bar when stderr is a terminal).

    The ETA is (trials left) × (mean seconds of the trials this worker ran),
    split over the workers seen running at once; it is a guess that improves
    as trials finish.
    """

    def __init__(self, total: int, done: int, log: Callable[[str], None]):
        from tqdm import tqdm

        self.total, self.done, self.log = total, done, log
        self.durations: list[float] = []
        self.bar = tqdm(total=total, initial=done, unit="trial", disable=not sys.stderr.isatty(), leave=False,
                        dynamic_ncols=True)

    def eta(self, running_elsewhere: int = 0) -> str:
        if not self.durations:
            return "?"
        left = max(0, self.total - self.done)
        return _hms(left * statistics.fmean(self.durations) / (1 + running_elsewhere))

    def finished(self, seconds: float, line: str, best: str, running_elsewhere: int = 0) -> None:
        self.done += 1
        self.durations.append(seconds)
        left = max(0, self.total - self.done)
        self.bar.update(1)
        self.bar.set_postfix_str(best, refresh=False)
        self.log(f"[{self.done}/{self.total}] {line} | best {best} | {left} left, ETA {self.eta(running_elsewhere)}")

    def close(self) -> None:
        self.bar.close()


def _hms(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


@dataclass
class _MethodState:
    method: Method
    search: Any = None  # optuna study
    final: Any = None
    skipped: str | None = None
    steps_budget: dict[str, Any] = field(default_factory=dict)
    fingerprint: str = ""


def run(
    study: Study,
    out: str | Path,
    *,
    storage: str | None = None,
    methods: Sequence[str] | None = None,
    n_trials: int | None = None,
    overwrite: bool = False,
    report: bool = True,
    log: Callable[[str], None] | None = None,
    heartbeat_interval: int = 30,
    grace_period: int = 120,
) -> dict[str, Any]:
    """Run (or resume, or join as one more worker) the sweep; return the results (``sweep.json``).

    ``n_trials`` caps the trials this worker runs (search and finals), then it
    returns; ``methods`` limits it to some methods. ``overwrite`` deletes the
    default SQLite storage and the run directories first (it refuses a remote
    ``storage``: delete those studies with optuna's tools).

    Raises:
        ConfigError: a bad study file, or a storage holding a different study under the same name.
        bpfree.data.DatasetNotFoundError: a method's data is missing and ``missing_data`` is "error".
        KeyboardInterrupt: after Ctrl-C; the running trial is re-enqueued, the rest is kept.
    """
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    out = Path(out)
    if overwrite and storage is not None:
        raise ConfigError("--overwrite only clears the default SQLite storage; delete remote studies yourself")
    prepare_out(out)
    with worker_lock(out, exclusive=overwrite):
        if overwrite:
            _clear_locked(study, out)
        return _run_locked(study, out, storage, methods, n_trials, report, log, heartbeat_interval, grace_period)


def _run_locked(study, out, storage, methods, n_trials, report, log, heartbeat_interval, grace_period):
    url = storage or default_storage(out)
    store = open_storage(url, heartbeat_interval=heartbeat_interval, grace_period=grace_period)
    selected = [study.method(n) for n in methods] if methods is not None else list(study.methods)
    states = [_prepare(study, m, store, log) for m in selected]
    direction = OBJECTIVES[study.objective][1]

    total = sum(_planned(s, study) for s in states if not s.skipped)
    progress = Progress(total, sum(_finished_count(s) for s in states if not s.skipped), log)
    log(f"sweep {study.name!r}{f' (preset {study.preset})' if study.preset else ''}: {len(states)} methods, "
        f"{total} trials planned, {progress.done} already done; storage {_safe_url(url)}; runs in {out}")
    ran = 0
    try:
        while n_trials is None or ran < n_trials:
            work = _next_work(study, states, store, direction, log)
            if work is None:
                break
            if work == "wait":
                time.sleep(2.0)
                continue
            state, trial, role = work
            t0 = time.monotonic()
            line = _run_trial(study, state, trial, role, out, store, heartbeat_interval)
            ran += 1
            running = sum(len(_running(s.search)) + len(_running(s.final)) for s in states if not s.skipped)
            progress.finished(time.monotonic() - t0, line, _best_line(state, study), running)
        results = collect(study, states, out, url)
    finally:
        progress.close()
        close_storage(store)
    runs.write_json(out / "sweep.json", results)
    if report:
        results["report"] = {k: str(v) for k, v in build_report(study, results, out).items()}
        runs.write_json(out / "sweep.json", results)
    return results


def _prepare(study: Study, method: Method, store: Any, log: Callable[[str], None]) -> _MethodState:
    """Resolve the method's config (errors surface here), its budget, and its search study."""
    state = _MethodState(method)
    values = {k: _decode(v) for k, v in (grid_points(method)[0] if method.sampler == "grid" else {}).items()}
    cfg = method_config(study, method, values, seed=study.search_seed)
    if study.missing_data == "skip":
        state.skipped = _data_missing(study, method)
        if state.skipped:
            log(f"{method.name}: skipped ({state.skipped})")
            return state
    else:
        d = cfg.data
        data.load(d.name, val_fraction=d.val_fraction, seed=d.seed, root=d.root, download=d.download, **d.options)
    state.steps_budget = budget_overrides(method, cfg)
    state.fingerprint = _space_hash({"space": method.space, "set": method.set, "budget": method.budget,
                                     "base": study.base, "sampler": method.sampler, "n_trials": method.n_trials,
                                     "objective": study.objective, "search_seed": study.search_seed})
    queue = [{"params": p, "user_attrs": {_ATTR + "role": "search"}} for p in grid_points(method)] \
        if method.sampler == "grid" else []
    state.search = _create_or_load(store, f"{study.name}/{method.name}", OBJECTIVES[study.objective][1], queue,
                                   {_ATTR + "method": method.name, _ATTR + "tags": method.tags}, state.fingerprint)
    with contextlib.suppress(Exception):
        import optuna

        state.final = optuna.load_study(study_name=f"{study.name}/{method.name}/final", storage=store)
    return state


def _data_missing(study: Study, method: Method) -> str | None:
    """Why the method cannot run here (its data set is absent), or None."""
    values = {k: _decode(v) for k, v in (grid_points(method)[0] if method.sampler == "grid" else {}).items()}
    d = method_config(study, method, values, seed=study.search_seed).data
    try:
        data.load(d.name, val_fraction=d.val_fraction, seed=d.seed, root=d.root, download=d.download, **d.options)
    except data.DatasetNotFoundError as e:
        first = str(e).splitlines()[0].split(";")[0].strip()
        return f"data set {d.name!r} is not on this machine ({first}; the error of bpfree.data.load({d.name!r}) says how to get it)"
    return None


def _planned(state: _MethodState, study: Study) -> int:
    m = state.method
    n = len(grid_points(m)) if m.sampler == "grid" else m.n_trials
    return n + len(study.seeds)


def _finished_count(state: _MethodState) -> int:
    n = len(_counted(state.search.get_trials(deepcopy=False)))
    if state.final is not None:
        n += len(_counted(state.final.get_trials(deepcopy=False)))
    return n


def _search_done(state: _MethodState) -> tuple[bool, bool]:
    """``(done, waiting_on_others)`` for the search phase."""
    from optuna.trial import TrialState

    trials = state.search.get_trials(deepcopy=False)
    pending = [t for t in trials if t.state in (TrialState.WAITING, TrialState.RUNNING)]
    if state.method.sampler == "grid":
        if any(t.state == TrialState.WAITING for t in trials):
            return False, False
        return not pending, bool(pending)
    n = len(_counted(trials))
    if n + len(pending) < state.method.n_trials or any(t.state == TrialState.WAITING for t in trials):
        return False, False
    return not pending, bool(pending)


def _next_work(study: Study, states: list[_MethodState], store: Any, direction: str, log) -> Any:
    """The next trial to run here: ``(state, optuna.Trial, role)``, ``"wait"`` or None (all done)."""
    waiting_on_others = False
    for state in states:
        if state.skipped:
            continue
        for s in (state.search, state.final):
            if s is not None:
                for n in recover(s):
                    log(f"{state.method.name}: trial {n} was left running by a dead worker; enqueued again")
        done, waiting = _search_done(state)
        if not done:
            if waiting:
                waiting_on_others = True
                continue
            trial = _claim_waiting(state.search)
            if trial is None and state.method.sampler != "grid":
                trial = _ask(state)
            if trial is None:
                waiting_on_others = True
                continue
            return state, trial, "search"
        if state.final is None:
            best = best_trial(state.search, direction)
            if best is None:
                if not state.skipped:
                    state.skipped = "every search trial failed; see the trials' run directories"
                    log(f"{state.method.name}: {state.skipped}")
                continue
            queue = [{"params": {"seed": s}, "user_attrs": {_ATTR + "role": "final", _ATTR + "seed": s}}
                     for s in study.seeds]
            attrs = {_ATTR + "best_params": best.params, _ATTR + "best_trial": best.number,
                     _ATTR + "best_value": best.value}
            state.final = _create_or_load(store, f"{study.name}/{state.method.name}/final", direction, queue, attrs,
                                          _space_hash([state.fingerprint, list(study.seeds)]))
        trial = _claim_waiting(state.final)
        if trial is not None:
            return state, trial, "final"
        if _running(state.final):
            waiting_on_others = True
    return "wait" if waiting_on_others else None


def _ask(state: _MethodState) -> Any:
    import optuna

    if not hasattr(state, "_sampler"):
        seed = int(hashlib.sha256(state.method.name.encode()).hexdigest()[:8], 16) + os.getpid()
        sampler = (optuna.samplers.TPESampler(seed=seed) if state.method.sampler == "tpe"
                   else optuna.samplers.RandomSampler(seed=seed))
        state._sampler = sampler  # type: ignore[attr-defined]
        state.search.sampler = sampler
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        # we run our own heartbeat thread (_Heartbeat) around ask/tell trials
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
        with claim_lock(state.search._storage):  # ask() also claims a WAITING trial when there is one
            trial = state.search.ask()
    trial.set_user_attr(_ATTR + "role", "search")
    return trial


def _run_trial(study: Study, state: _MethodState, trial: Any, role: str, out: Path, store: Any,
               heartbeat_interval: int) -> str:
    """Train one trial, tell optuna its value; returns the progress line."""
    import optuna
    from optuna.trial import TrialState

    m = state.method
    trial.set_user_attr(_ATTR + "worker", {**WORKER, "pid": os.getpid()})
    owner = state.search if role == "search" else state.final
    number = int(trial.user_attrs.get(_ATTR + "dir_number", trial.number))  # a retry: the dead trial's dir
    if role == "search":
        values = suggest(trial, m)
        seed = study.search_seed
        run_dir = paths.inside(out, m.name, f"trial-{number:04d}")
    else:
        seed = int(trial.suggest_categorical("seed", list(study.seeds)))
        best = owner.user_attrs[_ATTR + "best_params"]
        values = {k: _decode(v) for k, v in best.items()}
        run_dir = paths.inside(out, m.name, "final", f"trial-{number:04d}-seed-{seed}")
    cfg = method_config(study, m, values, seed=seed, budget=state.steps_budget)
    cfg = config_lib.resolve(config_lib.updated(cfg, {"train.progress": False, "train.measure": role == "final"}))
    trial.set_user_attr(_ATTR + "run_dir", str(run_dir))
    label = f"{m.name} {role} trial {trial.number}" + (f" seed {seed}" if role == "final" else "")
    with _Heartbeat(store, trial._trial_id, heartbeat_interval):
        try:
            summary = train.run_or_resume(cfg, run_dir, label=label)  # a killed trial continues from its checkpoint
        except KeyboardInterrupt:
            summary = {"status": "interrupted"}
        except Exception as e:
            trial.set_user_attr(_ATTR + "failed_because", f"{type(e).__name__}: {e}")
            owner.tell(trial, state=TrialState.FAIL)
            return f"{label}: failed ({type(e).__name__}: {e})"
    if summary.get("status") == "interrupted":
        trial.set_user_attr(_ATTR + "failed_because", "interrupted (Ctrl-C)")
        owner.tell(trial, state=TrialState.FAIL)
        _requeue(owner, store.get_trial(trial._trial_id))
        raise KeyboardInterrupt
    key, direction = OBJECTIVES[study.objective]
    value = summary.get(key)
    if summary.get("status") == "diverged" or value is None or not math.isfinite(value):
        value = math.inf if direction == "minimize" else 0.0
    try:
        trial.set_user_attr(_ATTR + "summary", _summary_subset(summary))
        trial.set_user_attr(_ATTR + "curves", curves(run_dir))
        owner.tell(trial, value)
    except optuna.exceptions.UpdateFinishedTrialError:
        # recover() elsewhere took this trial for dead (a heartbeat older than the grace period:
        # a stalled machine) and enqueued it again; that retry reuses run_dir and finds it finished.
        return (f"{label}: trained, but another worker had meanwhile marked it failed (its heartbeat was "
                f"older than the grace period) and enqueued it again; the retry reuses {run_dir}")
    status = summary.get("status")
    return f"{label}: {study.objective} {value:.4g} ({status}, {summary.get('steps')} steps)"


def _best_line(state: _MethodState, study: Study) -> str:
    best = best_trial(state.search, OBJECTIVES[study.objective][1])
    if best is None:
        return f"{state.method.name}: none yet"
    vals = ", ".join(f"{k.split('.')[-1]}={_fmt(_decode(v))}" for k, v in best.params.items())
    return f"{state.method.name} {best.value:.4g} (trial {best.number}: {vals})"


# what each trial stores of its summary.json (in the trial's user attributes, so the report
# can be rebuilt from the storage alone); declared keys of bpfree.schema
SUMMARY_KEYS = ("schema_version", "bpfree_version", "bpfree_commit", "bpfree_dirty",
                "status", "reason", "steps", "epochs_completed", "train_seconds", "ms_per_step", "flops_per_step",
                "peak_memory_mb", "memory_by_category_mb", "peak_over_inference", "estimate_peak_memory_mb",
                "estimate_memory_by_category_mb", "estimate_over_inference", "inference_peak_mb", "parameters_mb",
                "memory_resolution_mb", "final_train_loss", "final_train_accuracy", "final_val_loss",
                "final_val_accuracy", "final_test_loss", "final_test_accuracy", "diverged_at_step", "data_source",
                "steps_per_epoch", "model", "estimator", "optimizer", "schedule_decay")


def _summary_subset(summary: Mapping[str, Any]) -> dict[str, Any]:
    out = schema.subset(summary, SUMMARY_KEYS)
    for key in ("model", "estimator", "optimizer"):
        out[key] = out[key] or {}
    return runs.json_safe(out)


def report_only(study: Study, out: str | Path, *, storage: str | None = None) -> dict[str, Any]:
    """Rebuild ``sweep.json`` and the report from the storage, running nothing."""
    import optuna

    out = Path(out)
    url = storage or default_storage(out)
    if storage is None and not (out / "sweep.db").is_file():
        raise FileNotFoundError(f"{out / 'sweep.db'} does not exist; run the sweep first (or give --storage)")
    store = open_storage(url)
    states = []
    for m in study.methods:
        s = _MethodState(m)
        with contextlib.suppress(KeyError):
            s.search = optuna.load_study(study_name=f"{study.name}/{m.name}", storage=store)
        with contextlib.suppress(KeyError):
            s.final = optuna.load_study(study_name=f"{study.name}/{m.name}/final", storage=store)
        if s.search is None:
            s.skipped = _data_missing(study, m) or "not run yet"
        else:
            with contextlib.suppress(ConfigError):
                s.steps_budget = budget_overrides(m, method_config(study, m, {}, seed=study.search_seed),
                                                  flops_per_step=lambda c: math.inf)
        states.append(s)
    try:
        results = collect(study, states, out, url)
    finally:
        close_storage(store)
    results["report"] = {k: str(v) for k, v in build_report(study, results, out).items()}
    runs.write_json(out / "sweep.json", results)
    return results
