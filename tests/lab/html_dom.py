"""A small DOM for tests: parse a page with Python's html.parser and find elements by tag and class."""

from __future__ import annotations

import re
from html.parser import HTMLParser

_VOID = {"meta", "img", "br", "hr", "link", "input", "source", "col", "wbr"}


class Element:
    def __init__(self, tag: str, attrs: dict, parent: Element | None = None):
        self.tag, self.attrs, self.parent, self.children = tag, attrs, parent, []

    @property
    def classes(self) -> set[str]:
        return set((self.attrs.get("class") or "").split())

    def text(self) -> str:
        """The text content, whitespace collapsed (as a reader sees it)."""
        parts = [c if isinstance(c, str) else c.text() for c in self.children]
        return re.sub(r"\s+", " ", " ".join(p for p in parts if p)).strip().replace(" ,", ",").replace(" .", ".")

    def iter(self):
        for c in self.children:
            if isinstance(c, Element):
                yield c
                yield from c.iter()

    def find_all(self, tag: str | None = None, cls: str | None = None) -> list[Element]:
        return [e for e in self.iter() if (tag is None or e.tag == tag) and (cls is None or cls in e.classes)]

    def find(self, tag: str | None = None, cls: str | None = None) -> Element | None:
        return next(iter(self.find_all(tag, cls)), None)

    def ancestors(self):
        e = self.parent
        while e is not None:
            yield e
            e = e.parent


class _Builder(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.root = self.cur = Element("#document", {})

    def handle_starttag(self, tag, attrs):
        e = Element(tag, dict(attrs), self.cur)
        self.cur.children.append(e)
        if tag not in _VOID:
            self.cur = e

    def handle_startendtag(self, tag, attrs):
        self.cur.children.append(Element(tag, dict(attrs), self.cur))

    def handle_endtag(self, tag):
        e = self.cur
        while e is not None and e.tag != tag:
            e = e.parent
        if e is not None and e.parent is not None:
            self.cur = e.parent

    def handle_data(self, data):
        self.cur.children.append(data)


def parse(page: str) -> Element:
    b = _Builder()
    b.feed(page)
    b.close()
    return b.root


def table_columns(table: Element) -> list[str]:
    """Each column's name, its group's words first when a first header row groups columns (``tutorial / with BN``)."""
    rows = table.find("thead").find_all("tr")
    names = [c.text() for c in rows[-1].children if isinstance(c, Element)]
    if len(rows) == 1:
        return names
    groups = []
    for c in rows[0].children:
        if isinstance(c, Element):
            groups += [c.text()] * int(c.attrs.get("colspan", 1))
    return [f"{g} / {n}" if g else n for g, n in zip(groups, names)]


def table_rows(table: Element) -> list[tuple[Element, list[Element]]]:
    """``(row, cells)`` of the body, cells in order (th and td)."""
    return [(tr, [c for c in tr.children if isinstance(c, Element) and c.tag in ("th", "td")])
            for tr in table.find("tbody").find_all("tr")]


def css_rules(page: Element) -> dict[str, str]:
    """Selector -> declarations of the page's inline stylesheets (outside @media blocks)."""
    css = " ".join(s.text() for s in page.find_all("style"))
    css = re.sub(r"@media[^{]*\{(?:[^{}]*\{[^}]*\})*\s*\}", "", css)
    return {sel.strip(): body for sels, body in re.findall(r"([^{}]+)\{([^}]*)\}", css) for sel in sels.split(",")}
