"""``bpfree measure``: one table of step costs and gradient quality on a task.

For a task (data set + model, from a config or ``--task``) and a list of
estimator specs (``NAME[:KEY=VALUE]...``, see ``bpfree.studies.compare``),
one batch of the training split is drawn (seeded) and every estimator's step
is measured side by side with :func:`bpfree.measure.profile.profile_estimators`:
ms/step (interleaved median), FLOPs/step, forward passes, peak MB by category
and the cosine of its estimate to the exact gradient. Written to ``out``:
``measure.md``, ``measure.json`` and ``measure.csv``.
"""

from __future__ import annotations

import dataclasses
import csv
import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from bpfree import config as config_lib
from bpfree import data, models
from bpfree.config import Config, ConfigError
from bpfree.measure.profile import add_ratios, markdown_table, profile_estimators
from bpfree.studies.compare import Spec

COLUMNS = [
    ("label", "estimator", ""),
    ("ms_per_step", "ms/step", ".2f"),
    ("time_ratio", "time / first", ".2f"),
    ("flops_per_step", "FLOPs/step", ".3g"),
    ("flops_forward_equivalents", "FLOPs / fwd", ".2f"),
    ("forward_passes", "fwd passes", ".3g"),
    ("peak_mb", "peak MB", ".1f"),
    ("peak_over_inference", "MB / inference", ".2f"),
    ("mb_parameters", "params MB", ".1f"),
    ("mb_gradients", "grads MB", ".1f"),
    ("mb_optimizer_state", "opt MB", ".1f"),
    ("mb_activations", "act MB", ".1f"),
    ("mb_directions", "dirs MB", ".1f"),
    ("mb_temporaries", "temp MB", ".1f"),
    ("cosine_mean", "cos to ∇ (mean)", ".4g"),
    ("cosine_std", "cos std", ".2g"),
]


def run_measure(
    base: Config,
    specs: list[Spec],
    out: str | Path,
    *,
    batch: int | None = None,
    repeats: int = 20,
    cosine_draws: int = 10,
) -> list[dict[str, Any]]:
    """Measure every spec on one batch of ``base``'s task; write and return the rows.

    Ratios (``time_ratio``, ...) are relative to the first spec.
    """
    for s in specs:
        other = [k for k in s.overrides if not k.startswith("estimator.")]
        if s.lr is not None or other:
            raise ConfigError(
                f"estimator spec {s.text!r}: `measure` takes estimator options only; `lr` in a spec is the "
                f"optimizer's learning rate (MeZO's own update-mode lr is `mezo:estimator.lr=1e-6`)"
            )
    if all(getattr(base.train, k) is None for k in ("epochs", "max_steps", "max_seconds")):
        base = config_lib.updated(base, {"train.max_steps": 1}, origin="measure")  # no training: any budget
    cfg = config_lib.resolve(base)
    splits = data.load(cfg.data.name, val_fraction=cfg.data.val_fraction, seed=cfg.data.seed, root=cfg.data.root,
                       download=cfg.data.download, **cfg.data.options)
    model = models.make(cfg.model.name, input_shape=splits.input_shape, num_classes=splits.num_classes,
                        seed=cfg.train.seed, **cfg.model.options).to(cfg.train.device)
    size = batch if batch is not None else cfg.data.batch_size  # 0 is an error below, not the default
    if size < 1 or repeats < 1 or cosine_draws < 1:
        raise ConfigError(f"batch, repeats and cosine_draws must be >= 1, got {size}, {repeats}, {cosine_draws}")
    x, y = next(iter(data.batches(splits.train, size, generator=torch.Generator().manual_seed(cfg.train.seed))))
    x, y = x.to(cfg.train.device), y.to(cfg.train.device)

    def closure() -> torch.Tensor:
        return F.cross_entropy(model(x), y)

    def options(s: Spec) -> dict[str, Any]:
        return {**s.options, **{k.removeprefix("estimator."): v for k, v in s.overrides.items()}}

    rows = profile_estimators([dataclasses.replace(s, options=options(s)) for s in specs], model, closure,
                              repeats=repeats, cosine_draws=cosine_draws, device=str(cfg.train.device),
                              seed=cfg.train.seed)
    add_ratios(rows, rows[0]["label"])
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    head = (f"# Step cost and gradient quality: {cfg.data.name} / {cfg.model.name}\n\n"
            f"- Data: {splits.source}\n- Model: {models.count_parameters(model):,} parameters, options "
            f"{cfg.model.options}\n- Batch {size}; {repeats} interleaved repeats after warm-up (median ms); "
            f"cosine over {cosine_draws} draws; device {cfg.train.device}, torch {torch.__version__}\n"
            f"- Ratios are to the first estimator ({rows[0]['label']}). Memory: peak live tensor bytes of one "
            f"estimate from p.grad = None, by category at the peak.\n\n")
    (out / "measure.md").write_text(head + markdown_table(rows, COLUMNS) + "\n")
    (out / "measure.json").write_text(json.dumps({"config": config_lib.to_dict(cfg), "rows": rows}, indent=2,
                                                 default=str))
    keys = sorted({k for r in rows for k in r})
    with open(out / "measure.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows({k: (json.dumps(v) if isinstance(v, dict) else v) for k, v in r.items()} for r in rows)
    return rows
