"""Analysis, plots and the report: pure functions of records."""

import base64
import math
import re
import shutil
import subprocess

import numpy as np
import pytest

from bnlab import lab
from bnlab.lab import analysis, experiment, plots, records, report

from .fake_records import write_experiment


@pytest.fixture(scope="module")
def exp_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("rep") / "diabetes"
    experiment.run_experiment(lab.with_overrides(lab.get("diabetes"), ["epochs=6"]), out, seeds=[0, 1, 2])
    report.build_report(out)
    return out


def test_curves_figure_has_axes_labels_and_lines(exp_dir):
    exp = analysis.load(exp_dir)
    fig = plots.curves_figure(exp, "loss")
    (ax,) = fig.axes
    assert ax.get_xlabel() == "epoch" and ax.get_ylabel().startswith("loss") and "mean ± 1 std" in ax.get_title()
    curves = [line for line in ax.get_lines() if line.get_linestyle() in ("-", "--")]
    assert len(curves) == 4  # 2 arms x (training, validation)
    markers = [line for line in ax.get_lines() if line.get_linestyle() == "None"]
    assert len(markers) == 2  # the tutorial's training and validation loss with BN
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "with BN, training (n=3)" in labels and "without BN, validation (n=3)" in labels
    assert len(ax.collections) == 4  # one ± std band per curve
    colors = {line.get_label().split(",")[0]: line.get_color() for line in curves}
    assert colors["with BN"] == plots.ARM_STYLE["bn"]["color"] and colors["without BN"] == plots.ARM_STYLE["no_bn"]["color"]
    mae = plots.curves_figure(exp, "mae").axes[0]
    assert mae.get_ylabel() == "mean absolute error"


def test_finals_figure(exp_dir):
    exp = analysis.load(exp_dir)
    ax = plots.finals_figure(exp, "val_loss").axes[0]
    from matplotlib.collections import PathCollection

    points = [c for c in ax.collections if isinstance(c, PathCollection)]
    assert len(points) == 2 and all(len(c.get_offsets()) == 3 for c in points)  # 3 seeds per arm, plus a mean bar each
    assert [t.get_text() for t in ax.get_xticklabels()] == ["with BN\n(n=3)", "without BN\n(n=3)"]


def test_report_contents(exp_dir):
    md = (exp_dir / "report.md").read_text()
    assert md.startswith("# diabetes: does batch normalization help?")
    assert "## Verdict" in md and "Welch's t" in md and "| val_loss |" in md and "0.6657" in md  # the tutorial's figure
    assert "![curves-loss](plots/curves-loss.png)" in md
    html = (exp_dir / "report.html").read_text()
    assert html.count("data:image/png;base64,") == md.count("![")  # self-contained
    table_rows = [line for line in md.splitlines() if line.startswith("| ") and not line.startswith("| figure")]
    assert html.count("<table>") == 1 and html.count("<tr>") == 1 + len(table_rows)  # header + one row per figure
    assert "src=\"plots/" not in html
    png = html.split("data:image/png;base64,")[1].split('"')[0]
    assert base64.b64decode(png)[:8] == b"\x89PNG\r\n\x1a\n"


def test_verdict_is_computed_from_the_numbers(tmp_path):
    def fake(root, bn_vals, nobn_vals):
        return analysis.load(write_experiment(root, {"bn": bn_vals, "no_bn": nobn_vals}))

    better = analysis.verdict(fake(tmp_path / "a", [0.90, 0.91, 0.92], [0.80, 0.81, 0.79]))
    assert "clearly better" in better and "0.91" in better
    worse = analysis.verdict(fake(tmp_path / "b", [0.70, 0.71, 0.72], [0.80, 0.81, 0.79]))
    assert "clearly worse" in worse
    same = analysis.verdict(fake(tmp_path / "c", [0.80, 0.84, 0.78], [0.81, 0.79, 0.82]))
    assert "includes zero" in same


def _welch(a, b):
    """BN - no-BN and its 95% Welch interval, computed directly by scipy (the oracle)."""
    from scipy import stats

    ci = stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    return float(np.mean(a) - np.mean(b)), float(ci.low), float(ci.high)


def _md_cell(md: str, figure: str, column: int) -> str:
    row = next(line for line in md.splitlines() if line.startswith(f"| {figure} |"))
    return [c.strip() for c in row.strip("|").split("|")][column]


def _interval(cell: str) -> tuple[float, float, float]:
    """'+0.0575 [+0.0151, +0.0999]' -> (0.0575, 0.0151, 0.0999)."""
    m = re.fullmatch(r"([-+]?[\d.]+) \[([-+]?[\d.]+), ([-+]?[\d.]+)\]", cell.strip())
    assert m, f"not an interval cell: {cell!r}"
    return tuple(float(g) for g in m.groups())


@pytest.mark.parametrize("bn,no_bn", [
    ([0.91, 0.93, 0.90, 0.95], [0.85, 0.88, 0.80]),  # BN better: a positive difference
    ([0.70, 0.74, 0.69], [0.80, 0.83, 0.79, 0.82]),  # BN worse: negative
    ([0.80, 0.84, 0.78], [0.81, 0.79, 0.82]),  # the interval straddles zero
])
def test_report_and_cli_intervals_equal_a_direct_welch_computation(tmp_path, capsys, bn, no_bn):
    """The BN − no-BN cell of report.md and of `bnlab report`'s table: difference, lower and upper bound, in order."""
    from bnlab.cli import main

    root = write_experiment(tmp_path / "x", {"bn": bn, "no_bn": no_bn})
    diff, low, high = _welch(bn, no_bn)
    assert low < diff < high
    assert main(["report", str(root)]) == 0
    out = capsys.readouterr().out
    md = (root / "report.md").read_text()
    md_d, md_lo, md_hi = _interval(_md_cell(md, "val_accuracy", 3))
    assert (md_d, md_lo, md_hi) == pytest.approx((diff, low, high), abs=6e-5)  # 4 decimals in the report
    line = next(line for line in out.splitlines() if line.lstrip("│┃ ").startswith("val_accuracy"))
    cli_d, cli_lo, cli_hi = _interval(line.strip("│┃ ").split("│")[-1])
    assert (cli_d, cli_lo, cli_hi) == pytest.approx((diff, low, high), abs=6e-5)
    assert f"95% CI {low:.4g} to {high:.4g}, Welch's t" in out  # the verdict printed by `bnlab report`
    assert _md_cell(md, "val_accuracy", 1) == f"{np.mean(bn):.4f} ± {np.std(bn, ddof=1):.4f} (n={len(bn)})"


def test_diverged_and_unreadable_seeds_are_counted_not_dropped(tmp_path, capsys):
    """Fixed records: no-BN diverged in 2 of its 5 seeds, BN seed 4's history is cut mid-line."""
    from bnlab.cli import main

    bn = [0.90, 0.92, 0.91, 0.93, 0.99]
    no_bn = [0.80, ("diverged", 3), 0.82, ("diverged", 1), 0.81]
    root = write_experiment(tmp_path / "x", {"bn": bn, "no_bn": no_bn})
    hist = root / "bn" / "seed-4" / "history.csv"
    hist.write_bytes(hist.read_bytes()[:-7])
    exp = analysis.load(root)
    assert exp.arms["bn"].seeds == [0, 1, 2, 3] and exp.arms["bn"].unreadable.keys() == {4}
    assert exp.arms["no_bn"].seeds == [0, 2, 4] and exp.arms["no_bn"].diverged == {1: 3, 3: 1}
    cmp = analysis.compare(exp)
    assert cmp["runs"]["no_bn"] == {"planned": [0, 1, 2, 3, 4], "finished": [0, 2, 4], "diverged": {1: 3, 3: 1},
                                    "unreadable": {}, "unfinished": []}
    assert cmp["table"]["val_accuracy"]["bn"]["n"] == 4 and cmp["table"]["val_accuracy"]["no_bn"]["n"] == 3
    diff, low, high = _welch(bn[:4], [0.80, 0.82, 0.81])
    sentences = analysis.verdict_sentences(exp, cmp)
    assert sentences[:3] == [
        "BN diverged in 0/4 seeds, no-BN in 2/5 (a loss that was no longer finite stopped training; "
        "the figures compare the runs that did not diverge).",
        "Left out because their records are unreadable: BN seed 4.",
        f"On blobs, the final val_accuracy was {np.mean(bn[:4]):.4g} ± {np.std(bn[:4], ddof=1):.2g} with BN and "
        f"0.81 ± {np.std([0.80, 0.82, 0.81], ddof=1):.2g} without (mean ± std over 4 and 3 seeds).",
    ]
    assert sentences[3] == (f"BN − no-BN = {diff:.4g} (95% CI {low:.4g} to {high:.4g}, Welch's t): "
                            "BN made the val_accuracy clearly better here.")
    assert main(["report", str(root)]) == 1  # a damaged record: reported, and the exit code says so
    captured = capsys.readouterr()
    assert f"bnlab: warning: {hist}: row 5 has" in captured.err and "seed 4 of the BN arm is left out" in captured.err
    assert "Traceback" not in captured.err
    for sentence in sentences:
        assert sentence in captured.out
    md = (root / "report.md").read_text()
    assert "- **no-BN arm**: 3 of 5 finished; diverged: seed 1 at epoch 3, seed 3 at epoch 1" in md
    assert f"- **BN arm**: 4 of 5 finished; unreadable, left out: seed 4 ({hist}: row 5 has" in md
    assert _md_cell(md, "val_accuracy", 2).endswith("(n=3)") and _md_cell(md, "val_accuracy", 1).endswith("(n=4)")


def test_an_empty_history_is_not_counted(tmp_path):
    root = write_experiment(tmp_path / "x", {"bn": [0.9, 0.91, 0.92], "no_bn": [0.8, 0.81, 0.82]})
    (root / "no_bn" / "seed-2" / "history.csv").write_text("")
    exp = analysis.load(root)
    assert exp.arms["no_bn"].seeds == [0, 1] and "is empty" in exp.arms["no_bn"].unreadable[2]
    assert analysis.compare(exp)["table"]["val_accuracy"]["no_bn"]["n"] == 2


def test_every_arm_diverged_gives_a_verdict_not_an_error(tmp_path):
    exp = analysis.load(write_experiment(tmp_path / "x", {"bn": [("diverged", 2)] * 2, "no_bn": [("diverged", 1), 0.7]}))
    assert analysis.verdict_sentences(exp) == [
        "BN diverged in 2/2 seeds, no-BN in 1/2 (a loss that was no longer finite stopped training; "
        "the figures compare the runs that did not diverge).",
        "No run of the BN arm finished on blobs without diverging or damaged records, so there are no final figures to compare.",
    ]
    report.build_report(exp.path, exp)  # and the report is written


def test_notes_are_computed_from_the_configuration_that_ran(tmp_path):
    """digits28-cnn's note derives its update count from the data and batch size that ran (125 only at batch 250)."""
    recipe = lab.with_overrides(lab.get("digits28-cnn"), ["epochs=1", "batch_size=100"])
    out = experiment.run_experiment(recipe, tmp_path / "cnn", seeds=[0], arms=["no_bn"])
    train = int(1437 * (1 - 0.2))  # digits28: 1,437 training images, the last 20% validate
    updates = math.ceil(train / 100) * 1
    assert records.read_config(out / "config.json")["facts"]["updates"] == updates == 12
    report.build_report(out)
    md = (out / "report.md").read_text()
    assert f"With {train:,} training images at batch 100 over 1 epochs there are only {updates} updates" in md
    assert f"keep 0.99^{updates} = {0.99**updates:.0%} of their initial values" in md
    default = records.read_config(out / "config.json")
    assert "125 updates" not in md.split("At the recipe's own settings")[0]
    assert default["recipe"]["batch_size"] == 100


def test_welch_interval_matches_scipy():
    from scipy import stats

    a, b = np.array([0.91, 0.93, 0.90, 0.95]), np.array([0.85, 0.88, 0.80])
    d, lo, hi, dof = analysis.welch_interval(a, b)
    ci = stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    assert d == pytest.approx(a.mean() - b.mean())
    assert lo == pytest.approx(ci.low) and hi == pytest.approx(ci.high)


def test_epochs_to_target():
    bn = np.array([[0.5, 0.8, 0.9, 0.95], [0.6, 0.8, 0.92, 0.95]])
    ref = np.array([[0.4, 0.6, 0.7, 0.9], [0.4, 0.6, 0.8, 0.9]])
    ett = analysis.epochs_to_target(bn, ref, higher=True)
    assert ett == {"target": 0.9, "reference_epoch": 4, "bn_epoch": 3, "speedup": 4 / 3}
    assert analysis.epochs_to_target(ref, bn, higher=True)["bn_epoch"] is None


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium is not installed (apt-get install chromium)")
def test_report_html_renders_in_headless_chromium(exp_dir, tmp_path):
    shot = tmp_path / "shot.png"
    cmd = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1000,1400", f"--screenshot={shot}",
           (exp_dir / "report.html").as_uri()]
    subprocess.run(cmd, capture_output=True, timeout=120)
    assert shot.exists()
    from matplotlib.image import imread

    img = imread(shot)[..., :3]
    assert img.shape[0] >= 1000 and img.std() > 0.05  # not a blank page
    dark = (img.mean(-1) < 0.5).mean()
    assert 0.002 < dark < 0.5  # text and plots drawn on a light page
