"""A sweep's report (``bpfree.report.document``): the study's own, when its file names a
module (``[study] report = "module"``, the plugin hook of ``docs/sweeps.md``), else the
generic one: every method's row and notes, the memory view and the final curves."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from bpfree import provenance
from bpfree.config import ConfigError
from bpfree.studies.sweep.results import _fmt, mean_curve, pm
from bpfree.studies.sweep.study import Study


def build_report(study: Study, results: Mapping[str, Any], out: Path) -> dict[str, Path]:
    """The study's own report (``[study] report = "module"``: its ``build_report(results, out)``),
    else the generic one (:func:`write_report`)."""
    if study.report:
        import importlib

        try:
            module = importlib.import_module(study.report)
        except ImportError as e:
            raise ConfigError(f"study.report names module {study.report!r}, which cannot be imported: {e}") from None
        return module.build_report(results, Path(out))
    return write_report(results, Path(out))


def results_table(results: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Per method: sampler, trials, best values, best objective, test loss/acc mean ± std."""
    header = ["method", "sampler", "trials (done/planned)", "best values", f"best {results['objective']}",
              "test loss", "test acc (%)", "seeds"]
    body = []
    for m in results["methods"]:
        if m.get("skipped") and not m.get("finals"):
            body.append([m["name"], m["sampler"], "—", f"skipped: {m['skipped']}", "—", "—", "—", "0"])
            continue
        best = m.get("best") or {}
        vals = ", ".join(f"{k}={_fmt(v)}" for k, v in best.get("params", {}).items()) or "—"
        body.append([
            m["name"], m["sampler"], f"{m.get('n_complete', 0)}/{m.get('n_planned', '?')}", vals,
            "—" if best.get("value") is None else f"{best['value']:.4g}",
            pm(m.get("test_loss")), pm(m.get("test_accuracy"), ".2f", 100), str(len(m.get("finals", []))),
        ])
    return header, body


def write_report(results: Mapping[str, Any], out: Path) -> dict[str, Path]:
    """``report.md`` / ``report.html`` and ``final_curves.png`` (:func:`report_document`)."""
    from bpfree.report import document

    return document.write(report_document(results), Path(out))


def report_document(results: Mapping[str, Any]) -> Any:
    """The generic sweep report: the results table of every method with its notes, the memory
    view of the final runs and the mean validation curves (``bpfree.report.document``)."""
    from bpfree.report.document import Document, Figure, Heading, Paragraph

    doc = Document(results["title"])
    doc.add([Paragraph(line, meta=True) for line in _report_meta(results)],
            Heading("Results"), method_blocks(results), Heading("Curves"),
            Figure("Validation loss of the final runs (mean over seeds)",
                   final_curves_png(results, title=results["title"]), "final_curves.png"))
    return doc


def method_blocks(results: Mapping[str, Any]) -> list[Any]:
    """Every method's row (:func:`results_table`), its notes and the memory view of the final
    runs (``bpfree.report.memory``): the part of a sweep report a study's own report reuses."""
    from bpfree.report import memory as memory_view
    from bpfree.report.document import Notes, Table

    return [Table(*results_table(results)), Notes(REPORT_NOTES), *memory_view.blocks(memory_runs(results))]


def memory_runs(results: Mapping[str, Any]) -> list[Any]:
    """One ``bpfree.runs.Run`` per method for the memory view: the memory of its first final run
    (every seed measures the same step), its label, and its mean validation accuracy over seeds."""
    from bpfree.runs import Run

    out = []
    for m in results["methods"]:
        finals = m.get("finals") or []
        if not finals or finals[0]["summary"].get("peak_memory_mb") is None:
            continue
        summary = {**finals[0]["summary"], "label": m["name"],
                   "final_val_accuracy": (m.get("val_accuracy") or {}).get("mean")}
        out.append(Run(Path(m["name"]), {}, summary))
    return out


REPORT_NOTES = [
    "best values: the search space values of the trial with the best objective (validation split, at the budget).",
    "test loss / acc: the best values re-run with each of the study's seeds (not the search seed), "
    "mean ± sample std over seeds, measured on the test split after the last step.",
    "A run that diverged within the budget scores +inf loss in the search.",
]


def _report_meta(results: Mapping[str, Any]) -> list[str]:
    return [
        f"Study file: {results['source']}" + (f", preset {results['preset']}" if results.get("preset") else ""),
        f"Objective: {results['objective']} on the validation split at the end of each method's budget "
        f"({results['direction']}); search seed {results['search_seed']}, final seeds {results['seeds']}.",
        f"Storage: {results['storage']}",
        f"Code: {provenance.line(results)}",
    ]


def final_curves_png(results: Mapping[str, Any], *, title: str) -> bytes:
    """Mean validation loss over seeds vs steps, one line per method."""
    from bpfree.report import plots

    done = [m for m in results["methods"] if m.get("finals")]
    fig = plots.figure((8, 4.5))
    ax = fig.subplots()
    allv: list[float] = []
    for m, style in zip(done, plots.line_styles(len(done))):
        steps, vals = mean_curve(m["finals"], "val")
        allv += vals
        ax.plot(steps, vals, label=m["name"], **style)
    plots.loss_scale(ax, allv)
    ax.set(xlabel="optimizer steps", ylabel="validation loss (mean over seeds)", title=title)
    ax.grid(True, alpha=0.3)
    if done:
        ax.legend(fontsize="small")
    return plots.png_bytes(fig)
