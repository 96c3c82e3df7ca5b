"""The index and a report in headless Chromium at a desktop's and a phone's width: what a person would check."""

import pytest

from bnlab.lab import report

from . import browser
from .fake_records import write_experiment

pytestmark = pytest.mark.skipif(browser.executable() is None,
                                reason="no Chromium to render the pages with (Debian: apt-get install chromium)")

# What a reader would look at, measured in the page: anything wider than the window that no scrolling box holds,
# images that did not load, numbers that are not right-aligned or break over lines, the tutorial's figures, figures
# off-centre.
CHECK = """(() => {
  const W = window.innerWidth;
  const scrolling = [...document.querySelectorAll('.scroll')].filter(e => e.scrollWidth > e.clientWidth + 1)
    .map(e => e.firstElementChild.className);
  const held = el => { for (let a = el.parentElement; a; a = a.parentElement) {
      const o = getComputedStyle(a).overflowX; if (o === 'auto' || o === 'scroll') return true; } return false; };
  const overflow = [...document.body.querySelectorAll('*')].filter(el => {
      const r = el.getBoundingClientRect(); return r.width > 0 && (r.right > W + 0.5 || r.left < -0.5) && !held(el); })
    .map(el => el.tagName + '.' + el.className);
  const lines = el => { const r = document.createRange(); r.selectNodeContents(el);
      return new Set([...r.getClientRects()].map(x => Math.round(x.top))).size; };
  const main = document.querySelector('main').getBoundingClientRect();
  return {
    scrollWidth: document.documentElement.scrollWidth, width: W, overflow, scrolling,
    images: [...document.images].map(i => ({alt: i.alt, loaded: i.complete && i.naturalWidth > 0, width: i.getBoundingClientRect().width})),
    numbers: [...document.querySelectorAll('td.num')].map(td => ({text: td.innerText, align: getComputedStyle(td).textAlign,
      cell: getComputedStyle(td).display === 'table-cell', lines: lines(td)})),
    tutorial: [...document.querySelectorAll('td.tutorial')].filter(td => td.getClientRects().length).map(td => td.innerText),
    offCentre: [...document.querySelectorAll('figure img')].map(i => { const r = i.getBoundingClientRect();
        return r.width < main.width - 1 ? Math.abs((r.left - main.left) - (main.right - r.right)) : 0; }),
  };
})()"""


@pytest.fixture(scope="module")
def pages(tmp_path_factory):
    root = tmp_path_factory.mktemp("browser")
    write_experiment(root / "blobs-deep", {"bn": [0.80, 0.82, 0.78], "no_bn": [0.85, 0.84, 0.86]}, recipe="blobs-deep", test=True,
                     command=["demo"])
    write_experiment(root / "digits28-mlp", {"bn": [0.97, 0.96, 0.975], "no_bn": [0.95, 0.962, 0.955]}, recipe="digits28-mlp",
                     test=True, command=["demo"])
    for name in ("blobs-deep", "digits28-mlp"):
        report.build_report(root / name)
    report.build_index(root, ["blobs-deep", "digits28-mlp"])
    return {"index": root / "index.html", "report": root / "blobs-deep" / "report.html"}


@pytest.fixture(scope="module")
def chromium():
    with browser.Browser() as b:
        yield b


@pytest.mark.parametrize("width", [1280, 390])
def test_index_and_report_read_well_at_desktop_and_phone_width(pages, chromium, width):
    for name, path in pages.items():
        tab = chromium.open(path, width)
        seen = tab.eval(CHECK)
        where = f"{name} at {width} px"
        assert seen["scrollWidth"] <= width and not seen["overflow"], (where, seen["scrollWidth"], seen["overflow"][:5])
        if name == "index" or width > 1000:  # on a phone only a report's tables may scroll sideways in their box
            assert not seen["scrolling"], (where, seen["scrolling"])
        assert seen["images"] and all(i["loaded"] and i["width"] > 0 for i in seen["images"]), (where, seen["images"])
        numbers = seen["numbers"]  # right-aligned in columns (a phone's index shows one card per experiment instead)
        assert numbers and all(n["align"] == "right" or not n["cell"] for n in numbers), (where, numbers)
        assert all(n["lines"] == 1 for n in numbers), (where, numbers)
        shown = " ".join(" ".join(seen["tutorial"]).split())
        assert "0.840" in shown and "0.860" in shown, (where, seen["tutorial"])  # blobs-deep's tutorial figures
        if name == "index":
            assert "none (offline stand-in)" in shown
        if width > 1000:
            assert max(seen["offCentre"], default=0) < 2, (where, seen["offCentre"])
        assert all(u.startswith(("file://", "data:")) for u in tab.requests()), (where, tab.requests())
        tab.close()
