"""Analysis, plots and the report: pure functions of records."""

import base64
import math
import re

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
    train, val = fig.axes
    assert [ax.get_title() for ax in fig.axes] == ["training", "validation"]
    assert train.get_xlabel() == "epoch" and train.get_ylabel().startswith("loss") and "mean ± 1 std" in fig.get_suptitle()
    for ax, key, tutorial in ((train, "loss", 0.4790), (val, "val_loss", 0.6657)):
        for arm in ("bn", "no_bn"):
            color = plots.ARM_STYLE[arm]["color"]
            curve = exp.arms[arm].curve(key)
            mine = [line for line in ax.get_lines() if line.get_color() == color and len(line.get_xdata()) == 6]
            assert len(mine) == 4  # 3 seeds and their mean
            means = [line for line in mine if line.get_linewidth() > 2]
            assert len(means) == 1 and np.allclose(means[0].get_ydata(), curve.mean(0))
            assert sorted(map(tuple, (line.get_ydata() for line in mine if line not in means))) == sorted(map(tuple, curve))
        assert len(ax.collections) == 2  # one ± std band per arm
        stars = [line for line in ax.get_lines() if line.get_marker() == "*"]
        assert [(s.get_xdata()[0], s.get_ydata()[0]) for s in stars] == [(6, tutorial)]  # the tutorial's figure, with BN
        assert [t.get_text() for t in ax.texts] == [f"{tutorial:g}"]
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "with BN: mean of 3 seeds" in labels and "without BN: ± 1 std" in labels and "tutorial, with BN (one run)" in labels
    assert plots.curves_figure(exp, "mae").axes[0].get_ylabel() == "mean absolute error"


def test_finals_figure(exp_dir):
    """diabetes validates on a split: its validation and test figures are distinct quantities, one panel each."""
    from matplotlib.collections import PathCollection

    exp = analysis.load(exp_dir)
    fig = plots.finals_figure(exp, ["val_loss", "test_loss"])
    assert [ax.get_title() for ax in fig.axes] == ["final val_loss", "final test_loss"]
    for ax, key in zip(fig.axes, ("val_loss", "test_loss")):
        points = [c for c in ax.collections if isinstance(c, PathCollection)]
        assert [sorted(c.get_offsets()[:, 1]) for c in points] == [sorted(exp.arms[a].final_values(key)) for a in ("bn", "no_bn")]
        assert [t.get_text() for t in ax.get_xticklabels()] == ["with BN\n(n=3)", "without BN\n(n=3)"]
    assert set(plots.plot_all(exp, exp_dir / "plots")) == {"curves-loss", "curves-mae", "final-val_loss", "thumb"}


def _md_cell(md: str, figure: str, column: int) -> str:
    """A cell of report.md's table, in the row of ``figure`` (its name, bold for the verdict's row, then marks)."""
    row = next(line for line in md.splitlines() if re.match(rf"\| (\*\*)?{figure}\b", line))
    return [c.strip() for c in row.strip("|").split("|")][column]


def test_report_contents(exp_dir):
    md = (exp_dir / "report.md").read_text()
    assert md.startswith("# diabetes: does batch normalization help?")
    assert "## Verdict" in md and "Welch's t" in md and "| **val_loss** ↓ (verdict) |" in md
    d = len(_md_cell(md, "val_loss", 1).split(" ± ")[0].split(".")[1])  # the loss's precision in this run
    assert _md_cell(md, "val_loss", 4) == f"{0.6657:.{d}f}"  # the tutorial's figure, at the metric's precision
    assert _md_cell(md, "val_loss", 5) == f"{0.685:.{d}f} to {0.765:.{d}f}"  # the reference re-run's range
    assert "| tutorial, with BN | reference, with BN |" in md
    assert "![curves-loss](plots/curves-loss.png)" in md
    html = (exp_dir / "report.html").read_text()
    assert html.count("data:image/svg+xml;base64,") == md.count("![")  # self-contained
    table_rows = [line for line in md.split("## Final figures")[1].split("##")[0].splitlines() if line.startswith("| ")][1:]
    assert html.count("<tr>") + html.count('<tr class="verdict">') >= 2 + len(table_rows)  # two header rows + one per figure
    assert "src=\"plots/" not in html
    svg = html.split("data:image/svg+xml;base64,")[1].split('"')[0]
    assert base64.b64decode(svg).lstrip().startswith(b"<?xml")


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


def _interval(cell: str) -> tuple[tuple[float, float, float], float]:
    """'+0.058 [+0.015, −0.100]' -> ((0.058, 0.015, -0.1), half a unit of the last decimal written)."""
    m = re.fullmatch(r"([-+−]?[\d.]+) \[([-+−]?[\d.]+), ([-+−]?[\d.]+)\]", cell.strip())
    assert m, f"not an interval cell: {cell!r}"
    decimals = len(m[1].split(".")[1])
    return tuple(float(g.replace("−", "-")) for g in m.groups()), 0.5 * 10**-decimals + 1e-12


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
    got, half = _interval(_md_cell(md, "val_accuracy", 3))
    assert got == pytest.approx((diff, low, high), abs=half) and half < 6e-4  # at least 3 decimals for accuracies
    line = next(line for line in out.splitlines() if line.lstrip("│┃ ").startswith("val_accuracy"))
    cli, cli_half = _interval(line.strip("│┃ ").split("│")[-1])
    assert cli == pytest.approx((diff, low, high), abs=cli_half) and cli_half == half
    m = re.search(r"= (\S+) \(95% CI (\S+) to (\S+), Welch's t\)", out)  # the verdict printed by `bnlab report`
    assert f"{m[1]} [{m[2]}, {m[3]}]" == _md_cell(md, "val_accuracy", 3)
    mean, std = _md_cell(md, "val_accuracy", 1).split(" ± ")
    assert (float(mean), float(std)) == pytest.approx((np.mean(bn), np.std(bn, ddof=1)), abs=half)
    assert f"| with BN (n={len(bn)}) | without BN (n={len(no_bn)}) |" in md


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
        "On blobs, the final val_accuracy was 0.915 ± 0.013 with BN and 0.810 ± 0.010 without (mean ± std over 4 and 3 seeds).",
    ]
    assert (diff, low, high) == pytest.approx((0.105, 0.08268, 0.12732), abs=5e-6)  # the oracle, rounded below
    assert sentences[3] == "BN − no-BN = +0.105 (95% CI +0.083 to +0.127, Welch's t): BN made the val_accuracy clearly better here."
    assert main(["report", str(root)]) == 1  # a damaged record: reported, and the exit code says so
    captured = capsys.readouterr()
    assert f"bnlab: warning: {hist}: row 5 has" in captured.err and "seed 4 of the BN arm is left out" in captured.err
    assert "Traceback" not in captured.err
    for sentence in sentences:
        assert sentence in captured.out
    md = (root / "report.md").read_text()
    assert "- **no-BN arm**: 3 of 5 finished; diverged: seed 1 at epoch 3, seed 3 at epoch 1" in md
    assert f"- **BN arm**: 4 of 5 finished; unreadable, left out: seed 4 ({hist}: row 5 has" in md
    assert "| with BN (n=4) | without BN (n=3) |" in md


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
    # the final value as target: the reference curve first reached its last mean 0.8 at epoch 2
    ref = np.array([[0.4, 0.8, 0.9, 0.8], [0.4, 0.8, 0.9, 0.8]])
    assert analysis.epochs_to_target(bn, ref, higher=True, target="final") == {"target": 0.8, "reference_epoch": 2, "bn_epoch": 2, "speedup": 1.0}
    assert analysis.epochs_to_target(bn, ref, higher=True)["target"] == 0.9
    assert analysis.epochs_to_target(-bn, -ref, higher=False, target="final")["bn_epoch"] == 2
    ref = np.array([[0.4, 0.85, 0.9, 0.8], [0.4, 0.85, 0.9, 0.8]])  # first past its last value 0.8 at epoch 2, with 0.85
    assert analysis.epochs_to_target(bn, ref, higher=True, target="final") == {"target": 0.8, "reference_epoch": 2, "bn_epoch": 2, "speedup": 1.0}
    with pytest.raises(ValueError, match="target must be 'best' or 'final'"):
        analysis.epochs_to_target(bn, ref, higher=True, target="last")


def test_a_speed_up_reached_at_the_first_measurement_is_a_lower_bound(tmp_path):
    # paper-fig1-digits28's BN arm was at the no-BN arm's best at its first measurement: "54.0 times fewer" was only
    # a lower bound, and the verdict said it as if exact
    root = write_experiment(tmp_path / "x", {"bn": [0.9, 0.9], "no_bn": [0.85, 0.85]})
    curves = {"bn": [0.9, 0.9, 0.9, 0.9, 0.9], "no_bn": [0.5, 0.6, 0.7, 0.8, 0.85]}
    for arm, curve in curves.items():
        for seed in (0, 1):
            records.write_history(records.run_dir(root, arm, seed) / "history.csv",
                                  {"loss": [1.0, 0.9, 0.8, 0.7, 0.6], "val_accuracy": curve})
    said = analysis.verdict(analysis.load(root))
    assert "at epoch 1: at least 5.0 times fewer epochs in this run (BN was there at its first measurement)" in said
    later = write_experiment(tmp_path / "y", {"bn": [0.9, 0.9], "no_bn": [0.85, 0.85]})  # BN's curve rises too
    assert "at least" not in analysis.verdict(analysis.load(later))
