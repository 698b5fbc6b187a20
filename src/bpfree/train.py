"""The training loop: one loop for every estimator.

:func:`run` trains ``config`` and writes a run directory (``bpfree.runs``).
Each step is ``loss.backward()`` with the estimator as the engine::

    out = estimator.estimate(model, closure, generator=g_estimator)   # writes p.grad
    norm = clip_grad_norm_(params, config.train.clip_grad_norm)       # pre-clip norm recorded
    optimizer.step(); scheduler.step()                                # lr_t = lr·exp(−decay·t)

* **Randomness** is explicit and seeded from ``train.seed``: the model
  initialisation (``models.make(seed=...)``), the batch order (a
  ``torch.Generator`` used by nothing else, so every estimator sees the same
  batches in the same order for the same seed) and the estimator's generator
  (seeded with the estimator's ``seed`` option, which :func:`bpfree.config.resolve`
  sets to ``train.seed`` unless given). The global RNG is not used.
* **Budget**: ``train.epochs``, ``train.max_steps`` or ``train.max_seconds``
  (training wall time, evaluation excluded), whichever ends first.
* **Evaluation** on the validation split at step 0, after every epoch, every
  ``train.eval_every_steps`` steps if set, and when the run stops; at the end
  also on the full training split and on the test split. Loss is mean
  cross-entropy, accuracy the share of argmax hits.
* **Timing**: ``step_ms`` is the wall time of estimate + clipping + update
  (CUDA synchronised); an untimed warm-up estimate on a copy of the model
  runs first unless ``train.warmup = false``.
* **Cost**: unless ``train.measure = false``, the FLOPs and peak memory by
  category of one step are measured on a copy of the model before training
  and recorded in the summary (``flops_per_step``, ``peak_memory_mb``, ...).
* **Divergence**: a non-finite loss or gradient norm, or a loss above the
  divergence bound (``train.divergence_bound``, or ``train.divergence_factor``
  × |first step's training loss|; a validation loss above it too), stops the
  run before the update is applied (status ``diverged``, ``diverged_at_step``,
  ``reason``); its metrics row is still written. A diverged run reports no
  final loss or accuracy (its model is not a result), and is not evaluated on
  train/test at the end.
* **Checkpoints** (``bpfree.checkpoint``): every ``train.checkpoint_every_steps``
  steps and/or ``train.checkpoint_every_seconds``, and at Ctrl-C / SIGTERM,
  ``checkpoint.pt`` holds everything needed to continue (model, optimizer,
  schedule, every generator, the epoch's batch order and position, the
  estimator's ``state_dict()``, counters, evaluations, the metrics files'
  lengths). :func:`resume` continues a run from it; on CPU the result is
  bit-identical to an uninterrupted run (wall-time columns aside). Checkpoint
  time is excluded from ``train_seconds``; its cost is in ``summary["checkpoints"]``.
* **Signals**: the first Ctrl-C or SIGTERM stops the run after the current
  step, or inside an evaluation before its next batch (status ``interrupted``,
  checkpoint, final records, no further evaluation; the resumed run redoes the
  evaluation that was cut); a second one interrupts at once (the last periodic checkpoint
  is kept; a possibly half-done step is never checkpointed); any signal
  during the final write is recorded and ignored, so it cannot corrupt it.
* **Dropout and other global-RNG draws** come from the global RNG seeded with
  ``train.seed`` inside ``torch.random.fork_rng`` (the caller's RNG state is
  left as it was) and are checkpointed with the rest.
* MeZO in update mode (``estimator.lr`` set) applies its own SGD step and
  writes no ``p.grad``; the optimizer step and schedule are then skipped.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import platform
import signal
import statistics
import sys
import threading
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from bpfree import checkpoint
from bpfree import config as config_lib
from bpfree import data, estimators, limits, models, runs
from bpfree.config import Config, ConfigError, OptimizerConfig
from bpfree.measure.profile import training_step_cost


def make_optimizer(cfg: OptimizerConfig, params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    """The ``torch.optim`` optimizer of a resolved ``[optimizer]`` table."""
    if cfg.name in ("sgd", "nesterov"):
        return torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.name == "nesterov", weight_decay=cfg.weight_decay
        )
    cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[cfg.name]
    return cls(params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)


def exponential_decay(optimizer: torch.optim.Optimizer, decay: float) -> torch.optim.lr_scheduler.LambdaLR:
    """lr_t = lr · exp(−decay · t) after t calls of ``scheduler.step()`` (see ``ScheduleConfig``)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: math.exp(-decay * t))


def grad_norm(model: nn.Module, max_norm: float | None) -> float | None:
    """Total 2-norm of the gradients before clipping; clips to ``max_norm`` if given.

    ``None`` when no parameter has a ``.grad`` (MeZO update mode).
    """
    params = [p for p in model.parameters() if p.requires_grad and p.grad is not None]
    if not params:
        return None
    if max_norm is not None:
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params])))


@torch.no_grad()
def evaluate(model: nn.Module, split: data.TensorSplit, batch_size: int, *,
             between_batches: Callable[[], None] | None = None) -> tuple[float, float]:
    """``(mean cross-entropy, accuracy)`` of ``model`` on ``split``, in eval mode.

    Means are over targets: one per example for classification, one per real
    token for a language model's next-token targets (−100, padding, is ignored).
    ``between_batches`` is called before every batch; the training loop raises
    ``KeyboardInterrupt`` from it once a signal came, so a long evaluation (a
    minute for a transformer on a CPU) never outlives ``docker stop``'s grace period.
    """
    was_training = model.training
    model.eval()
    loss, correct, count = 0.0, 0, 0
    try:
        for x, y in data.batches(split, batch_size, shuffle=False):
            if between_batches is not None:
                between_batches()
            logits = model(x)
            loss += float(F.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(dim=1) == y).sum())
            count += int((y != -100).sum())
    finally:
        model.train(was_training)
    return loss / max(count, 1), correct / max(count, 1)


def run(
    config: Config,
    out_dir: str | Path,
    *,
    label: str | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Train ``config`` and write its run directory to ``out_dir``; return the summary.

    Everything that can fail on a bad config (names, options, data files)
    fails before the directory is created.

    Raises:
        ConfigError: an invalid config (also a model that cannot take the data's shape).
        bpfree.limits.MemoryLimitError: the run would not fit in this machine's memory.
        bpfree.data.DatasetNotFoundError: the data set's files are missing.
        bpfree.runs.RunExistsError: ``out_dir`` holds a run and ``overwrite`` is false.
        Exception: whatever the step raised (status ``failed``, traceback in
            ``error.txt``); a ``KeyboardInterrupt`` is not re-raised.
    """
    return _run(config_lib.resolve(config), Path(out_dir), label=label, overwrite=overwrite)


# Keys ``resume(..., overrides)`` may change: the budget, checkpointing and display. Anything else
# would make the continued run a different experiment than the one its first steps belong to.
RESUME_KEYS = ("train.epochs", "train.max_steps", "train.max_seconds", "train.checkpoint_every_steps",
               "train.checkpoint_every_seconds", "train.keep_checkpoint", "train.progress")


def resume(run_dir: str | Path, overrides: Iterable[str] = ()) -> dict[str, Any]:
    """Continue the run in ``run_dir`` from its ``checkpoint.pt``; return the final summary.

    ``overrides`` (``"train.max_steps=2000"``) may change only :data:`RESUME_KEYS`,
    e.g. to train a completed run (kept with ``train.keep_checkpoint``) further.

    Raises:
        ConfigError: not a run directory, no checkpoint, a live run, a finished run
            without a larger budget, or an override outside :data:`RESUME_KEYS`.
    """
    run_dir = Path(run_dir)
    if not runs.is_run_dir(run_dir):
        raise ConfigError(f"--resume {run_dir}: not a run directory (no summary.json)")
    overrides = list(overrides)
    for text in overrides:
        key, _ = config_lib.parse_override(text)
        if key not in RESUME_KEYS:
            raise ConfigError(f"--resume: --set {key} would change the run; only {', '.join(RESUME_KEYS)} may change")
    if runs.is_alive(run_dir):
        raise ConfigError(f"--resume {run_dir}: the run is still running in another process")
    previous = runs.read_run(run_dir).summary
    if previous.get("status") == "diverged":
        raise ConfigError(f"--resume {run_dir}: the run diverged ({previous.get('reason')}); start a new run")
    if previous.get("status") == "completed" and not overrides:
        raise ConfigError(f"--resume {run_dir}: the run completed; to train it further pass a larger budget, "
                          "e.g. --set train.max_steps=N (needs a checkpoint kept with train.keep_checkpoint)")
    try:
        state = checkpoint.load(run_dir / checkpoint.FILE)
    except checkpoint.CheckpointError as e:
        raise ConfigError(f"--resume {run_dir}: {e} (the run stopped before its first checkpoint; "
                          "start it again with --overwrite)") from None
    cfg = config_lib.resolve(config_lib.load(run_dir / "config.toml", overrides))
    mismatch = _config_changes(state["config"], config_lib.to_dict(cfg))
    if mismatch:
        raise ConfigError(f"--resume {run_dir}: config.toml differs from the checkpoint's config in {', '.join(mismatch)}")
    return _run(cfg, run_dir, label=previous.get("label"), resume_from=state)


def run_or_resume(config: Config, out_dir: str | Path, *, label: str | None = None) -> dict[str, Any]:
    """:func:`resume` ``out_dir`` if it holds an unfinished run of the same config with a
    checkpoint (a killed or interrupted trial of a sweep or study), else :func:`run` it
    afresh (replacing whatever is there)."""
    out_dir = Path(out_dir)
    cfg = config_lib.resolve(config)
    if resumable(cfg, out_dir):
        return _run(cfg, out_dir, label=label, resume_from=checkpoint.load(out_dir / checkpoint.FILE))
    return _run(cfg, out_dir, label=label, overwrite=True)


def resumable(cfg: Config, out_dir: Path) -> bool:
    """Whether ``out_dir`` holds a dead, unfinished run of ``cfg`` (resolved) with a readable checkpoint."""
    if not runs.is_run_dir(out_dir) or not (out_dir / checkpoint.FILE).is_file() or runs.is_alive(out_dir):
        return False
    if runs.read_run(out_dir).summary.get("status") not in ("running", "killed", "interrupted"):
        return False
    try:
        state = checkpoint.load(out_dir / checkpoint.FILE)
    except checkpoint.CheckpointError:
        return False
    return not _config_changes(state["config"], config_lib.to_dict(cfg))


def _config_changes(saved: dict, now: dict) -> list[str]:
    """Dotted keys whose values differ between two ``config.to_dict`` forms, :data:`RESUME_KEYS` aside."""
    keys = {f"{s}.{k}" for d in (saved, now) for s, table in d.items() for k in table}
    return sorted(
        k for k in keys - set(RESUME_KEYS) - {"run.name", "run.out"}
        if saved.get(k.split(".")[0], {}).get(k.split(".")[1]) != now.get(k.split(".")[0], {}).get(k.split(".")[1])
    )


def _run(
    cfg: Config,
    out_dir: Path,
    *,
    label: str | None = None,
    overwrite: bool = False,
    resume_from: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """:func:`run` of a resolved config, or its continuation from the checkpoint ``resume_from``."""
    t = cfg.train
    device = torch.device(t.device)
    limits.check_data(cfg)  # before anything large is allocated
    try:
        splits = data.load(
            cfg.data.name,
            val_fraction=cfg.data.val_fraction,
            seed=cfg.data.seed,
            root=cfg.data.root,
            download=cfg.data.download,
            **cfg.data.options,
        )
        nbytes = sum(t.nbytes for s in (splits.train, splits.val, splits.test) for t in (s.x, s.y))
        limits.check_run(cfg, splits.input_shape, splits.num_classes, nbytes)
        model = models.make(
            cfg.model.name,
            input_shape=splits.input_shape,
            num_classes=splits.num_classes,
            seed=t.seed,
            **cfg.model.options,
        ).to(device)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    estimator = estimators.make(cfg.estimator.name, **cfg.estimator.options)
    optimizer = make_optimizer(cfg.optimizer, model.parameters())
    scheduler = exponential_decay(optimizer, cfg.schedule.decay)
    on_device = {name: s.to(device) for name, s in (("train", splits.train), ("val", splits.val), ("test", splits.test))}
    data_gen = torch.Generator().manual_seed(t.seed)  # batch order only
    est_gen = torch.Generator(device=device).manual_seed(int(cfg.estimator.options.get("seed", t.seed)))
    steps_per_epoch = math.ceil(len(data.batches(on_device["train"], cfg.data.batch_size, shuffle=False))
                                / t.accumulate)

    static = {
        "label": label or cfg.run.name,
        "estimator": {"name": cfg.estimator.name, "options": cfg.estimator.options, **estimator.describe(model)},
        "optimizer": dataclasses.asdict(cfg.optimizer),
        "schedule_decay": cfg.schedule.decay,
        "clip_grad_norm": t.clip_grad_norm,
        "budget": {"epochs": t.epochs, "max_steps": t.max_steps, "max_seconds": t.max_seconds},
        "data": {"name": cfg.data.name, "batch_size": cfg.data.batch_size, **splits.summary()},
        "data_source": splits.source,
        "model": {
            "name": cfg.model.name,
            "options": cfg.model.options,
            "num_parameters": models.count_parameters(model),  # trainable
            "num_parameters_total": models.count_parameters(model, trainable_only=False),
        },
        "steps_per_epoch": steps_per_epoch,
        "seed": t.seed,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    header = (
        f"Fully resolved bpfree config of run {static['label']!r} ({static['started_at']}).\n"
        f"Re-run: bpfree train config.toml --out NEW_DIR"
    )
    toml = config_lib.to_toml(cfg, header=header)
    if resume_from is None:
        writer = runs.RunWriter(out_dir, toml, overwrite=overwrite)
        lock = runs.RunLock(out_dir).acquire()
    else:
        lock = runs.RunLock(out_dir).acquire()  # before touching the files: refuses a live run
        loop_state = resume_from["loop"]
        static["started_at"] = loop_state["started_at"]
        static["resumed_at"] = [*loop_state.get("resumed_at", []), datetime.now(timezone.utc).isoformat(timespec="seconds")]
        try:
            writer = runs.RunWriter.reopen(out_dir, resume_from["files"], toml)
        except BaseException:
            lock.release()
            raise
    cuda = [device.index or 0] if device.type == "cuda" else []
    with lock, writer, torch.random.fork_rng(devices=cuda), _StopSignals() as signals:
        torch.manual_seed(t.seed)  # dropout and other global-RNG draws; the caller's RNG is restored after
        loop = _Loop(cfg, model, estimator, optimizer, scheduler, on_device, data_gen, est_gen, writer, steps_per_epoch)
        loop.static, loop.signals, loop.resume_from = static, signals, resume_from
        writer.write_summary({**static, **loop.summary("running")})
        try:
            loop.train()
        except KeyboardInterrupt:
            loop.interrupted()
        except BaseException as e:
            with signals.final_write():
                loop.status, loop.reason = "failed", f"{type(e).__name__}: {e}"
                writer.write_error(traceback.format_exc())
                writer.write_summary({**static, **loop.summary("failed")})
            raise
        with signals.final_write():  # a further signal is recorded, not raised: the records stay whole
            summary = loop.finish()
    return summary


class _Loop:
    """The state of one run: step and time counters, latest evaluations, status."""

    def __init__(self, cfg, model, estimator, optimizer, scheduler, splits, data_gen, est_gen, writer, steps_per_epoch):
        self.cfg, self.model, self.estimator = cfg, model, estimator
        self.optimizer, self.scheduler = optimizer, scheduler
        self.splits = splits  # {"train", "val", "test"}: TensorSplit on the model's device
        self.steps_per_epoch = steps_per_epoch  # optimizer steps per epoch (batches / train.accumulate)
        self.data_gen, self.est_gen, self.writer = data_gen, est_gen, writer
        self.device = next(model.parameters()).device
        self.step, self.epoch = 0, 0
        self.forward_passes_total, self.train_seconds = 0.0, 0.0
        self.step_ms: list[float] = []
        self.last: dict[str, dict[str, float]] = {}  # split -> {"step", "loss", "accuracy"}
        self._train_sample: data.TensorSplit | None = None  # train.eval_train_examples' sample, drawn once
        self.status, self.reason, self.diverged_at, self.stopped_by = "running", None, None, None
        self.cost: dict[str, Any] = {}  # FLOPs and memory of one step (measure())
        self.t_start = time.perf_counter()
        self.wall_before = 0.0  # wall seconds of the run's earlier segments (before a resume)
        self.order: data.Batches | None = None  # the current epoch's batches, None between epochs
        self.initial_loss: float | None = None  # the first step's training loss (divergence bound)
        self.in_step = False  # a step is under way: its state is not checkpointed
        self.evaluating: str | None = None  # the split being evaluated, if any
        self.checkpoints: dict[str, Any] = {"count": 0, "seconds_total": 0.0, "seconds_max": 0.0, "bytes": None}
        self.last_checkpoint = time.monotonic()
        self.best_val_loss = math.inf
        self.static: dict[str, Any] = {}
        self.signals: _StopSignals | None = None
        self.resume_from: dict[str, Any] | None = None

    # ------------------------------------------------------------------ the loop

    def train(self) -> None:
        t = self.cfg.train
        if t.warmup:
            self.warmup()
        if self.resume_from is not None:
            self.load_state_dict(self.resume_from)  # after the warm-up: it may touch estimator state
            if self.validation_due():
                self.evaluate("val")  # the one a signal cut (evaluation draws nothing: the run stays bit-exact)
        else:
            if t.measure:
                self.measure()
            self.evaluate("val")
        self.last_checkpoint = time.monotonic()
        self.stop_if_signalled()  # a signal during the warm-up, measurement or first evaluation
        bar = _progress_bar(self.cfg, self.steps_per_epoch, initial=self.step)
        try:
            while self.stopped_by is None and self.status == "running":
                if self.order is None:
                    if t.epochs is not None and self.epoch >= t.epochs:
                        self.stopped_by = "epochs"
                        break
                    self.epoch += 1
                    self.order = data.batches(self.splits["train"], self.cfg.data.batch_size, generator=self.data_gen)
                for (x, y), *more in _groups(self.order, t.accumulate):
                    self.stopped_by = self.cap_reached()  # a run resumed after its last step takes no more
                    if self.stopped_by:
                        break
                    loss = self.train_step(x, y, *more)
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.4g}", epoch=self.epoch, refresh=False)
                    if self.status == "diverged":
                        self.stopped_by = "diverged"
                        break
                    if t.eval_every_steps and self.step % t.eval_every_steps == 0:
                        self.evaluate("val")
                        if self.status == "diverged":
                            self.stopped_by = "diverged"
                            break
                    self.stopped_by = self.cap_reached()
                    if self.stopped_by:
                        break
                    self.stop_if_signalled()
                    self.maybe_checkpoint()
                else:
                    self.order = None  # the epoch ran to its end
                self.evaluate("val")  # end of epoch (or of the run)
                self.stop_if_signalled()
        finally:
            bar.close()
        if self.status == "diverged":
            self.stopped_by = "diverged"
            return  # a diverged model is not evaluated: its numbers are no result
        self.evaluate("train")
        self.evaluate("test")
        if self.status == "running":
            self.status = "completed"

    def cap_reached(self) -> str | None:
        """``"max_steps"`` / ``"max_seconds"`` once the run has taken its budget, else None."""
        t = self.cfg.train
        if t.max_steps is not None and self.step >= t.max_steps:
            return "max_steps"
        if t.max_seconds is not None and self.train_seconds >= t.max_seconds:
            return "max_seconds"
        return None

    def validation_due(self) -> bool:
        """Whether the loop evaluates ``val`` at this step: at the start, every
        ``train.eval_every_steps``, at the end of an epoch (no batch order open)."""
        every = self.cfg.train.eval_every_steps
        return self.step == 0 or self.order is None or bool(every and self.step % every == 0)

    def stop_if_signalled(self) -> None:
        """Raise ``KeyboardInterrupt`` between steps (and evaluation batches) once a Ctrl-C / SIGTERM was received."""
        if self.signals is not None and self.signals.received:
            raise KeyboardInterrupt

    def maybe_checkpoint(self) -> None:
        """Write ``checkpoint.pt`` when ``train.checkpoint_every_steps`` / ``_seconds`` says so."""
        t = self.cfg.train
        due = (t.checkpoint_every_steps is not None and self.step % t.checkpoint_every_steps == 0) or (
            t.checkpoint_every_seconds is not None and time.monotonic() - self.last_checkpoint >= t.checkpoint_every_seconds
        )
        if due:
            self.write_checkpoint()
            self.writer.write_summary({**self.static, **self.summary("running")})

    def write_checkpoint(self) -> None:
        """``checkpoint.pt`` of the state between two steps (atomic; its time and size recorded)."""
        size, seconds = checkpoint.save(self.writer.path / checkpoint.FILE, self.state_dict())
        c = self.checkpoints
        c["count"] += 1
        c["seconds_total"] += seconds
        c["seconds_max"] = max(c["seconds_max"], seconds)
        c["bytes"] = size
        self.last_checkpoint = time.monotonic()

    def interrupted(self) -> None:
        """Ctrl-C / SIGTERM: status ``interrupted``; the state is checkpointed unless a step was cut."""
        name = (self.signals.received if self.signals else None) or "Ctrl-C"
        self.status, self.stopped_by = "interrupted", "interrupted"
        if self.in_step:
            self.reason = (f"interrupted by {name} inside step {self.step + 1}; that step is discarded "
                           "(the last periodic checkpoint, if any, is kept)")
        elif self.evaluating:
            self.reason = (f"interrupted by {name} during the {self.evaluating} evaluation after step {self.step}; "
                           "a resumed run evaluates again")
        else:
            self.reason = f"interrupted by {name} after step {self.step}"

    def finish(self) -> dict[str, Any]:
        """The final records: checkpoint (interrupted) or its removal, model, summary."""
        t = self.cfg.train
        path = self.writer.path / checkpoint.FILE
        whole = not self.in_step  # a cut step may have left parameters perturbed
        if self.status == "interrupted" and whole:
            self.write_checkpoint()
        elif self.status in ("completed", "diverged"):
            if t.keep_checkpoint and whole and self.status == "completed":
                self.write_checkpoint()
            elif not t.keep_checkpoint:
                path.unlink(missing_ok=True)
        if t.save_model and whole:
            self.writer.write_model(self.model)
        return self.writer.write_summary({**self.static, **self.summary(self.status)})

    # ------------------------------------------------------------------ checkpoint state

    def state_dict(self) -> dict[str, Any]:
        """Everything the loop needs to continue exactly here (see ``bpfree.checkpoint``)."""
        own = getattr(self.estimator, "state_dict", None)
        rng = {"data": self.data_gen.get_state(), "estimator": self.est_gen.get_state(), "torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {
            "config": config_lib.to_dict(self.cfg),
            "step": self.step,
            "epoch": self.epoch,
            "order": None if self.order is None else self.order.state_dict(),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": rng,
            "estimator": own() if callable(own) else {},
            "loop": {
                "forward_passes_total": self.forward_passes_total,
                "train_seconds": self.train_seconds,
                "wall_seconds": self.wall_before + time.perf_counter() - self.t_start,
                "step_ms": list(self.step_ms),
                "last": self.last,
                "cost": self.cost,
                "initial_loss": self.initial_loss,
                "best_val_loss": self.best_val_loss,
                "checkpoints": dict(self.checkpoints, count=self.checkpoints["count"] + 1),
                "started_at": self.static.get("started_at"),
                "resumed_at": self.static.get("resumed_at", []),
            },
            "files": self.writer.sync(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output (the run directory's files are cut back by the writer)."""
        self.step, self.epoch = int(state["step"]), int(state["epoch"])
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        rng = state["rng"]
        self.data_gen.set_state(rng["data"])
        self.est_gen.set_state(rng["estimator"])
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.device)
        own = getattr(self.estimator, "load_state_dict", None)
        if callable(own):
            own(state["estimator"])
        elif state["estimator"]:
            raise ValueError(f"the checkpoint holds state of estimator {self.cfg.estimator.name!r}, which cannot load it")
        if state["order"] is not None:
            self.order = data.batches(self.splits["train"], self.cfg.data.batch_size, shuffle=False)
            self.order.load_state_dict(state["order"])
        loop = state["loop"]
        self.forward_passes_total = float(loop["forward_passes_total"])
        self.train_seconds = float(loop["train_seconds"])
        self.wall_before = float(loop["wall_seconds"])
        self.t_start = time.perf_counter()
        self.step_ms = list(loop["step_ms"])
        self.last = loop["last"]
        self.cost = loop["cost"]
        self.initial_loss = loop["initial_loss"]
        self.best_val_loss = float(loop["best_val_loss"])
        self.checkpoints = dict(loop["checkpoints"])

    def warmup(self) -> None:
        """One untimed estimate on a copy of the model, with its own generator, on the first
        batch in file order: pays first-call costs without touching the run's model, batch
        order or estimator randomness."""
        model = copy.deepcopy(self.model)
        x, y = next(iter(data.batches(self.splits["train"], self.cfg.data.batch_size, shuffle=False)))
        gen = torch.Generator(device=self.device).manual_seed(0)
        with _estimator_state_kept(self.estimator):
            self.estimator.estimate(model, lambda: F.cross_entropy(model(x), y), generator=gen)
        del model

    def measure(self) -> None:
        """FLOPs and peak memory by category of one step, on a copy of the model with its own
        optimizer and generator (``bpfree.measure.profile.training_step_cost``)."""
        model = copy.deepcopy(self.model)
        x, y = next(iter(data.batches(self.splits["train"], self.cfg.data.batch_size, shuffle=False)))
        with _estimator_state_kept(self.estimator):
            self.cost = self._step_cost(model, x, y)
        del model

    def _step_cost(self, model, x, y):
        return training_step_cost(
            model,
            self.estimator,
            lambda: F.cross_entropy(model(x), y),
            lambda m: make_optimizer(self.cfg.optimizer, m.parameters()),
            device=self.device,
            generator=torch.Generator(device=self.device).manual_seed(0),
        )

    def train_step(self, x: torch.Tensor, y: torch.Tensor, *more: tuple[torch.Tensor, torch.Tensor]) -> float:
        """One estimate + clip + update; writes the metrics row; returns the loss. With ``more``
        minibatches (``train.accumulate`` > 1) the estimate is the mean over all of them."""
        t = self.cfg.train
        model = self.model
        self.in_step = True
        t0 = time.perf_counter()
        model.train()
        if not more:
            out = self.estimator.estimate(model, lambda: F.cross_entropy(model(x), y), generator=self.est_gen)
        else:
            closures = [lambda x=bx, y=by: F.cross_entropy(model(x), y) for bx, by in ((x, y), *more)]
            out = estimators.accumulate(self.estimator, model, closures, generator=self.est_gen)
        norm = grad_norm(model, t.clip_grad_norm)
        lr = self.optimizer.param_groups[0]["lr"]
        why = self.divergence(out.loss, norm)
        finite = why is None
        if finite and not out.details.get("updated_in_place", False):
            self.optimizer.step()
            self.scheduler.step()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        dt = time.perf_counter() - t0
        self.step += 1
        self.train_seconds += dt
        self.step_ms.append(dt * 1e3)
        self.forward_passes_total += out.forward_passes
        self.writer.log_step(
            {
                "step": self.step,
                "epoch": self.epoch,
                "loss": out.loss,
                "lr": lr,
                "grad_norm": norm,
                "forward_passes": out.forward_passes,
                "forward_passes_total": self.forward_passes_total,
                "step_ms": dt * 1e3,
                "wall_time_s": self.train_seconds,
            }
        )
        if not finite:
            self.status, self.diverged_at = "diverged", self.step
            applied = "MeZO's in-place update was applied" if out.details.get("updated_in_place") else "the update was not applied"
            self.reason = f"{why} at step {self.step}; {applied}"
        self.in_step = False
        return out.loss

    def bound(self) -> float:
        """The divergence bound: ``train.divergence_bound``, else ``divergence_factor`` × |first loss|."""
        t = self.cfg.train
        if t.divergence_bound is not None:
            return t.divergence_bound
        if not self.initial_loss:  # no step yet, or a first loss of exactly 0: no relative bound
            return math.inf
        return t.divergence_factor * abs(self.initial_loss)

    def divergence(self, loss: float, norm: float | None, what: str = "loss") -> str | None:
        """Why the run diverged (non-finite loss or norm, or a loss above :meth:`bound`), or ``None``."""
        if not math.isfinite(loss):
            return f"{what} is {loss}"
        if norm is not None and not math.isfinite(norm):
            return f"gradient norm is {norm}"
        if self.initial_loss is None and what == "loss":
            self.initial_loss = loss
        if loss > self.bound():
            t = self.cfg.train
            source = ("train.divergence_bound" if t.divergence_bound is not None else
                      f"{t.divergence_factor:g} x the first step's loss {self.initial_loss:.4g}; train.divergence_factor")
            return f"{what} {loss:.4g} is above the divergence bound {self.bound():.4g} ({source})"
        return None

    def evaluate(self, split: str) -> None:
        """Evaluate ``split`` unless it is empty or was already evaluated at this step."""
        data_split = self.train_sample() if split == "train" else self.splits[split]
        if len(data_split) == 0 or self.last.get(split, {}).get("step") == self.step:
            return
        self.evaluating = split
        loss, acc = evaluate(self.model, data_split, self.cfg.data.eval_batch_size, between_batches=self.stop_if_signalled)
        self.evaluating = None
        self.last[split] = {"step": self.step, "loss": loss, "accuracy": acc}
        if split == "val" and self.status == "running":
            why = self.divergence(loss, None, what="validation loss")
            if why is not None:
                self.status, self.diverged_at = "diverged", self.step
                self.reason = f"{why} at step {self.step}"
            elif self.cfg.train.save_best and loss < self.best_val_loss:
                self.best_val_loss = loss
                self.writer.write_model(self.model, "best.pt")
        self.writer.log_eval(
            {
                "step": self.step,
                "epoch": self.epoch,
                "split": split,
                "loss": loss,
                "accuracy": acc,
                "wall_time_s": self.train_seconds,
            }
        )

    def train_sample(self) -> data.TensorSplit:
        """The training split, or ``train.eval_train_examples`` of its examples: a sample fixed by
        ``train.seed`` (its own generator: the data order and the estimator's draws are untouched)."""
        split, n = self.splits["train"], self.cfg.train.eval_train_examples
        if n is None or n >= len(split):
            return split
        if self._train_sample is None:
            g = torch.Generator().manual_seed(self.cfg.train.seed)
            idx = torch.randperm(len(split), generator=g)[:n].sort().values.to(split.y.device)
            self._train_sample = data.TensorSplit(split.x[idx], split.y[idx], split.collate)
        return self._train_sample

    # ------------------------------------------------------------------ the record

    def summary(self, status: str) -> dict[str, Any]:
        """The run's numbers so far (``final_*`` are the latest evaluation of each split)."""
        final = {}
        for split in ("train", "val", "test"):
            last = {} if status == "diverged" else self.last.get(split, {})  # a diverged model is no result
            final[f"final_{split}_loss"] = last.get("loss")
            final[f"final_{split}_accuracy"] = last.get("accuracy")
        steps = self.step
        return {
            "status": status,
            "reason": self.reason,
            "diverged_at_step": self.diverged_at,
            "stopped_by": self.stopped_by if status != "interrupted" else "interrupted",
            **final,
            "train_eval_examples": len(self.train_sample()) if "train" in self.last else None,
            "steps": steps,
            "epochs_completed": steps / self.steps_per_epoch,
            "train_seconds": self.train_seconds,
            "wall_seconds": self.wall_before + time.perf_counter() - self.t_start,
            "divergence_bound": self.bound() if math.isfinite(self.bound()) else None,
            "checkpoints": self.checkpoints,
            "ms_per_step": statistics.median(self.step_ms) if self.step_ms else None,
            "ms_per_step_mean": statistics.fmean(self.step_ms) if self.step_ms else None,
            "forward_passes_total": self.forward_passes_total,
            "forward_passes_per_step": self.forward_passes_total / steps if steps else None,
            **self.cost,
            "finished_at": None
            if status == "running"
            else datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }


def _groups(order, n: int):
    """The epoch's batches in groups of ``n`` (one optimizer step each); the last may be shorter."""
    group = []
    for batch in order:
        group.append(batch)
        if len(group) == n:
            yield group
            group = []
    if group:
        yield group


@contextlib.contextmanager
def _estimator_state_kept(estimator):
    """Run an untimed estimate (warm-up, measurement) without advancing the estimator's state
    (step counter, SVRG snapshot, sparse masks): saved before, restored after."""
    save = getattr(estimator, "state_dict", None)
    state = save() if save is not None else None
    try:
        yield
    finally:
        if state is not None:
            estimator.load_state_dict(state)


class _StopSignals:
    """SIGINT and SIGTERM during a run (``timeout``, SLURM, Kubernetes and ``docker stop`` send SIGTERM).

    The first signal is recorded (:attr:`received`) and the loop stops after the
    current step; a second one raises ``KeyboardInterrupt`` at once; inside
    :meth:`final_write` signals are only recorded, so the final records are
    written whole. The previous handlers come back on exit. Outside the main
    thread (where Python cannot install handlers) it does nothing.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.received: str | None = None
        self.during_final_write: list[str] = []
        self._final = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self._final:
            self.during_final_write.append(name)
        elif self.received is None:
            self.received = name
        else:
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def final_write(self) -> Iterator[None]:
        """Context in which signals are recorded and ignored."""
        self._final = True
        try:
            yield
        finally:
            self._final = False

    def __enter__(self) -> "_StopSignals":
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def _progress_bar(cfg: Config, steps_per_epoch: int, initial: int = 0):
    """tqdm bar over steps with loss and ETA; disabled unless stderr is a TTY and train.progress."""
    from tqdm import tqdm

    t = cfg.train
    caps = [n for n in (t.max_steps, t.epochs * steps_per_epoch if t.epochs else None) if n is not None]
    enabled = t.progress and sys.stderr.isatty()
    return tqdm(
        total=min(caps) if caps else None,
        desc=cfg.run.name,
        unit="step",
        disable=not enabled,
        initial=initial,
        dynamic_ncols=True,
        leave=False,
    )
