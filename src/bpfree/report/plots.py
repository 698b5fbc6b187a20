"""PNG plots of runs, and the helpers every report's figures share.

Drawn with matplotlib's Agg canvas on a bare ``Figure`` (no ``pyplot``), so
making a report never changes the user's global matplotlib backend and needs
no display. Each plot function returns PNG bytes (a ``report.document.Figure``'s
content). The shared pieces, for a study's own figures::

    fig = plots.figure((8, 4.5))                  # a bare Figure on an Agg canvas
    ax = fig.subplots()
    for (name, steps, losses), style in zip(curves, plots.line_styles(len(curves))):
        ax.plot(steps, losses, label=name, **style)
    plots.loss_scale(ax, all_losses)              # log y when losses span > 20x
    png = plots.png_bytes(fig)                    # at DPI
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


def figure(figsize: tuple[float, float], **kwargs) -> Figure:
    """A bare matplotlib ``Figure`` (constrained layout unless ``layout`` is given) on an Agg
    canvas: no pyplot state, no display."""
    fig = Figure(figsize=figsize, **{"layout": "constrained", **kwargs})
    FigureCanvasAgg(fig)
    return fig


def legend_label(run: Run) -> str:
    """The run's label, with its status when it did not complete."""
    status = run.summary.get("status")
    return run.label if status == "completed" else f"{run.label} ({status})"


def png_bytes(fig: Figure) -> bytes:
    """The figure as PNG bytes at :data:`DPI`."""
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def line_styles(n: int) -> list[dict]:
    """Colour and line style per run; styles vary so identical curves stay visible."""
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    dashes = ["-", "--", ":", "-."]
    return [{"color": cmap(i % cmap.N), "linestyle": dashes[i % len(dashes)]} for i in range(n)]


def loss_scale(ax, values: list[float]) -> None:
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
    for run, style in zip(runs, line_styles(len(runs))):
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
        ax_loss.plot(xs, loss, marker=".", label=legend_label(run), **style)
        ax_acc.plot(xs, acc, marker=".", label=legend_label(run), **style)
    ax_loss.set(xlabel=xlabel, ylabel="validation loss (cross-entropy, nats)", title="Validation loss")
    loss_scale(ax_loss, all_losses)
    ax_acc.set(xlabel=xlabel, ylabel="validation accuracy (%)", title="Validation accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(True, alpha=0.3)
    ax_acc.legend(fontsize="small", loc="best")
    fig.suptitle(title)
    return png_bytes(fig)


def training_loss(runs: list[Run], *, title: str, smoothing: float = 0.9) -> bytes:
    """Per-step training loss (the estimator's batch loss), exponentially smoothed, vs steps."""
    fig = Figure(figsize=(7.5, 4.2), layout="constrained")
    ax = fig.subplots()
    all_losses = []
    for run, style in zip(runs, line_styles(len(runs))):
        steps, losses = run.metrics.get("step", []), run.metrics.get("loss", [])
        smooth, avg = [], None
        for v in losses:
            if math.isfinite(v):
                avg = v if avg is None else smoothing * avg + (1 - smoothing) * v
            smooth.append(avg if avg is not None else math.nan)
        all_losses += smooth
        ax.plot(steps, smooth, label=legend_label(run), **style)
    ax.set(
        xlabel="optimizer steps",
        ylabel="training batch loss (cross-entropy, nats)",
        title=f"Training loss (EMA, smoothing {smoothing})",
    )
    loss_scale(ax, all_losses)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small", loc="best")
    fig.suptitle(title)
    return png_bytes(fig)


def plain_mb_axis(axis, values: list[float], resolution: float) -> str:
    """Memory axis in plain MB: no offset or scientific notation, log scale only when the
    values span more than 10x, and a range that shows real differences. Returns a note
    ("" or "all peaks within X KB: below the measurement's resolution") for the caption.

    When every value lies within ``resolution`` (or within 0.5% of their mean), the axis
    is centred on them with a ±5% window, so differences below resolution are not spread
    across the plot as if they were real.
    """
    from matplotlib.ticker import FuncFormatter, NullFormatter

    fmt = FuncFormatter(lambda v, _: f"{v:.3g}" if abs(v) >= 1 else f"{v:.2g}")
    note = ""
    is_x = axis is axis.axes.xaxis
    if values:
        lo, hi = min(values), max(values)
        if lo > 0 and hi / lo > 10:
            (axis.axes.set_xscale if is_x else axis.axes.set_yscale)("log")
            axis.set_minor_formatter(NullFormatter())
        else:
            mid, span = (lo + hi) / 2, hi - lo
            if span <= max(resolution, 0.005 * mid):
                note = (f"all peaks within {1024 * span:.1f} KB of each other: below the measurement's resolution "
                        f"({1024 * resolution:.1f} KB), drawn as equal")
                half = max(0.05 * mid, resolution)
            else:
                half = 0.5 * span + 0.08 * span + 0.01 * mid
            (axis.axes.set_xlim if is_x else axis.axes.set_ylim)(max(0.0, mid - half), mid + half)
    axis.set_major_formatter(fmt)
    return note


def accuracy_vs_memory(runs: list[Run], *, title: str) -> bytes:
    """Final validation accuracy against the two peaks (estimate alone; whole training step),
    with the Pareto frontier (``bpfree.report.memory.pareto``): seed 000's comparable-memory view."""
    from bpfree.report import memory as memory_view

    fig = Figure(figsize=(12, 4.8), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    resolution = memory_view.resolution(runs)
    styles = line_styles(len(runs))
    for ax, (key, what) in zip(axes, (("estimate_peak_memory_mb", "one estimate alone"),
                                      ("peak_memory_mb", "one training step (estimate + optimizer)"))):
        points = []
        for run, style in zip(runs, styles):
            mem, acc = run.summary.get(key), run.summary.get("final_val_accuracy")
            if mem is None or acc is None:
                continue
            points.append((mem, 100 * acc, run))
            ax.scatter([mem], [100 * acc], color=style["color"], marker="o^sDvP*X"[len(points) % 8], s=55,
                       label=legend_label(run), zorder=3, alpha=0.85)
        if len(points) <= 4:  # more labels than that overlap; the legend names the markers
            for mem, acc, run in points:
                ax.annotate(run.label, (mem, acc), textcoords="offset points", xytext=(5, 4), fontsize="x-small")
        front = sorted((m, a) for m, a, r in points if r in memory_view.pareto(points))
        if front:
            xs, ys = zip(*front)
            ax.step(xs, ys, where="post", color="0.4", linewidth=1, zorder=2, label="Pareto frontier")
        note = plain_mb_axis(ax.xaxis, [m for m, _, _ in points], resolution)
        xlabel = f"peak memory of {what} (MB" + (", log scale)" if ax.get_xscale() == "log" else ")")
        ax.set(xlabel=xlabel + (f"\n{note}" if note else ""),
               title=("Estimate peak" if key.startswith("estimate") else "Whole-step peak"))
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("final validation accuracy (%)")
    handles, names = axes[1].get_legend_handles_labels()
    if handles:  # a diverged run has no accuracy to place
        fig.legend(handles, names, loc="outside right upper", fontsize="x-small")
    fig.suptitle(f"{title}: accuracy at comparable memory (up and left is better)")
    return png_bytes(fig)


def memory_by_category(runs: list[Run], *, title: str) -> bytes:
    """Stacked horizontal bars: each run's estimate and step peaks split by category (MB)."""
    from bpfree.report import memory as memory_view

    measured = [r for r in runs if r.summary.get("peak_memory_mb") is not None]
    cats = [c for c in memory_view.SYMBOLS if any(
        (r.summary.get(k) or {}).get(c, 0) > 0 for r in measured
        for k in ("estimate_memory_by_category_mb", "memory_by_category_mb"))]
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    fig = Figure(figsize=(11, 1.6 + 0.45 * max(1, len(measured))), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    labels = [r.label for r in measured]
    for ax, key, name in zip(axes, ("estimate_memory_by_category_mb", "memory_by_category_mb"),
                             ("Estimate peak by category", "Whole-step peak by category")):
        left = [0.0] * len(measured)
        for ci, cat in enumerate(cats):
            widths = [(r.summary.get(key) or {}).get(cat, 0.0) for r in measured]
            ax.barh(range(len(measured)), widths, left=left, color=cmap(ci),
                    label=f"{memory_view.SYMBOLS[cat]}: {memory_view.NAMES[cat]}")
            left = [a + b for a, b in zip(left, widths)]
        ax.set(title=name, xlabel="MB at the peak")
        plain_mb_axis(ax.xaxis, [], 0.0)
        ax.set_xlim(0, max([*left, 1e-3]) * 1.05)
        ax.grid(True, axis="x", alpha=0.3)
    axes[0].set_yticks(range(len(measured)), labels, fontsize="small")
    axes[0].invert_yaxis()
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="outside lower center", ncols=min(len(cats), 4), fontsize="small")
    fig.suptitle(title)
    return png_bytes(fig)


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
        }
    if any(r.summary.get("peak_memory_mb") is not None for r in runs):
        extra["accuracy_vs_memory.png"] = (
            "Final validation accuracy vs peak memory of one estimate and of one training step",
            accuracy_vs_memory(runs, title=title),
        )
        extra["memory_by_category.png"] = (
            "Peak memory of one estimate and of one training step, by category",
            memory_by_category(runs, title=title),
        )
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
