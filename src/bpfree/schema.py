"""The run record, declared once: the columns of ``metrics.csv`` / ``eval.csv`` and the keys of
``summary.json``, with their types, units and a ``schema_version``.

Every writer of a summary goes through :func:`summary_record` (``bpfree.train``,
``bpfree.runs.RunWriter``; ``bpfree.measure.profile.training_step_cost`` returns the
:data:`COST_KEYS`), and every reader reads through :class:`Summary`, a ``dict`` whose
``get`` / ``[]`` refuse a key that is not declared here: a renamed key fails loudly at the
reader instead of reading ``None`` forever. Free-form *contents* stay free: the
``estimator`` block holds the estimator's own description (options, fallback reasons,
anything nested) and only its being a table is checked.

Versions (``schema_version`` in ``summary.json``):

* **1** — records written before the schema was declared: no ``schema_version``,
  ``bpfree_commit`` / ``bpfree_dirty`` absent. They load as they are (absent keys
  read as ``None``).
* **2** — this version: ``schema_version``, ``bpfree_commit`` and ``bpfree_dirty``
  added (``bpfree.provenance``).

A record with a version newer than :data:`SCHEMA_VERSION` is refused with a one-line
error naming both versions (:class:`SchemaError`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

SCHEMA_VERSION = 2
READABLE_VERSIONS = (1, 2)

# ------------------------------------------------------------------ the CSV files

METRICS_COLUMNS = (
    "step",
    "epoch",
    "loss",
    "lr",
    "grad_norm",
    "forward_passes",
    "forward_passes_total",
    "step_ms",
    "wall_time_s",
)
EVAL_COLUMNS = ("step", "epoch", "split", "loss", "accuracy", "wall_time_s")

STATUSES = ("running", "completed", "diverged", "interrupted", "failed", "killed")


class SchemaError(ValueError):
    """A ``summary.json`` this version of bpfree cannot read, or a writer breaking the schema."""


@dataclass(frozen=True)
class Field:
    """One key of ``summary.json``: its JSON types (``None`` is always allowed: unknown, not
    measured, or not finite), its unit and what it means."""

    name: str
    types: tuple[type, ...]
    unit: str
    doc: str


_NUM = (int, float)
_F = Field

# The keys of summary.json, in the order a reader meets them. Units: "" for counts and
# labels, else what the number is measured in.
SUMMARY_FIELDS: tuple[Field, ...] = (
    _F("schema_version", (int,), "", "the version of this schema the record was written with"),
    _F("bpfree_version", (str,), "", "bpfree.__version__ of the writer"),
    _F("bpfree_commit", (str,), "", "git commit of the bpfree checkout that wrote it, or 'unknown'"),
    _F("bpfree_dirty", (bool,), "", "whether that checkout had uncommitted changes to tracked files"),
    _F("status", (str,), "", f"one of {', '.join(STATUSES)}"),
    _F("reason", (str,), "", "why the run stopped early (diverged, failed, killed), in words"),
    _F("label", (str,), "", "the run's name in reports (the estimator spec in a comparison)"),
    _F("estimator", (dict,), "", "the estimator's description: name, options and anything it adds (free-form)"),
    _F("optimizer", (dict,), "", "the resolved [optimizer] table (name, lr, momentum, betas, ...)"),
    _F("schedule_decay", _NUM, "1/step", "exponential learning-rate decay lr_t = lr·exp(-decay·t)"),
    _F("clip_grad_norm", _NUM, "", "gradient-norm clip threshold"),
    _F("budget", (dict,), "", "{epochs, max_steps, max_seconds} as configured"),
    _F("data", (dict,), "", "the data set: name, batch_size, source, sizes, input_shape, num_classes, ..."),
    _F("data_source", (str,), "", "where the data came from (files, generator)"),
    _F("model", (dict,), "", "name, options, num_parameters (trainable), num_parameters_total"),
    _F("steps_per_epoch", (int,), "steps", "optimizer steps in one epoch"),
    _F("seed", (int,), "", "train.seed"),
    _F("device", (str,), "", "torch device of the run"),
    _F("device_name", (str,), "", "the device's name (GPU model, or the CPU)"),
    _F("torch_version", (str,), "", "torch.__version__"),
    _F("python_version", (str,), "", "platform.python_version()"),
    _F("started_at", (str,), "ISO 8601 UTC", "when the run started"),
    _F("resumed_at", (list,), "ISO 8601 UTC", "when it was resumed, once per resume"),
    _F("finished_at", (str,), "ISO 8601 UTC", "when it ended (None while running)"),
    _F("diverged_at_step", (int,), "step", "the step whose loss or gradient was non-finite or past the bound"),
    _F("stopped_by", (str,), "", "epochs, max_steps, max_seconds, diverged or interrupted"),
    _F("final_train_loss", _NUM, "nats", "mean cross-entropy on the training split at the last evaluation"),
    _F("final_train_accuracy", _NUM, "fraction", "accuracy on the training split at the last evaluation"),
    _F("final_val_loss", _NUM, "nats", "mean cross-entropy on the validation split at the last evaluation"),
    _F("final_val_accuracy", _NUM, "fraction", "accuracy on the validation split at the last evaluation"),
    _F("final_test_loss", _NUM, "nats", "mean cross-entropy on the test split at the last evaluation"),
    _F("final_test_accuracy", _NUM, "fraction", "accuracy on the test split at the last evaluation"),
    _F("train_eval_examples", (int,), "examples", "how many training examples the final_train_* evaluation used (train.eval_train_examples)"),
    _F("steps", (int,), "steps", "optimizer steps taken"),
    _F("epochs_completed", _NUM, "epochs", "steps / steps_per_epoch"),
    _F("train_seconds", _NUM, "s", "training wall time, evaluation and checkpoints excluded"),
    _F("wall_seconds", _NUM, "s", "wall time of the whole run"),
    _F("divergence_bound", _NUM, "nats", "loss above which the run counts as diverged"),
    _F("checkpoints", (dict,), "", "{count, seconds_total (s), seconds_max (s), bytes}"),
    _F("ms_per_step", _NUM, "ms", "median wall time of one training step"),
    _F("ms_per_step_mean", _NUM, "ms", "mean wall time of one training step"),
    _F("forward_passes_total", _NUM, "forward passes", "the estimator's cost, summed over the steps"),
    _F("forward_passes_per_step", _NUM, "forward passes", "forward_passes_total / steps"),
    # the cost of one step (train.measure; bpfree.measure.profile.training_step_cost)
    _F("flops_per_step", _NUM, "FLOP", "FLOPs of one estimate (FlopCounterMode)"),
    _F("flops_forward", _NUM, "FLOP", "FLOPs of one forward pass"),
    _F("flops_forward_equivalents", _NUM, "forward passes", "flops_per_step / flops_forward"),
    _F("peak_memory_mb", _NUM, "MiB", "peak live tensor memory of one training step (estimate + optimizer)"),
    _F("memory_by_category_mb", (dict,), "MiB", "that peak by category (parameters, gradients, ...)"),
    _F("peak_over_inference", _NUM, "ratio", "peak_memory_mb / inference_peak_mb"),
    _F("estimate_peak_memory_mb", _NUM, "MiB", "peak live tensor memory of one estimate alone"),
    _F("estimate_memory_by_category_mb", (dict,), "MiB", "that peak by category"),
    _F("estimate_over_inference", _NUM, "ratio", "estimate_peak_memory_mb / inference_peak_mb"),
    _F("inference_peak_mb", _NUM, "MiB", "peak of one no-grad forward"),
    _F("parameters_mb", _NUM, "MiB", "bytes of the parameters"),
    _F("memory_resolution_mb", _NUM, "MiB", "the memory measurement's resolution"),
    _F("memory_method", (str,), "", "how memory was measured (tensor tracking, CUDA allocator)"),
)

FIELDS: dict[str, Field] = {f.name: f for f in SUMMARY_FIELDS}
SUMMARY_KEYS: tuple[str, ...] = tuple(FIELDS)
COST_KEYS: tuple[str, ...] = SUMMARY_KEYS[SUMMARY_KEYS.index("flops_per_step"):]
PROVENANCE_KEYS = ("bpfree_version", "bpfree_commit", "bpfree_dirty")


def _undeclared(key: str) -> KeyError:
    import difflib

    close = difflib.get_close_matches(str(key), SUMMARY_KEYS, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return KeyError(f"{key!r} is not a declared summary.json key{hint}; the keys are bpfree.schema.SUMMARY_KEYS")


class Summary(dict):
    """A ``summary.json`` as read: a plain ``dict`` (JSON-serialisable, ``**``-unpackable) whose
    ``get(key)`` and ``[key]`` raise ``KeyError`` for a key the schema does not declare. A
    declared key the record lacks (an older version, a run that never measured) reads as
    ``None`` from ``get``, as from any dict."""

    def get(self, key: str, default: Any = None) -> Any:
        if key not in FIELDS:
            raise _undeclared(key)
        return super().get(key, default)

    def __getitem__(self, key: str) -> Any:
        if key not in FIELDS:
            raise _undeclared(key)
        return super().__getitem__(key)

    @property
    def version(self) -> int:
        """The record's schema version (1: written before the schema had one)."""
        return int(super().get("schema_version") or 1)


def check(record: Mapping[str, Any], *, where: str = "summary.json") -> None:
    """``SchemaError`` naming the key when ``record`` has an undeclared key or a value of the
    wrong type (``None`` and non-finite floats are allowed everywhere: "not known")."""
    for key, value in record.items():
        field = FIELDS.get(key)
        if field is None:
            raise SchemaError(f"{where}: key {key!r} is not declared in bpfree.schema.SUMMARY_FIELDS; declare it "
                              "there (with its type and unit) before writing it")
        if value is None or (isinstance(value, float) and not math.isfinite(value)):
            continue
        ok = isinstance(value, field.types) and not (isinstance(value, bool) and bool not in field.types)
        if not ok:
            want = " or ".join(t.__name__ for t in field.types)
            raise SchemaError(f"{where}: {key} must be {want}, got {type(value).__name__} {value!r}")


def summary_record(values: Mapping[str, Any]) -> Summary:
    """The ``summary.json`` record of ``values``: checked (:func:`check`), stamped with
    :data:`SCHEMA_VERSION` and the code that wrote it (``bpfree.provenance``)."""
    from bpfree import provenance

    record = {"schema_version": SCHEMA_VERSION, **provenance.code_version(), **values}
    check(record)
    return Summary(record)


def read_summary(raw: Any, *, where: str = "summary.json") -> Summary:
    """A parsed ``summary.json`` as a :class:`Summary`, or ``SchemaError`` (one line) for a record
    that is not a table or whose ``schema_version`` this bpfree cannot read."""
    if not isinstance(raw, Mapping):
        raise SchemaError(f"{where} is not a JSON object (got {type(raw).__name__}); it is not a bpfree run record")
    version = raw.get("schema_version", 1)
    if version not in READABLE_VERSIONS:
        raise SchemaError(f"{where} has schema_version {version!r}; this bpfree reads versions "
                          f"{', '.join(map(str, READABLE_VERSIONS))}: upgrade bpfree to read it")
    return Summary(raw)


def subset(summary: Mapping[str, Any], keys: Iterable[str]) -> dict[str, Any]:
    """``{key: summary's value}`` for declared ``keys`` (absent: ``None``), e.g. what a sweep
    stores per trial."""
    out = {}
    for key in keys:
        if key not in FIELDS:
            raise _undeclared(key)
        out[key] = summary.get(key)
    return out


def describe() -> str:
    """The schema as a markdown table (key, type, unit, meaning), for the docs."""
    rows = ["| key | type | unit | meaning |", "| --- | --- | --- | --- |"]
    for f in SUMMARY_FIELDS:
        rows.append(f"| `{f.name}` | {' or '.join(t.__name__ for t in f.types)} | {f.unit} | {f.doc} |")
    return "\n".join(rows)


__all__ = ["COST_KEYS", "EVAL_COLUMNS", "FIELDS", "METRICS_COLUMNS", "SCHEMA_VERSION", "STATUSES", "SUMMARY_FIELDS",
           "SUMMARY_KEYS", "SchemaError", "Summary", "check", "describe", "read_summary", "subset", "summary_record"]
