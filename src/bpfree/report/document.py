"""One report model: a report is a title and a list of blocks, rendered by one markdown writer
and one self-contained HTML writer.

Every report of bpfree (``bpfree compare`` / ``bpfree report``, ``bpfree sweep``, the
seed-001 and seed-002 studies) builds a :class:`Document` and hands it to :func:`write`;
no report assembles markdown or HTML itself. The blocks::

    Heading("Results")                          ## Results               <h2>
    Paragraph("Storage: ...", meta=True)        the text                 <p class="meta"> (`code`, **bold** marked)
    Notes(["lr: ...", "ms/step: ..."])          - bullet list            <ul class="notes">
    Table(header, rows, cls="settings")         GitHub table             <table> in a scroll box
    Figure("caption", png, "curves.png")        ![caption](curves.png)   <figure>, PNG embedded
    Claims(["claim", "here", "evidence"], [Claim(...)])   a table; the verdict cell styled by outcome
    Code("bpfree sweep ...")                    ``` fenced block ```     <pre>
    Details([("label: dir", "config text")])    - label: dir             <details><summary>

A table cell is text, :func:`code` text (markdown backticks, monospace in HTML), or a
tuple of those joined by ", ". The HTML page is the compare report's look (``CSS``):
one column up to 1150 px wide, tables in their own horizontal scroll box so the page
never scrolls sideways, figures embedded as base64 PNG data URIs, so ``report.html``
opens on its own, offline (``tests/report_checks.assert_self_contained``;
``scripts/screenshot_report.sh`` renders one in headless Chromium).
"""

from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence, Union

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
table.settings td, table.claims td, table.claims th { text-align: left; }
table.settings td { font-family: ui-monospace, monospace; }
table.claims td:first-child { max-width: 30em; }
td.verdict-holds { background: #e8f5e9; } td.verdict-fails { background: #fdecea; } td.verdict-open { background: #fff8e1; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.5em 0; }
.meta { color: #555; font-size: 0.92em; } pre { background: #f7f7f7; padding: 0.8em; overflow-x: auto; }
ul.notes { color: #555; font-size: 0.9em; }
"""


class CodeText(str):
    """Text shown as code: ``backticks`` in markdown, monospace in HTML (a ``settings`` table)."""


def code(text: object) -> CodeText:
    """A table cell shown as code."""
    return CodeText(str(text))


Cell = Union[str, CodeText, tuple]


@dataclass(frozen=True)
class Heading:
    """A section heading (``level`` 2 is ``##``; the title is the document's own level 1)."""

    text: str
    level: int = 2


@dataclass(frozen=True)
class Paragraph:
    """One paragraph of text; ``meta`` marks a line about the report itself (data, code, storage)."""

    text: str
    meta: bool = False


@dataclass(frozen=True)
class Notes:
    """A bullet list of short statements (footnotes to a table, the findings of a study)."""

    items: Sequence[str]


@dataclass(frozen=True)
class Table:
    """A table: ``header`` and ``rows`` of cells (text, :func:`code`, or a tuple of those)."""

    header: Sequence[str]
    rows: Sequence[Sequence[Cell]]
    cls: str = ""


@dataclass(frozen=True)
class Figure:
    """A PNG figure: written beside the report as ``file`` and linked from the markdown,
    embedded in the HTML."""

    caption: str
    png: bytes = field(repr=False)
    file: str


@dataclass(frozen=True)
class Claim:
    """A published claim and what we found: ``verdict`` is a short phrase that starts with what
    happened ("reproduces", "partly (2/3)", "does not reproduce", "not scored: ..."), ``evidence``
    the numbers behind it."""

    claim: str
    verdict: str
    evidence: str

    @property
    def outcome(self) -> str:
        """``holds``, ``fails`` or ``open`` (anything else: not measured, partly, ...), for styling."""
        v = self.verdict.lower()
        if v.startswith(("holds", "reproduces", "yes", "confirmed")):
            return "holds"
        if v.startswith(("does not", "fails", "no ", "contradicted")):
            return "fails"
        return "open"


@dataclass(frozen=True)
class Claims:
    """Claims with their verdicts, as one table with ``header`` (claim, verdict, evidence)."""

    header: Sequence[str]
    items: Sequence[Claim]


@dataclass(frozen=True)
class Code:
    """A preformatted block (commands to reproduce, a config)."""

    text: str


@dataclass(frozen=True)
class Details:
    """Items that open to a preformatted text in HTML (``<details>``); markdown lists the items.
    Each item is ``(summary, text)``; a summary may be a tuple of text and :func:`code` parts,
    written one after the other."""

    items: Sequence[tuple[str | tuple, str]]


Block = Union[Heading, Paragraph, Notes, Table, Figure, Claims, Code, Details]


@dataclass
class Document:
    """A report: its title (the level-1 heading) and its blocks, in order."""

    title: str
    blocks: list[Block] = field(default_factory=list)

    def add(self, *blocks: Block | Iterable[Block]) -> "Document":
        """Append blocks (or iterables of blocks, e.g. a section another module builds)."""
        for b in blocks:
            if isinstance(b, (list, tuple)):
                self.add(*b)
            else:
                self.blocks.append(b)
        return self

    def figures(self) -> list[Figure]:
        return [b for b in self.blocks if isinstance(b, Figure)]


# ------------------------------------------------------------------ markdown


def _inline(parts: str | tuple, *, md: bool) -> str:
    """Text and code parts written one after the other (markdown backticks, or escaped HTML)."""
    parts = parts if isinstance(parts, tuple) else (parts,)
    if md:
        return "".join(f"`{p}`" if isinstance(p, CodeText) else str(p) for p in parts)
    return "".join(f"<code>{html.escape(p)}</code>" if isinstance(p, CodeText) else html.escape(str(p)) for p in parts)


def _md_cell(cell: Cell) -> str:
    if isinstance(cell, tuple):
        return ", ".join(_md_cell(c) for c in cell)
    text = f"`{cell}`" if isinstance(cell, CodeText) else str(cell)
    return text.replace("|", "\\|")


def _md_table(header: Sequence[str], rows: Sequence[Sequence[Cell]]) -> str:
    def line(cells: Sequence[Cell]) -> str:
        return "| " + " | ".join(_md_cell(c) for c in cells) + " |"

    return "\n".join([line(header), line(["---"] * len(header)), *(line(r) for r in rows)])


def _md_block(b: Block) -> str:
    if isinstance(b, Heading):
        return f"{'#' * b.level} {b.text}"
    if isinstance(b, Paragraph):
        return b.text
    if isinstance(b, Notes):
        return "\n".join(f"- {x}" for x in b.items)
    if isinstance(b, Table):
        return _md_table(b.header, b.rows)
    if isinstance(b, Figure):
        return f"![{b.caption}]({b.file})"
    if isinstance(b, Claims):
        return _md_table(b.header, [[c.claim, c.verdict, c.evidence] for c in b.items])
    if isinstance(b, Code):
        return f"```\n{b.text}\n```"
    if isinstance(b, Details):
        return "\n".join(f"- {_inline(summary, md=True)}" for summary, _ in b.items)
    raise TypeError(f"not a report block: {b!r}; use the blocks of bpfree.report.document")


def markdown(doc: Document) -> str:
    """The markdown text: the title as ``#``, then every non-empty block, one blank line apart."""
    parts = [f"# {doc.title}"] + [text for text in map(_md_block, doc.blocks) if text]
    return "\n\n".join(parts) + "\n"


# ------------------------------------------------------------------ HTML


def _html_cell(cell: Cell) -> str:
    if isinstance(cell, tuple):
        return ", ".join(_html_cell(c) for c in cell)
    return html.escape(str(cell))


def html_table(header: Sequence[str], rows: Sequence[Sequence[Cell]], *, cls: str = "",
               cell_classes: Sequence[Sequence[str]] | None = None) -> str:
    """An HTML table with escaped cells, in a scroll box of its own: a table wider than the
    page scrolls inside the box, never the whole page."""
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    trs = []
    for i, r in enumerate(rows):
        classes = cell_classes[i] if cell_classes else [""] * len(r)
        trs.append("<tr>" + "".join((f'<td class="{c}">' if c else "<td>") + _html_cell(v) + "</td>"
                                    for v, c in zip(r, classes)) + "</tr>")
    return (f'<div class="table-box"><table class="{cls}"><thead><tr>{head}</tr></thead>'
            f"<tbody>{''.join(trs)}</tbody></table></div>")


_CODE_SPAN = re.compile(r"`([^`]+)`")
_STRONG = re.compile(r"\*\*([^*]+)\*\*")


def _html_text(text: str) -> str:
    """Escaped text with the two inline marks a paragraph or note may use in markdown:
    `` `code` `` → ``<code>``, ``**bold**`` → ``<strong>``."""
    out = _CODE_SPAN.sub(r"<code>\1</code>", html.escape(text))
    return _STRONG.sub(r"<strong>\1</strong>", out)


def _html_block(b: Block) -> str:
    e = html.escape
    if isinstance(b, Heading):
        return f"<h{b.level}>{e(b.text)}</h{b.level}>"
    if isinstance(b, Paragraph):
        return f'<p class="meta">{_html_text(b.text)}</p>' if b.meta else f"<p>{_html_text(b.text)}</p>"
    if isinstance(b, Notes):
        return '<ul class="notes">' + "".join(f"<li>{_html_text(x)}</li>" for x in b.items) + "</ul>" if b.items else ""
    if isinstance(b, Table):
        return html_table(b.header, b.rows, cls=b.cls)
    if isinstance(b, Figure):
        data = base64.b64encode(b.png).decode("ascii")
        return (f'<figure><img alt="{e(b.caption)}" src="data:image/png;base64,{data}">'
                f"<figcaption>{e(b.caption)} ({e(b.file)})</figcaption></figure>")
    if isinstance(b, Claims):
        rows = [[c.claim, c.verdict, c.evidence] for c in b.items]
        return html_table(b.header, rows, cls="claims",
                          cell_classes=[["", f"verdict-{c.outcome}", ""] for c in b.items])
    if isinstance(b, Code):
        return f"<pre>{e(b.text)}</pre>"
    if isinstance(b, Details):
        return "\n".join(f"<details><summary>{_inline(s, md=False)}</summary><pre>{e(t)}</pre></details>"
                         for s, t in b.items)
    raise TypeError(f"not a report block: {b!r}; use the blocks of bpfree.report.document")


def html_page(doc: Document) -> str:
    """The whole page, self-contained: inline CSS, every figure embedded."""
    e = html.escape
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             f"<title>{e(doc.title)}</title><style>{CSS}</style></head><body>", f"<h1>{e(doc.title)}</h1>"]
    parts += [text for text in map(_html_block, doc.blocks) if text]
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


# ------------------------------------------------------------------ files


def write(doc: Document, out: str | Path, *, name: str = "report") -> dict[str, Path]:
    """Write ``NAME.md``, ``NAME.html`` and every figure's PNG into ``out``; return
    ``{"markdown", "html", <figure file>: path}`` (figures first, in document order)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    for fig in doc.figures():
        if Path(fig.file).name != fig.file:
            raise ValueError(f"figure file {fig.file!r} must be a bare file name (it is written beside the report)")
        (out / fig.file).write_bytes(fig.png)
        written[fig.file] = out / fig.file
    written["markdown"] = out / f"{name}.md"
    written["markdown"].write_text(markdown(doc))
    written["html"] = out / f"{name}.html"
    written["html"].write_text(html_page(doc))
    return written


__all__ = ["CSS", "Block", "Claim", "Claims", "Code", "CodeText", "Details", "Document", "Figure", "Heading", "Notes",
           "Paragraph", "Table", "code", "html_page", "html_table", "markdown", "write"]
