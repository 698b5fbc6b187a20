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
* **Divergence**: a non-finite loss or gradient norm stops the run before the
  update is applied (status ``diverged``, ``diverged_at_step``, ``reason``);
  its metrics row is still written.
* **Ctrl-C** stops the run with status ``interrupted``; everything written so
  far stays, and ``summary.json`` is valid (no further evaluation is run).
* MeZO in update mode (``estimator.lr`` set) applies its own SGD step and
  writes no ``p.grad``; the optimizer step and schedule are then skipped.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import platform
import statistics
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import nn

import bpfree
from bpfree import config as config_lib
from bpfree import data, estimators, models, runs
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
def evaluate(model: nn.Module, split: data.TensorSplit, batch_size: int) -> tuple[float, float]:
    """``(mean cross-entropy, accuracy)`` of ``model`` on ``split``, in eval mode.

    Means are over targets: one per example for classification, one per real
    token for a language model's next-token targets (−100, padding, is ignored).
    """
    was_training = model.training
    model.eval()
    loss, correct, count = 0.0, 0, 0
    for x, y in data.batches(split, batch_size, shuffle=False):
        logits = model(x)
        loss += float(F.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(dim=1) == y).sum())
        count += int((y != -100).sum())
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
        bpfree.data.DatasetNotFoundError: the data set's files are missing.
        bpfree.runs.RunExistsError: ``out_dir`` holds a run and ``overwrite`` is false.
        Exception: whatever the step raised (status ``failed``, traceback in
            ``error.txt``); a ``KeyboardInterrupt`` is not re-raised.
    """
    cfg = config_lib.resolve(config)
    t = cfg.train
    device = torch.device(t.device)
    try:
        splits = data.load(
            cfg.data.name,
            val_fraction=cfg.data.val_fraction,
            seed=cfg.data.seed,
            root=cfg.data.root,
            download=cfg.data.download,
            **cfg.data.options,
        )
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
    steps_per_epoch = len(data.batches(on_device["train"], cfg.data.batch_size, shuffle=False))

    static = {
        "label": label or cfg.run.name,
        "estimator": {"name": cfg.estimator.name, "options": cfg.estimator.options},
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
        "bpfree_version": bpfree.__version__,
        "python_version": platform.python_version(),
        "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    header = (
        f"Fully resolved bpfree config of run {static['label']!r} ({static['started_at']}).\n"
        f"Re-run: bpfree train config.toml --out NEW_DIR"
    )
    with runs.RunWriter(out_dir, config_lib.to_toml(cfg, header=header), overwrite=overwrite) as writer:
        loop = _Loop(cfg, model, estimator, optimizer, scheduler, on_device, data_gen, est_gen, writer)
        writer.write_summary({**static, **loop.summary("running")})
        try:
            loop.train()
        except KeyboardInterrupt:
            loop.status = "interrupted"
        except BaseException as e:
            loop.status, loop.reason = "failed", f"{type(e).__name__}: {e}"
            writer.write_error(traceback.format_exc())
            writer.write_summary({**static, **loop.summary("failed")})
            raise
        summary = {**static, **loop.summary(loop.status)}
        if t.save_model:
            writer.write_model(model)
        writer.write_summary(summary)
    return runs.json_safe(summary)


class _Loop:
    """The state of one run: step and time counters, latest evaluations, status."""

    def __init__(self, cfg, model, estimator, optimizer, scheduler, splits, data_gen, est_gen, writer):
        self.cfg, self.model, self.estimator = cfg, model, estimator
        self.optimizer, self.scheduler = optimizer, scheduler
        self.splits = splits  # {"train", "val", "test"}: TensorSplit on the model's device
        self.steps_per_epoch = len(data.batches(splits["train"], cfg.data.batch_size, shuffle=False))
        self.data_gen, self.est_gen, self.writer = data_gen, est_gen, writer
        self.device = next(model.parameters()).device
        self.step, self.epoch = 0, 0
        self.forward_passes_total, self.train_seconds = 0.0, 0.0
        self.step_ms: list[float] = []
        self.last: dict[str, dict[str, float]] = {}  # split -> {"step", "loss", "accuracy"}
        self.status, self.reason, self.diverged_at, self.stopped_by = "running", None, None, None
        self.cost: dict[str, Any] = {}  # FLOPs and memory of one step (measure())
        self.t_start = time.perf_counter()

    # ------------------------------------------------------------------ the loop

    def train(self) -> None:
        t = self.cfg.train
        if t.warmup:
            self.warmup()
        if t.measure:
            self.measure()
        self.evaluate("val")
        bar = _progress_bar(self.cfg, self.steps_per_epoch)
        try:
            while self.stopped_by is None:
                if t.epochs is not None and self.epoch >= t.epochs:
                    self.stopped_by = "epochs"
                    break
                self.epoch += 1
                order = data.batches(self.splits["train"], self.cfg.data.batch_size, generator=self.data_gen)
                for x, y in order:
                    loss = self.train_step(x, y)
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.4g}", epoch=self.epoch, refresh=False)
                    if self.status == "diverged":
                        self.stopped_by = "diverged"
                        break
                    if t.eval_every_steps and self.step % t.eval_every_steps == 0:
                        self.evaluate("val")
                    if t.max_steps is not None and self.step >= t.max_steps:
                        self.stopped_by = "max_steps"
                    elif t.max_seconds is not None and self.train_seconds >= t.max_seconds:
                        self.stopped_by = "max_seconds"
                    if self.stopped_by:
                        break
                self.evaluate("val")  # end of epoch (or of the run)
        finally:
            bar.close()
        self.evaluate("train")
        self.evaluate("test")
        if self.status == "running":
            self.status = "completed"

    def warmup(self) -> None:
        """One untimed estimate on a copy of the model, with its own generator, on the first
        batch in file order: pays first-call costs without touching the run's model, batch
        order or estimator randomness."""
        model = copy.deepcopy(self.model)
        x, y = next(iter(data.batches(self.splits["train"], self.cfg.data.batch_size, shuffle=False)))
        gen = torch.Generator(device=self.device).manual_seed(0)
        self.estimator.estimate(model, lambda: F.cross_entropy(model(x), y), generator=gen)
        del model

    def measure(self) -> None:
        """FLOPs and peak memory by category of one step, on a copy of the model with its own
        optimizer and generator (``bpfree.measure.profile.training_step_cost``)."""
        model = copy.deepcopy(self.model)
        x, y = next(iter(data.batches(self.splits["train"], self.cfg.data.batch_size, shuffle=False)))
        self.cost = training_step_cost(
            model,
            self.estimator,
            lambda: F.cross_entropy(model(x), y),
            lambda m: make_optimizer(self.cfg.optimizer, m.parameters()),
            device=self.device,
            generator=torch.Generator(device=self.device).manual_seed(0),
        )
        del model

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """One estimate + clip + update; writes the metrics row; returns the loss."""
        t = self.cfg.train
        model = self.model
        t0 = time.perf_counter()
        model.train()
        out = self.estimator.estimate(model, lambda: F.cross_entropy(model(x), y), generator=self.est_gen)
        norm = grad_norm(model, t.clip_grad_norm)
        lr = self.optimizer.param_groups[0]["lr"]
        finite = math.isfinite(out.loss) and (norm is None or math.isfinite(norm))
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
            what = f"loss is {out.loss}" if not math.isfinite(out.loss) else f"gradient norm is {norm}"
            self.reason = f"{what} at step {self.step}; the update was not applied"
        return out.loss

    def evaluate(self, split: str) -> None:
        """Evaluate ``split`` unless it is empty or was already evaluated at this step."""
        data_split = self.splits[split]
        if len(data_split) == 0 or self.last.get(split, {}).get("step") == self.step:
            return
        loss, acc = evaluate(self.model, data_split, self.cfg.data.eval_batch_size)
        self.last[split] = {"step": self.step, "loss": loss, "accuracy": acc}
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

    # ------------------------------------------------------------------ the record

    def summary(self, status: str) -> dict[str, Any]:
        """The run's numbers so far (``final_*`` are the latest evaluation of each split)."""
        final = {}
        for split in ("train", "val", "test"):
            last = self.last.get(split, {})
            final[f"final_{split}_loss"] = last.get("loss")
            final[f"final_{split}_accuracy"] = last.get("accuracy")
        steps = self.step
        return {
            "status": status,
            "reason": self.reason,
            "diverged_at_step": self.diverged_at,
            "stopped_by": self.stopped_by if status != "interrupted" else "interrupted",
            **final,
            "steps": steps,
            "epochs_completed": steps / self.steps_per_epoch,
            "train_seconds": self.train_seconds,
            "wall_seconds": time.perf_counter() - self.t_start,
            "ms_per_step": statistics.median(self.step_ms) if self.step_ms else None,
            "ms_per_step_mean": statistics.fmean(self.step_ms) if self.step_ms else None,
            "forward_passes_total": self.forward_passes_total,
            "forward_passes_per_step": self.forward_passes_total / steps if steps else None,
            **self.cost,
            "finished_at": None
            if status == "running"
            else datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }


def _progress_bar(cfg: Config, steps_per_epoch: int):
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
        dynamic_ncols=True,
        leave=False,
    )
