"""The documentation site: the API reference covers every public name, and ``mkdocs build --strict`` passes.

The reference pages are written by ``docs/gen_reference.py`` from the ``__all__``
lists; these tests hold them to the package as it is at run time, then build the
site as CI does and look for every public name's anchor in the HTML.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytest.importorskip("griffe", reason="the docs extra is not installed (pip install -e '.[docs]')")
sys.path.insert(0, str(ROOT / "docs"))
import gen_reference  # noqa: E402

import bnlab  # noqa: E402


@pytest.fixture(scope="module")
def pages():
    return gen_reference.pages()


def _runtime_public_modules() -> set[str]:
    names = {bnlab.__name__}
    for info in pkgutil.walk_packages(bnlab.__path__, prefix="bnlab."):
        if not any(part.startswith("_") for part in info.name.split(".")) and info.name not in gen_reference.EXCLUDED:
            names.add(info.name)
    return names


def test_reference_pages_are_current():
    stale = gen_reference.stale()
    assert not stale, f"run `python docs/gen_reference.py`: these differ from what it writes: {stale}"


def test_every_public_module_is_read_with_its_runtime_all():
    """griffe's static view (what the pages are written from) is the package as Python imports it."""
    package = gen_reference.load()
    static = {m.path: m for m in gen_reference.public_modules(package)}
    assert set(static) == _runtime_public_modules()
    for path, module in static.items():
        runtime = importlib.import_module(path)
        assert hasattr(runtime, "__all__"), f"{path} has no __all__"
        assert gen_reference.exports(module) == list(runtime.__all__), path
        for name in runtime.__all__:
            obj, ident = gen_reference.member(module, name)
            is_module = isinstance(getattr(runtime, name), type(bnlab))
            assert obj.is_module == is_module, f"{path}.{name}: griffe and Python disagree on what it is"


def test_pages_list_every_name_of_their_module(pages):
    by_module = {p.module: p for p in pages}
    assert "bnlab" in by_module and "bnlab.nn" in by_module and "bnlab.lab" in by_module
    for page in pages:
        runtime = importlib.import_module(page.module)
        assert page.names == list(runtime.__all__)
        assert set(page.ident) | set(page.links) == set(runtime.__all__), page.module
        text = (gen_reference.REFERENCE / f"{page.module}.md").read_text()
        for name, ident in page.ident.items():
            assert f"::: {ident}\n" in text, f"{page.module}.{name} is not documented on its page"
        for name, (_, ident) in page.links.items():
            assert f"][{ident}]" in text, f"{page.module}.{name} has no link to where it is documented"


def test_each_object_is_documented_once(pages):
    documented = [ident for page in pages for ident in page.ident.values()]
    assert len(documented) == len(set(documented))
    homes = {ident for page in pages for ident in page.ident.values()} | {page.module for page in pages}
    for page in pages:
        for name, (_, ident) in page.links.items():
            assert ident in homes, f"{page.module}.{name} links to {ident}, which no page documents"


def test_home_is_the_shortest_public_path(pages):
    anchors = gen_reference.anchors(pages)
    assert anchors["bnlab.BatchNorm"] == "bnlab.nn.BatchNorm"
    assert anchors["bnlab.fold"] == "bnlab.tools.fold"
    assert anchors["bnlab.lab.training.fit"] == "bnlab.lab.fit"
    # bnlab.tools.summary is the function at run time (the package rebinds the submodule's name)
    assert anchors["bnlab.summary"] == "bnlab.tools.summary.summary"
    assert bnlab.tools.summary is bnlab.summary


def _mkdocs(*args, cwd=ROOT) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
               NO_MKDOCS_2_WARNING="1")
    return subprocess.run([sys.executable, "-m", "mkdocs", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    pytest.importorskip("mkdocs", reason="the docs extra is not installed (pip install -e '.[docs]')")
    out = tmp_path_factory.mktemp("site")
    start = time.perf_counter()
    done = _mkdocs("build", "--strict", "--site-dir", str(out))
    assert done.returncode == 0, f"mkdocs build --strict failed:\n{done.stderr[-5000:]}"
    print(f"mkdocs build --strict: {time.perf_counter() - start:.1f} s")
    return out


def test_site_builds_strictly_with_an_anchor_for_every_public_name(site, pages):
    missing = []
    for page in pages:
        html = (site / "reference" / page.module / "index.html").read_text()
        for ident in [page.module, *page.ident.values()]:
            if f'id="{ident}"' not in html:
                missing.append(ident)
        for name, (_, ident) in page.links.items():
            if f'#{ident}"' not in html:
                missing.append(f"link {page.module}.{name} -> {ident}")
    assert not missing, f"not in the built site: {missing}"


def test_strict_build_fails_on_a_broken_reference(tmp_path):
    """The guard itself: the project's configuration turns an unknown cross-reference into a failed build."""
    pytest.importorskip("mkdocs", reason="the docs extra is not installed (pip install -e '.[docs]')")
    import yaml

    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "index.md").write_text("# Broken\n\nSee [the layer][bnlab.nn.NoSuchLayer].\n")
    config.update(docs_dir=str(docs), nav=[{"Home": "index.md"}])
    for plugin in config["plugins"]:
        if isinstance(plugin, dict) and "mkdocstrings" in plugin:
            python = plugin["mkdocstrings"]["handlers"]["python"]
            python["paths"] = [str(ROOT / "src")]
            python["options"]["extensions"] = [str(ROOT / p) for p in python["options"]["extensions"]]
    (tmp_path / "mkdocs.yml").write_text(yaml.safe_dump(config))
    done = _mkdocs("build", "--strict", "--site-dir", str(tmp_path / "site"), cwd=tmp_path)
    assert done.returncode != 0
    assert "bnlab.nn.NoSuchLayer" in done.stderr
