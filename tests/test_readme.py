"""The README's Python examples run as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_blocks_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "the README should show Python examples"
    namespace: dict = {}
    exec(compile(blocks[0], "README.md[quick start]", "exec"), namespace)  # noqa: S102
    assert namespace["y"].shape == (8, 28, 28, 32)
