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

One module per concern, everything public re-exported here:

==============  ==================================================================
``study``       the study file, presets, the search space, the configs of trials
``storage``     optuna's storage, trial claiming and recovery, heartbeats, the
                sweep directory and its worker lock
``runner``      :func:`run` / :func:`report_only`: search, then finals, trial by trial
``results``     ``sweep.json`` from the storage: per method trials, best, finals
``report``      the report: the study's own module, or the generic one
==============  ==================================================================

**The study-module hook** (a plugin point): ``[study] report = "pkg.module"``
names an importable module with ``build_report(results, out) -> {name: path}``,
called instead of the generic report with the ``sweep.json`` results; it builds
a ``bpfree.report.document.Document`` and may reuse :func:`method_blocks`,
:func:`mean_curve` and :func:`pm` (``bpfree.studies.rike2024`` is one).
"""

from __future__ import annotations

from bpfree.studies.sweep.report import (REPORT_NOTES, build_report, final_curves_png, memory_runs, method_blocks,
                                         report_document, results_table, write_report)
from bpfree.studies.sweep.results import collect, curves, mean_curve, pm, steps_to_reach
from bpfree.studies.sweep.runner import SUMMARY_KEYS, Progress, report_only, run
from bpfree.studies.sweep.storage import (SWEEP_MARK, STORAGE_FILES, WORKER, best_trial, claim_lock, clear,
                                          close_storage, creation_lock, default_storage, open_storage, prepare_out, recover,
                                          worker_lock)
from bpfree.studies.sweep.study import (BUDGET_KEYS, METHOD_KEYS, OBJECTIVES, SAMPLERS, STUDY_KEYS, Method, Study,
                                        _decode, _encode, apply_preset, budget_overrides, count_step_flops,
                                        deep_merge, from_dict, grid_points, load_study, method_config, parse_budget,
                                        shipped_studies, suggest)
from bpfree.studies.sweep.storage import _claim_waiting  # noqa: F401  (used by the concurrency tests)
from bpfree.config import ConfigError  # noqa: F401  (sweep.ConfigError, as before the split)

__all__ = [
    "BUDGET_KEYS", "METHOD_KEYS", "OBJECTIVES", "REPORT_NOTES", "SAMPLERS", "STORAGE_FILES", "STUDY_KEYS",
    "SUMMARY_KEYS", "SWEEP_MARK", "WORKER", "Method", "Progress", "Study", "apply_preset", "best_trial", "budget_overrides",
    "build_report", "claim_lock", "clear", "close_storage", "collect", "count_step_flops", "creation_lock", "curves", "deep_merge",
    "default_storage", "final_curves_png", "from_dict", "grid_points", "load_study", "mean_curve", "memory_runs",
    "method_blocks", "method_config", "open_storage", "parse_budget", "pm", "prepare_out", "recover",
    "report_document", "report_only", "results_table", "run", "shipped_studies", "steps_to_reach", "suggest",
    "worker_lock", "write_report",
]
