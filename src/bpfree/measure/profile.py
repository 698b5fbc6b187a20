"""One table per task: every estimator's step measured the same way.

For each estimator (a name and options), on the same model and batch:
ms/step (interleaved median, ``timing``), FLOPs/step and forward-pass
equivalents (``flops``), peak memory by category (``memory``) and the cosine
of its estimate to the exact gradient (mean ± std over draws). A "step" is one
``estimate`` call (the gradient computation); the optimizer update is common
to all methods and measured separately when asked (``with_optimizer``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from bpfree import estimators, schema
from bpfree.estimators.base import Closure
from bpfree.measure import flops as flops_mod
from bpfree.measure import memory as memory_mod
from bpfree.measure import quality
from bpfree.measure import timing as timing_mod


@dataclass(frozen=True)
class EstimatorSpec:
    """A labelled estimator configuration: the one estimator-spec type (``bpfree compare``'s
    parsed ``NAME[:KEY=VALUE]...`` specs are ``bpfree.studies.compare.Spec``, a subclass that
    adds the spec's learning rate and config overrides)."""

    label: str
    name: str
    options: dict[str, Any]

    def make(self) -> estimators.Estimator:
        return estimators.make(self.name, **self.options)


def gradient_writing_twin(est: estimators.Estimator) -> estimators.Estimator:
    """The estimator itself, or — for one that applies its update in place
    instead of writing ``p.grad`` (MeZO with ``lr``) — its gradient-writing
    twin, which computes the same estimate."""
    if getattr(est, "lr", None) is not None and dataclasses.is_dataclass(est):
        return dataclasses.replace(est, lr=None, weight_decay=0.0)
    return est


def profile_estimators(
    specs: list[EstimatorSpec],
    model: nn.Module,
    closure: Closure,
    *,
    repeats: int = 20,
    warmup: int = 3,
    cosine_draws: int = 10,
    measure_memory: bool = True,
    device: str = "cpu",
    seed: int = 0,
    with_optimizer: Callable[[], torch.optim.Optimizer] | None = None,
) -> list[dict[str, Any]]:
    """Measure each spec on ``model``/``closure``; rows in the order given.

    Timing is interleaved across all specs after a warm-up. Memory is taken
    with ``p.grad`` cleared first, so a method that writes gradients pays for
    them, as in a training step after ``zero_grad(set_to_none=True)``.
    """
    made = {s.label: s.make() for s in specs}
    gens = {s.label: torch.Generator(device=device).manual_seed(seed) for s in specs}
    optimizers = {s.label: with_optimizer() for s in specs} if with_optimizer else {}

    def step_fn(label: str) -> Callable[[], object]:
        est, gen = made[label], gens[label]
        opt = optimizers.get(label)

        def step() -> None:
            est.estimate(model, closure, generator=gen)
            if opt is not None:
                opt.step()

        return step

    steps = {label: step_fn(label) for label in made}
    times = timing_mod.time_interleaved(steps, warmup=warmup, repeats=repeats, device=device)
    forward = flops_mod.forward_flops(closure)
    for p in model.parameters():  # inference holds no gradients
        p.grad = None
    with torch.no_grad():
        inference = memory_mod.measure_step_memory(closure, model=model, device=device) if measure_memory else None
    rows = []
    for spec in specs:
        est = made[spec.label]
        count = flops_mod.count_flops(lambda est=est: est.estimate(model, closure, generator=gens[spec.label]))
        out = est.estimate(model, closure, generator=gens[spec.label])
        q = quality.estimator_quality(gradient_writing_twin(est), model, closure, samples=max(2, cosine_draws),
                                      generator=torch.Generator(device=device).manual_seed(seed + 1), per_layer=False)
        row: dict[str, Any] = {
            "label": spec.label,
            "estimator": spec.name,
            "options": dict(spec.options),
            "ms_per_step": times[spec.label].median_ms,
            "ms_q25": times[spec.label].iqr_ms[0],
            "ms_q75": times[spec.label].iqr_ms[1],
            "flops_per_step": count,
            "flops_forward_equivalents": count / forward if forward else math.nan,
            "forward_passes": out.forward_passes,
            "cosine_mean": q.cosine_mean,
            "cosine_std": q.cosine_std,
        }
        if measure_memory:
            for p in model.parameters():
                p.grad = None
            mem = memory_mod.measure_step_memory(steps[spec.label], model=model, optimizer=optimizers.get(spec.label),
                                                 device=device)
            row["peak_mb"] = mem.peak_mb
            row["peak_over_inference"] = mem.peak_bytes / inference.peak_bytes if inference else math.nan
            row.update({f"mb_{k}": v / 2**20 for k, v in mem.by_category.items()})
        rows.append(row)
    if inference is not None:
        for row in rows:
            row["inference_peak_mb"] = inference.peak_mb
    return rows


def add_ratios(rows: list[dict[str, Any]], baseline_label: str) -> list[dict[str, Any]]:
    """Add ``time_ratio``, ``flops_ratio`` and ``memory_ratio`` (each row over the
    baseline row) to every row, in place; return the rows."""
    base = next(r for r in rows if r["label"] == baseline_label)
    for r in rows:
        r["time_ratio"] = r["ms_per_step"] / base["ms_per_step"]
        r["flops_ratio"] = r["flops_per_step"] / base["flops_per_step"]
        r["memory_ratio"] = r["peak_mb"] / base["peak_mb"] if "peak_mb" in r and "peak_mb" in base else math.nan
    return rows


def markdown_table(rows: list[dict[str, Any]], columns: list[tuple[str, str, str]]) -> str:
    """A markdown table; ``columns`` are (key, header, format spec)."""
    head = "| " + " | ".join(h for _, h, _ in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    lines = [head, sep]
    for r in rows:
        cells = []
        for key, _, fmt in columns:
            v = r.get(key, "")
            cells.append(format(v, fmt) if isinstance(v, (int, float)) and fmt else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def training_step_cost(
    model: nn.Module,
    estimator: estimators.Estimator,
    closure: Closure,
    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer] | None = None,
    *,
    device: str | torch.device = "cpu",
    generator: torch.Generator | None = None,
) -> dict[str, Any]:
    """FLOPs and peak memory by category of one training step, for run records.

    ``model`` is used as given (pass a copy to keep the real one untouched).
    One untracked step (``estimate`` + ``optimizer.step()``) runs first so that
    the optimizer's state exists (as in every step after the first) and lazy
    initialisation is not counted. FLOPs count the estimate (the optimizer's
    elementwise update is not a matmul). Memory starts from ``p.grad = None``
    (``zero_grad(set_to_none=True)``) and is measured twice:

    * **estimate** — one ``estimate`` call alone, the optimizer's state left
      out: what the gradient method costs (parameters, gradients, saved
      activations, directions, temporaries);
    * **step** — ``estimate`` + ``optimizer.step()`` with the optimizer's state
      counted: what a training step costs (``peak_memory_mb``).

    A method that updates in place (MeZO with ``lr``) skips the optimizer, so
    its two peaks are the same computation.
    """
    gen = generator if generator is not None else torch.Generator(device=device).manual_seed(0)
    optimizer = make_optimizer(model) if make_optimizer is not None else None

    def estimate() -> Any:
        return estimator.estimate(model, closure, generator=gen)

    def step() -> None:
        out = estimate()
        if optimizer is not None and not out.details.get("updated_in_place", False):
            optimizer.step()

    step()
    forward = flops_mod.forward_flops(closure)
    count = flops_mod.count_flops(estimate)
    for p in model.parameters():
        p.grad = None
    with torch.no_grad():
        inference = memory_mod.measure_step_memory(closure, model=model, device=device)
    est = memory_mod.measure_step_memory(estimate, model=model, device=device)
    for p in model.parameters():
        p.grad = None
    mem = memory_mod.measure_step_memory(step, model=model, optimizer=optimizer, device=device)
    ratio = lambda r: r.peak_bytes / inference.peak_bytes if inference.peak_bytes else None  # noqa: E731
    cost = {
        "flops_per_step": count,
        "flops_forward": forward,
        "flops_forward_equivalents": count / forward if forward else None,
        "peak_memory_mb": mem.peak_mb,
        "memory_by_category_mb": {k: v / 2**20 for k, v in mem.by_category.items()},
        "peak_over_inference": ratio(mem),
        "estimate_peak_memory_mb": est.peak_mb,
        "estimate_memory_by_category_mb": {k: v / 2**20 for k, v in est.by_category.items()},
        "estimate_over_inference": ratio(est),
        "inference_peak_mb": inference.peak_mb,
        "parameters_mb": sum(t.numel() * t.element_size() for t in model.parameters()) / 2**20,
        "memory_resolution_mb": max(est.resolution_mb, mem.resolution_mb),
        "memory_method": mem.method,
    }
    schema.check(cost, where="training_step_cost")  # these keys go into summary.json (bpfree.schema.COST_KEYS)
    return cost
