"""Seed 002 reproduced: forward gradient vs backprop, each tuned (Rike & Førland, Table I).

The study file ``configs/rike2024.toml`` (shipped with the package) holds the
methods (MNIST NN and CNN × SGD, Nesterov, Adam × BP and FG; the CIFAR-10
CNN with SGD) and two presets: ``quick`` (one CPU core, about an hour) and
``full`` (the paper's 50/100 epochs, a GPU job). :func:`run_study` runs the
sweep (``bpfree.studies.sweep``) and writes the report, which puts beside the
paper's Table I:

* our tuned hyperparameters and test loss / accuracy (mean ± std over seeds);
* the loss curves of the tuned runs (the paper's Figures 1 and 2);
* the iterations-to-target ratio of each (model, optimizer): the steps FG
  needs to reach its own best validation loss over the steps BP needs to
  reach that same loss (the paper: BP converges 2–4x faster);
* which of the paper's claims reproduce here and which do not.

Every number is computed from the sweep's results (``sweep.json`` / the
storage); :func:`build_report` rebuilds the report without training.
"""

from __future__ import annotations

import math
import statistics
import sys
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from bpfree import runs
from bpfree.studies import sweep

STUDY_FILE = "rike2024.toml"
PRESETS = ("quick", "full")

# Table I of seed 002 (../shared/REFERENCES.md, "Seed 002"). Keys: gradient, model, data, optimizer.
PAPER: list[dict[str, Any]] = [
    {"gradient": "FG", "model": "NN", "data": "MNIST", "optimizer": "SGD", "lr": 4.64e-4, "decay": 1e-5, "epochs": 50, "test_loss": 0.332},
    {"gradient": "BP", "model": "NN", "data": "MNIST", "optimizer": "SGD", "lr": 0.1, "decay": 0, "epochs": 50, "test_loss": 0.000},
    {"gradient": "FG", "model": "NN", "data": "MNIST", "optimizer": "Nesterov", "lr": 3.20e-4, "decay": 1e-5, "momentum": 0.367, "epochs": 50, "test_loss": 0.270},
    {"gradient": "BP", "model": "NN", "data": "MNIST", "optimizer": "Nesterov", "lr": 0.1, "decay": 0, "momentum": 0.5, "epochs": 50, "test_loss": 0.000},
    {"gradient": "FG", "model": "NN", "data": "MNIST", "optimizer": "Adam", "lr": 5e-4, "decay": 5e-5, "beta1": 0.99, "beta2": 0.999, "epochs": 50, "test_loss": 0.283},
    {"gradient": "BP", "model": "NN", "data": "MNIST", "optimizer": "Adam", "lr": 1e-4, "decay": 0, "beta1": 0.9, "beta2": 0.999, "epochs": 50, "test_loss": 0.000},
    {"gradient": "FG", "model": "CNN", "data": "MNIST", "optimizer": "SGD", "lr": 3.98e-4, "decay": 1e-5, "epochs": 50, "test_loss": 0.548},
    {"gradient": "BP", "model": "CNN", "data": "MNIST", "optimizer": "SGD", "lr": 0.1, "decay": 0, "epochs": 50, "test_loss": 0.000},
    {"gradient": "FG", "model": "CNN", "data": "MNIST", "optimizer": "Nesterov", "lr": 1e-4, "decay": 1e-4, "momentum": 0.9, "epochs": 50, "test_loss": 0.559},
    {"gradient": "BP", "model": "CNN", "data": "MNIST", "optimizer": "Nesterov", "lr": 0.01, "decay": 0, "momentum": 0.783, "epochs": 50, "test_loss": 0.000},
    {"gradient": "FG", "model": "CNN", "data": "MNIST", "optimizer": "Adam", "lr": 2.5e-4, "decay": 1e-4, "beta1": 0.9, "beta2": 0.9999, "epochs": 50, "test_loss": 0.669},
    {"gradient": "BP", "model": "CNN", "data": "MNIST", "optimizer": "Adam", "lr": 2.36e-4, "decay": 0, "beta1": 0.9, "beta2": 0.999, "epochs": 50, "test_loss": 0.000},
    {"gradient": "FG", "model": "CNN", "data": "CIFAR-10", "optimizer": "SGD", "lr": 4.33e-4, "decay": 1e-6, "epochs": 100, "test_loss": 6.955},
    {"gradient": "BP", "model": "CNN", "data": "CIFAR-10", "optimizer": "SGD", "lr": 0.01, "decay": 1e-4, "epochs": 100, "test_loss": 1.685},
]
PAPER_RATIO = (2.0, 4.0)  # "backpropagation converges 2-4 times faster" (iterations)


def study_path() -> Path:
    """The shipped study file (package data)."""
    return Path(str(resources.files("bpfree.studies") / "configs" / STUDY_FILE))


def presets() -> dict[str, str]:
    """The study file's presets (``bpfree study list``)."""
    return {name: name for name in PRESETS}


def load(preset: str = "quick", overrides: Sequence[str] = ()) -> sweep.Study:
    """The study with ``preset`` applied (``quick`` or ``full``)."""
    if preset not in PRESETS:
        raise sweep.ConfigError(f"rike2024 has presets {', '.join(PRESETS)}, got {preset!r}")
    return sweep.load_study(study_path(), preset=preset, overrides=overrides)


def run_study(
    preset: str,
    out: Path,
    *,
    overwrite: bool = False,
    storage: str | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Run (or resume) the seed-002 sweep with ``preset`` into ``out`` and write its report.

    Returns the sweep's results (``out/sweep.json``) with ``"report"``: the report paths.
    Re-running the same call resumes a killed sweep (no trial lost or repeated).
    """
    study = load(preset)
    results = sweep.run(study, out, storage=storage, overwrite=overwrite, log=log)
    log(f"report: {results['report']['html']}")
    return results


def rebuild(preset: str, out: Path, *, storage: str | None = None) -> dict:
    """Rebuild ``sweep.json`` and the report from the storage, training nothing."""
    return sweep.report_only(load(preset), out, storage=storage)


# --------------------------------------------------------------------------- analysis


def _key(tags: Mapping[str, Any]) -> tuple:
    return (tags.get("gradient"), tags.get("model"), tags.get("data"), tags.get("optimizer"))


def by_tags(results: Mapping[str, Any]) -> dict[tuple, dict]:
    """The sweep's methods keyed by (gradient, model, data, optimizer)."""
    return {_key(m["tags"]): m for m in results["methods"]}


def tuned(method: Mapping[str, Any]) -> dict[str, Any]:
    """The tuned hyperparameters of a method, as in Table I (lr, decay, momentum, β1, β2, epochs)."""
    res = method.get("resolved") or {}
    opt = res.get("optimizer") or {}
    best = (method.get("best") or {}).get("params", {})
    out: dict[str, Any] = {"lr": opt.get("lr", best.get("optimizer.lr")),
                           "decay": res.get("schedule_decay", best.get("schedule.decay"))}
    if opt.get("name") == "nesterov":
        out["momentum"] = opt.get("momentum")
    if opt.get("name") in ("adam", "adamw"):
        betas = opt.get("betas") or [None, None]
        out["beta1"], out["beta2"] = betas[0], betas[1]
    steps, per_epoch = res.get("steps"), res.get("steps_per_epoch")
    out["epochs"] = round(steps / per_epoch, 2) if steps and per_epoch else None
    return out


def iterations_to_target(bp: Mapping[str, Any], fg: Mapping[str, Any], kind: str = "val") -> dict[str, Any]:
    """Steps each method needs to reach FG's best loss (mean curves over seeds).

    target = the lowest value of FG's mean loss curve; steps_fg = the step
    where FG first reaches it, steps_bp = the first point where BP's mean
    loss is at or below it; ratio = steps_fg / steps_bp. ``kind`` "val": the
    validation curve (points ``eval_every_steps`` apart); "train": the
    training batch loss averaged over windows of budget/200 steps (finer, but
    on the training batches). When BP is already below the target at its first
    point the ratio is a lower bound (``bound = ">="``).
    """
    s_fg, v_fg = sweep.mean_curve(fg.get("finals", []), kind)
    s_bp, v_bp = sweep.mean_curve(bp.get("finals", []), kind)
    finite = [(v, s) for s, v in zip(s_fg, v_fg) if v is not None and math.isfinite(v)]
    if not finite or not s_bp:
        return {"target": None, "steps_fg": None, "steps_bp": None, "ratio": None, "bound": ""}
    target, steps_fg = min(finite)
    steps_bp = sweep.steps_to_reach(s_bp, v_bp, target)
    if steps_bp is None:
        return {"target": target, "steps_fg": steps_fg, "steps_bp": None, "ratio": None, "bound": ""}
    first = next((s for s in s_bp if s > 0), None)
    bound = ">=" if steps_bp == first else ""
    ratio = steps_fg / steps_bp if steps_bp > 0 else math.inf
    return {"target": target, "steps_fg": steps_fg, "steps_bp": steps_bp, "ratio": ratio, "bound": bound}


def training_noise(method: Mapping[str, Any]) -> float | None:
    """Noise of the training loss: mean over seeds of the std of the per-step batch loss
    over the last 20% of steps, divided by its mean (read from the final runs' metrics.csv)."""
    values = []
    for f in method.get("finals", []):
        d = f.get("run_dir")
        if not d or not runs.is_run_dir(d):
            continue
        losses = [v for v in runs.read_run(d).metrics.get("loss", []) if math.isfinite(v)]
        tail = losses[int(0.8 * len(losses)):]
        if len(tail) > 2 and statistics.fmean(tail) > 0:
            values.append(statistics.stdev(tail) / statistics.fmean(tail))
    return statistics.fmean(values) if values else None


def claims(results: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """``(claim, verdict, evidence)`` for each claim of seed 002 we can test with these runs."""
    t = by_tags(results)
    pairs = [(k[1:], t[k], t.get(("FG", *k[1:]))) for k in t if k[0] == "BP" and t.get(("FG", *k[1:]))]
    pairs = [(k, bp, fg) for k, bp, fg in pairs if bp.get("finals") and fg.get("finals")]
    out = []
    if not pairs:
        return [("all", "not tested", "no (BP, FG) pair has final runs")]

    def name(k: tuple) -> str:
        return f"{k[0]} {k[1]} {k[2]}"

    lower = [(k, bp["test_loss"]["mean"], fg["test_loss"]["mean"], bp["test_loss"]["std"], fg["test_loss"]["std"])
             for k, bp, fg in pairs]
    wins = [x for x in lower if x[1] is not None and x[2] is not None and x[1] + x[3] < x[2] - x[4]]
    out.append((
        "BP reaches a lower (test) loss than FG with every optimizer (Table I)",
        "reproduces" if len(wins) == len(lower) else f"partly ({len(wins)}/{len(lower)})",
        "; ".join(f"{name(k)}: BP {b:.3f} vs FG {f:.3f}" for k, b, f, _, _ in lower),
    ))
    ratios = [(k, iterations_to_target(bp, fg, "train")) for k, bp, fg in pairs]
    got = [(k, r) for k, r in ratios if r["ratio"] is not None]
    in_range = [x for x in got if PAPER_RATIO[0] <= x[1]["ratio"] <= PAPER_RATIO[1]]
    faster = [x for x in got if x[1]["ratio"] > 1]
    if got and len(faster) == len(ratios):
        verdict = ("reproduces (2-4x)" if len(in_range) == len(ratios)
                   else f"direction reproduces (BP faster in {len(faster)}/{len(ratios)}); size differs: "
                        f"{len(in_range)}/{len(ratios)} ratios within 2-4x")
    else:
        verdict = f"does not reproduce (BP faster in {len(faster)}/{len(ratios)})"
    out.append((
        "BP converges 2-4x faster in iterations",
        verdict,
        "steps FG needs to reach its best training loss / steps BP needs to reach it: "
        + "; ".join(f"{name(k)}: {r['bound']}{r['ratio']:.1f}x" if r["ratio"] is not None else f"{name(k)}: n/a"
                    for k, r in ratios),
    ))
    lrs = [(k, tuned(bp)["lr"], tuned(fg)["lr"]) for k, bp, fg in pairs]
    higher = [x for x in lrs if x[1] and x[2] and x[1] > x[2]]
    out.append((
        "Tuned separately, BP takes a much higher learning rate than FG",
        "reproduces" if len(higher) == len(lrs) else f"partly ({len(higher)}/{len(lrs)})",
        "; ".join(f"{name(k)}: {b:.3g} vs {f:.3g}" for k, b, f in lrs if b and f),
    ))
    noise = [(k, training_noise(bp), training_noise(fg)) for k, bp, fg in pairs]
    noise = [x for x in noise if x[1] is not None and x[2] is not None]
    if noise:
        out.append((
            "FG training is much noisier than BP (Figure 2)",
            "not scored: see the figures",
            "the spread of the batch loss depends on the loss level (BP's is near 0, FG's far above), so no "
            "single number compares it fairly; relative std of the batch loss over the last 20% of steps, BP vs FG: "
            + "; ".join(f"{name(k)}: {b:.2f} vs {f:.2f}" for k, b, f in noise),
        ))
    zero = [(k, bp["train_loss"]["mean"]) for k, bp, _ in pairs if bp["train_loss"]["mean"] is not None]
    if zero:
        near = [x for x in zero if x[1] < 0.01]
        out.append((
            "BP drives the loss to ~0 on MNIST (Table I: test loss 0.000)",
            "reproduces" if len(near) == len(zero) else f"not at this budget ({len(near)}/{len(zero)} below 0.01 train loss)",
            "BP train loss: " + "; ".join(f"{name(k)}: {v:.4f}" for k, v in zero),
        ))
    return out


# --------------------------------------------------------------------------- report


def _g(v: Any, fmt: str = ".6g") -> str:
    if v is None:
        return ""
    if isinstance(v, float) and v == 0:
        return "0"
    return format(v, fmt) if isinstance(v, (int, float)) else str(v)


def table_one(results: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Table I beside ours: paper hyperparameters and test loss | ours, tuned, mean ± std."""
    t = by_tags(results)
    header = ["gradient", "model", "data", "optimizer",
              "paper lr", "decay", "mom.", "β1", "β2", "epochs", "test loss",
              "our lr", "decay", "mom.", "β1", "β2", "epochs", "test loss", "test acc (%)"]
    body = []
    for p in PAPER:
        m = t.get((p["gradient"], p["model"], p["data"], p["optimizer"]))
        paper = [_g(p.get(k)) for k in ("lr", "decay", "momentum", "beta1", "beta2", "epochs")]
        row = [p["gradient"], p["model"], p["data"], p["optimizer"], *paper, f"{p['test_loss']:.3f}"]
        if m is None:
            row += ["not in this study"] + [""] * 7
        elif not m.get("finals"):
            row += [f"skipped: {m['skipped']}" if m.get("skipped") else "not run yet"] + [""] * 7
        else:
            ours = tuned(m)
            row += [_g(ours.get(k)) for k in ("lr", "decay", "momentum", "beta1", "beta2", "epochs")]
            div = f" ({m['diverged_finals']} diverged)" if m.get("diverged_finals") else ""
            row += [sweep.pm(m["test_loss"], ".3f") + div, sweep.pm(m["test_accuracy"], ".2f", 100)]
        body.append(row)
    return header, body


def ratio_table(results: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    t = by_tags(results)
    header = ["model", "data", "optimizer", "val: target (FG's best)", "steps FG", "steps BP", "ratio FG/BP",
              "train: target", "steps FG", "steps BP", "ratio FG/BP", "paper"]
    body = []
    for k, bp in t.items():
        fg = t.get(("FG", *k[1:]))
        if k[0] != "BP" or fg is None or not bp.get("finals") or not fg.get("finals"):
            continue
        row = [k[1], k[2], k[3]]
        for kind in ("val", "train"):
            r = iterations_to_target(bp, fg, kind)
            ratio = "BP never reached it" if r["steps_bp"] is None and r["target"] is not None else (
                "—" if r["ratio"] is None else f"{r['bound']}{r['ratio']:.1f}x")
            row += [_g(r["target"], ".4f"), _g(r["steps_fg"]), _g(r["steps_bp"]), ratio]
        body.append(row + ["2-4x"])
    return header, body


def loss_figure(results: Mapping[str, Any], model: str, data: str) -> bytes | None:
    """The paper's Figure 2 (MNIST) / Figure 1 (CIFAR-10): training and validation loss of
    the tuned BP and FG runs vs iterations, one panel per optimizer (mean over seeds)."""
    from bpfree.report import plots

    t = by_tags(results)
    optimizers = [o for o in ("SGD", "Nesterov", "Adam")
                  if any(t.get((g, model, data, o), {}).get("finals") for g in ("BP", "FG"))]
    if not optimizers:
        return None
    fig = plots.figure((4.6 * len(optimizers), 4.3))
    axes = fig.subplots(1, len(optimizers), squeeze=False)[0]
    colors = {"BP": "tab:blue", "FG": "tab:red"}
    train_colors = {"BP": "lightsteelblue", "FG": "darkorange"}
    for ax, opt in zip(axes, optimizers):
        for g in ("BP", "FG"):
            m = t.get((g, model, data, opt))
            if not m or not m.get("finals"):
                continue
            lr = tuned(m)["lr"]
            s, v = sweep.mean_curve(m["finals"], "val")
            ax.plot(s, v, color=colors[g], linewidth=1.5, linestyle="--", marker=".", alpha=0.8, zorder=2,
                    label=f"{g} validation")
            s, v = sweep.mean_curve(m["finals"], "train")  # drawn on top: FG's train and val curves overlap
            ax.plot(s, v, color=train_colors[g], linewidth=1, zorder=3, label=f"{g} train (batch loss, lr {lr:.3g})")
        ax.set_yscale("log")
        ax.set(xlabel="iterations (optimizer steps)", ylabel="cross-entropy loss (log scale)", title=opt)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="x-small")
    n = len(results.get("seeds", []))
    fig.suptitle(f"{data} {model}: tuned BP vs FG, mean over {n} seeds")
    return plots.png_bytes(fig)


def _notes(results: Mapping[str, Any]) -> list[str]:
    t = by_tags(results)
    notes = []
    sources = {f["summary"].get("data_source") for m in results["methods"] for f in m.get("finals", [])}
    sources.discard(None)
    for s in sorted(sources):
        notes.append(f"Data: {s}")
    for m in results["methods"]:
        res = m.get("resolved") or {}
        if m["tags"].get("model") == "CNN" and m["tags"].get("data") == "MNIST" and res.get("model"):
            opts = res["model"].get("options", {})
            if opts.get("channels") != 64 or opts.get("hidden") != 1024:
                notes.append(
                    f"MNIST CNN narrowed in this preset: {opts.get('channels')} channels, dense {opts.get('hidden')} "
                    f"({res['model'].get('num_parameters'):,} parameters) instead of the paper's 64 channels and "
                    "dense 1024 (3,333,962 parameters); on this CPU the paper's CNN step costs ~10x more, "
                    "too much for the quick preset's hour.")
            break
    budgets = {json_budget(m) for m in results["methods"] if not m.get("skipped")}
    notes.append(f"Budget per trial: {', '.join(sorted(budgets))} (the paper: 50 epochs on MNIST, 100 on CIFAR-10).")
    skipped = [m for m in results["methods"] if m.get("skipped") and not m.get("finals")]
    for m in skipped:
        notes.append(f"{m['name']} skipped: {m['skipped']}")
    if any(k[2] == "CIFAR-10" for k in t) and all(not t[k].get("finals") for k in t if k[2] == "CIFAR-10"):
        notes.append("The CIFAR-10 rows of Table I and Figure 1 were not reproduced: the CIFAR-10 files are not "
                     "on this machine (no internet). Put the official python batches in $BPFREE_DATA/cifar10 and "
                     "re-run the same command: the sweep resumes and adds them.")
    notes.append("FG = bpfree's forward_gradient with K = 1 direction per step (Rademacher, rank-1 for Linear "
                 "weights: unbiased, the variance of dense Rademacher directions) and |∇f·v| capped at 1; no "
                 "gradient-norm clip: the paper gives no threshold, and since ||g|| ≈ √N·|∇f·v| a clip at 1.0 makes "
                 "every SGD step exactly lr long (at the paper's lr the NN stayed at chance in our first attempt). "
                 "BP runs unclipped, as in the paper.")
    notes.append("Our test loss is mean ± sample std over the final seeds; the paper reports one run per row.")
    edges = [f"{m['name']} {e}" for m in results["methods"] for e in grid_edges(m)]
    if edges:
        notes.append("Best value at the edge of its grid (the optimum may lie outside the grid): " + "; ".join(edges))
    return notes


def grid_edges(method: Mapping[str, Any]) -> list[str]:
    """``"lr=0.3 (highest)"`` for each numeric axis of 3+ values whose best value is its lowest or highest."""
    best = (method.get("best") or {}).get("params", {})
    out = []
    for key, value in best.items():
        seen = [t["params"].get(key) for t in method.get("trials", []) if key in t.get("params", {})]
        nums = sorted({v for v in seen if isinstance(v, (int, float)) and not isinstance(v, bool)})
        if len(nums) < 3 or not isinstance(value, (int, float)):  # with 2 values every choice is an edge
            continue
        if value == nums[-1] or (value == nums[0] and value != 0):
            out.append(f"{key.split('.')[-1]}={value:g} ({'highest' if value == nums[-1] else 'lowest'})")
    return out


def json_budget(m: Mapping[str, Any]) -> str:
    (k, v), = m["budget"].items()
    steps = (m.get("steps_budget") or {}).get("train.max_steps")
    return f"{v:g} {k}" + (f" ({steps} steps)" if steps and k != "steps" else "")


def build_report(results: Mapping[str, Any], out: Path) -> dict[str, Path]:
    """Write ``report.md``, ``report.html`` and the figures into ``out``; return their paths."""
    from bpfree.report import document

    return document.write(report_document(results), Path(out))


RATIO_DEFINITION = (
    "Iterations to target: target = the lowest point of FG's mean loss curve (mean over seeds); steps "
    "FG = where FG first reaches it; steps BP = the first point at which BP's mean loss is at or below "
    "it; ratio = steps FG / steps BP (how many times fewer iterations BP needs). 'val': validation "
    "loss, evaluated every eval_every_steps; 'train': training batch loss averaged over windows of "
    "budget/200 steps (finer). '>=' marks a lower bound: BP was already below the target at its "
    "first point.")


def report_document(results: Mapping[str, Any]) -> Any:
    """The study's report (``bpfree.report.document``): Table I beside ours, the claims with
    their verdicts, iterations to target, the paper's figures, every method and the commands."""
    from bpfree import provenance
    from bpfree.report.document import Claim, Claims, Code, Document, Figure, Heading, Notes, Paragraph, Table

    figures = []
    for model, data, name, caption in (
        ("NN", "MNIST", "figure2_mnist_nn.png", "Figure 2 (MNIST, NN): loss of the tuned runs vs iterations"),
        ("CNN", "MNIST", "figure2_mnist_cnn.png", "Figure 2 (MNIST, CNN): loss of the tuned runs vs iterations"),
        ("CNN", "CIFAR-10", "figure1_cifar10.png", "Figure 1 (CIFAR-10, CNN, SGD): loss of the tuned runs vs iterations"),
    ):
        png = loss_figure(results, model, data)
        if png is not None:
            figures.append(Figure(caption, png, name))
    preset = results.get("preset") or "quick"
    commands = [
        f"OMP_NUM_THREADS=1 bpfree sweep rike2024 --preset {preset} --out {results['out']}"
        + ("   # (OMP_NUM_THREADS=1: one CPU core)" if preset == "quick" else ""),
        f"python -c \"from bpfree.studies import rike2024; rike2024.run_study('{preset}', '{results['out']}')\"",
        "(re-running either resumes a killed sweep; add --storage postgresql://... to share one study between workers)",
    ]
    doc = Document(results["title"])
    doc.add(
        Paragraph(f"Preset `{preset}`; objective {results['objective']} on the validation split at the end of the "
                  f"budget; final seeds {results['seeds']} (search seed {results['search_seed']}).", meta=True),
        Paragraph(f"Code: {provenance.line(results)}", meta=True),
        Notes(_notes(results)),
        Heading("Table I beside ours"), Table(*table_one(results)),
        Heading("Claims"), Claims(["claim (seed 002)", "here", "evidence"], [Claim(*c) for c in claims(results)]),
        Heading("Iterations to target (BP vs FG)"), Paragraph(RATIO_DEFINITION), Table(*ratio_table(results)),
        Heading("Figures"), figures or Paragraph("(no final runs yet)"),
        Heading("Every method"), sweep.method_blocks(results),
        Heading("Commands"), Code("\n".join(commands)),
    )
    return doc


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m bpfree.studies.rike2024 [quick|full] [OUT] [--report-only]``."""
    args = list(sys.argv[1:] if argv is None else argv)
    report_only = "--report-only" in args
    args = [a for a in args if a != "--report-only"]
    preset = args[0] if args else "quick"
    out = Path(args[1]) if len(args) > 1 else Path("runs") / f"rike2024-{preset}"
    if report_only:
        r = rebuild(preset, out)
        print(f"report: {r['report']['html']}")
    else:
        run_study(preset, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
