"""The design's one-way imports: the core (functional, nn, tools) never pulls in the lab or its dependencies."""

import subprocess
import sys

HEAVY = ("matplotlib", "sklearn", "scipy", "rich", "safetensors", "h5py", "keras", "bnlab.lab", "bnlab.data", "bnlab.cli")


def test_importing_the_core_imports_no_lab_dependency():
    code = (
        "import sys, bnlab, bnlab.functional, bnlab.nn, bnlab.tools, bnlab.tools.keras, bnlab.keras, bnlab.reference, bnlab.conventions\n"
        f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r} or m in {HEAVY!r})\n"
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"the core imported: {out.stdout.strip()}"


def test_nothing_imports_the_cli():
    from pathlib import Path

    src = Path(__file__).resolve().parents[1] / "src" / "bnlab"
    for path in src.rglob("*.py"):
        if path.name in ("cli.py", "__main__.py"):
            continue
        text = path.read_text()
        assert "from .cli" not in text and "from ..cli" not in text and "bnlab.cli" not in text, path


def test_keras_weights_live_under_tools_and_the_old_name_still_works():
    import bnlab.keras
    import bnlab.tools.keras

    assert bnlab.keras.load_weights is bnlab.tools.keras.load_weights
    assert bnlab.keras.save_weights is bnlab.tools.keras.save_weights
