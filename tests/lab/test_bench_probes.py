"""The probes benchmark runs and writes well-formed results (a smoke test: no timing is asserted)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_probes_benchmark_quick_run_writes_json(tmp_path):
    out = tmp_path / "probes.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_probes.py"), "--rounds", "1", "--epochs", "1",
                           "--every", "10", "--json", str(out)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    assert [r["variant"] for r in data["rows"]] == ["none", "every 10"]
    assert data["steps"] == 45 and data["rows"][1]["records"] == 5 and data["rows"][1]["ratio_of_medians"] > 0
    assert "ratio of medians" in proc.stdout
