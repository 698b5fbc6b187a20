"""A self-contained HTML report: inline CSS, PNG plots embedded as base64 data URIs."""

from __future__ import annotations

import base64
import html

from bpfree.report import memory as memory_view
from bpfree.report import tables
from bpfree.runs import Run

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1150px;
       color: #222; line-height: 1.45; padding: 0 1em; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; margin-top: 1.8em; border-bottom: 1px solid #ddd; }
.table-box { max-width: 100%; overflow-x: auto; margin: 0.8em 0; }
table { border-collapse: collapse; font-size: 0.88em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.5em; text-align: right; }
th { white-space: normal; vertical-align: bottom; max-width: 9em; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; }
td:first-child { max-width: 15em; overflow-wrap: anywhere; }
table.settings td { text-align: left; font-family: ui-monospace, monospace; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.5em 0; }
.meta { color: #555; font-size: 0.92em; } pre { background: #f7f7f7; padding: 0.8em; overflow-x: auto; }
ul.notes { color: #555; font-size: 0.9em; }
"""


def memory_html(runs: list[Run]) -> list[str]:
    """The "Memory" and "Comparable memory" sections (``bpfree.report.memory``) as HTML parts."""
    return [block(kind, content) for kind, content in memory_view.blocks(runs)]


def block(kind: str, content) -> str:
    """One ``(kind, content)`` block as HTML: h2, p, ul (a list of strings) or table ((header, rows))."""
    e = html.escape
    if kind == "h2":
        return f"<h2>{e(content)}</h2>"
    if kind == "p":
        return f'<p class="meta">{e(content)}</p>'
    if kind == "ul":
        return '<ul class="notes">' + "".join(f"<li>{e(x)}</li>" for x in content) + "</ul>"
    if kind == "table":
        return tables.html_table(*content)
    raise ValueError(f"unknown report block kind {kind!r}; use h2, p, ul or table")


def render(
    title: str,
    runs: list[Run],
    plots: dict[str, tuple[str, bytes]],
    meta: list[str],
) -> str:
    """The whole page: title, meta lines, results table, notes, plots, settings, run details."""
    e = html.escape
    shared, per_run = tables.settings(runs)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{e(title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{e(title)}</h1>",
        *(f'<p class="meta">{e(line)}</p>' for line in meta),
        "<h2>Results</h2>",
        tables.html_table(tables.headers(), tables.rows(runs)),
        '<ul class="notes">' + "".join(f"<li>{e(n)}</li>" for n in tables.NOTES) + "</ul>",
    ]
    parts += memory_html(runs)
    parts += [
        "<h2>Curves</h2>",
    ]
    for name, (caption, png) in plots.items():
        data = base64.b64encode(png).decode("ascii")
        parts.append(f'<figure><img alt="{e(caption)}" src="data:image/png;base64,{data}">')
        parts.append(f"<figcaption>{e(caption)} ({e(name)})</figcaption></figure>")
    parts.append("<h2>Settings</h2>")
    parts.append("<p>Differing between runs:</p>")
    parts.append(
        tables.html_table(
            ["estimator", "settings"],
            [[r.label, ", ".join(f"{k}={v}" for k, v in d.items()) or "—"] for r, d in zip(runs, per_run)],
            cls="settings",
        )
    )
    parts.append("<p>Shared by all runs:</p>")
    parts.append(tables.html_table(["key", "value"], [[k, v] for k, v in shared.items()], cls="settings"))
    parts.append("<h2>Runs</h2>")
    for run in runs:
        s = run.summary
        line = f"{run.label}: {s.get('status')} — {run.path}"
        if s.get("reason"):
            line += f" — {s['reason']}"
        config_text = (run.path / "config.toml").read_text() if (run.path / "config.toml").is_file() else ""
        parts.append(f"<details><summary>{e(line)}</summary><pre>{e(config_text)}</pre></details>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
