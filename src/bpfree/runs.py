"""Run directories: what one training run leaves on disk, and reading it back.

Every run writes one directory, enough to rebuild any report without re-running::

    config.toml    the fully resolved config (re-run it: ``bpfree train DIR/config.toml``)
    metrics.csv    one row per optimizer step, flushed as it is written (METRICS_COLUMNS)
    eval.csv       one row per evaluation of a split (EVAL_COLUMNS)
    summary.json   status and final numbers; written with status "running" when the
                   run starts and replaced atomically (write + rename) when it ends
    error.txt      the traceback, only when status is "failed"
    model.pt       the final parameters (``state_dict``), only with ``train.save_model = true``
    best.pt        the parameters at the lowest validation loss, only with ``train.save_best = true``
    checkpoint.pt  everything needed to continue the run bit for bit (``bpfree.checkpoint``);
                   ``bpfree train --resume DIR`` continues from it
    run.lock       held (``flock``) by the process writing the run; a ``running`` summary
                   whose lock nobody holds is a run that died without a final write: read
                   back as status ``killed``, with its steps counted from ``metrics.csv``

Columns of ``metrics.csv``: ``step`` (1-based index of the optimizer step),
``epoch`` (1-based epoch the step belongs to), ``loss`` (the estimator's loss on
the step's batch, before the update), ``lr`` (the learning rate the step used),
``grad_norm`` (2-norm of the estimated gradient **before** clipping; empty when
the estimator wrote no ``p.grad``), ``forward_passes`` (this step's cost in
forward-pass equivalents), ``forward_passes_total`` (cumulative, including this
step), ``step_ms`` (wall time of this step) and ``wall_time_s`` (cumulative
training wall time, evaluation excluded). ``eval.csv`` uses the same ``step``
and ``wall_time_s`` clocks, so curves from both files line up.

A compare directory holds one run directory per estimator and a
``compare.json`` listing them (see ``bpfree.studies.compare``).
"""

from __future__ import annotations

import csv
import json
import math
import os
import tempfile
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from bpfree import schema
from bpfree.schema import EVAL_COLUMNS, METRICS_COLUMNS, STATUSES, Summary  # noqa: F401  (re-exported)

RUN_FILES = ("config.toml", "metrics.csv", "eval.csv", "summary.json", "error.txt", "model.pt", "best.pt",
             "checkpoint.pt")
LOCK_FILE = "run.lock"



class RunExistsError(FileExistsError):
    """The output directory already holds a run (pass ``overwrite=True`` / ``--overwrite``)."""


class RunBusyError(RuntimeError):
    """Another live process is writing this run directory (it holds ``run.lock``)."""


class RunLock:
    """An exclusive ``flock`` on ``RUN_DIR/run.lock``, held while a process writes the run.

    The kernel drops it when the process dies however it dies (SIGKILL, OOM
    kill, power loss), so :func:`is_alive` tells a live run from a dead one
    without trusting PIDs. POSIX only; elsewhere it is a no-op.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        try:
            import fcntl
        except ImportError:  # not POSIX: no liveness tracking
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunBusyError(f"{self.path.parent} is being written by another live process; wait for it or stop it") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self if self._fd is not None else self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def is_alive(path: str | Path) -> bool:
    """Whether a live process holds the run directory's ``run.lock`` (see :class:`RunLock`)."""
    try:
        import fcntl
    except ImportError:
        return True  # cannot tell: never call a run dead
    try:
        fd = os.open(Path(path) / LOCK_FILE, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


class RunWriter:
    """Writes one run directory; use as a context manager so the CSV files get closed.

    Creating it writes ``config.toml`` and the two CSV headers. Refuses a
    directory that already holds a run unless ``overwrite``, in which case
    only the files of :data:`RUN_FILES` are replaced; refuses, also with
    ``overwrite``, a file and a non-empty directory that is not a bpfree run
    (:func:`is_bpfree_run_dir`), so a user's own files are never replaced.
    """

    def __init__(self, path: str | Path, config_toml: str, *, overwrite: bool = False):
        self.path = Path(path)
        check_run_dir(self.path)
        if (self.path / "summary.json").exists():
            if not overwrite:
                raise RunExistsError(
                    f"{self.path} already holds a run; choose another --out (or run.name), or pass --overwrite"
                )
            for name in RUN_FILES:
                (self.path / name).unlink(missing_ok=True)
        self.path.mkdir(parents=True, exist_ok=True)
        # Mark the directory as bpfree's before anything else lands in it: a process killed
        # between here and the first full summary leaves a directory that a retry (a sweep's
        # requeued trial, --overwrite) still recognises as its own instead of refusing it.
        self.write_summary({"status": "running"})
        (self.path / "config.toml").write_text(config_toml)
        self._files = []
        self._metrics = self._open_csv("metrics.csv", METRICS_COLUMNS)
        self._eval = self._open_csv("eval.csv", EVAL_COLUMNS)

    def _open_csv(self, name: str, columns: tuple[str, ...]) -> csv.DictWriter:
        f = open(self.path / name, "w", newline="")
        self._files.append(f)
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        f.flush()
        return w

    @classmethod
    def reopen(cls, path: str | Path, offsets: dict[str, int], config_toml: str | None = None) -> "RunWriter":
        """Continue writing a run directory (``--resume``): ``metrics.csv`` and ``eval.csv`` are cut
        back to the byte lengths ``offsets`` recorded with the checkpoint (rows written after it are
        written again, identically) and appended to; ``config.toml`` is replaced if given."""
        self = cls.__new__(cls)
        self.path = Path(path)
        if config_toml is not None:
            write_text(self.path / "config.toml", config_toml)
        self._files = []
        for name, columns in (("metrics.csv", METRICS_COLUMNS), ("eval.csv", EVAL_COLUMNS)):
            file = self.path / name
            size = file.stat().st_size if file.is_file() else -1
            if size < offsets[name]:
                raise ValueError(f"{file} is shorter ({size} bytes) than when the checkpoint was written "
                                 f"({offsets[name]} bytes); the run directory was changed, resume is not possible")
            os.truncate(file, offsets[name])
            f = open(file, "a", newline="")
            self._files.append(f)
            w = csv.DictWriter(f, fieldnames=columns)
            if name == "metrics.csv":
                self._metrics = w
            else:
                self._eval = w
        return self

    def sync(self) -> dict[str, int]:
        """Flush and fsync ``metrics.csv`` and ``eval.csv``; return their byte lengths (for a checkpoint)."""
        sizes = {}
        for name, f in zip(("metrics.csv", "eval.csv"), self._files):
            f.flush()
            os.fsync(f.fileno())
            sizes[name] = f.tell()
        return sizes

    def log_step(self, row: dict[str, Any]) -> None:
        """Append one ``metrics.csv`` row and flush it to the OS."""
        self._metrics.writerow({k: _cell(v) for k, v in row.items()})
        self._files[0].flush()

    def log_eval(self, row: dict[str, Any]) -> None:
        """Append one ``eval.csv`` row and flush it to the OS."""
        self._eval.writerow({k: _cell(v) for k, v in row.items()})
        self._files[1].flush()

    def write_summary(self, summary: dict[str, Any]) -> Summary:
        """Replace ``summary.json`` atomically with ``summary`` as a checked, versioned record
        (``bpfree.schema.summary_record``); returns that record."""
        record = schema.summary_record(summary)
        write_json(self.path / "summary.json", record)
        return schema.Summary(json_safe(record))

    def write_model(self, model: "torch.nn.Module", name: str = "model.pt") -> None:
        """``model.pt`` (or ``name``): the ``state_dict``, written to a temporary file, fsynced and
        renamed (never half-written)."""
        import torch

        part = self.path / f"{name}.part"
        with open(part, "wb") as f:
            torch.save(model.state_dict(), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(part, self.path / name)

    def write_error(self, text: str) -> None:
        (self.path / "error.txt").write_text(text)

    def close(self) -> None:
        for f in self._files:
            f.close()

    def __enter__(self) -> "RunWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _cell(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, float):
        return repr(v)  # shortest exact round trip; nan/inf read back by float()
    return v


def json_safe(obj: Any) -> Any:
    """``obj`` with non-finite floats replaced by ``None`` (strict JSON has no NaN)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def write_text(path: str | Path, text: str) -> None:
    """Write ``text`` via a temporary file, fsync and ``os.replace`` (atomic on POSIX)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as strict JSON via a temporary file and ``os.replace`` (atomic on POSIX).

    The temporary file's name is unique (``mkstemp``), so processes writing the same file at
    once (sweep workers writing ``sweep.json``) never rename each other's half-written file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(json_safe(obj), f, indent=2, allow_nan=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# --------------------------------------------------------------------------- reading


@dataclass
class Run:
    """One run directory read back: config (plain dicts), summary, metrics columns, eval rows."""

    path: Path
    config: dict[str, Any]
    summary: dict[str, Any]
    metrics: dict[str, list[float]] = field(default_factory=dict)
    evals: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        # read through the schema: an undeclared key fails at the reader (bpfree.schema.Summary)
        if not isinstance(self.summary, Summary):
            self.summary = Summary(self.summary)

    @property
    def label(self) -> str:
        return str(self.summary.get("label") or self.path.name)

    def eval_curve(self, split: str, column: str) -> tuple[list[float], list[float], list[float]]:
        """``(steps, wall_time_s, values)`` of ``column`` for every evaluation of ``split``."""
        rows = [r for r in self.evals if r["split"] == split]
        return [r["step"] for r in rows], [r["wall_time_s"] for r in rows], [r[column] for r in rows]


def is_bpfree_run_dir(path: str | Path) -> bool:
    """Whether ``path`` holds a ``summary.json`` that bpfree wrote (it names ``bpfree_version``)."""
    try:
        summary = json.loads((Path(path) / "summary.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(summary, dict) and "bpfree_version" in summary


def check_run_dir(path: Path) -> None:
    """``RunExistsError`` unless ``path`` is new, an empty directory or a bpfree run directory."""
    if path.exists() and not path.is_dir():
        raise RunExistsError(f"{path} is a file, not a run directory; choose a new or empty --out")
    if path.is_dir() and any(path.iterdir()) and not is_bpfree_run_dir(path):
        raise RunExistsError(
            f"{path} is a non-empty directory that is not a bpfree run (no summary.json written by bpfree); "
            "bpfree will not write into it: choose a new or empty --out"
        )


def is_run_dir(path: str | Path) -> bool:
    return (Path(path) / "summary.json").is_file()


def is_compare_dir(path: str | Path) -> bool:
    return (Path(path) / "compare.json").is_file()


def read_run(path: str | Path) -> Run:
    """Read a run directory (``summary.json`` required; the other files if present)."""
    path = Path(path)
    if not is_run_dir(path):
        raise FileNotFoundError(f"{path} is not a run directory (no summary.json)")
    try:
        raw = json.loads((path / "summary.json").read_text())
    except ValueError as e:
        raise schema.SchemaError(f"{path / 'summary.json'} is not valid JSON ({e}); it is not a readable run record") from None
    summary = schema.read_summary(raw, where=str(path / "summary.json"))
    cfg_file = path / "config.toml"
    config = tomllib.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
    metrics: dict[str, list[float]] = {c: [] for c in METRICS_COLUMNS}
    for row in _read_csv(path / "metrics.csv"):
        for c in METRICS_COLUMNS:
            metrics[c].append(_number(row.get(c)))
    evals = [
        {k: (v if k == "split" else _number(v)) for k, v in row.items()} for row in _read_csv(path / "eval.csv")
    ]
    summary = Summary(as_reported(path, summary, metrics, evals))
    return Run(path, config, summary, metrics, evals)


def as_reported(path: Path, summary: dict[str, Any], metrics: dict[str, list[float]],
                evals: list[dict[str, Any]]) -> dict[str, Any]:
    """``summary`` as it stands now, for reports.

    * A ``running`` run whose writer is gone becomes ``killed``; its ``steps``
      (and ``epochs_completed``, ``train_seconds``) are taken from the complete
      rows of ``metrics.csv``, and its ``final_*`` loss and accuracy of each split
      from the split's last row of ``eval.csv`` (both files are flushed row by row;
      the summary is only rewritten at checkpoints).
    * A ``diverged`` run has no final loss or accuracy (records written before
      this rule may hold them): a diverged model's numbers are no result.
    """
    if summary.get("status") == "diverged":
        return {**summary, **{f"final_{s}_{m}": None for s in ("train", "val", "test") for m in ("loss", "accuracy")}}
    if summary.get("status") != "running" or is_alive(path):
        return summary
    steps = [s for s in metrics.get("step", []) if math.isfinite(s)]
    n = int(max(steps)) if steps else 0
    per_epoch = summary.get("steps_per_epoch")
    wall = [w for w in metrics.get("wall_time_s", []) if math.isfinite(w)]
    latest = {row["split"]: row for row in evals}  # rows are in time order
    finals = {f"final_{split}_{m}": row[m] for split, row in latest.items() if split in ("train", "val", "test")
              for m in ("loss", "accuracy") if math.isfinite(row.get(m, math.nan))}
    return {
        **summary,
        **finals,
        "status": "killed",
        "steps": n,
        "epochs_completed": n / per_epoch if per_epoch else None,
        "train_seconds": wall[-1] if wall else summary.get("train_seconds"),
        "reason": "the process died without a final write (SIGKILL, OOM kill or power loss); "
        f"steps counted from metrics.csv; continue it with: bpfree train --resume {path}",
    }


def _read_csv(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        # A run killed mid-write may leave a partial last line; keep the complete rows.
        return [r for r in csv.DictReader(f) if None not in r.values()]


def _number(text: str | None) -> float:
    try:
        return float(text) if text not in (None, "") else math.nan
    except ValueError:
        return math.nan


def find_runs(paths: Iterable[str | Path]) -> list[Path]:
    """Run directories named by ``paths``: run dirs themselves, or compare dirs expanded.

    A compare directory contributes the runs its ``compare.json`` lists (in
    order); any other directory contributes its subdirectories that are runs.
    """
    paths = [Path(p) for p in paths]
    found: list[Path] = []
    for p in paths:
        if is_compare_dir(p):
            listing = json.loads((p / "compare.json").read_text())
            found += [p / r["dir"] for r in listing.get("runs", []) if is_run_dir(p / r["dir"])]
        elif is_run_dir(p):
            found.append(p)
        elif p.is_dir():
            found += sorted(d for d in p.iterdir() if is_run_dir(d))
        else:
            raise FileNotFoundError(f"{p} does not exist")
    if not found:
        raise FileNotFoundError(f"no run directories (with summary.json) in {', '.join(map(str, paths))}")
    return found


# --------------------------------------------------------------------------- loading for use


@dataclass
class LoadedRun:
    """A run directory made usable: the resolved config, the model with weights, the records.

    ``model`` is in eval mode on ``device``; ``weights`` names the file its
    parameters came from (``model.pt``, ``best.pt`` or ``checkpoint.pt``);
    ``run`` holds the summary, the per-step metrics and the evaluations.
    """

    config: "Any"  # bpfree.config.Config
    model: "Any"  # torch.nn.Module
    run: Run
    weights: str

    @property
    def summary(self) -> dict[str, Any]:
        return self.run.summary

    @property
    def metrics(self) -> dict[str, list[float]]:
        return self.run.metrics


def load(path: str | Path, *, weights: str = "last", device: str = "cpu") -> LoadedRun:
    """Read ``path`` for evaluation or further training in your own code.

    ``weights="last"``: the final parameters (``model.pt``, written with
    ``train.save_model``) of a run that finished, else those of its latest
    ``checkpoint.pt`` (an interrupted or killed run); ``weights="best"``: the
    parameters at the lowest validation loss (``best.pt``, ``train.save_best``).
    The model is rebuilt from the resolved ``config.toml`` (same architecture
    and options) and its ``state_dict`` loaded with ``torch.load(weights_only=True)``.

    Raises:
        FileNotFoundError: not a run directory, or no file with the weights asked for
            (the message says which ``train.*`` option writes it).
        ValueError: ``weights`` is not ``"last"`` or ``"best"``.
    """
    import torch

    from bpfree import checkpoint, models
    from bpfree import config as config_lib

    path = Path(path)
    if weights not in ("last", "best"):
        raise ValueError(f"weights must be 'last' or 'best', got {weights!r}")
    run = read_run(path)
    cfg = config_lib.resolve(config_lib.load(path / "config.toml"))
    finished = run.summary.get("status") in ("completed", "diverged", "interrupted", "failed")
    if weights == "best":
        candidates = ["best.pt"]
    else:
        candidates = ["model.pt", checkpoint.FILE] if finished else [checkpoint.FILE, "model.pt"]
    found = next((name for name in candidates if (path / name).is_file()), None)
    if found is None:
        how = ("train.save_best = true" if weights == "best"
               else "train.save_model = true (or a checkpoint: train.checkpoint_every_steps)")
        raise FileNotFoundError(f"{path} holds no {' or '.join(candidates)}; runs write it with {how}")
    if found == checkpoint.FILE:
        state = checkpoint.load(path / found)["model"]
    else:
        state = torch.load(path / found, map_location="cpu", weights_only=True)
    d = run.summary.get("data", {})
    model = models.make(cfg.model.name, input_shape=tuple(d["input_shape"]), num_classes=int(d["num_classes"]),
                        seed=cfg.train.seed, **cfg.model.options)
    model.load_state_dict(state)
    return LoadedRun(cfg, model.to(device).eval(), run, found)
