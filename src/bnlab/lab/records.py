"""Run records on disk: every write atomic, every read checked, nothing unpickled.

Layout of an experiment directory::

    DIR/config.json                 recipe (with overrides), arms, seeds, command, facts of the data
    DIR/env.json                    bnlab, torch, numpy, python versions, platform, git commit
    DIR/<arm>/seed-<k>/history.csv  epoch and every logged metric, one row per finished epoch
    DIR/<arm>/seed-<k>/final.json   epochs run, divergence, last-epoch and test figures, checks, wall time,
                                    SHA-256 of history.csv and weights (written last: marks the run done)
    DIR/<arm>/seed-<k>/weights.safetensors   the trained model's state dict
    DIR/<arm>/seed-<k>/checkpoint.pt         model, optimizer, RNG states, history after a finished epoch
                                            (tensors and plain containers; read with weights_only=True)
    DIR/<arm>/seed-<k>/probes.csv, probes.json  what probes recorded (recipe.probes; bnlab.lab.probes)
    DIR/<arm>/seed-<k>/landscape.jsonl       loss-landscape measurements (recipe.landscape; bnlab.lab.landscape)

A sweep (``bnlab sweep``) is a directory ``SWEEP/sweep.json`` (the base
recipe, the grid, the learning-rate rule, the cells) with one experiment
directory per cell, ``SWEEP/<cell id>/``, laid out as above.

A write goes to a temporary file in the same directory and is renamed over the
target, so a run killed at any moment leaves either the previous complete file
or the new one. Files get the permissions the umask allows, like any file the
user creates. ``durable=True`` (the default) also flushes the file to disk
before the rename, for records that must survive a power cut; per-epoch
checkpoints skip it (a killed process loses nothing without it).

Every reader checks what it loads (JSON structure, CSV columns and lengths,
types, finite numbers where they must be) and raises :class:`RecordError`
naming the file and what is wrong with it, so a damaged record is reported,
never half-used.
"""

from __future__ import annotations

import csv
import datetime
import hashlib
import io
import json
import math
import os
import platform
import secrets
import subprocess
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "RecordError", "atomic_write_bytes", "write_json", "read_json", "read_config", "read_env", "read_final",
    "write_history", "read_history", "environment", "run_dir", "save_weights", "load_weights", "save_checkpoint",
    "load_checkpoint", "sha256", "check_digest",
]


class RecordError(ValueError):
    """A record file is missing, damaged or not what bnlab writes; says which file and what is wrong."""

    def __init__(self, path, problem: str):
        super().__init__(f"{path}: {problem}")
        self.path = Path(path)
        self.problem = problem

    def __reduce__(self):  # an error raised in a worker process (``--jobs``) reaches the parent whole
        return type(self), (self.path, self.problem)


# ----------------------------------------------------------------------------- writing


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: Path, data: bytes, durable: bool = True) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same directory and a rename.

    The temporary file is created with mode 0o666 filtered by the umask (what
    ``open(path, "w")`` gives), not ``mkstemp``'s 0o600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666 & ~_umask())
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if durable:
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
        return _jsonable(obj.item())
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return repr(obj)


def write_json(path: Path, obj, durable: bool = True) -> None:
    atomic_write_bytes(path, (json.dumps(_jsonable(obj), indent=2, sort_keys=False) + "\n").encode(), durable)


def write_history(path: Path, history: dict[str, list[float]], durable: bool = True) -> None:
    """``history.csv``: a column ``epoch`` (1-based) and one per metric, floats written with repr (exact)."""
    keys = list(history)
    n = max((len(v) for v in history.values()), default=0)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["epoch", *keys])
    for i in range(n):
        w.writerow([i + 1, *[repr(float(history[k][i])) if i < len(history[k]) else "" for k in keys]])
    atomic_write_bytes(path, buf.getvalue().encode(), durable)


# ----------------------------------------------------------------------------- reading, checked


def _read_bytes(path: Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise RecordError(path, "missing") from None
    except OSError as exc:
        raise RecordError(path, f"cannot be read ({exc.strerror or exc})") from None


def _read_text(path: Path) -> str:
    data = _read_bytes(path)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RecordError(path, f"is not UTF-8 text (byte {exc.start} is 0x{data[exc.start]:02x}); the file is damaged") from None


def _no_constant(name: str):
    raise ValueError(f"the non-standard number {name}")


def read_json(path: Path):
    """The JSON value in ``path``; :class:`RecordError` if the file is missing, empty, cut short or not JSON."""
    text = _read_text(path)
    if not text.strip():
        raise RecordError(path, "is empty")
    try:
        return json.loads(text, parse_constant=_no_constant)
    except json.JSONDecodeError as exc:
        cut = " (cut short?)" if exc.pos >= len(text.rstrip()) else ""
        raise RecordError(path, f"is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}{cut}") from None
    except (ValueError, RecursionError) as exc:
        raise RecordError(path, f"is not valid JSON: {exc}") from None


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _expect(path, ok: bool, problem: str) -> None:
    if not ok:
        raise RecordError(path, problem)


def _object(path, value, what: str) -> dict:
    _expect(path, isinstance(value, dict), f"expected a JSON object ({what}), found {type(value).__name__}")
    return value


def read_config(path: Path) -> dict:
    """``config.json``, checked: a valid recipe, known distinct arms, distinct seeds >= 0, nproc >= 1."""
    from .recipes import Recipe, validate
    from .runner import ARMS

    cfg = _object(path, read_json(path), "the experiment's configuration")
    for key in ("recipe", "seeds", "arms"):
        _expect(path, key in cfg, f"has no {key!r} entry")
    seeds, arms = cfg["seeds"], cfg["arms"]
    _expect(path, isinstance(seeds, list) and seeds and all(_is_int(s) and s >= 0 for s in seeds) and len(set(seeds)) == len(seeds),
            f"'seeds' must be a non-empty list of distinct ints >= 0, found {seeds!r:.80}")
    _expect(path, isinstance(arms, list) and arms and all(a in ARMS for a in arms) and len(set(arms)) == len(arms),
            f"'arms' must be a non-empty list drawn from {list(ARMS)}, found {arms!r:.80}")
    nproc = cfg.setdefault("nproc", 1)
    _expect(path, _is_int(nproc) and nproc >= 1, f"'nproc' must be an int >= 1, found {nproc!r:.40}")
    _expect(path, isinstance(cfg.setdefault("command", []), list), "'command' must be a list")
    facts = cfg.setdefault("facts", {})
    _expect(path, isinstance(facts, dict), "'facts' must be an object")
    try:
        recipe = Recipe.from_dict(_object(path, cfg["recipe"], "the recipe"))
        validate(recipe)
    except (TypeError, ValueError) as exc:
        raise RecordError(path, f"holds an invalid recipe: {exc}") from None
    cfg["recipe"] = recipe.to_dict()
    return cfg


def read_env(path: Path) -> dict:
    """``env.json``: an object of versions and machine facts (strings, numbers, booleans or null)."""
    env = _object(path, read_json(path), "the environment")
    bad = [k for k, v in env.items() if not (v is None or isinstance(v, (str, int, float, bool)))]
    _expect(path, not bad, f"entries {bad} are not plain values")
    return env


_FINAL_META = ("arm", "seed", "epochs", "diverged_epoch", "diverged_in", "checks", "seconds", "resumed_from_epoch", "sha256")


def read_final(path: Path, arm: str | None = None, seed: int | None = None) -> dict:
    """``final.json`` of one run, checked: its arm and seed, epochs, divergence, finite figures.

    A run that diverged (``diverged_epoch`` an int) carries no final figures;
    every other run's figures (``loss``, ``val_*``, ``test_*``, ...) are finite numbers.
    """
    final = _object(path, read_json(path), "a run's final figures")
    _expect(path, final.get("arm") == arm if arm is not None else isinstance(final.get("arm"), str),
            f"'arm' is {final.get('arm')!r:.40}, expected {arm!r}")
    _expect(path, _is_int(final.get("seed")) and (seed is None or final["seed"] == seed),
            f"'seed' is {final.get('seed')!r:.40}, expected {seed if seed is not None else 'an int'}")
    epochs = final.get("epochs")
    _expect(path, epochs is None or (_is_int(epochs) and epochs >= 1), f"'epochs' must be an int >= 1, found {epochs!r:.40}")
    div = final.setdefault("diverged_epoch", None)
    _expect(path, div is None or (_is_int(div) and div >= 1), f"'diverged_epoch' must be null or an int >= 1, found {div!r:.40}")
    checks = final.setdefault("checks", {})
    _expect(path, isinstance(checks, dict) and all(_is_number(v) for v in checks.values()), "'checks' must map names to numbers")
    for key in ("seconds", "resumed_from_epoch"):
        _expect(path, key not in final or _is_number(final[key]), f"{key!r} must be a number, found {final.get(key)!r:.40}")
    digests = final.setdefault("sha256", {})
    _expect(path, isinstance(digests, dict) and all(isinstance(v, str) and len(v) == 64 for v in digests.values()),
            "'sha256' must map file names to SHA-256 digests")
    figures = {k: v for k, v in final.items() if k not in _FINAL_META}
    if div is None:
        bad = {k: v for k, v in figures.items() if not (_is_number(v) and math.isfinite(v))}
        _expect(path, not bad, f"figures {sorted(bad)} are not finite numbers (found {next(iter(bad.values()), None)!r:.40})")
    return final


def read_history(path: Path, *, epochs: int | None = None, diverged_epoch: int | None = None) -> dict[str, list[float]]:
    """``history.csv``, checked: header ``epoch,<metric>,...``; rows numbered 1, 2, ...; every cell a number.

    ``epochs``: the number of rows the run must have. Values must be finite,
    except in the last row of a run that diverged there (``diverged_epoch``).
    """
    text = _read_text(path)
    try:
        rows = list(csv.reader(io.StringIO(text, newline="")))
    except csv.Error as exc:
        raise RecordError(path, f"is not valid CSV: {exc}") from None
    _expect(path, bool(rows), "is empty (no header row)")
    header, body = rows[0], rows[1:]
    _expect(path, len(header) >= 2 and header[0] == "epoch" and all(header[1:]) and len(set(header)) == len(header),
            f"header must be 'epoch' and one distinct name per metric, found {','.join(header)[:80]!r}")
    _expect(path, bool(body), "has a header but no epochs")
    if diverged_epoch is not None:
        epochs = diverged_epoch
    if epochs is not None:
        _expect(path, len(body) == epochs, f"has {len(body)} epoch rows, expected {epochs} (cut short?)")
    out: dict[str, list[float]] = {k: [] for k in header[1:]}
    for i, row in enumerate(body, start=1):
        _expect(path, len(row) == len(header), f"row {i} has {len(row)} values, the header has {len(header)} (cut short?)")
        _expect(path, row[0] == str(i), f"row {i} is numbered {row[0]!r:.20}, expected {i}")
        last_of_diverged = diverged_epoch is not None and i == len(body)
        for key, cell in zip(header[1:], row[1:]):
            try:
                value = float(cell)
            except ValueError:
                raise RecordError(path, f"row {i}, column {key!r}: {cell!r:.20} is not a number") from None
            _expect(path, math.isfinite(value) or last_of_diverged, f"row {i}, column {key!r}: {cell} is not finite")
            out[key].append(value)
    return out


def sha256(path: Path) -> str:
    """The SHA-256 of a file's bytes (hex)."""
    return hashlib.sha256(_read_bytes(path)).hexdigest()


def check_digest(path: Path, digests: dict) -> None:
    """RecordError if ``path`` changed after its digest was recorded (``digests``: file name -> SHA-256, from final.json).

    A file cut at a line or number boundary can still parse; its digest cannot match.
    """
    want = digests.get(Path(path).name)
    if want is not None and sha256(path) != want:
        raise RecordError(path, f"has changed since its run finished (SHA-256 {sha256(path)[:12]}…, final.json recorded {want[:12]}…)")


# ----------------------------------------------------------------------------- environment, layout


def _git_commit() -> str | None:
    try:
        here = Path(__file__).resolve().parent
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def environment() -> dict:
    """Versions and machine facts for ``env.json``, and ``started``: the local time the records were begun
    (ISO 8601 with the UTC offset), which the report's Setup shows."""
    import bnlab

    return {
        "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
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


# ----------------------------------------------------------------------------- weights and checkpoints


def save_weights(path: Path, model: torch.nn.Module, metadata: dict | None = None) -> None:
    """The model's state dict as ``.safetensors``, the same bytes for the same weights and metadata in any process."""
    from safetensors.torch import save

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write_bytes(path, _sorted_metadata(save(state, metadata={k: str(v) for k, v in (metadata or {}).items()})))


def _sorted_metadata(data: bytes) -> bytes:
    """``data`` (a safetensors file) with its ``__metadata__`` entries in sorted order.

    safetensors writes the metadata from a Rust hash map, whose order is drawn
    afresh in every process: the same weights saved by two processes gave
    different bytes (and digests). The header is the 8-byte little-endian
    length, then JSON padded with spaces to that length; reordering keeps its
    length, so the tensors' offsets stay valid.
    """
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    if "__metadata__" not in header:
        return data
    meta = header.pop("__metadata__")
    text = json.dumps({"__metadata__": dict(sorted(meta.items())), **header}, separators=(",", ":"), ensure_ascii=False).encode()
    if len(text) > n:  # not the compact JSON safetensors writes: leave it
        return data
    return data[:8] + text + b" " * (n - len(text)) + data[8 + n :]


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """The state dict in a ``.safetensors`` file; :class:`RecordError` if it is missing, cut short or garbage."""
    from safetensors.torch import load

    data = _read_bytes(path)
    _expect(path, len(data) > 0, "is empty")
    try:
        return load(data)
    except Exception as exc:  # safetensors raises its own SafetensorError (not a ValueError) for any damage
        raise RecordError(path, f"is not a readable safetensors file ({type(exc).__name__}: {str(exc)[:120]})") from None


def save_checkpoint(path: Path, payload: dict) -> None:
    buf = io.BytesIO()
    torch.save(payload, buf)
    atomic_write_bytes(path, buf.getvalue(), durable=False)


_CHECKPOINT_KEYS = ("arm", "seed", "epochs_done", "model", "optimizer", "rng", "history")


def load_checkpoint(path: Path) -> dict:
    """A checkpoint written by :func:`save_checkpoint`, read with ``weights_only=True`` and checked for its entries."""
    data = _read_bytes(path)
    _expect(path, len(data) > 0, "is empty")
    try:
        ckpt = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)  # never unpickles arbitrary objects
    except Exception as exc:  # pickle, zip and torch errors of every kind: the file is damaged
        raise RecordError(path, f"is not a readable checkpoint ({type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''})") from None
    _expect(path, isinstance(ckpt, dict), f"holds a {type(ckpt).__name__}, not a checkpoint")
    missing = [k for k in _CHECKPOINT_KEYS if k not in ckpt]
    _expect(path, not missing, f"lacks {missing} (written by an older bnlab, or damaged)")
    _expect(path, _is_int(ckpt["epochs_done"]) and ckpt["epochs_done"] >= 1, f"'epochs_done' is {ckpt['epochs_done']!r:.40}")
    hist = ckpt["history"]
    _expect(path, isinstance(hist, dict) and all(isinstance(v, list) and len(v) == ckpt["epochs_done"] for v in hist.values()),
            f"its history does not hold {ckpt['epochs_done']} epochs")
    return ckpt
