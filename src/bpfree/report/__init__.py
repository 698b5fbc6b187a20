"""Reports built from run directories alone (``bpfree.runs``).

::

    from bpfree import report
    paths = report.build(["runs/demo"])      # a compare directory, or run directories
    paths["html"]                            # runs/demo/report.html

:func:`build` writes into the output directory:

* ``report.md`` — the results table, notes, settings and links to the plots;
* ``report.html`` — the same, self-contained (plots embedded as base64 PNG);
* ``val_vs_steps.png``, ``val_vs_time.png``, ``train_loss.png`` and, for runs
  with measured cost, ``val_vs_flops.png`` and ``accuracy_vs_memory.png``
  (``report.plots``).

Every report of bpfree, this one and those of the sweeps and studies, is a
``report.document.Document`` of blocks rendered by its one markdown and one HTML
writer; ``report.plots`` holds the plot helpers they share, ``report.tables``
the comparison table and ``report.memory`` the memory view.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

from bpfree import provenance
from bpfree import runs as runs_lib
from bpfree.report import document as doc_lib
from bpfree.report import memory as memory_view
from bpfree.report import plots, tables
from bpfree.report.document import Details, Document, Figure, Heading, Notes, Paragraph, Table, code
from bpfree.runs import Run

__all__ = ["build", "comparison", "default_title", "meta_lines"]


def build(
    paths: Iterable[str | Path], out_dir: str | Path | None = None, *, title: str | None = None
) -> dict[str, Path]:
    """Read the runs under ``paths`` and write the report files to ``out_dir``.

    ``paths`` are run directories or compare directories (expanded to their
    runs). ``out_dir`` defaults to the single path given, else to the paths'
    common parent. Returns ``{"markdown", "html", <png names>: path}``.
    """
    paths = [Path(p) for p in paths]
    run_list = [runs_lib.read_run(p) for p in runs_lib.find_runs(paths)]
    if out_dir is None:
        out_dir = paths[0] if len(paths) == 1 else Path(os.path.commonpath([p.resolve() for p in paths]))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return doc_lib.write(comparison(run_list, out, title=title or default_title(run_list)), out)


def comparison(run_list: list[Run], out: Path, *, title: str) -> Document:
    """The comparison report of ``run_list`` as a document: meta lines, results table and
    notes, the memory view, the plots, the settings that differ and those shared, the runs
    (paths relative to ``out``, where the report is written)."""
    shared, per_run = tables.settings(run_list)
    reasons = [f"{r.label}: {r.summary['reason']}" for r in run_list if r.summary.get("reason")]
    runs_items = []
    for r in run_list:
        rel = os.path.relpath(r.path.resolve(), Path(out).resolve())
        config_text = (r.path / "config.toml").read_text() if (r.path / "config.toml").is_file() else ""
        runs_items.append(((f"{r.label}: ", code(rel), f" ({r.summary.get('status')})"), config_text))
    doc = Document(title)
    doc.add(
        Notes(meta_lines(run_list)),
        Heading("Results"),
        Table(tables.headers(), tables.rows(run_list)),
        Notes([*tables.NOTES, *reasons]),
        memory_view.blocks(run_list),
        Heading("Curves"),
        [Figure(caption, png, name) for name, (caption, png) in plots.all_plots(run_list, title=title).items()],
        Heading("Settings"),
        Paragraph("Differing between runs:"),
        Table(["estimator", "settings"],
              [[r.label, tuple(code(f"{k}={v}") for k, v in d.items()) or "—"] for r, d in zip(run_list, per_run)],
              cls="settings"),
        Paragraph("Shared by all runs:"),
        Table(["key", "value"], [[code(k), code(v)] for k, v in shared.items()], cls="settings"),
        Heading("Runs"),
        Details(runs_items),
    )
    return doc


def default_title(run_list: list[Run]) -> str:
    """"Estimator comparison: <data> / <model>" when all runs share them."""
    data = {r.summary.get("data", {}).get("name") for r in run_list}
    model = {r.summary.get("model", {}).get("name") for r in run_list}
    if len(data) == 1 and len(model) == 1:
        return f"Estimator comparison: {data.pop()} / {model.pop()}"
    return "Estimator comparison"


def meta_lines(run_list: list[Run]) -> list[str]:
    """What the runs were trained on and with: data source, model size, budget, machine."""

    def values(get) -> str:
        return " | ".join(sorted({get(r.summary) for r in run_list}))

    def budget(s: dict) -> str:
        parts = [f"{k}={v}" for k, v in s.get("budget", {}).items() if v is not None]
        return " or ".join(parts) + (" (whichever ends first)" if len(parts) > 1 else "") if parts else "?"

    lines = [
        f"Data: {values(lambda s: str(s.get('data_source', '?')))}",
        f"Model: {values(lambda s: _model(s))}",
        f"Budget: {values(budget)}",
        f"Machine: {values(_machine)}",
        f"Code: {values(provenance.line)}",
    ]
    lines.append(
        "Every run used the same data split, model initialisation, batch order and budget "
        "(same train.seed); see Settings for what differs."
    )
    return lines


def _machine(s: dict) -> str:
    return f"{s.get('device', '?')} ({s.get('device_name', '?')}), torch {s.get('torch_version', '?')}"


def _model(s: dict) -> str:
    m = s.get("model", {})
    opts = ", ".join(f"{k}={v}" for k, v in m.get("options", {}).items())
    n, total = m.get("num_parameters", "?"), m.get("num_parameters_total")
    if total is not None and total != n:  # LoRA / head-only: say how much of the model is trained
        return f"{m.get('name', '?')}({opts}), {n:,} trainable of {total:,} parameters"
    return f"{m.get('name', '?')}({opts}), {n:,} parameters"
