"""Fair hyperparameter search: every method gets its own search, then its best is re-run over seeds.

Seed 002 (Rike & Førland) found that an untuned backprop learning rate made
forward gradients look good; a comparison is only fair when each method is
tuned on its own. A **study file** (TOML) names the methods, their search
spaces and one fixed budget::

    [study]
    name = "demo"                  # optuna study names are "{name}/{method}" and "{name}/{method}/final"
    objective = "val_loss"         # val_loss (minimised) or val_accuracy (maximised), at the end of the budget
    budget = { steps = 500 }       # steps | epochs | seconds | flops (converted to steps per method)
    seeds = [1, 2, 3]              # the best configuration is re-run with these train.seed values
    search_seed = 0                # train.seed of every search trial (kept apart from seeds: no selection bias)
    sampler = "grid"               # grid | tpe | random (default of every method)
    n_trials = 20                  # trials per method for tpe / random
    missing_data = "error"         # or "skip": a method whose data set is absent is reported as skipped
    report = "bpfree.studies.rike2024"   # optional: a module whose build_report(results, out) writes the report

    [base.data]                    # a bpfree config (bpfree.config), shared by every method
    name = "mnist"

    [method.nn-sgd-bp]
    set = { "model.name" = "mlp", "estimator.name" = "backprop", "optimizer.name" = "sgd" }
    space = { "optimizer.lr" = [0.01, 0.1], "schedule.decay" = [0, 1e-4] }
    tags = { model = "NN", optimizer = "SGD", gradient = "BP" }    # free-form, for reports

    [preset.quick]                 # deep-merged onto the study by --preset quick
    study.budget = { epochs = 2 }
    method."*-bp".space = { "optimizer.lr" = [0.1] }                 # a key with * applies to every match

* A space value that is a list is a categorical choice (a grid axis); a
  table ``{low, high, log}`` is a range for tpe/random, and ``{low, high,
  num, log}`` also gives a grid of ``num`` points. Keys are dotted config
  keys (``optimizer.betas`` takes a list per choice, e.g. ``[[0.9, 0.999]]``).
* **Objective**: ``final_val_loss`` (or accuracy) of ``bpfree.train.run`` at
  the budget. A run that diverges scores +inf loss (0 accuracy): a
  configuration that explodes within the budget is worse than any that does not.
* **Storage**: optuna's RDB storage. The default is a SQLite file,
  ``OUT/sweep.db``, which needs no server and survives a kill (every trial
  state change is a committed transaction); ``--storage postgresql://...``
  lets many workers on many machines share one study.
* **No trial lost or repeated**: grid points (and the final seeds) are
  enqueued once, by whichever worker creates the optuna study, and each worker
  claims one WAITING trial at a time (a row-locked state change, so two
  workers never claim the same one). A trial left RUNNING by a dead worker is
  marked FAIL and enqueued again with the same parameters: at once when the
  worker ran on this machine and its process is gone, else when its heartbeat
  is older than the grace period. Finished trials are never re-run, so
  re-running the same command resumes a killed sweep.
* Every trial keeps its run directory, ``OUT/{method}/trial-{number:04d}``
  (finals: ``OUT/{method}/final/trial-{number:04d}-seed-{seed}``), and its
  summary numbers and curves are stored in the trial's user attributes, so the
  report can be rebuilt from the storage alone.

:func:`run` does the whole sweep and writes ``OUT/sweep.json``,
``OUT/report.md`` and ``OUT/report.html``; :func:`load_study` reads a study file.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import fnmatch
import hashlib
import itertools
import json
import math
import os
import socket
import statistics
import sys
import threading
import time
import tomllib
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from bpfree import config as config_lib
from bpfree import data, paths, runs, train
from bpfree.config import Config, ConfigError

BUDGET_KEYS = ("steps", "epochs", "seconds", "flops")
SAMPLERS = ("grid", "tpe", "random")
OBJECTIVES = {"val_loss": ("final_val_loss", "minimize"), "val_accuracy": ("final_val_accuracy", "maximize")}
STUDY_KEYS = ("name", "title", "objective", "budget", "seeds", "search_seed", "sampler", "n_trials",
              "missing_data", "eval_every_steps", "default_preset", "description", "report")
METHOD_KEYS = ("set", "space", "tags", "sampler", "n_trials", "budget")
_ATTR = "bpfree:"  # prefix of the optuna user attributes this module writes


# --------------------------------------------------------------------------- the study file


@dataclass(frozen=True)
class Method:
    """One method of a study: its fixed settings, search space, sampler and budget."""

    name: str
    set: dict[str, Any]
    space: dict[str, Any]
    tags: dict[str, Any]
    sampler: str
    n_trials: int | None
    budget: dict[str, float]


@dataclass(frozen=True)
class Study:
    """A parsed study file, with its preset (if any) applied."""

    name: str
    title: str
    objective: str
    seeds: tuple[int, ...]
    search_seed: int
    missing_data: str
    eval_every_steps: int | None
    base: dict[str, Any]
    methods: tuple[Method, ...]
    preset: str | None = None
    source: str = ""
    report: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    def method(self, name: str) -> Method:
        for m in self.methods:
            if m.name == name:
                return m
        raise ConfigError(f"study {self.name!r} has no method {name!r}; methods: {', '.join(self.names())}")

    def names(self) -> list[str]:
        return [m.name for m in self.methods]


def deep_merge(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``update`` merged in: tables recursively, anything else replaced."""
    out = copy.deepcopy(dict(base))
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def apply_preset(raw: Mapping[str, Any], preset: str | None) -> dict[str, Any]:
    """The study dict with ``[preset.NAME]`` deep-merged onto it (``preset`` tables dropped).

    Inside a preset, ``method.PATTERN`` with ``*``/``?`` applies to every
    method whose name matches (``fnmatch``), in the preset's order.
    """
    presets = raw.get("preset", {})
    out = {k: copy.deepcopy(v) for k, v in raw.items() if k != "preset"}
    if preset is None:
        return out
    if preset not in presets:
        have = ", ".join(presets) or "(none)"
        raise ConfigError(f"the study has no preset {preset!r}; presets: {have}")
    patch = copy.deepcopy(presets[preset])
    method_patch = patch.pop("method", {})
    out = deep_merge(out, patch)
    methods = out.setdefault("method", {})
    for key, value in method_patch.items():
        targets = fnmatch.filter(list(methods), key) if any(c in key for c in "*?[") else [key]
        if not targets or (targets == [key] and key not in methods):
            raise ConfigError(f"preset {preset!r}: method {key!r} matches no method of the study")
        for name in targets:
            methods[name] = deep_merge(methods[name], value)
    return out


def load_study(path: str | Path, *, preset: str | None = None, overrides: Iterable[str] = ()) -> Study:
    """Read a study file, apply ``preset`` (else the study's ``default_preset``) and
    ``--set`` overrides (dotted config keys, applied to the base config of every method).

    A bare name such as ``rike2024`` that is not a file names a study shipped
    with bpfree (``bpfree/studies/configs/NAME.toml``).
    """
    path = Path(path)
    if not path.exists() and path.suffix == "" and len(path.parts) == 1:
        shipped = shipped_studies()
        if str(path) in shipped:
            path = shipped[str(path)]
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        names = ", ".join(shipped_studies()) or "(none)"
        raise ConfigError(f"study file {str(path)!r} does not exist (shipped studies, usable by name: {names})") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from None
    try:
        return from_dict(raw, preset=preset, overrides=overrides, source=str(path))
    except (TypeError, AttributeError, KeyError, IndexError, ZeroDivisionError, OverflowError) as e:
        # a value of the wrong kind that no specific check above named (e.g. a table where a list goes)
        raise ConfigError(f"{path}: a value has the wrong type or shape ({type(e).__name__}: {e}); "
                          "see docs/sweeps.md for the study file format") from None


def shipped_studies() -> dict[str, Path]:
    """``{name: path}`` of the study files shipped in ``bpfree/studies/configs``."""
    from importlib import resources

    folder = Path(str(resources.files("bpfree.studies") / "configs"))
    return {p.stem: p for p in sorted(folder.glob("*.toml"))}


def from_dict(
    raw: Mapping[str, Any], *, preset: str | None = None, overrides: Iterable[str] = (), source: str = "study"
) -> Study:
    """Build a :class:`Study` from the parsed TOML; every error names the key and the fix."""
    for key in raw:
        if key not in ("study", "base", "method", "preset"):
            raise ConfigError(f"{source}: unknown table [{key}]; a study file has [study], [base], [method.*], [preset.*]")
    preset = preset if preset is not None else raw.get("study", {}).get("default_preset")
    merged = apply_preset(raw, preset)
    s = merged.get("study", {})
    for key in s:
        if key not in STUDY_KEYS:
            raise ConfigError(f"{source}: unknown key study.{key}{_near(key, STUDY_KEYS)}")
    objective = s.get("objective", "val_loss")
    if not isinstance(objective, str) or objective not in OBJECTIVES:
        raise ConfigError(f"{source}: study.objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    missing = s.get("missing_data", "error")
    if not isinstance(missing, str) or missing not in ("error", "skip"):
        raise ConfigError(f"{source}: study.missing_data must be 'error' or 'skip', got {missing!r}")
    seeds = s.get("seeds", (1, 2, 3))
    seeds = tuple(seeds) if isinstance(seeds, (list, tuple)) else (seeds,)
    if not seeds or not all(isinstance(v, int) and not isinstance(v, bool) for v in seeds):
        raise ConfigError(f"{source}: study.seeds must be a non-empty list of integers, got {list(seeds)!r}")
    base = config_lib.apply_overrides(merged.get("base", {}), overrides)
    config_lib.from_dict(base, origin=f"{source} [base]")  # keys checked here, values per method
    methods = []
    paths.check_name(s.get("name") or Path(source).stem, f"{source}: study.name")
    for name, m in merged.get("method", {}).items():
        where = f"{source} [method.{name}]"
        paths.check_name(name, f"{source}: method name")
        for key in m:
            if key not in METHOD_KEYS:
                raise ConfigError(f"{where}: unknown key {key!r}{_near(key, METHOD_KEYS)}")
        sampler = m.get("sampler", s.get("sampler", "grid"))
        if sampler not in SAMPLERS:
            raise ConfigError(f"{where}: sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
        n_trials = m.get("n_trials", s.get("n_trials"))
        if sampler != "grid" and not (isinstance(n_trials, int) and n_trials > 0):
            raise ConfigError(f"{where}: sampler {sampler!r} needs n_trials (a positive integer)")
        budget = parse_budget(m.get("budget", s.get("budget")), where)
        method = Method(name, dict(m.get("set", {})), dict(m.get("space", {})), dict(m.get("tags", {})),
                        sampler, n_trials, budget)
        for key in [*method.set, *method.space]:
            config_lib.check_key(key, origin=where)
        grid_points(method) if sampler == "grid" else None  # checks the space
        methods.append(method)
    if not methods:
        raise ConfigError(f"{source}: the study has no [method.NAME] tables")
    return Study(
        name=str(s.get("name") or Path(source).stem),
        title=str(s.get("title") or s.get("name") or Path(source).stem),
        objective=objective,
        seeds=seeds,
        search_seed=int(s.get("search_seed", 0)),
        missing_data=missing,
        eval_every_steps=s.get("eval_every_steps"),
        base=base,
        methods=tuple(methods),
        preset=preset,
        source=source,
        report=s.get("report"),
        raw=merged,
    )


def _near(key: str, valid: Sequence[str]) -> str:
    import difflib

    close = difflib.get_close_matches(key, list(valid), n=1)
    return f" (did you mean {close[0]!r}?)" if close else f"; valid keys: {', '.join(valid)}"


def parse_budget(budget: Any, where: str) -> dict[str, float]:
    """``{steps|epochs|seconds|flops: number}``: exactly one, positive."""
    if not isinstance(budget, Mapping) or len(budget) != 1:
        raise ConfigError(f"{where}: give one budget, e.g. budget = {{ steps = 1000 }} ({' | '.join(BUDGET_KEYS)})")
    (key, value), = budget.items()
    if key not in BUDGET_KEYS:
        raise ConfigError(f"{where}: unknown budget {key!r}; use one of {', '.join(BUDGET_KEYS)}")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ConfigError(f"{where}: budget {key} must be a positive number, got {value!r}")
    return {key: value}


# --------------------------------------------------------------------------- search spaces


def _encode(value: Any) -> Any:
    """A choice as optuna stores it: scalars as they are, lists/tables as ``"json:..."``."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return "json:" + json.dumps(value, separators=(",", ":"))


def _decode(value: Any) -> Any:
    if isinstance(value, str) and value.startswith("json:"):
        return json.loads(value[5:])
    return value


def _axis(method: Method, key: str) -> list[Any]:
    """The grid values of one space entry (a list, or a range with ``num``)."""
    spec = method.space[key]
    if isinstance(spec, list):
        if not spec:
            raise ConfigError(f"[method.{method.name}] space {key!r} is an empty list")
        return [_encode(v) for v in spec]
    if isinstance(spec, Mapping) and "num" in spec:
        lo, hi, num, log = spec["low"], spec["high"], int(spec["num"]), bool(spec.get("log", False))
        if num == 1:
            return [lo]
        if log:
            return [float(lo * (hi / lo) ** (i / (num - 1))) for i in range(num)]
        return [lo + (hi - lo) * i / (num - 1) for i in range(num)]
    raise ConfigError(
        f"[method.{method.name}] space {key!r}: a grid needs a list of values or {{low, high, num}}, got {spec!r}"
    )


def grid_points(method: Method) -> list[dict[str, Any]]:
    """Every combination of the space's axes, in file order (encoded for optuna)."""
    keys = list(method.space)
    axes = [_axis(method, k) for k in keys]
    return [dict(zip(keys, combo)) for combo in itertools.product(*axes)]


def suggest(trial: Any, method: Method) -> dict[str, Any]:
    """Draw (or read back, for an enqueued trial) the trial's values; returns decoded values."""
    values = {}
    for key, spec in method.space.items():
        if isinstance(spec, list) or method.sampler == "grid":
            choice = trial.suggest_categorical(key, _axis(method, key))
        elif isinstance(spec, Mapping) and {"low", "high"} <= set(spec):
            lo, hi = spec["low"], spec["high"]
            if isinstance(lo, int) and isinstance(hi, int) and not spec.get("log", False):
                choice = trial.suggest_int(key, lo, hi, step=int(spec.get("step", 1)))
            else:
                choice = trial.suggest_float(key, float(lo), float(hi), log=bool(spec.get("log", False)),
                                             step=spec.get("step"))
        else:
            raise ConfigError(f"[method.{method.name}] space {key!r}: give a list or {{low, high[, log]}}, got {spec!r}")
        values[key] = _decode(choice)
    return values


# --------------------------------------------------------------------------- configs of trials


def method_config(
    study: Study, method: Method, values: Mapping[str, Any], *, seed: int, budget: Mapping[str, Any] | None = None
) -> Config:
    """The resolved config of one trial: base, the method's ``set``, the trial's values, the seed
    and the ``train.*`` budget keys (``budget``; unset: the method's budget, FLOPs as one step)."""
    raw = deep_merge(study.base, {})
    cfg = config_lib.from_dict(raw, origin=f"{study.source} [base]")
    if budget is None:
        budget = budget_overrides(method, cfg, flops_per_step=lambda c: math.inf)
    fixed = {**method.set, **values, **budget, "train.seed": seed, "run.name": method.name}
    if study.eval_every_steps and "train.eval_every_steps" not in fixed:
        fixed["train.eval_every_steps"] = study.eval_every_steps
    cfg = config_lib.updated(cfg, fixed, origin=f"[method.{method.name}]")
    return config_lib.resolve(cfg)


def budget_overrides(method: Method, cfg: Config, flops_per_step: Callable[[Config], float] | None = None) -> dict:
    """The ``train.*`` budget keys of the method's budget (FLOPs → steps via one counted step)."""
    (key, value), = method.budget.items()
    out = {"train.max_steps": None, "train.epochs": None, "train.max_seconds": None}
    if key == "steps":
        out["train.max_steps"] = int(value)
    elif key == "epochs":
        out["train.epochs"] = int(value)
    elif key == "seconds":
        out["train.max_seconds"] = float(value)
    else:
        per_step = (flops_per_step or count_step_flops)(cfg)
        out["train.max_steps"] = max(1, int(value // per_step)) if math.isfinite(per_step) else 1
    return out


def count_step_flops(cfg: Config) -> float:
    """FLOPs of one training estimate of ``cfg`` (model, estimator, batch size), counted on one batch."""
    import torch
    import torch.nn.functional as F

    from bpfree import estimators, models
    from bpfree.measure import flops

    d = cfg.data
    splits = data.load(d.name, val_fraction=d.val_fraction, seed=d.seed, root=d.root, download=d.download, **d.options)
    model = models.make(cfg.model.name, input_shape=splits.input_shape, num_classes=splits.num_classes,
                        seed=cfg.train.seed, **cfg.model.options)
    x, y = next(iter(data.batches(splits.train, d.batch_size, shuffle=False)))
    est = estimators.make(cfg.estimator.name, **cfg.estimator.options)
    out = flops.step_flops(est, model, lambda: F.cross_entropy(model(x), y), generator=torch.Generator().manual_seed(0))
    return float(out.step)


# --------------------------------------------------------------------------- storage and workers


def default_storage(out: Path) -> str:
    """The embedded default: a SQLite file in the sweep's directory."""
    return f"sqlite:///{(out / 'sweep.db').resolve()}"


def open_storage(url: str, *, heartbeat_interval: int = 30, grace_period: int = 120):
    """optuna's RDB storage with heartbeats (a dead remote worker's trial is noticed after
    ``grace_period`` s). ``postgresql://`` needs the ``postgres`` extra (psycopg 3)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": 60}}
    elif url.startswith("postgresql"):
        kwargs["engine_kwargs"] = {"pool_pre_ping": True}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        try:
            # Workers that start together on an empty database race to create optuna's tables
            # and stamp alembic's version (optuna/optuna#1092, #4621: "UNIQUE constraint failed:
            # alembic_version.version_num"); optuna's advice is to create the storage once before
            # the workers start. creation_lock makes that so: one opener at a time creates or
            # checks the schema, the others then open a finished database.
            with creation_lock(url):
                return optuna.storages.RDBStorage(url, heartbeat_interval=heartbeat_interval,
                                                  grace_period=grace_period, **kwargs)
        except ImportError as e:
            raise ConfigError(
                f"storage {url.split('://')[0]}:// needs its database driver ({e}); for PostgreSQL "
                "install it with: pip install 'bpfree[postgres]' (psycopg 3)"
            ) from None


# the key of the PostgreSQL advisory lock held while optuna's schema is created or checked
_PG_LOCK_KEY = int.from_bytes(hashlib.sha256(b"bpfree sweep storage creation").digest()[:8], "big", signed=True)


@contextlib.contextmanager
def _sqlite_file_lock(url: str, suffix: str):
    """An exclusive ``flock`` on ``DB<suffix>`` beside a SQLite file (released by the kernel when
    its holder dies); yields False, holding nothing, for any other URL."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url) if url else None
    if parsed is None or parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        yield False
        return
    import fcntl

    lock_path = Path(parsed.database).with_name(Path(parsed.database).name + suffix)
    with open(lock_path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # blocks until the current holder is done
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def claim_lock(storage: Any):
    """Serialise trial-state flips (WAITING → RUNNING claims, RUNNING → FAIL recoveries)
    between the workers of one SQLite file.

    optuna's ``set_trial_state_values`` reads the trial ``FOR UPDATE`` and then checks that a
    claimed trial is still WAITING; SQLite ignores ``FOR UPDATE`` and pysqlite runs the read
    outside the write transaction, so two workers can both read WAITING and both "win" the
    same trial: both train it, and the second ``tell`` fails with ``UpdateFinishedTrialError``.
    PostgreSQL's row lock makes the flip atomic there, so no lock is taken for it."""
    backend = getattr(storage, "_backend", storage)  # optuna wraps an RDBStorage in _CachedStorage
    with _sqlite_file_lock(getattr(backend, "url", None) or "", ".claim.lock"):
        yield


@contextlib.contextmanager
def creation_lock(url: str):
    """Serialise storage creation between processes: an exclusive ``flock`` on ``DB.lock``
    beside a SQLite file, a session advisory lock (``pg_advisory_lock``) on PostgreSQL
    (released when the connection closes, so a killed worker never leaves it held);
    no lock for other URLs."""
    from sqlalchemy.engine import make_url

    with _sqlite_file_lock(url, ".lock") as held:
        if held:
            yield
            return
    if make_url(url).get_backend_name() == "postgresql":
        import sqlalchemy

        engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
        try:
            with engine.connect() as conn:
                conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": _PG_LOCK_KEY})
                conn.commit()
                try:
                    yield
                finally:
                    conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": _PG_LOCK_KEY})
                    conn.commit()
        finally:
            engine.dispose()
    else:
        yield


def close_storage(storage: Any) -> None:
    """Close the storage's database connections (a server connection left open warns at exit)."""
    with contextlib.suppress(Exception):
        storage.remove_session()
        storage.engine.dispose()


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


WORKER = {"host": socket.gethostname(), "boot": _boot_id(), "pid": os.getpid()}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _dead_here(trial: Any) -> bool:
    """True when the trial's worker ran on this machine and its process is gone."""
    w = trial.user_attrs.get(_ATTR + "worker") or {}
    me = {**WORKER, "pid": os.getpid()}
    if w.get("host") != me["host"] or w.get("boot") != me["boot"] or not isinstance(w.get("pid"), int):
        return False
    return w["pid"] != me["pid"] and not _alive(w["pid"])


def recover(study: Any) -> list[int]:
    """Fail RUNNING trials whose worker is dead and enqueue each again with the same values.

    Dead means: a process of this machine that no longer exists, or a heartbeat
    older than the storage's grace period. Only the worker that flips a
    trial's state re-enqueues it (the flip is one locked update), so a trial is
    re-enqueued once. Returns the numbers of the trials failed here.
    """
    import optuna
    from optuna.trial import TrialState

    storage = study._storage
    stale = set()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        with contextlib.suppress(Exception):
            stale = set(storage._get_stale_trial_ids(study._study_id))
    failed = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if t._trial_id not in stale and not _dead_here(t):
            continue
        try:  # the attribute first: a finished trial takes no more attributes
            with claim_lock(storage):  # one flip, so one requeue, per dead trial
                if storage.get_trial(t._trial_id).state != TrialState.RUNNING:
                    continue  # another worker failed (or the owner finished) it meanwhile
                storage.set_trial_user_attr(t._trial_id, _ATTR + "failed_because", "worker died (killed or lost)")
                flipped = storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            flipped = False
        if flipped:
            _requeue(study, t)
            failed.append(t.number)
    return failed


def _requeue(study: Any, t: Any) -> None:
    attrs = {k: v for k, v in t.user_attrs.items() if k in (_ATTR + "seed", _ATTR + "role")}
    # dir_number: the retry works in the dead trial's run directory, so it resumes from its checkpoint
    study.enqueue_trial(dict(t.params), user_attrs={**attrs, _ATTR + "retry_of": t.number,
                                                    _ATTR + "dir_number": t.user_attrs.get(_ATTR + "dir_number", t.number)})


def _retried(trials: Sequence[Any]) -> set[int]:
    return {t.user_attrs[_ATTR + "retry_of"] for t in trials if _ATTR + "retry_of" in t.user_attrs}


def _claim_waiting(study: Any) -> Any | None:
    """Claim one WAITING trial (WAITING → RUNNING, row-locked): an ``optuna.Trial`` or None."""
    import optuna
    from optuna.trial import TrialState

    for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        for attempt in range(5):
            try:
                with claim_lock(study._storage):
                    ok = study._storage.set_trial_state_values(t._trial_id, state=TrialState.RUNNING)
                break
            except optuna.exceptions.UpdateFinishedTrialError:
                ok = False
                break
            except Exception as e:  # SQLite "database is locked" between local workers: retry
                if "locked" not in str(e) or attempt == 4:
                    raise
                time.sleep(0.2 * (attempt + 1))
        if ok:
            return optuna.Trial(study, t._trial_id)
    return None


class _Heartbeat:
    """Records the trial's heartbeat every ``interval`` s from a daemon thread."""

    def __init__(self, storage: Any, trial_id: int, interval: float):
        self.storage, self.trial_id, self.interval = storage, trial_id, interval
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._beat, daemon=True)

    def _beat(self) -> None:
        while True:
            with contextlib.suppress(Exception):
                self.storage.record_heartbeat(self.trial_id)
            if self.stop.wait(self.interval):
                return

    def __enter__(self) -> "_Heartbeat":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=5)


def _space_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _create_or_load(storage: Any, name: str, direction: str, queue: list[dict], attrs: dict, fingerprint: str) -> Any:
    """The optuna study ``name``; its creator enqueues ``queue`` (params + user attrs) once.

    Only one worker can create a study (the name is unique in the storage), so
    only one enqueues. Others wait until the creator marks the queue complete;
    a creator that died mid-way is finished by whoever finds the mark missing
    for 30 s (it enqueues what is not yet there).
    """
    import optuna

    try:
        study = optuna.create_study(storage=storage, study_name=name, direction=direction)
        created = True
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=name, storage=storage)
        created = False
    if created:
        for key, value in attrs.items():
            study.set_user_attr(key, value)
        study.set_user_attr(_ATTR + "fingerprint", fingerprint)
        for item in queue:
            study.enqueue_trial(item["params"], user_attrs=item.get("user_attrs"))
        study.set_user_attr(_ATTR + "queued", len(queue))
        return study
    deadline = time.monotonic() + 30
    while _ATTR + "queued" not in study.user_attrs and time.monotonic() < deadline:
        time.sleep(0.5)
    have = study.user_attrs.get(_ATTR + "fingerprint")
    if have is not None and have != fingerprint:
        raise ConfigError(
            f"the storage already holds optuna study {name!r} made from a different search space or budget; "
            "use another --out / --storage, or pass --overwrite (default SQLite storage only)"
        )
    if _ATTR + "queued" not in study.user_attrs:  # its creator died while enqueueing
        present = [json.dumps(t.params, sort_keys=True) for t in study.get_trials(deepcopy=False)]
        for item in queue:
            if json.dumps(item["params"], sort_keys=True) not in present:
                study.enqueue_trial(item["params"], user_attrs=item.get("user_attrs"))
        study.set_user_attr(_ATTR + "fingerprint", fingerprint)
        study.set_user_attr(_ATTR + "queued", len(queue))
    return study


# --------------------------------------------------------------------------- progress


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


# --------------------------------------------------------------------------- the sweep


class _Interrupted(Exception):
    pass


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


def build_report(study: Study, results: Mapping[str, Any], out: Path) -> dict[str, Path]:
    """The study's own report (``[study] report = "module"``: its ``build_report(results, out)``),
    else the generic one (:func:`write_report`)."""
    if study.report:
        import importlib

        try:
            module = importlib.import_module(study.report)
        except ImportError as e:
            raise ConfigError(f"study.report names module {study.report!r}, which cannot be imported: {e}") from None
        return module.build_report(results, Path(out))
    return write_report(results, Path(out))


SWEEP_MARK = ".bpfree-sweep"  # written into every sweep directory: "bpfree wrote here"
STORAGE_FILES = ("sweep.db", "sweep.db-journal", "sweep.db-wal", "sweep.db-shm")


def prepare_out(out: Path) -> None:
    """Create ``out`` for a sweep, or check that it already is one (``bpfree.paths``):
    a non-empty directory without a sweep's files is refused."""
    paths.check_output_dir(out, "sweep", [SWEEP_MARK, "sweep.db", "sweep.json"])
    out.mkdir(parents=True, exist_ok=True)
    mark = out / SWEEP_MARK
    if not mark.exists():
        mark.write_text("bpfree sweep directory: --overwrite deletes only the files bpfree wrote here\n")


@contextlib.contextmanager
def worker_lock(out: Path, *, exclusive: bool):
    """``flock`` on ``OUT/.sweep.lock`` for the whole life of a worker: shared by the workers
    of one sweep, exclusive (and not waited for) for ``--overwrite``, so that an overwrite
    never deletes the storage or runs of a worker still using them."""
    import fcntl

    with open(out / ".sweep.lock", "a") as f:
        try:  # a plain worker waits while an --overwrite clears (it then holds the lock shared too)
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB if exclusive else fcntl.LOCK_SH)
        except BlockingIOError:
            raise ConfigError(f"another bpfree sweep worker is using {out}; --overwrite would delete its storage "
                              "and runs: stop it (or let it finish) first, or choose another --out") from None
        try:
            yield
            if exclusive:  # done clearing: from now on an ordinary worker
                fcntl.flock(f, fcntl.LOCK_SH)
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def clear(study: Study, out: str | Path) -> None:
    """``--overwrite``: delete the default SQLite storage and the run directories bpfree wrote
    under ``out``, refusing while another worker uses ``out`` (:func:`worker_lock`)."""
    out = Path(out)
    if not out.is_dir():
        return
    prepare_out(out)
    with worker_lock(out, exclusive=True):
        _clear_locked(study, out)


def _clear_locked(study: Study, out: Path) -> None:
    """Delete only what bpfree wrote: each method's ``trial-*`` run directories (their
    :data:`bpfree.runs.RUN_FILES` and its ``run.lock``, which no worker holds under the exclusive
    worker lock; a directory keeps anything else), then the directories
    that left empty, then the storage files. Nothing outside ``out`` is touched."""
    for m in study.methods:
        method_dir = paths.inside(out, m.name)
        if method_dir.is_symlink() or not method_dir.is_dir():
            continue
        final_dir = method_dir / "final"
        for parent in (final_dir, method_dir):
            if parent.is_dir() and not parent.is_symlink():
                for run_dir in sorted(parent.glob("trial-*")):
                    if run_dir.is_dir() and not run_dir.is_symlink() and runs.is_bpfree_run_dir(run_dir):
                        paths.remove_written(run_dir, (*runs.RUN_FILES, runs.LOCK_FILE))
        paths.remove_written(final_dir, ())
        paths.remove_written(method_dir, ())
    for name in STORAGE_FILES:
        (out / name).unlink(missing_ok=True)


def _safe_url(url: str) -> str:
    """The storage URL without a password."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        return f"{scheme}://{creds.split(':')[0]}:***@{host}" if ":" in creds else url
    return url


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


def _running(s: Any) -> list:
    from optuna.trial import TrialState

    return [] if s is None else s.get_trials(deepcopy=False, states=(TrialState.RUNNING,))


def _planned(state: _MethodState, study: Study) -> int:
    m = state.method
    n = len(grid_points(m)) if m.sampler == "grid" else m.n_trials
    return n + len(study.seeds)


def _counted(trials: Sequence[Any]) -> list:
    """Finished trials that count: COMPLETE, and FAIL that was not re-enqueued."""
    from optuna.trial import TrialState

    retried = _retried(trials)
    return [t for t in trials if t.state == TrialState.COMPLETE or (t.state == TrialState.FAIL and t.number not in retried)]


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


def best_trial(search: Any, direction: str) -> Any | None:
    """The COMPLETE trial with the best value (ties: the lowest number); None if there is none."""
    from optuna.trial import TrialState

    done = [t for t in search.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.value is not None]
    if not done:
        return None
    sign = 1 if direction == "minimize" else -1
    return min(done, key=lambda t: (sign * t.value, t.number))


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


def _fmt(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


SUMMARY_KEYS = ("status", "reason", "steps", "epochs_completed", "train_seconds", "ms_per_step", "flops_per_step",
                "peak_memory_mb", "memory_by_category_mb", "peak_over_inference", "estimate_peak_memory_mb",
                "estimate_memory_by_category_mb", "estimate_over_inference", "inference_peak_mb", "parameters_mb",
                "memory_resolution_mb", "final_train_loss", "final_train_accuracy", "final_val_loss",
                "final_val_accuracy", "final_test_loss", "final_test_accuracy", "diverged_at_step", "data_source",
                "steps_per_epoch")


def _summary_subset(summary: Mapping[str, Any]) -> dict[str, Any]:
    out = {k: summary.get(k) for k in SUMMARY_KEYS}
    out["model"] = summary.get("model", {})
    out["estimator"] = summary.get("estimator", {})
    out["optimizer"] = summary.get("optimizer", {})
    out["schedule_decay"] = summary.get("schedule_decay")
    return runs.json_safe(out)


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


# --------------------------------------------------------------------------- results


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
             "status": (t.user_attrs.get(_ATTR + "summary") or {}).get("status"),
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
                             "summary": best.user_attrs.get(_ATTR + "summary")}
        finals = []
        if state.final is not None:
            for t in state.final.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
                finals.append({"number": t.number, "seed": t.user_attrs.get(_ATTR + "seed"),
                               "run_dir": t.user_attrs.get(_ATTR + "run_dir"),
                               "summary": t.user_attrs.get(_ATTR + "summary") or {},
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
            "search_seed": study.search_seed, "storage": _safe_url(url), "out": str(out), "methods": methods}


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


# --------------------------------------------------------------------------- the generic report


def pm(stat: Mapping[str, Any] | None, fmt: str = ".4f", scale: float = 1.0) -> str:
    """``mean ± std`` text of a ``{"mean", "std"}`` entry ("—" when missing)."""
    if not stat or stat.get("mean") is None:
        return "—"
    return f"{stat['mean'] * scale:{fmt}} ± {stat['std'] * scale:{fmt}}"


def results_table(results: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Per method: sampler, trials, best values, best objective, test loss/acc mean ± std."""
    header = ["method", "sampler", "trials (done/planned)", "best values", f"best {results['objective']}",
              "test loss", "test acc (%)", "seeds"]
    body = []
    for m in results["methods"]:
        if m.get("skipped") and not m.get("finals"):
            body.append([m["name"], m["sampler"], "—", f"skipped: {m['skipped']}", "—", "—", "—", "0"])
            continue
        best = m.get("best") or {}
        vals = ", ".join(f"{k}={_fmt(v)}" for k, v in best.get("params", {}).items()) or "—"
        body.append([
            m["name"], m["sampler"], f"{m.get('n_complete', 0)}/{m.get('n_planned', '?')}", vals,
            "—" if best.get("value") is None else f"{best['value']:.4g}",
            pm(m.get("test_loss")), pm(m.get("test_accuracy"), ".2f", 100), str(len(m.get("finals", []))),
        ])
    return header, body


def write_report(results: Mapping[str, Any], out: Path) -> dict[str, Path]:
    """``report.md`` / ``report.html`` and ``final_curves.png``: the results table and the mean
    validation curves of every method's final runs."""
    from bpfree.report import html as html_lib
    from bpfree.report import tables

    from bpfree.report import memory as memory_view

    header, body = results_table(results)
    png = final_curves_png(results, title=results["title"])
    (out / "final_curves.png").write_bytes(png)
    memory = memory_view.blocks(memory_runs(results))
    lines = [f"# {results['title']}", "", *_report_meta(results), "", "## Results", "",
             tables.markdown(header, body), "", *(f"- {n}" for n in REPORT_NOTES), *memory_view.markdown(memory),
             "## Curves", "", "![Validation loss of the final runs (mean over seeds)](final_curves.png)", ""]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    html = html_page(results["title"], [("p", x) for x in _report_meta(results)] + [
        ("h2", "Results"), ("table", (header, body)), ("ul", REPORT_NOTES), *memory, ("h2", "Curves"),
        ("img", ("Validation loss of the final runs (mean over seeds)", png))])
    (out / "report.html").write_text(html)
    del html_lib
    return {"markdown": out / "report.md", "html": out / "report.html", "final_curves.png": out / "final_curves.png"}


def memory_runs(results: Mapping[str, Any]) -> list[Any]:
    """One ``bpfree.runs.Run`` per method for the memory view: the memory of its first final run
    (every seed measures the same step), its label, and its mean validation accuracy over seeds."""
    from bpfree.runs import Run

    out = []
    for m in results["methods"]:
        finals = m.get("finals") or []
        if not finals or finals[0]["summary"].get("peak_memory_mb") is None:
            continue
        summary = {**finals[0]["summary"], "label": m["name"],
                   "final_val_accuracy": (m.get("val_accuracy") or {}).get("mean")}
        out.append(Run(Path(m["name"]), {}, summary))
    return out


REPORT_NOTES = [
    "best values: the search space values of the trial with the best objective (validation split, at the budget).",
    "test loss / acc: the best values re-run with each of the study's seeds (not the search seed), "
    "mean ± sample std over seeds, measured on the test split after the last step.",
    "A run that diverged within the budget scores +inf loss in the search.",
]


def _report_meta(results: Mapping[str, Any]) -> list[str]:
    return [
        f"Study file: {results['source']}" + (f", preset {results['preset']}" if results.get("preset") else ""),
        f"Objective: {results['objective']} on the validation split at the end of each method's budget "
        f"({results['direction']}); search seed {results['search_seed']}, final seeds {results['seeds']}.",
        f"Storage: {results['storage']}",
    ]


def html_page(title: str, blocks: Sequence[tuple[str, Any]]) -> str:
    """A self-contained page from ``(kind, content)`` blocks: h2, p, ul, table, img (PNG bytes), pre."""
    import base64
    import html

    from bpfree.report import tables
    from bpfree.report.html import CSS

    e = html.escape
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             f"<title>{e(title)}</title><style>{CSS}</style></head><body>", f"<h1>{e(title)}</h1>"]
    for kind, content in blocks:
        if kind == "h2":
            parts.append(f"<h2>{e(content)}</h2>")
        elif kind == "p":
            parts.append(f'<p class="meta">{e(content)}</p>')
        elif kind == "ul":
            parts.append('<ul class="notes">' + "".join(f"<li>{e(n)}</li>" for n in content) + "</ul>")
        elif kind == "table":
            parts.append(tables.html_table(*content))
        elif kind == "img":
            caption, png = content
            data_uri = base64.b64encode(png).decode("ascii")
            parts.append(f'<figure><img alt="{e(caption)}" src="data:image/png;base64,{data_uri}">'
                         f"<figcaption>{e(caption)}</figcaption></figure>")
        elif kind == "pre":
            parts.append(f"<pre>{e(content)}</pre>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def final_curves_png(results: Mapping[str, Any], *, title: str) -> bytes:
    """Mean validation loss over seeds vs steps, one line per method."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from bpfree.report import plots

    done = [m for m in results["methods"] if m.get("finals")]
    fig = Figure(figsize=(8, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    allv: list[float] = []
    for m, style in zip(done, plots._styles(len(done))):
        steps, vals = mean_curve(m["finals"], "val")
        allv += vals
        ax.plot(steps, vals, label=m["name"], **style)
    plots._loss_scale(ax, allv)
    ax.set(xlabel="optimizer steps", ylabel="validation loss (mean over seeds)", title=title)
    ax.grid(True, alpha=0.3)
    if done:
        ax.legend(fontsize="small")
    return plots._png(fig)


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


__all__ = [
    "Method", "Study", "apply_preset", "best_trial", "collect", "curves", "deep_merge", "from_dict", "grid_points",
    "load_study", "mean_curve", "method_config", "open_storage", "recover", "report_only", "run", "steps_to_reach",
    "write_report",
]
