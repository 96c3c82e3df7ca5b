"""Analysis, plots and the report: pure functions of records."""

import base64
import shutil
import subprocess

import numpy as np
import pytest

from bnlab import lab
from bnlab.lab import analysis, experiment, plots, records, report


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
        cfg = {"recipe": lab.get("blobs").to_dict(), "seeds": list(range(len(bn_vals))), "arms": ["bn", "no_bn"]}
        records.write_json(root / "config.json", cfg)
        for arm, vals in (("bn", bn_vals), ("no_bn", nobn_vals)):
            for s, v in enumerate(vals):
                rd = records.run_dir(root, arm, s)
                curve = list(np.linspace(0.5, v, 5))
                records.write_history(rd / "history.csv", {"loss": [1.0] * 5, "val_accuracy": curve})
                records.write_json(rd / "final.json", {"arm": arm, "seed": s, "val_accuracy": v})
        return analysis.load(root)

    better = analysis.verdict(fake(tmp_path / "a", [0.90, 0.91, 0.92], [0.80, 0.81, 0.79]))
    assert "clearly better" in better and "0.91" in better
    worse = analysis.verdict(fake(tmp_path / "b", [0.70, 0.71, 0.72], [0.80, 0.81, 0.79]))
    assert "clearly worse" in worse
    same = analysis.verdict(fake(tmp_path / "c", [0.80, 0.84, 0.78], [0.81, 0.79, 0.82]))
    assert "includes zero" in same


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
