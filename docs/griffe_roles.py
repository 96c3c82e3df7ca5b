"""A griffe extension for the docs build: the docstrings' Sphinx roles become links.

bnlab's docstrings are read as plain text (``help()``), as doctests and as this
site's Markdown. They name other objects Sphinx's way, ``:func:`bnlab.fold```
or ``:class:`BatchNorm```. Here each such role becomes a cross-reference to the
page that documents the object (``docs/gen_reference.py`` says which), checked
by the strict build like any other link; a role naming something the
reference does not document (a private helper, a torch function) becomes code.
A literal block introduced Sphinx's way (a line ending in ``::``) is
introduced with one colon, which is what Markdown and griffe's Google-style
sections expect.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import griffe

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gen_reference  # noqa: E402  (the reference's rules: where each public object is documented)

ROLE = re.compile(r":(?:py:)?(?:func|class|meth|mod|data|attr|obj|exc|const):`([^`]+)`")
DOUBLE_COLON = re.compile(r"(?<=\S)::$", re.M)


class SphinxRoles(griffe.Extension):
    def on_package(self, *, pkg, **kwargs) -> None:
        if pkg.path != gen_reference.PACKAGE:
            return
        pages = gen_reference.pages(pkg)
        public = gen_reference.anchors(pages)
        defined = {}  # defining path -> identifier of its documentation
        for page in pages:
            public[page.module] = defined[page.module] = page.module
            for name, ident in page.ident.items():
                obj, _ = gen_reference.member(pkg if page.module == pkg.path else pkg[page.module.split(".", 1)[1]], name)
                defined[obj.path] = ident
        self._pkg, self._public, self._defined = pkg, public, defined
        for obj in _objects(pkg):
            if obj.docstring is not None:
                text = ROLE.sub(lambda m: self._link(m.group(1), obj), obj.docstring.value)
                obj.docstring.value = DOUBLE_COLON.sub(":", text)

    def _link(self, target: str, owner) -> str:
        short = target.startswith("~")
        target = target.lstrip("~!")
        display = target.rsplit(".", 1)[-1] if short else target
        scopes = [owner.path]
        parent = owner.parent
        while parent is not None:
            scopes.append(parent.path)
            parent = parent.parent
        candidates = [target] + [f"{scope}.{target}" for scope in scopes]
        for path in candidates:
            ident = self._ident(path)
            if ident:
                return f"[`{display}`][{ident}]"
        return f"`{display}`"

    def _ident(self, path: str) -> str | None:
        """The identifier documenting ``path`` (a public path, a defining path, or a class member), if any."""
        if path in self._public:
            return self._public[path]
        if path in self._defined:
            return self._defined[path]
        owner, _, attr = path.rpartition(".")
        base = self._public.get(owner) or self._defined.get(owner)
        if base and not attr.startswith("_"):
            try:
                obj = self._pkg[base.split(".", 1)[1]] if "." in base else self._pkg
                obj = obj.final_target if obj.is_alias else obj
            except (KeyError, griffe.AliasResolutionError):
                return None
            member = obj.all_members.get(attr) if obj.is_class else None
            if member is not None and member.docstring:  # the reference shows documented members only
                return f"{base}.{attr}"
        return None


def _objects(obj):
    yield obj
    for member in obj.members.values():
        if not member.is_alias:
            yield from _objects(member)
