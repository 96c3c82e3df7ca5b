"""The README's figures are the results files' figures: every table and number it quotes is re-derived here.

When a benchmark or the recipes' runs are redone, the files in ``benchmarks/results/`` change and these tests
say what the README must say instead (the expected text is in the failure message, ready to paste).
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
README = (ROOT / "README.md").read_text()


def _section(text: str, title: str) -> list[str]:
    """The data lines of one ``## title`` table of a benchmark's text output."""
    lines = text.splitlines()
    start = lines.index(f"## {title}")
    out = []
    for line in lines[start + 3:]:
        if not line.strip() or line.startswith("#"):
            break
        out.append(line)
    return out


def layer_rows(mode: str = "training forward+backward, float32") -> list[dict]:
    rows = []
    for line in _section((RESULTS / "layer.txt").read_text(), mode):
        layout, shape, mb, _bn_ms, _nat_ms, bn_nat, off_nat, *_ = line.split()
        rows.append({"layout": layout, "shape": shape, "MB": mb, "bn/nat": bn_nat, "off/nat": off_nat})
    return rows


def speed_table() -> str:
    lines = ["| layout | shape | MB | bnlab / native | kernels off / native |", "|---|---|---:|---:|---:|"]
    lines += [f"| {r['layout']} | {r['shape']} | {r['MB']} | {r['bn/nat']} | {r['off/nat']} |" for r in layer_rows()]
    return "\n".join(lines)


def models_ratio(network: str) -> str:
    for line in (RESULTS / "models.txt").read_text().splitlines():
        if line.startswith(network + " "):
            return line.split()[-1]
    raise AssertionError(f"{network} not in models.txt")


def results_table() -> str:
    text = (RESULTS / "recipes.md").read_text()
    return text[text.index("| recipe |"):].strip()


def test_the_speed_table_is_the_layer_benchmark_s_forward_backward_rows():
    expected = speed_table()
    assert expected in README, "README's speed table should be:\n" + expected


def test_the_speed_figures_in_the_text_are_the_benchmarks():
    nchw = sorted(float(r["bn/nat"]) for r in layer_rows() if r["layout"] == "NCHW")
    claim = f"takes {nchw[0]:.2f}–{nchw[-1]:.2f} of the time of\n  `torch.nn.BatchNorm2d`"
    assert claim in README, claim
    assert f"in {models_ratio('kmnist-cnn')} of the time it takes with PyTorch's layer" in README
    for network in ("kmnist-cnn", "mnist-mlp"):
        assert f"`{network}` {models_ratio(network)}" in README


def test_the_results_table_is_the_recipes_results_file():
    expected = results_table()
    assert expected in README, "README's results table should be:\n" + expected


def test_the_readme_is_short_and_speaks_about_the_project_as_it_is():
    assert len(README.splitlines()) <= 250
    for diary in ("this pass", "this round", "issue ", "Issue ", "TODO", "/work/", "/root/", "/home/"):
        assert diary not in README, diary
    assert not re.search(r"\b(DEMO_TIME|RESULTS_TABLE|SPEED_TABLE)\b", README)


def test_the_recalibration_figures_are_the_results_file_s():
    rows = [line.split() for line in (RESULTS / "recalibrate.txt").read_text().splitlines()[2:] if line.strip()]
    before = sorted(float(r[1]) for r in rows)
    after = sorted(float(r[3]) for r in rows)
    claim = f"from {before[0]:.3f}–{before[-1]:.3f} to {after[0]:.3f}–{after[-1]:.3f}"
    assert claim in README.replace("\n", " "), claim
