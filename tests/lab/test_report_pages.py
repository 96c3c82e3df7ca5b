"""Reports and the index as a reader meets them: the HTML parsed, the figures' artists read (issue 22).

Records are written by hand (fake_records) with fixed numbers, so every test knows what the page must show.
"""

import base64
import re

import numpy as np
import pytest
import torch

from bnlab.lab import analysis, plots, report

from .fake_records import write_experiment
from .html_dom import css_rules, parse, table_columns, table_rows

COMMIT = "0123456789abcdef0123456789abcdef01234567"
BN, NO_BN = [0.97, 0.99, 0.98], [0.80, 0.82, 0.81]  # BN reaches no-BN's best (0.81, epoch 5) at epoch 4


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("pages")
    env = {"bnlab": "0.1.0", "torch": torch.__version__, "numpy": np.__version__, "python": "3.11.7", "cpu_count": 2,
           "git_commit": COMMIT, "started": "2026-12-01T09:30:05+01:00"}
    write_experiment(root / "blobs-deep", {"bn": BN, "no_bn": NO_BN}, recipe="blobs-deep", test=True, facts={"steps_per_epoch": 3},
                     command=["run", "blobs-deep", "--seeds", "3", "epochs=5"], env=env)
    write_experiment(root / "digits28-mlp", {"bn": [0.97, 0.96, 0.975], "no_bn": [0.95, 0.962, 0.955]}, recipe="digits28-mlp",
                     test=True, command=["demo"])
    write_experiment(root / "mnist-mlp", {"bn": [0.97, 0.96], "no_bn": [0.95, 0.96]}, recipe="mnist-mlp", test=True)
    for name in ("blobs-deep", "digits28-mlp", "mnist-mlp"):
        report.build_report(root / name)
    return root


def page(root, name="blobs-deep"):
    return parse((root / name / "report.html").read_text())


def figures_table(doc):
    return next(t for t in doc.find_all("table") if table_columns(t)[0].startswith("figure"))


def row_of(table, figure: str):
    """The cells of the row whose figure is ``figure`` (its first cell starts with the name)."""
    return next(cells for _, cells in table_rows(table) if cells[0].text().startswith(figure))


def setup_items(doc) -> dict[str, str]:
    section = next(h for h in doc.find_all("h2") if h.text() == "Setup")
    ul = section.parent.children[section.parent.children.index(section) + 1:]
    ul = next(e for e in ul if getattr(e, "tag", None) == "ul")
    return {li.find("strong").text(): li.text().split(":", 1)[1].strip() for li in ul.find_all("li")}


NUMBER = re.compile(r"[+\-−]?\d+\.\d+")


# ----------------------------------------------------------------------------- the tutorial's figures


def test_the_tutorial_figures_sit_beside_ours_when_the_test_set_validates(root):
    """blobs-deep's tutorial printed test accuracy 0.84 (BN) and 0.86 (no-BN); our val_accuracy is that test accuracy."""
    table = figures_table(page(root))
    columns = table_columns(table)
    cells = row_of(table, "val_accuracy")
    tutorial = {c: cell.text() for c, cell in zip(columns, cells) if "tutorial" in c}
    assert sorted(tutorial.values()) == ["0.840", "0.860"], tutorial
    assert [c for c in tutorial if "without" in c and tutorial[c] == "0.860"]


def test_the_curves_and_the_per_seed_plot_draw_the_tutorial_figure(root):
    exp = analysis.load(root / "blobs-deep")
    fig = plots.curves_figure(exp, "accuracy")
    drawn = {(round(float(y), 4), line.get_color()) for ax in fig.axes for line in ax.get_lines()
             for y in set(np.asarray(line.get_ydata(), float).tolist()) if len(set(line.get_ydata())) == 1}
    assert (0.84, plots.ARM_STYLE["bn"]["color"]) in drawn and (0.86, plots.ARM_STYLE["no_bn"]["color"]) in drawn
    from matplotlib.collections import LineCollection

    ax = plots.finals_figure(exp, "val_accuracy").axes[0]
    levels = {(round(float(seg[0][1]), 4), tuple(np.round(c.get_color()[0][:3], 3)))
              for c in ax.collections if isinstance(c, LineCollection) for seg in c.get_segments()}
    from matplotlib.colors import to_rgb

    assert (0.84, tuple(np.round(to_rgb(plots.ARM_STYLE["bn"]["color"]), 3))) in levels
    assert (0.86, tuple(np.round(to_rgb(plots.ARM_STYLE["no_bn"]["color"]), 3))) in levels


def test_an_offline_stand_in_says_it_has_no_tutorial_figure(root):
    doc = page(root, "digits28-mlp")
    said = [p.text() for p in doc.find_all("p") if "no tutorial figure" in p.text().lower()]
    assert said and "offline stand-in for mnist-mlp" in said[0]
    columns = table_columns(figures_table(doc))
    assert not [c for c in columns if "tutorial" in c]  # no column of dashes


# ----------------------------------------------------------------------------- nothing said twice, nothing borrowed


def test_one_plot_per_distinct_quantity(root, tmp_path):
    exp = analysis.load(root / "blobs-deep")
    made = plots.plot_all(exp, tmp_path / "plots")
    assert "final-val_accuracy" in made and "final-test_accuracy" not in made  # the same data, validation = test set
    imgs = page(root).find_all("img")
    assert len({i.attrs["alt"] for i in imgs}) == len(imgs) and not [i for i in imgs if "test_accuracy" in i.attrs["alt"]]


def test_the_speedup_is_said_once_in_the_run_s_own_epochs_and_steps(root):
    doc = page(root)
    text = doc.find("main").text() if doc.find("main") else doc.text()
    said = [p.text() for p in doc.find_all("p") if "at epoch 4" in p.text()]  # BN reached the target at epoch 4
    assert len(said) == 1, said
    assert "ImageNet" not in text and "14 times" not in text
    verdict = analysis.verdict(analysis.load(root / "blobs-deep"))
    assert "at epoch 5, step 15) at epoch 4, step 12: 1.2 times fewer epochs and steps in this run." in verdict


# ----------------------------------------------------------------------------- what was run


def test_setup_lists_command_overrides_date_versions_commit_and_links_the_records(root):
    items = setup_items(page(root))
    assert items["command"] == "bnlab run blobs-deep --seeds 3 epochs=5"
    assert "epochs=5 (recipe default 100)" in items["overrides"] and "batch_size" not in items["overrides"]
    assert items["date"] == "2026-12-01 09:30 (UTC+01:00)"  # env.json's "started", in the run's own time zone
    older = setup_items(page(root, "digits28-mlp"))["date"]  # records from before env.json held it: config.json's time
    assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d \(when config.json was written", older), older
    assert COMMIT in items["code"] and f"torch {torch.__version__}" in items["software"]
    assert items["model"].startswith("blobs_mlp (depth=11)") and "{" not in items["model"]
    hrefs = {a.attrs.get("href") for a in page(root).find_all("a")}
    assert {"config.json", "env.json", "bn/seed-0/history.csv", "no_bn/seed-2/final.json"} <= hrefs
    assert all((root / "blobs-deep" / h).is_file() for h in hrefs if h and not h.startswith(("#", "..")))


def test_a_data_set_with_an_official_split_is_not_said_to_be_split_by_a_seed(root):
    assert setup_items(page(root, "mnist-mlp"))["data"] == "mnist, its official train/test split"
    assert "data seed 0" in setup_items(page(root))["data"]  # blobs: made and split with the seed


# ----------------------------------------------------------------------------- plots


def test_epoch_ticks_are_whole_numbers_and_the_legend_is_off_the_data(root):
    exp = analysis.load(root / "blobs-deep")
    fig = plots.curves_figure(exp, "accuracy")
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    for ax in fig.axes:
        lo, hi = ax.get_xlim()
        ticks = [t for t in ax.get_xticks() if lo <= t <= hi]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks
    legends = [*fig.legends, *[ax.get_legend() for ax in fig.axes if ax.get_legend()]]
    assert legends
    for legend in legends:
        box = legend.get_window_extent(renderer)
        assert not any(box.overlaps(ax.get_window_extent(renderer)) for ax in fig.axes)


def test_overlapping_bands_stay_apart_and_seeds_are_drawn_thin_under_the_mean(root):
    """The two arms' ± std bands differ in texture (BN filled, no-BN hatched) as well as in colour-blind-safe colour."""
    from matplotlib.collections import PolyCollection

    exp = analysis.load(root / "blobs-deep")
    for ax in plots.curves_figure(exp, "accuracy").axes:
        bands = [c for c in ax.collections if isinstance(c, PolyCollection)]
        assert len({c.get_hatch() for c in bands}) == 2, [c.get_hatch() for c in bands]
        lines = [line for line in ax.get_lines() if len(line.get_xdata()) == 5]
        widths = sorted(line.get_linewidth() for line in lines)
        assert len(lines) == 2 * 3 + 2 and widths[:6] == [widths[0]] * 6 and widths[-1] > 2 * widths[0]  # 3 thin seeds, 1 bold mean
    assert {plots.ARM_STYLE[a]["color"] for a in ("bn", "no_bn")} <= set(plots.OKABE_ITO.values())


def test_per_seed_points_are_labelled_with_their_seed_and_do_not_overlap(root):
    exp = analysis.load(root / "blobs-deep")
    ax = plots.finals_figure(exp, "val_accuracy").axes[0]
    labels = sorted(t.get_text() for t in ax.texts if t.get_text().isdigit())
    assert labels == ["0", "0", "1", "1", "2", "2"]
    from matplotlib.collections import PathCollection

    for points in (c for c in ax.collections if isinstance(c, PathCollection)):
        xs = points.get_offsets()[:, 0]
        assert len(set(np.round(xs, 6))) == len(xs)


def test_figures_are_embedded_as_svg_and_the_pngs_are_twice_the_screen_density(root):
    imgs = page(root).find_all("img")
    assert imgs
    for img in imgs:
        uri = img.attrs["src"]
        assert uri.startswith("data:image/svg+xml;base64,") and base64.b64decode(uri.split(",", 1)[1]).lstrip().startswith(b"<?xml")
    from PIL import Image

    png = root / "blobs-deep" / "plots" / "curves-accuracy.png"
    svg = (root / "blobs-deep" / "plots" / "curves-accuracy.svg").read_text()
    width_pt = float(re.search(r'<svg[^>]*\swidth="([\d.]+)pt"', svg)[1])
    assert Image.open(png).size[0] == pytest.approx(2 * width_pt * 96 / 72, rel=0.02)


# ----------------------------------------------------------------------------- numbers and the table


def verdict_text(doc) -> str:
    """The paragraph under the heading 'Verdict'."""
    h2 = next(h for h in doc.find_all("h2") if h.text() == "Verdict")
    siblings = h2.parent.children
    return next(e for e in siblings[siblings.index(h2) + 1:] if getattr(e, "tag", None) == "p").text()


def test_the_verdict_writes_its_interval_and_means_as_the_table_does(root):
    doc = page(root)
    verdict = verdict_text(doc)
    cells = row_of(figures_table(doc), "val_accuracy")
    columns = table_columns(figures_table(doc))
    ci = next(c.text() for col, c in zip(columns, cells) if "95% CI" in col)
    m = re.search(r"BN − no-BN = (\S+) \(95% CI (\S+) to (\S+), Welch's t\)", verdict)
    assert m and ci == f"{m[1]} [{m[2]}, {m[3]}]", (ci, verdict)
    with_bn = next(c.text() for col, c in zip(columns, cells) if col.endswith("with BN (n=3)"))
    assert f"was {with_bn} with BN" in verdict


@pytest.fixture(scope="module")
def worse(tmp_path_factory):
    """A blobs-deep run where BN is worse: negative differences and intervals."""
    d = write_experiment(tmp_path_factory.mktemp("neg") / "blobs-deep", {"bn": [0.70, 0.74, 0.69], "no_bn": [0.80, 0.83, 0.79]},
                         recipe="blobs-deep", test=True)
    report.build_report(d)
    return parse((d / "report.html").read_text())


def test_numbers_are_right_aligned_and_never_wrap(worse):
    for _, cells in table_rows(figures_table(worse)):
        numbers = [c for c in cells[1:] if NUMBER.search(c.text())]
        assert numbers and all("num" in c.classes for c in numbers), [c.text() for c in numbers]
    num = " ".join(body for sel, body in css_rules(worse).items() if sel.strip().endswith(".num")).replace(" ", "")
    assert "text-align:right" in num and "white-space:nowrap" in num


def test_one_precision_per_metric_and_a_true_minus_sign(worse):
    for _, cells in table_rows(figures_table(worse)):
        found = [n for c in cells[1:] for n in NUMBER.findall(c.text())]
        assert len({len(n.split(".")[1]) for n in found}) == 1, found  # one precision per row, every arm alike
        assert not [n for n in found if n.startswith("-")], found  # U+2212, never a hyphen
    verdict = verdict_text(worse)
    assert "−0.0" in verdict and not re.search(r"-\d", verdict)
    means = re.search(r"was (\S+) ± (\S+) with BN and (\S+) ± (\S+) without", verdict).groups()
    assert len({len(x.split(".")[1]) for x in means}) == 1, means


def test_the_verdict_row_and_the_better_direction_are_marked(root):
    table = figures_table(page(root))
    rows = table_rows(table)
    marked = [cells[0].text() for tr, cells in rows if "verdict" in tr.classes]
    assert len(marked) == 1 and marked[0].startswith("val_accuracy")
    for _, cells in rows:
        name = cells[0].text()
        assert ("↑" in name) == ("accuracy" in name.split()[0]) and ("↓" in name) == ("loss" in name.split()[0]), name


# ----------------------------------------------------------------------------- pages: phone, index, purity


def test_pages_have_a_viewport_and_tables_that_scroll_in_their_box(root):
    paths = [root / "blobs-deep" / "report.html"]
    if hasattr(report, "build_index"):
        report.build_index(root, ["blobs-deep", "digits28-mlp"])
        paths.append(root / "index.html")
    for path in paths:
        doc = parse(path.read_text())
        assert [m for m in doc.find_all("meta") if m.attrs.get("name") == "viewport" and "width=device-width" in m.attrs["content"]]
        for table in doc.find_all("table"):
            assert [a for a in table.ancestors() if "scroll" in a.classes]
        assert "overflow-x:auto" in css_rules(doc)[".scroll"].replace(" ", "")
    assert len(paths) == 2


def test_the_index_summarizes_and_links_every_report_and_back(root):
    report.build_index(root, ["blobs-deep", "digits28-mlp"], seconds={"blobs-deep": 12.5, "digits28-mlp": 3.25})
    doc = parse((root / "index.html").read_text())
    table = doc.find("table")
    columns = table_columns(table)
    assert columns[:6] == ["experiment: figure", "with BN", "without BN", "BN − no-BN [95% CI]", "tutorial", "verdict"]
    rows = {cells[0].find("a").attrs["href"]: dict(zip(columns, cells)) for _, cells in table_rows(table)}
    assert list(rows) == ["blobs-deep/report.html", "digits28-mlp/report.html"]
    bd = rows["blobs-deep/report.html"]
    assert bd["experiment: figure"].text() == "blobs-deep val_accuracy ↑ · 3 seeds · 12.5 s"
    exp = analysis.load(root / "blobs-deep")
    cmp = analysis.compare(exp)
    d = next(r for r in analysis.figure_rows(exp, cmp) if r.verdict)
    assert d.verdict and bd["BN − no-BN [95% CI]"].text() == analysis.fmt_interval(d.diff, d.decimals)
    assert bd["tutorial"].text() == "BN 0.840 no-BN 0.860" and bd["verdict"].text() == "BN better"
    assert rows["digits28-mlp/report.html"]["tutorial"].text() == "none (offline stand-in)"
    assert bd["curves"].find("img").attrs["src"].startswith("data:image/svg+xml;base64,")
    links = [a.text() or a.find("img").attrs["alt"] for a in doc.find_all("a")]
    assert len(links) == len(set(links)), links  # no two links read the same (a picture's link reads its alt text)
    # the demo's reports link back; a report of a plain `bnlab run` has no index to go back to
    back = [a.attrs["href"] for a in page(root, "digits28-mlp").find_all("a") if "experiments" in a.text()]
    assert back == ["../index.html"]
    assert not [a for a in page(root).find_all("a") if a.attrs.get("href") == "../index.html"]


def test_a_report_is_a_pure_function_of_its_records_and_asks_nothing_of_the_network(root, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(root / "blobs-deep", copy)
    shutil.rmtree(copy / "plots")
    report.build_report(copy)
    assert (copy / "report.html").read_bytes() == (root / "blobs-deep" / "report.html").read_bytes()
    doc = page(root)
    for e in doc.iter():
        for attr in ("src", "href"):
            value = e.attrs.get(attr) or ""
            assert not re.match(r"[a-z]+://|//", value), value  # only data: URIs and relative links
    assert not doc.find_all("script") and not doc.find_all("link")


def test_other_modules_add_sections_after_the_curves(root, tmp_path):
    """The hook for diagnostics: a Section's text, its figure (embedded SVG, linked PNG) and its fragment, in both files."""
    import shutil

    d = tmp_path / "blobs-deep"
    shutil.copytree(root / "blobs-deep", d)
    exp = analysis.load(d)
    fig = plots.thumbnail_figure(exp)
    plots._save(fig, d / "plots", "probe-demo")
    section = report.Section("Inside the network", ["Percentiles of **one** unit; see [its records](bn/seed-0/final.json)."],
                             ["probe-demo"], html="<table class='extra'><tr><td>7</td></tr></table>", markdown="| 7 |")
    report.build_report(d, sections=[section])
    doc = parse((d / "report.html").read_text())
    headings = [h.text() for h in doc.find_all("h2")]
    assert headings.index("Curves") < headings.index("Inside the network") < headings.index("Setup")
    assert [i.attrs["alt"] for i in doc.find_all("img")][-1] == "probe-demo" and doc.find("table", "extra")
    assert any(a.attrs.get("href") == "bn/seed-0/final.json" for a in doc.find_all("a"))
    md = (d / "report.md").read_text()
    assert "## Inside the network\n\nPercentiles of **one** unit" in md and "![probe-demo](plots/probe-demo.png)\n\n| 7 |" in md


def test_the_index_names_an_experiment_it_cannot_read(root, tmp_path):
    import shutil

    shutil.copytree(root / "blobs-deep", tmp_path / "blobs-deep")
    (tmp_path / "broken").mkdir()
    report.build_index(tmp_path, ["blobs-deep", "broken"])
    rows = table_rows(parse((tmp_path / "index.html").read_text()).find("table"))
    assert [cells[0].text().split()[0] for _, cells in rows] == ["blobs-deep", "broken"]
    assert "records unreadable" in rows[1][1][1].text() and "no config.json" in rows[1][1][1].text()
