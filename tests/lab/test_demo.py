"""`bnlab demo` end to end, reduced (2 seeds, 1 epoch): records, reports, the index, the time of each step."""

import re

import pytest

from bnlab.cli import main
from bnlab.lab import analysis, demo

from .html_dom import parse, table_columns, table_rows


def test_a_reduced_demo_writes_every_report_and_the_index(tmp_path, capsys, monkeypatch):
    root = tmp_path / "demo"
    monkeypatch.setattr(demo, "calibrate", lambda: demo.REFERENCE_UNIT / 1000)  # predicts ~0 s: every step is "slow"
    assert main(["demo", "--out", str(root), "--seeds", "2", "epochs=1", "--quiet"]) == 0
    out, err = capsys.readouterr()
    index = (root / "index.md").read_text()
    table = parse((root / "index.html").read_text()).find("table")  # the summary: one row per experiment, linked
    rows = {cells[0].find("a").attrs["href"]: dict(zip(table_columns(table), cells)) for _, cells in table_rows(table)}
    assert list(rows) == [f"{name}/report.html" for name in demo.DEMO_RECIPES]
    for name in demo.DEMO_RECIPES:
        exp = analysis.load(root / name)
        assert exp.complete and exp.recipe["epochs"] == 1 and exp.config["seeds"] == [0, 1] and not exp.problems
        assert all(len(h["loss"]) == 1 for a in exp.arms.values() for h in a.histories)
        assert (root / name / "report.md").exists() and (root / name / "report.html").exists()
        verdict = analysis.verdict(exp)
        assert verdict in index and f"[{name} report]({name}/report.html)" in index
        row = rows[f"{name}/report.html"]
        assert row["verdict"].text() == analysis.outcome(exp) and row["curves"].find("img").attrs["src"].startswith("data:image/svg")
        back = [a.attrs["href"] for a in parse((root / name / "report.html").read_text()).find_all("a") if "experiments" in a.text()]
        assert back == ["../index.html"]
        assert exp.config["command"] == ["demo", "--out", str(root), "--seeds", "2", "epochs=1", "--quiet"]
        m = re.search(rf"^{name}: 4 runs and the report in ([\d.]+) s \(expected about ([\d.]+) s\)$", out, re.M)
        assert m, out
        assert f"bnlab: warning: {name} took {m[1]} s" in err and "other programs are probably using the CPUs" in err
    assert re.search(r"^calibration \d+ ms: expect about \d+ s on this machine now$", out, re.M)
    assert re.search(r"^demo finished in \d+ s$", out, re.M)
    # again (every run is skipped: --resume) with a calibration like the reference machine's and steps predicted
    # to take an hour: no warning
    monkeypatch.setattr(demo, "calibrate", lambda: demo.REFERENCE_UNIT)
    monkeypatch.setattr(demo, "REPORT", {name: 3600 / demo.REFERENCE_UNIT for name in demo.REPORT})
    assert main(["demo", "--out", str(root), "--seeds", "2", "epochs=1", "--quiet", "--resume"]) == 0
    assert capsys.readouterr().err == ""


def test_pace_and_calibration_warnings():
    assert demo.pace_warning("diabetes", 10.0, 5.0) is None
    slow = demo.pace_warning("diabetes", 30.0, 5.0)
    assert slow.startswith("diabetes took 30.0 s, 6.0x the 5.0 s expected from this machine's calibration")
    assert demo.calibration_warning(demo.REFERENCE_UNIT * 1.5) is None
    assert "3.0x its" in demo.calibration_warning(demo.REFERENCE_UNIT * 3)
    # the prediction scales with seeds and epochs
    unit = 0.01
    assert demo.expected_seconds("diabetes", 50, 100, 3, unit) == pytest.approx(unit * (demo.COST["diabetes"] * 3 * 0.5 + demo.REPORT["diabetes"]))


def test_calibration_is_quick_and_leaves_the_generator_alone():
    import time

    import torch

    torch.manual_seed(7)
    want = torch.rand(2)
    torch.manual_seed(7)
    t0 = time.perf_counter()
    unit = demo.calibrate()
    assert 0 < unit < time.perf_counter() - t0 < 5.0
    assert torch.equal(torch.rand(2), want)
