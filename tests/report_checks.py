"""Checks shared by the report tests: an HTML page must open on its own, offline."""

from __future__ import annotations

import re
from html.parser import HTMLParser

# attributes through which a page loads or links something
URL_ATTRIBUTES = {"src", "href", "srcset", "data", "poster", "action", "background"}


class _Refs(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.refs: list[tuple[str, str, str]] = []
        self.tags: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        for name, value in attrs:
            if name in URL_ATTRIBUTES and value is not None:
                self.refs.append((tag, name, value))


def assert_self_contained(page: str) -> None:
    """Every image is embedded as a data URI; no tag or style loads anything from elsewhere
    (no external URL, no relative file, no script, stylesheet link or iframe)."""
    parser = _Refs()
    parser.feed(page)
    outside = [r for r in parser.refs if not r[2].startswith("data:")]
    assert not outside, f"the page references files or URLs outside itself: {outside[:5]}"
    images = [r for r in parser.refs if r[0] == "img"]
    assert images and all(v.startswith("data:image/png;base64,") for _, _, v in images)
    assert parser.tags.count("img") == len(images), "an <img> without an embedded src"
    for tag in ("script", "link", "iframe", "object", "embed"):
        assert tag not in parser.tags, f"<{tag}> in a self-contained report"
    for style in re.findall(r"<style>(.*?)</style>", page, flags=re.S):
        assert "@import" not in style
        assert all(u.strip("'\" ").startswith("data:") for u in re.findall(r"url\(([^)]*)\)", style))
