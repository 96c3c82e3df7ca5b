"""Every Python block of README.md and docs/ runs, as a reader would run it (sybil).

Each page's blocks run in order in one namespace, so a later block may use what an
earlier one made; a block states its results with ``assert``. Blocks that must not
run (shell commands, output) are fenced as ``bash`` or ``text``, never ``python``.
Fences with markdown-exec's options (```` ```python exec="on" ````, whose output the
site shows) run here too.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

sybil = pytest.importorskip("sybil", reason="sybil is in the test extra (pip install -e '.[test]')")
from sybil.parsers.markdown import PythonCodeBlockParser  # noqa: E402
from sybil.parsers.markdown.codeblock import CodeBlockParser  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# (docs/reference/ is written by docs/gen_reference.py and holds no code blocks)
PAGES = [ROOT / "README.md", *sorted(p for p in (ROOT / "docs").rglob("*.md") if p.parent != ROOT / "docs" / "reference")]
PYTHON_FENCE = re.compile(r"^[ \t]*```python\b", re.M)


class _PythonFences(CodeBlockParser):
    """Sybil's code-block parser, taking a fence whose info string starts with the language."""

    def __call__(self, document):
        for region in self.lexers(document):
            if region.lexemes["arguments"].split(maxsplit=1)[0] == self.language:
                region.parsed = region.lexemes["source"]
                region.evaluator = self._evaluator or self.evaluate
                yield region


class _PythonBlocks(PythonCodeBlockParser):
    codeblock_parser_class = _PythonFences


SYBIL = sybil.Sybil(parsers=[_PythonBlocks()])


def _line(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_python_blocks_run(page, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # a block that writes files writes them here
    document = SYBIL.parse(page)
    examples = list(document)
    fences = [m.start() for m in PYTHON_FENCE.finditer(document.text)]
    starts = sorted(e.region.start for e in examples)
    assert starts == fences, f"{page.name}: sybil found python blocks at {starts}, the page has them at {fences}"
    for example in examples:
        try:
            example.evaluate()
        except Exception as error:  # say where, then fail with the block's own error
            raise AssertionError(f"{page.name}, the block at line {_line(document.text, example.region.start)}: "
                                 f"{type(error).__name__}: {error}") from error


def test_the_readme_shows_python_examples():
    assert len(PYTHON_FENCE.findall((ROOT / "README.md").read_text())) >= 2
