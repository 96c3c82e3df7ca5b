"""The benchmark scripts run and write well-formed results (a smoke test: no timing is asserted)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(script, *args):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def test_layer_benchmark_quick_run_writes_json(tmp_path):
    out = tmp_path / "layer.json"
    text = _run("bench_layer.py", "--quick", "--rounds", "1", "--modes", "infer,fwdbwd", "--dtypes", "float32",
                "--no-keras", "--json", str(out))
    data = json.loads(out.read_text())
    assert data["env"]["threads"] == 2 and data["env"]["allocator"]
    rows = data["rows"]
    assert len(rows) == 2 * 5  # two modes x (two 2-D rows + one 4-D shape in three layouts)
    for r in rows:
        assert r["bnlab_over_native"] > 0 and r["copies"]["bnlab"] > 0 and r["native"].startswith("native")
    assert "against the targets" in text and not list(tmp_path.glob("*.tmp"))
    again = _run("bench_layer.py", "--quick", "--rounds", "1", "--modes", "infer", "--dtypes", "float32", "--no-keras",
                 "--compare", str(out))
    assert "bnlab now / then" in again


def test_model_benchmark_quick_run_writes_json(tmp_path):
    out = tmp_path / "models.json"
    _run("bench_models.py", "--networks", "mnist-mlp", "--steps", "2", "--rounds", "1", "--json", str(out))
    row = json.loads(out.read_text())["rows"][0]
    assert row["network"] == "mnist-mlp" and set(row["epoch_s"]) == {"bnlab BN", "torch BN", "no BN"}
    assert row["bnlab_over_nobn"] > 0


def test_variants_run_in_turn_with_the_order_reversed_every_other_round():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from _bench import in_turn
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    calls = []
    times = in_turn({"a": "A", "b": "B", "c": "C"}, 3, lambda v: calls.append(v) or len(calls))
    assert calls == ["A", "B", "C", "C", "B", "A", "A", "B", "C"]
    assert times == {"a": [1, 6, 7], "b": [2, 5, 8], "c": [3, 4, 9]}


def test_streaming_benchmark_quick_run(monkeypatch):
    from bnlab import _kernels

    if _kernels.get() is None:
        pytest.skip(f"kernels unavailable: {_kernels.status()['reason']}")
    monkeypatch.setenv("BNLAB_STREAM_MIN_BYTES", "1")  # every output streams, so the tiny rows compare something
    text = _run("bench_stream.py", "--shapes", "300x70", "--modes", "infer,fwdbwd", "--rounds", "1")
    lines = [ln.split() for ln in text.splitlines() if ln.startswith(("infer", "fwdbwd"))]
    assert [ln[:2] for ln in lines] == [["infer", "300x70"], ["fwdbwd", "300x70"]]
    assert all(float(v) > 0 for ln in lines for v in ln[3:])


def test_floor_benchmark_quick_run_writes_json(tmp_path):
    from bnlab import _kernels

    if _kernels.get() is None:
        pytest.skip(f"kernels unavailable: {_kernels.status()['reason']}")
    out = tmp_path / "floor.json"
    text = _run("bench_floor.py", "--shapes", "64x64,32x32x32x32", "--layouts", "2D,NHWC", "--rounds", "1",
                "--json", str(out))
    rows = json.loads(out.read_text())["rows"]
    assert [(r["mode"], r["layout"]) for r in rows] == [(m, lay) for m in ("train", "fwdbwd", "infer")
                                                       for lay in ("2D", "NHWC")]
    for r in rows:
        assert set(r["copies"]) == {"copy", "kernels", "bare", "bnlab", "native"} and r["bnlab_over_bare"] > 0
    assert "against the targets" in text and not list(tmp_path.glob("*.tmp"))


def test_floor_benchmark_checks_its_bare_variants_against_the_layer(monkeypatch):
    # the bare variants are only a floor if they compute what the layer does: a wrong call must stop the row
    from bnlab import _kernels

    if _kernels.get() is None:
        pytest.skip(f"kernels unavailable: {_kernels.status()['reason']}")
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import bench_floor

    for layout, shape in (("NCHW", (8, 4, 5, 5)), ("NHWC", (8, 4, 5, 5)), ("2D", (64, 16))):
        for mode in ("train", "fwdbwd", "infer"):
            bench_floor.check_row(layout, shape, mode)
    calls_init = bench_floor._KernelCalls.__init__

    def wrong(field, value):
        def init(self, *args):
            calls_init(self, *args)
            setattr(self, field, value)
        return init

    import torch

    for field, value, mode in (("var_factor", 1.01, "train"), ("momentum", 0.6, "fwdbwd"),
                               ("gamma", torch.ones(4), "infer")):
        monkeypatch.setattr(bench_floor._KernelCalls, "__init__", wrong(field, value))
        with pytest.raises(AssertionError):
            bench_floor.check_row("NCHW", (8, 4, 5, 5), mode)
