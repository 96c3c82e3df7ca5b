"""Write the API reference from the package's ``__all__`` lists.

    python docs/gen_reference.py            # write docs/reference/*.md and the reference nav in mkdocs.yml
    python docs/gen_reference.py --check    # exit 1, naming the files, if what is committed differs

The rules, in one place:

- Every module whose dotted path has no part starting with ``_`` is public,
  except those in ``EXCLUDED`` (with the reason). Each must have ``__all__``.
- Every name in a public module's ``__all__`` is documented once, in full, at
  its *home*: of the public modules exporting that object, the one with the
  shortest path, not counting the top-level ``bnlab`` (an index of shortcuts),
  ties going to the module that defines it. ``bnlab.fold`` is at home in
  ``bnlab.tools``, ``bnlab.lab.fit`` in ``bnlab.lab``.
- A package has a page; a plain module has one when it is home to a name.
  Every other name on a page is a link to its home.

The package is read statically with griffe (the library mkdocstrings uses), so
this neither imports torch nor runs the package. ``tests/test_docs.py`` checks
that the committed pages are what this writes, that each module's runtime
``__all__`` is what griffe read, and that the built site has an anchor for
every name.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import griffe

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
DOCS = ROOT / "docs"
REFERENCE = DOCS / "reference"
MKDOCS_YML = ROOT / "mkdocs.yml"
PACKAGE = "bnlab"

EXCLUDED = {
    "bnlab.__main__": "the entry point of `python -m bnlab`",
    "bnlab.cli": "the `bnlab` command, described in the lab guide and by `bnlab --help`",
}

# Sections of the reference nav, in reading order; a module goes to the first whose prefix matches.
SECTIONS = (
    ("Core", ("bnlab", "bnlab.nn", "bnlab.functional", "bnlab.initializers", "bnlab.regularizers",
              "bnlab.constraints", "bnlab.conventions", "bnlab.reference")),
    ("Model tools", ("bnlab.tools", "bnlab.keras")),
    ("Data", ("bnlab.data",)),
    ("Lab", ("bnlab.lab",)),
)

# mkdocstrings options for one object, where its docstring needs them. Each entry says why and when it goes.
OPTIONS = {
    # "unit (int or ``{layer name: int}``, default 0)": the colon inside the type ends the parameter's name
    # for griffe's Google parser. Remove once that docstring says the type without a colon.
    "bnlab.lab.probes.Probes": {"docstring_options": "{warn_unknown_params: false, warn_missing_types: false}"},
}

NAV_BEGIN = "      # reference: begin (written by docs/gen_reference.py; do not edit by hand)"
NAV_END = "      # reference: end"


@dataclass
class Page:
    module: str
    names: list[str]
    docstring: bool
    ident: dict[str, str] = field(default_factory=dict)  # name -> identifier documented here (at home here)
    links: dict[str, tuple[str, str]] = field(default_factory=dict)  # name -> (public path, identifier) elsewhere


def load():
    return griffe.load(PACKAGE, search_paths=[str(SRC)], resolve_aliases=True, allow_inspection=False)


def _walk(module):
    yield module
    for member in module.members.values():
        if not member.is_alias and member.is_module:
            yield from _walk(member)


def public_modules(package) -> list:
    """The public modules, as griffe objects, in a stable order."""
    mods = [m for m in _walk(package)
            if not any(part.startswith("_") for part in m.path.split(".")) and m.path not in EXCLUDED]
    return sorted(mods, key=lambda m: m.path)


def exports(module) -> list[str]:
    names = module.exports
    if names is None:
        raise SystemExit(f"{module.path} has no __all__: say what is public (or add it to EXCLUDED with a reason)")
    return [str(n) for n in names]


def member(module, name: str):
    """The object ``module.name`` is at run time, and the identifier mkdocstrings documents it under.

    One case differs from griffe's static view: a package that does ``from .summary import summary``
    rebinds ``summary`` from the submodule to the function, so ``bnlab.tools.summary`` is the function
    at run time; griffe (and mkdocstrings) see the submodule there and reach the function only by its
    defining path.
    """
    try:
        obj = module[name]
    except KeyError:
        raise SystemExit(f"{module.path}.__all__ names {name!r}, which the module does not define") from None
    target = obj.final_target if obj.is_alias else obj
    if target.is_module and name in (target.exports or ()):
        inner = target[name]
        inner = inner.final_target if inner.is_alias else inner
        if not inner.is_module:
            return inner, inner.path
    return target, f"{module.path}.{name}"


def canonical(obj) -> str:
    """The path where an exported object is defined."""
    return obj.final_target.path if obj.is_alias else obj.path


def _section(path: str) -> int:
    return _order(path)[0]


def _order(path: str) -> tuple:
    """(section, place of the matching prefix in it, path): the nav order."""
    for i, (_, prefixes) in enumerate(SECTIONS):
        for j, prefix in enumerate(prefixes):
            if path == prefix or (prefix != PACKAGE and path.startswith(prefix + ".")):
                return i, j, path
    return len(SECTIONS), 0, path


def pages(package=None) -> list[Page]:
    """The reference pages, in nav order, each with its names and where each is documented."""
    package = package or load()
    modules = public_modules(package)
    exporters: dict[str, list[str]] = {}  # defining path -> public modules exporting the object
    ident: dict[tuple[str, str], str] = {}  # (module, name) -> identifier
    is_module: dict[str, bool] = {}
    for mod in modules:
        for name in exports(mod):
            obj, ident[mod.path, name] = member(mod, name)
            exporters.setdefault(obj.path, []).append(mod.path)
            is_module[obj.path] = obj.is_module
    home: dict[str, str] = {}
    for target, mods in exporters.items():
        if not is_module[target]:  # an exported module is documented on its own page
            candidates = [m for m in mods if m != PACKAGE] or mods
            home[target] = min(candidates, key=lambda m: (m.count("."), not target.startswith(m + "."), m))
    with_page = {m.path for m in modules if m.is_package} | set(home.values())
    out = []
    for mod in modules:
        if mod.path not in with_page:
            continue
        page = Page(mod.path, exports(mod), docstring=bool(mod.docstring))
        for name in page.names:
            obj, _ = member(mod, name)
            if is_module[obj.path]:
                page.links[name] = (obj.path, obj.path)
            elif home[obj.path] == mod.path:
                page.ident[name] = ident[mod.path, name]
            else:
                page.links[name] = (f"{home[obj.path]}.{name}", ident[home[obj.path], name])
        out.append(page)
    return sorted(out, key=lambda p: _order(p.module))


def anchors(all_pages: list[Page]) -> dict[str, str]:
    """Every public path ``module.name`` -> the identifier (HTML anchor) it is documented under."""
    out = {}
    for page in all_pages:
        for name in page.names:
            out[f"{page.module}.{name}"] = page.ident.get(name) or page.links[name][1]
    return out


def render(page: Page) -> str:
    # The page's title is the module itself (its docstring, heading id = the module's path).
    lines = [f"::: {page.module}", "    options:", "      heading_level: 1", "      show_root_full_path: true",
             "      members: false", ""]
    if page.links:
        lines += ["Exported here, documented where linked:" if not page.ident else "Also exported here:", "",
                  "| name | documented at |", "|---|---|"]
        lines += [f"| `{name}` | [`{path}`][{ident}] |" for name, (path, ident) in page.links.items()]
        lines.append("")
    for ident in page.ident.values():
        lines.append(f"::: {ident}")
        options = OPTIONS.get(ident)
        if options:
            lines += ["    options:"] + [f"      {key}: {value}" for key, value in options.items()]
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def nav(all_pages: list[Page]) -> str:
    lines = [NAV_BEGIN]
    current = None
    for page in all_pages:
        title = SECTIONS[_section(page.module)][0] if _section(page.module) < len(SECTIONS) else "Other"
        if title != current:
            lines.append(f"      - {title}:")
            current = title
        lines.append(f"        - {page.module}: reference/{page.module}.md")
    lines.append(NAV_END)
    return "\n".join(lines)


def expected_files(package=None) -> dict[Path, str]:
    """Every file this script writes, with its text."""
    all_pages = pages(package)
    files = {REFERENCE / f"{p.module}.md": render(p) for p in all_pages}
    yml = MKDOCS_YML.read_text()
    block = re.compile(re.escape(NAV_BEGIN) + r".*?" + re.escape(NAV_END), re.S)
    if not block.search(yml):
        raise SystemExit(f"{MKDOCS_YML.name} has no reference nav block: add the lines\n{NAV_BEGIN}\n{NAV_END}")
    files[MKDOCS_YML] = block.sub(lambda _: nav(all_pages), yml)
    return files


def stale(package=None) -> list[str]:
    """Files that differ from what this script would write (and reference pages it would not write)."""
    files = expected_files(package)
    out = [str(p.relative_to(ROOT)) for p, text in files.items() if not p.exists() or p.read_text() != text]
    out += [str(p.relative_to(ROOT)) for p in sorted(REFERENCE.glob("*.md")) if p not in files]
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only say which files differ (exit 1 if any)")
    args = parser.parse_args(argv)
    if args.check:
        differ = stale()
        for path in differ:
            print(f"out of date: {path} (run python docs/gen_reference.py)")
        return 1 if differ else 0
    files = expected_files()
    REFERENCE.mkdir(parents=True, exist_ok=True)
    for path in REFERENCE.glob("*.md"):
        if path not in files:
            path.unlink()
    for path, text in files.items():
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
            print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
