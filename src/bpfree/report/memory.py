"""The memory view of a report: two peaks per run, by category, the arithmetic beside them.

Every run records two peaks (``bpfree.measure.profile.training_step_cost``):

* the **estimate** peak — one ``estimate`` call alone: what the gradient
  method costs (``estimate_peak_memory_mb``);
* the **step** peak — estimate + optimizer step, the optimizer's state
  counted: what a training step costs (``peak_memory_mb``).

Symbols (bytes of fp32 tensors, N parameters): P = parameters (4N), G =
gradients (= P when the method writes ``p.grad``), S = optimizer state (Adam
and AdamW 2P, SGD with momentum or Nesterov P, plain SGD 0), A = activations
autograd saves for the backward pass (for an MLP with widths d_i and batch B,
about 4·B·Σ d_i), F = the working set of one no-grad forward (inference peak
− P), U = the optimizer update's own temporaries (foreach Adam: about P).
What each method must hold at its estimate peak, from the smallest:

==================================  ===============  =====
method                              estimate holds   class
==================================  ===============  =====
no-grad forward (inference)         P + F            0
MeZO in update mode (``lr`` set)    P + F            0
MeZO, SPSA, forward gradient        P + G (+ F)      1
backprop with checkpointing         P + G + A_ckpt   2
backprop                            P + G + A        3
==================================  ===============  =====

A_ckpt < A: checkpointing keeps only the segment inputs and recomputes the
rest (Chen et al. 2016; seed 000). The whole step adds S (+ U) to the
estimate: with plain SGD the two peaks are equal, with Adam the step peak is
at least P + G + S = 4P, whatever the method. :func:`ordering_violations`
checks measured runs against this table; the demo's settings
(``configs/demo.toml``) are chosen so that the four classes are apart.
"""

from __future__ import annotations

from typing import Any, Mapping

from bpfree.runs import Run

SYMBOLS = {
    "parameters": "P",
    "gradients": "G",
    "optimizer_state": "S",
    "activations": "A",
    "directions": "D",
    "snapshot": "Θ̃",
    "temporaries": "T",
    "other": "O",
}
NAMES = {
    "parameters": "parameters",
    "gradients": "gradients",
    "optimizer_state": "optimizer state",
    "activations": "saved activations",
    "directions": "random directions",
    "snapshot": "SVRG snapshot θ̃ and μ̃",
    "temporaries": "temporaries",
    "other": "other (CUDA: not separated)",
}
STATE_FACTOR = {"adam": 2, "adamw": 2, "nesterov": 1}  # S / P; sgd: momentum > 0 gives 1, else 0
CLASS_FORMULA = {0: "P + F", 1: "P + G (+ F)", 2: "P + G + A_ckpt", 3: "P + G + A"}
CLASS_NAME = {
    0: "no p.grad (MeZO update mode): about inference",
    1: "writes p.grad, saves no activations (zeroth order, forward gradient)",
    2: "backprop, checkpointed: saves segment inputs only",
    3: "backprop: saves every activation",
}

LEGEND = (
    "P parameters, G gradients (= P when p.grad is written), S optimizer state (Adam 2P, SGD with momentum P, "
    "plain SGD 0), A activations saved for backward, D random directions, T temporaries, F the working set of "
    "one no-grad forward (inference peak − P)."
)
EXPECTED = (
    "Expected ordering of the estimate peaks (what each method must hold): MeZO in update mode ≈ inference "
    "(P + F) < MeZO, SPSA, forward gradient writing p.grad (P + G) < checkpointed backprop (P + G + A_ckpt) "
    "< backprop (P + G + A). The whole step adds the optimizer: plain SGD adds nothing (step = estimate), "
    "Adam adds S = 2P and its update temporaries, so every Adam step peaks at 4P or more."
)


# --------------------------------------------------------------------------- the arithmetic


def memory_class(summary: Mapping[str, Any]) -> int:
    """Class 0-3 of the table in the module docstring, from a run's ``summary.json``."""
    est = summary.get("estimator", {}) or {}
    name, options = est.get("name"), est.get("options", {}) or {}
    if name == "mezo" and options.get("lr") is not None:
        return 0
    if name == "backprop":
        return 2 if options.get("checkpoint", "none") not in ("none", None, 0) else 3
    return 1


def state_factor(summary: Mapping[str, Any]) -> int:
    """S / P of the run's optimizer (0 when the method updates in place and skips it)."""
    if memory_class(summary) == 0:
        return 0
    opt = summary.get("optimizer", {}) or {}
    name = opt.get("name")
    if name == "sgd":
        return 1 if (opt.get("momentum") or 0) > 0 else 0
    return STATE_FACTOR.get(name, 0)


def formulas(summary: Mapping[str, Any]) -> tuple[str, str]:
    """``(estimate, step)``: what the run's estimate holds, and what the step adds to it,
    e.g. ``("P + G + A", "+ S = 2P, ≥ 4P")`` for Adam, ``("P + G (+ F)", "= estimate")`` for plain SGD."""
    est = CLASS_FORMULA[memory_class(summary)]
    s = state_factor(summary)
    if s == 0:
        return est, "= estimate"
    return est, f"+ S = {'P' if s == 1 else f'{s}P'}, ≥ {2 + s}P"


def resolution(runs: list[Run]) -> float:
    """The coarsest measurement resolution (MB) of the runs' peaks (0 when none recorded)."""
    return max((r.summary.get("memory_resolution_mb") or 0.0 for r in runs), default=0.0)


def ordering_violations(runs: list[Run]) -> list[str]:
    """Where the measured peaks contradict the arithmetic (module docstring); empty when they follow it.

    Checked, with the runs' measurement resolution as tolerance: every class-k
    estimate peak is below every class-(k+1) peak (classes present); MeZO in
    update mode stays within inference + resolution + 5% of P (its peak is one
    inference plus the z slice it is drawing); a run without
    optimizer state has step peak = estimate peak; a run with state S = sP has
    a step peak of at least P + G + S.
    """
    tol = resolution(runs)
    measured = [r for r in runs if r.summary.get("estimate_peak_memory_mb") is not None]
    out: list[str] = []
    by_class: dict[int, list[Run]] = {}
    for r in measured:
        by_class.setdefault(memory_class(r.summary), []).append(r)
    present = sorted(by_class)
    for lo, hi in zip(present, present[1:]):
        top = max(by_class[lo], key=lambda r: r.summary["estimate_peak_memory_mb"])
        bottom = min(by_class[hi], key=lambda r: r.summary["estimate_peak_memory_mb"])
        a, b = top.summary["estimate_peak_memory_mb"], bottom.summary["estimate_peak_memory_mb"]
        if not a < b + tol:
            out.append(f"estimate peak of {top.label} ({a:.2f} MB, {CLASS_FORMULA[lo]}) is not below "
                       f"{bottom.label} ({b:.2f} MB, {CLASS_FORMULA[hi]})")
    for r in measured:
        s = r.summary
        est, step, params = s["estimate_peak_memory_mb"], s.get("peak_memory_mb"), s.get("parameters_mb")
        inference = s.get("inference_peak_mb")
        if memory_class(s) == 0 and inference is not None and params is not None:
            slack = tol + 0.05 * params
            if est > inference + slack:
                out.append(f"{r.label}: update-mode estimate peak {est:.2f} MB exceeds inference "
                           f"{inference:.2f} MB by more than {slack:.2f} MB")
        if step is None or params is None:
            continue
        k = state_factor(s)
        if k == 0 and abs(step - est) > tol:
            out.append(f"{r.label}: no optimizer state, yet step peak {step:.2f} MB ≠ estimate peak {est:.2f} MB")
        if k > 0 and step + tol < (2 + k) * params:
            out.append(f"{r.label}: step peak {step:.2f} MB is below P + G + S = {(2 + k) * params:.2f} MB")
    return out


# --------------------------------------------------------------------------- wording


def breakdown(by_category: Mapping[str, float] | None) -> str:
    """``"P 2.5 · G 2.5 · A 4.0 · T 1.0"`` (MB; categories under 0.005 MB left out)."""
    if not by_category:
        return "—"
    parts = [f"{SYMBOLS.get(k, k)} {v:.2f}" for k, v in by_category.items() if v >= 0.005]
    return " · ".join(parts) or "—"


def dominant(by_category: Mapping[str, float] | None) -> str:
    """What dominates a peak: its largest category, and the next ones until they hold half of it."""
    if not by_category:
        return "not measured"
    total = sum(by_category.values())
    if total <= 0:
        return "nothing measured"
    ranked = sorted(by_category.items(), key=lambda kv: -kv[1])
    chosen, held = [], 0.0
    for k, v in ranked:
        chosen.append(f"{NAMES.get(k, k)} ({100 * v / total:.0f}%)")
        held += v
        if held >= 0.6 * total or len(chosen) == 2:
            break
    return " and ".join(chosen)


def sentence(run: Run) -> str:
    """One sentence on what dominates the run's two peaks."""
    s = run.summary
    est, step = s.get("estimate_peak_memory_mb"), s.get("peak_memory_mb")
    if est is None and step is None:
        return f"{run.label}: memory not measured."
    parts = []
    if est is not None:
        parts.append(f"estimate peak {est:.2f} MB, mostly {dominant(s.get('estimate_memory_by_category_mb'))}")
    if step is not None:
        parts.append(f"step peak {step:.2f} MB, mostly {dominant(s.get('memory_by_category_mb'))}")
    return f"{run.label}: " + "; ".join(parts) + "."


# --------------------------------------------------------------------------- tables


def _mb(v: Any) -> str:
    return "—" if v is None else f"{v:.2f}"


def _ratio(v: Any) -> str:
    return "—" if v is None else f"{v:.2f}x"


def table(runs: list[Run]) -> tuple[list[str], list[list[str]]]:
    """Per run: optimizer, expected formulas, the two peaks (× inference) and their categories."""
    header = ["estimator", "optimizer", "expected estimate", "estimate MB", "× inference", "estimate by category",
              "expected step", "step MB", "step by category"]
    body = []
    for r in runs:
        s = r.summary
        f_est, f_step = formulas(s)
        opt = (s.get("optimizer") or {}).get("name", "?") if memory_class(s) else "none (in place)"
        body.append([
            r.label, str(opt), f_est,
            _mb(s.get("estimate_peak_memory_mb")), _ratio(s.get("estimate_over_inference")),
            breakdown(s.get("estimate_memory_by_category_mb")),
            f_step, _mb(s.get("peak_memory_mb")), breakdown(s.get("memory_by_category_mb")),
        ])
    return header, body


def notes(runs: list[Run]) -> list[str]:
    """The legend, the expected ordering, whether the measured peaks follow it, and the resolution."""
    lines = [LEGEND, EXPECTED]
    measured = [r for r in runs if r.summary.get("estimate_peak_memory_mb") is not None]
    if not measured:
        return lines + ["No run measured its memory (train.measure = false)."]
    s0 = measured[0].summary
    if s0.get("parameters_mb") is not None and s0.get("inference_peak_mb") is not None:
        lines.append(f"Here P = {s0['parameters_mb']:.2f} MB and one no-grad forward peaks at "
                     f"{s0['inference_peak_mb']:.2f} MB (F = {s0['inference_peak_mb'] - s0['parameters_mb']:.2f} MB).")
    bad = ordering_violations(measured)
    lines.append("The measured peaks follow the expected ordering." if not bad
                 else "The measured peaks deviate from the expected ordering: " + "; ".join(bad) + ".")
    tol = resolution(measured)
    if tol:
        lines.append(f"Resolution: peaks closer than {1024 * tol:.1f} KB are not distinguishable (the CPU "
                     "allocator aligns each live storage to 64 bytes; CUDA: one 2 MiB segment).")
    return lines


def _same(a: float, b: float, tol: float) -> bool:
    return abs(a - b) <= tol


def pareto(points: list[tuple[float, float, Run]]) -> list[Run]:
    """Runs not dominated in (lower memory, higher accuracy): no other run uses no more memory
    and is at least as accurate, better in one of the two. ``points`` are (MB, accuracy, run)."""
    front = []
    for m, a, r in points:
        dominated = any((m2 <= m and a2 >= a) and (m2 < m or a2 > a) for m2, a2, _ in points)
        if not dominated:
            front.append(r)
    return front


def comparable(runs: list[Run], basis: str = "step") -> tuple[list[str], list[list[str]]]:
    """Seed 000's "comparable memory" view for ``basis`` "estimate" or "step": one row per
    distinct peak (peaks within the resolution are one budget), the runs whose own peak
    is that budget, how many fit, the best validation accuracy that fits and by whom,
    and whether that budget's runs are on the Pareto frontier of accuracy against memory.
    """
    key = "estimate_peak_memory_mb" if basis == "estimate" else "peak_memory_mb"
    tol = resolution(runs)
    measured = sorted((r for r in runs if r.summary.get(key) is not None), key=lambda r: r.summary[key])
    scored = [(r.summary[key], r.summary["final_val_accuracy"], r) for r in measured
              if r.summary.get("final_val_accuracy") is not None]
    front = {id(r) for r in pareto(scored)}
    groups: list[list[Run]] = []
    for r in measured:
        if groups and _same(groups[-1][0].summary[key], r.summary[key], tol):
            groups[-1].append(r)
        else:
            groups.append([r])
    header = [f"{basis} budget (MB)", "runs peaking here", "runs that fit", "best val acc that fits", "by",
              "Pareto frontier"]
    body = []
    for i, group in enumerate(groups):
        budget = max(r.summary[key] for r in group)
        fits = [r for g in groups[: i + 1] for r in g]
        cands = [r for r in fits if r.summary.get("final_val_accuracy") is not None]
        best = max(cands, key=lambda r: r.summary["final_val_accuracy"], default=None)
        on_front = [r.label for r in group if id(r) in front]
        body.append([
            f"{budget:.2f}", ", ".join(r.label for r in group), str(len(fits)),
            "—" if best is None else f"{100 * best.summary['final_val_accuracy']:.2f}%",
            "—" if best is None else best.label, ", ".join(on_front) or "—",
        ])
    return header, body


COMPARABLE_NOTE = (
    "Seed 000 compares methods at comparable memory: each row is a distinct peak (peaks within the "
    "resolution count as one), and a method fits a budget when its own peak is at most that budget. "
    "The Pareto frontier holds the runs no other run beats on both accuracy and memory. The estimate view "
    "asks what the gradient method costs; the step view adds the optimizer."
)


def blocks(runs: list[Run]) -> list[Any]:
    """The "Memory" and "Comparable memory" sections as report blocks
    (``bpfree.report.document``); empty when no run measured its memory."""
    from bpfree.report.document import Heading, Notes, Paragraph, Table

    if not any(r.summary.get("peak_memory_mb") is not None for r in runs):
        return []
    out: list[Any] = [
        Heading("Memory"), Table(*table(runs)), Notes(notes(runs)),
        Paragraph("What dominates each peak:"), Notes([sentence(r) for r in runs]),
        Heading("Comparable memory"), Paragraph(COMPARABLE_NOTE),
    ]
    for basis in ("estimate", "step"):
        out += [Paragraph(f"By {basis} peak:"), Table(*comparable(runs, basis))]
    return out
