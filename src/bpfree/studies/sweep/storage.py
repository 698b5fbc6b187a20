"""Where a sweep keeps its trials and how workers share them: optuna's RDB storage, its
creation lock, claiming a WAITING trial, recovering the trials of dead workers, heartbeats,
and the sweep directory with its worker lock (``bpfree.studies.sweep``)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import threading
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from bpfree import paths, runs
from bpfree.config import ConfigError

if TYPE_CHECKING:
    from bpfree.studies.sweep.study import Study


_ATTR = "bpfree:"  # prefix of the optuna user attributes this module writes


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


def _running(s: Any) -> list:
    from optuna.trial import TrialState

    return [] if s is None else s.get_trials(deepcopy=False, states=(TrialState.RUNNING,))


def _counted(trials: Sequence[Any]) -> list:
    """Finished trials that count: COMPLETE, and FAIL that was not re-enqueued."""
    from optuna.trial import TrialState

    retried = _retried(trials)
    return [t for t in trials if t.state == TrialState.COMPLETE or (t.state == TrialState.FAIL and t.number not in retried)]


def best_trial(search: Any, direction: str) -> Any | None:
    """The COMPLETE trial with the best value (ties: the lowest number); None if there is none."""
    from optuna.trial import TrialState

    done = [t for t in search.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.value is not None]
    if not done:
        return None
    sign = 1 if direction == "minimize" else -1
    return min(done, key=lambda t: (sign * t.value, t.number))
