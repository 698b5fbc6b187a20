"""The one report model (bpfree.report.document): every block through both writers."""

import io

import pytest

from bpfree.report import document, plots
from bpfree.report.document import (Claim, Claims, Code, Details, Document, Figure, Heading, Notes, Paragraph, Table,
                                     code)
from report_checks import assert_self_contained


def tiny_png() -> bytes:
    fig = plots.figure((2, 1.5))
    fig.subplots().plot([0, 1], [1, 0], **plots.line_styles(1)[0])
    return plots.png_bytes(fig)


def sample() -> Document:
    doc = Document("A <title> & more")
    doc.add(
        Paragraph("Code: bpfree 0.1.0", meta=True),
        Notes(["first | note", "second"]),
        Heading("Results"),
        Table(["a", "b|c"], [["1", code("x=1")], ["2", (code("k=v"), code("q=2"))]], cls="settings"),
        [Heading("Claims"), Claims(["claim", "here", "evidence"], [
            Claim("BP is lower", "reproduces", "0.1 vs 0.2"),
            Claim("2-4x faster", "does not reproduce (1/3)", "ratios"),
            Claim("noisier", "not scored: see the figures", "—")])],
        Figure("curves <1>", tiny_png(), "curves.png"),
        Code("bpfree sweep x\n  --out y"),
        Details([(("run: ", code("dir"), " (completed)"), "[train]\nseed = 0\n")]),
    )
    return doc


def test_markdown_writes_every_block_once_one_blank_line_apart():
    md = document.markdown(sample())
    assert md.startswith("# A <title> & more\n\nCode: bpfree 0.1.0\n\n- first | note\n- second\n\n## Results\n\n")
    assert "| a | b\\|c |\n| --- | --- |\n| 1 | `x=1` |\n| 2 | `k=v`, `q=2` |" in md
    assert "| BP is lower | reproduces | 0.1 vs 0.2 |" in md
    assert "![curves <1>](curves.png)" in md
    assert "```\nbpfree sweep x\n  --out y\n```" in md
    assert md.endswith("- run: `dir` (completed)\n")
    assert "\n\n\n" not in md


def test_html_is_one_self_contained_page_with_escaped_text():
    page = document.html_page(sample())
    assert_self_contained(page)
    assert page.count("<h1>") == 1 and "<title>A &lt;title&gt; &amp; more</title>" in page
    assert '<p class="meta">Code: bpfree 0.1.0</p>' in page
    assert '<div class="table-box"><table class="settings">' in page  # tables scroll in their own box
    assert "<td>k=v, q=2</td>" in page
    assert 'class="verdict-holds">reproduces' in page and 'class="verdict-fails">does not reproduce' in page
    assert 'class="verdict-open">not scored' in page
    assert "<figcaption>curves &lt;1&gt; (curves.png)</figcaption>" in page
    assert "<details><summary>run: <code>dir</code> (completed)</summary><pre>[train]\nseed = 0\n</pre></details>" in page
    assert "max-width: 1150px" in page and "overflow-x: auto" in page  # the compare report's look


def test_write_puts_figures_beside_the_report(tmp_path):
    written = document.write(sample(), tmp_path)
    assert list(written) == ["curves.png", "markdown", "html"]
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "report.md").read_text() == document.markdown(sample())
    bad = Document("t").add(Figure("c", tiny_png(), "../escape.png"))
    with pytest.raises(ValueError, match="must be a bare file name"):
        document.write(bad, tmp_path)


def test_a_non_block_is_refused_by_name():
    with pytest.raises(TypeError, match="not a report block: 'text'"):
        document.markdown(Document("t", ["text"]))


def test_plots_png_bytes_is_a_png_at_the_declared_dpi():
    from PIL import Image

    png = tiny_png()
    img = Image.open(io.BytesIO(png))
    assert img.size == (2 * plots.DPI, int(1.5 * plots.DPI))


def test_paragraphs_and_notes_keep_their_inline_code_and_bold_in_html():
    doc = Document("t").add(Paragraph("Preset **cpu**: `a<b`"), Notes(["run `x`"]))
    page = document.html_page(doc)
    assert "<p>Preset <strong>cpu</strong>: <code>a&lt;b</code></p>" in page and "<li>run <code>x</code></li>" in page
    assert document.markdown(doc) == "# t\n\nPreset **cpu**: `a<b`\n\n- run `x`\n"
