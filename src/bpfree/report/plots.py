"""PNG plots of runs: validation loss/accuracy vs steps and vs wall time, training loss.

Drawn with matplotlib's Agg canvas on a bare ``Figure`` (no ``pyplot``), so
making a report never changes the user's global matplotlib backend and needs
no display. Each function returns PNG bytes.
"""

from __future__ import annotations

import io
import math

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from bpfree.runs import Run

DPI = 110
X_AXES = {
    "steps": ("optimizer steps", 0),
    "time": ("training wall time (s, evaluation excluded)", 1),
    "flops": ("training compute (TFLOP, counted matmul ops)", 0),  # steps × FLOPs/step
}


def _legend_label(run: Run) -> str:
    status = run.summary.get("status")
    return run.label if status == "completed" else f"{run.label} ({status})"


def _png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def _styles(n: int) -> list[dict]:
    """Colour and line style per run; styles vary so identical curves stay visible."""
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    dashes = ["-", "--", ":", "-."]
    return [{"color": cmap(i % cmap.N), "linestyle": dashes[i % len(dashes)]} for i in range(n)]


def _loss_scale(ax, values: list[float]) -> None:
    """Log y axis when the finite positive losses span more than 20x, else linear."""
    finite = [v for v in values if math.isfinite(v) and v > 0]
    if finite and max(finite) / min(finite) > 20:
        ax.set_yscale("log")


def validation_curves(runs: list[Run], x: str, *, title: str) -> bytes:
    """Validation loss (log scale) and accuracy (%) of every run vs ``x`` ("steps" or "time")."""
    xlabel, column = X_AXES[x]
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    ax_loss, ax_acc = fig.subplots(1, 2)
    all_losses = []
    for run, style in zip(runs, _styles(len(runs))):
        curve_loss = run.eval_curve("val", "loss")
        curve_acc = run.eval_curve("val", "accuracy")
        xs = curve_loss[column]
        if x == "flops":
            per_step = run.summary.get("flops_per_step")
            if not per_step:
                continue  # the run was not measured
            xs = [s * per_step / 1e12 for s in xs]
        loss = [v if math.isfinite(v) else math.nan for v in curve_loss[2]]
        acc = [100 * v for v in curve_acc[2]]
        all_losses += loss
        ax_loss.plot(xs, loss, marker=".", label=_legend_label(run), **style)
        ax_acc.plot(xs, acc, marker=".", label=_legend_label(run), **style)
    ax_loss.set(xlabel=xlabel, ylabel="validation loss (cross-entropy, nats)", title="Validation loss")
    _loss_scale(ax_loss, all_losses)
    ax_acc.set(xlabel=xlabel, ylabel="validation accuracy (%)", title="Validation accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(True, alpha=0.3)
    ax_acc.legend(fontsize="small", loc="best")
    fig.suptitle(title)
    return _png(fig)


def training_loss(runs: list[Run], *, title: str, smoothing: float = 0.9) -> bytes:
    """Per-step training loss (the estimator's batch loss), exponentially smoothed, vs steps."""
    fig = Figure(figsize=(7.5, 4.2), layout="constrained")
    ax = fig.subplots()
    all_losses = []
    for run, style in zip(runs, _styles(len(runs))):
        steps, losses = run.metrics.get("step", []), run.metrics.get("loss", [])
        smooth, avg = [], None
        for v in losses:
            if math.isfinite(v):
                avg = v if avg is None else smoothing * avg + (1 - smoothing) * v
            smooth.append(avg if avg is not None else math.nan)
        all_losses += smooth
        ax.plot(steps, smooth, label=_legend_label(run), **style)
    ax.set(
        xlabel="optimizer steps",
        ylabel="training batch loss (cross-entropy, nats)",
        title=f"Training loss (EMA, smoothing {smoothing})",
    )
    _loss_scale(ax, all_losses)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small", loc="best")
    fig.suptitle(title)
    return _png(fig)


def accuracy_vs_memory(runs: list[Run], *, title: str) -> bytes:
    """Final validation accuracy against peak step memory: the "comparable memory" view."""
    fig = Figure(figsize=(7.5, 4.6), layout="constrained")
    ax = fig.subplots()
    mems = []
    for run, style in zip(runs, _styles(len(runs))):
        mem, acc = run.summary.get("peak_memory_mb"), run.summary.get("final_val_accuracy")
        if mem is None or acc is None:
            continue
        mems.append(mem)
        ax.scatter([mem], [100 * acc], color=style["color"], s=50, label=_legend_label(run), zorder=3)
        ax.annotate(run.label, (mem, 100 * acc), textcoords="offset points", xytext=(5, 4), fontsize="x-small")
    log = bool(mems) and max(mems) / min(mems) > 10
    if log:
        ax.set_xscale("log")
    ax.set(
        xlabel="peak memory of one training step (MB" + (", log scale)" if log else ")"),
        ylabel="final validation accuracy (%)",
        title="Accuracy at comparable memory (up and left is better)",
    )
    ax.grid(True, which="both", alpha=0.3)
    if mems:  # a diverged run has no accuracy to place
        ax.legend(fontsize="small", loc="best")
    fig.suptitle(title)
    return _png(fig)


def all_plots(runs: list[Run], *, title: str) -> dict[str, tuple[str, bytes]]:
    """``{file name: (caption, PNG bytes)}`` of every report plot."""
    measured = any(r.summary.get("flops_per_step") for r in runs)
    extra = {}
    if measured:
        extra = {
            "val_vs_flops.png": (
                "Validation loss and accuracy vs training compute (counted FLOPs)",
                validation_curves(runs, "flops", title=title),
            ),
            "accuracy_vs_memory.png": (
                "Final validation accuracy vs peak memory of a training step",
                accuracy_vs_memory(runs, title=title),
            ),
        }
    return {
        "val_vs_steps.png": (
            "Validation loss and accuracy vs optimizer steps",
            validation_curves(runs, "steps", title=title),
        ),
        "val_vs_time.png": (
            "Validation loss and accuracy vs training wall time",
            validation_curves(runs, "time", title=title),
        ),
        "train_loss.png": ("Training loss per step (smoothed)", training_loss(runs, title=title)),
        **extra,
    }
