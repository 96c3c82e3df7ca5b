"""The README's main job (the tutorial 002 demo) runs and its hand computation matches the layer."""

import runpy
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "tutorial002_bn_params.py"


def test_tutorial002_demo_recomputes_layer_by_hand(capsys):
    main = runpy.run_path(str(EXAMPLE))["main"]
    diff = main(["--seed", "3"])
    out = capsys.readouterr().out
    assert diff < 1e-5
    assert "Initial values" in out and "max |layer - by hand|" in out
