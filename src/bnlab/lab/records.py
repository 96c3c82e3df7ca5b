"""Run records on disk: every write atomic, nothing unpickled.

Layout of an experiment directory::

    DIR/config.json                 recipe (with overrides), arms, seeds, command
    DIR/env.json                    bnlab, torch, numpy, python versions, platform, git commit
    DIR/<arm>/seed-<k>/history.csv  epoch and every logged metric, one row per finished epoch
    DIR/<arm>/seed-<k>/final.json   last-epoch and test figures, checks, wall time (marks the run done)
    DIR/<arm>/seed-<k>/weights.safetensors   the trained model's state dict
    DIR/<arm>/seed-<k>/checkpoint.pt         model, optimizer, RNG states, history after the last epoch
                                            (tensors and plain containers; read with weights_only=True)

A write goes to a temporary file in the same directory, is flushed to disk and
renamed over the target, so a run killed at any moment leaves either the
previous complete file or the new one.
"""

from __future__ import annotations

import csv
import io
import json
import os
import platform
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "atomic_write_bytes", "write_json", "read_json", "write_history", "read_history", "environment",
    "run_dir", "save_weights", "load_weights", "save_checkpoint", "load_checkpoint",
]


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, float) and not np.isfinite(obj):
        return str(obj)
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return repr(obj)


def write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(_jsonable(obj), indent=2, sort_keys=False) + "\n").encode())


def read_json(path: Path):
    return json.loads(Path(path).read_text())


def write_history(path: Path, history: dict[str, list[float]]) -> None:
    """``history.csv``: a column ``epoch`` (1-based) and one per metric, floats written with repr (exact)."""
    keys = list(history)
    n = max((len(v) for v in history.values()), default=0)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["epoch", *keys])
    for i in range(n):
        w.writerow([i + 1, *[repr(float(history[k][i])) if i < len(history[k]) else "" for k in keys]])
    atomic_write_bytes(path, buf.getvalue().encode())


def read_history(path: Path) -> dict[str, list[float]]:
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        return {}
    header, body = rows[0], rows[1:]
    return {k: [float(r[i]) for r in body if r[i] != ""] for i, k in enumerate(header) if k != "epoch"}


def _git_commit() -> str | None:
    try:
        here = Path(__file__).resolve().parent
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def environment() -> dict:
    import bnlab

    return {
        "bnlab": bnlab.__version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
        "git_commit": _git_commit(),
    }


def run_dir(root: Path, arm: str, seed: int) -> Path:
    return Path(root) / arm / f"seed-{seed}"


def save_weights(path: Path, model: torch.nn.Module, metadata: dict | None = None) -> None:
    from safetensors.torch import save

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write_bytes(path, save(state, metadata={k: str(v) for k, v in (metadata or {}).items()}))


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    return load(Path(path).read_bytes())


def save_checkpoint(path: Path, payload: dict) -> None:
    buf = io.BytesIO()
    torch.save(payload, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)  # never unpickles arbitrary objects
