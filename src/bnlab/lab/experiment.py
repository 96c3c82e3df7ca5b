"""A whole experiment: one recipe, both arms (with / without BN), several seeds, written as records.

A run leaves a checkpoint after an epoch (model, optimizer, every random
number generator training draws from: torch's CPU and CUDA generators,
NumPy's, Python's and the data-order generator, and the history) whenever
``CHECKPOINT_SECONDS`` have passed since the last one, so
``run_experiment(..., resume=True)`` continues a killed run from its last
checkpoint and ends with the same history, byte for byte on CPU, as a run that
was never interrupted. Finished runs (``final.json`` present) are skipped on
resume, those that diverged included: divergence is a result.

Before anything is written the configuration is checked against the data
(``runner.check_runnable``), so a run that cannot work fails at once.
"""

from __future__ import annotations

import math
import random
import shutil
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist

from ..tools.distributed import rank_and_world
from . import records
from .recipes import Recipe
from .runner import ARMS, build_model, check_runnable, facts, load_data, run
from .training import History, get_optimizer

__all__ = ["ExperimentError", "prepare_dir", "run_experiment", "default_out", "rng_state", "set_rng_state", "CHECKPOINT_SECONDS"]

# Seconds between checkpoints (0: after every epoch). A killed run repeats at most this much work;
# checkpointing a small model after every one of its 100 short epochs cost more than training it.
CHECKPOINT_SECONDS = 2.0


class ExperimentError(RuntimeError):
    """The experiment cannot run as asked (directory conflicts, unwritable output, ...)."""


def default_out(recipe: Recipe) -> Path:
    return Path("runs") / f"{recipe.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def _config(recipe: Recipe, seeds, arms, argv, nproc: int = 1, data_facts: dict | None = None) -> dict:
    return {"recipe": recipe.to_dict(), "seeds": list(seeds), "arms": list(arms), "command": list(argv or []), "nproc": nproc,
            "facts": dict(data_facts or {})}


def _comparable(cfg: dict) -> dict:
    r = {k: v for k, v in cfg["recipe"].items() if k not in ("reported", "reference", "notes", "title")}
    return {"recipe": r, "seeds": cfg["seeds"], "arms": cfg["arms"], "nproc": cfg.get("nproc", 1)}


# What bnlab writes into a records directory: --overwrite removes a directory only if it holds nothing else.
_OWN_NAMES = {"config.json", "env.json", *ARMS, "plots", "report.md", "report.html", "index.md", "index.html"}


def _only_records(out: Path) -> bool:
    return all(p.name in _OWN_NAMES or (p.name.startswith(".") and p.name.endswith(".tmp")) for p in out.iterdir())


def prepare_dir(out: Path, recipe: Recipe, seeds, arms, *, resume=False, overwrite=False, argv=None, nproc: int = 1,
                data_facts: dict | None = None) -> Path:
    """Create or check the records directory; write config.json and env.json.

    ``overwrite`` replaces a directory that holds bnlab records and nothing
    else (or an empty one); it never deletes a directory with other files.
    """
    out = Path(out)
    cfg = _config(recipe, seeds, arms, argv, nproc, data_facts)
    cfg_path = out / "config.json"
    if out.exists() and not out.is_dir():
        raise ExperimentError(f"output path {out} exists and is not a directory")
    if out.exists() and any(out.iterdir()):
        if overwrite and not _only_records(out):
            raise ExperimentError(f"{out} holds files that bnlab did not write; --overwrite only replaces a records "
                                  "directory: choose another --out")
        if not cfg_path.exists() and not overwrite:
            raise ExperimentError(f"{out} is not empty and holds no bnlab records: choose another --out, or --overwrite")
        if cfg_path.exists() and not overwrite:
            old = records.read_config(cfg_path)
            old_name = old["recipe"]["name"]
            if old_name != recipe.name:
                raise ExperimentError(f"{out} holds records of recipe {old_name!r}, not {recipe.name!r}: choose another --out, or --overwrite")
            if not resume:
                raise ExperimentError(f"{out} already holds a run of {recipe.name!r}: use --resume to continue it or --overwrite to start again")
            if _comparable(old) != _comparable(cfg):
                raise ExperimentError(f"{out} was started with another configuration; --resume needs the same recipe, overrides and seeds (see {cfg_path})")
            return out
        shutil.rmtree(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        records.write_json(cfg_path, cfg)
        records.write_json(out / "env.json", records.environment())
    except OSError as exc:
        raise ExperimentError(f"cannot write to {out}: {exc.strerror or exc}") from None
    return out


def rng_state() -> dict:
    """Every random number generator training may draw from, as tensors and plain values (a checkpoint's ``rng``)."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": int(version), "internal": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` captured."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["internal"].tolist()), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _checkpoint_callback(path: Path, arm: str, seed: int, history: History, on_epoch: Callable | None, write: bool = True):
    last = [-math.inf]

    def callback(epoch, logs, model, optimizer, state):
        if not write:
            return
        now = time.monotonic()
        if now - last[0] >= CHECKPOINT_SECONDS or history.diverged_epoch is not None:
            last[0] = now
            payload = {
                "arm": arm,
                "seed": seed,
                "epochs_done": epoch + 1,
                "diverged_epoch": history.diverged_epoch,
                "model": {k: v.detach().clone() for k, v in model.state_dict().items()},
                "optimizer": optimizer.state_dict(),
                "generator": state["generator"].get_state(),
                "rng": rng_state(),
                "stream_order": state.get("stream_order"),
                "stream_pos": int(state.get("stream_pos", 0)),
                "history": {k: list(v) for k, v in history.history.items()},
            }
            records.save_checkpoint(path / "checkpoint.pt", payload)
        records.write_history(path / "history.csv", history.history, durable=False)
        if on_epoch is not None:
            on_epoch(arm, seed, epoch, logs)

    return callback


def _resume_state(recipe: Recipe, arm: str, seed: int, path: Path):
    """Model, fit state, history and first epoch from the checkpoint at ``path``; RecordError if it does not fit."""
    ckpt = records.load_checkpoint(path)
    if (ckpt["arm"], ckpt["seed"]) != (arm, seed) or not ckpt["epochs_done"] <= recipe.epochs:
        raise records.RecordError(path, f"is the checkpoint of arm {ckpt['arm']!r}, seed {ckpt['seed']!r} after "
                                        f"{ckpt['epochs_done']} epochs, not one of this run (arm {arm!r}, seed {seed}, {recipe.epochs} epochs)")
    try:
        model = build_model(recipe, arm, seed)
        model.load_state_dict(ckpt["model"])
        opt = get_optimizer({"name": recipe.optimizer, "lr": recipe.learning_rate}, [p for p in model.parameters() if p.requires_grad])
        opt.load_state_dict(ckpt["optimizer"])
        gen = torch.Generator()
        gen.set_state(ckpt["generator"])
        set_rng_state(ckpt["rng"])
        history = History(history={k: [float(v) for v in vals] for k, vals in ckpt["history"].items()},
                          epoch=list(range(ckpt["epochs_done"])), diverged_epoch=ckpt.get("diverged_epoch"))
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError, IndexError) as exc:
        raise records.RecordError(path, f"cannot be resumed from ({type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}); "
                                        "delete it to start this seed again") from None
    state = {"generator": gen, "optimizer": opt, "stream_order": ckpt.get("stream_order"), "stream_pos": int(ckpt.get("stream_pos") or 0)}
    return model, state, history, ckpt["epochs_done"]


def run_experiment(
    recipe: Recipe,
    out: Path,
    *,
    seeds: Sequence[int] = (0, 1, 2, 3, 4),
    arms: Sequence[str] = ARMS,
    resume: bool = False,
    overwrite: bool = False,
    argv=None,
    on_epoch: Callable | None = None,
    on_run_start: Callable | None = None,
    on_run_end: Callable | None = None,
    device=None,
) -> Path:
    """Run ``recipe`` for every arm and seed into ``out``; returns ``out``.

    ``on_run_start(arm, seed, epochs_done)``, ``on_epoch(arm, seed, epoch, logs)`` and
    ``on_run_end(arm, seed, final)`` let a front end show progress. A run whose
    figures stop being finite is recorded as diverged (``final.json``:
    ``diverged_epoch``) and the experiment goes on with the next run.
    """
    for arm in arms:
        if arm not in ARMS:
            raise ExperimentError(f"unknown arm {arm!r}; expected one of {ARMS}")
    if not seeds or any(not isinstance(s, int) or isinstance(s, bool) or s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise ExperimentError(f"seeds must be distinct ints >= 0, got {list(seeds)!r}")
    check_runnable(recipe)  # a configuration that cannot run fails before anything is loaded, written or trained
    dataset = load_data(recipe)  # then a dataset that cannot be had leaves no directory behind
    check_runnable(recipe, dataset)
    rank, world = rank_and_world()
    main = rank == 0  # with several processes only the first writes records
    if main:
        out = prepare_dir(out, recipe, seeds, arms, resume=resume, overwrite=overwrite, argv=argv, nproc=world,
                          data_facts=facts(recipe, dataset))
    if world > 1:
        dist.barrier()  # the directory is ready before anyone reads it
    out = Path(out)
    for arm in arms:
        for seed in seeds:
            rd = records.run_dir(out, arm, seed)
            if (rd / "final.json").exists():
                records.read_final(rd / "final.json", arm, seed)  # a damaged record stops here, named
                continue
            rd.mkdir(parents=True, exist_ok=True)
            if main:
                for stale in rd.glob(".*.tmp"):  # a write that a kill interrupted before its rename
                    stale.unlink(missing_ok=True)
            model = state = None
            history = History()
            initial_epoch = 0
            if resume and (rd / "checkpoint.pt").exists():
                model, state, history, initial_epoch = _resume_state(recipe, arm, seed, rd / "checkpoint.pt")
            if on_run_start is not None and main:
                on_run_start(arm, seed, initial_epoch)
            cb = _checkpoint_callback(rd, arm, seed, history, on_epoch if main else None, write=main)
            t0 = time.perf_counter()
            result = run(
                recipe, arm=arm, seed=seed, dataset=dataset, model=model, state=state, history=history,
                initial_epoch=initial_epoch, callbacks=[cb], device=device,
            )
            if not main:
                dist.barrier()  # wait until the first process has written this run's records
                continue
            hist = result.history
            diverged, diverged_in = hist.diverged_epoch, "training" if hist.diverged_epoch is not None else None
            figures = result.final()
            if diverged is None and not all(math.isfinite(v) for v in figures.values()):
                diverged, diverged_in, figures = len(hist.epoch), "test evaluation", {}  # finite training, non-finite test
            records.write_history(rd / "history.csv", hist.history)
            records.save_weights(rd / "weights.safetensors", result.model, {"recipe": recipe.name, "arm": arm, "seed": seed})
            digests = {name: records.sha256(rd / name) for name in ("history.csv", "weights.safetensors")}
            final = {"arm": arm, "seed": seed, "epochs": len(hist.epoch), "diverged_epoch": diverged, "diverged_in": diverged_in,
                     **figures, "checks": result.checks, "seconds": time.perf_counter() - t0, "resumed_from_epoch": initial_epoch,
                     "sha256": digests}
            records.write_json(rd / "final.json", final)  # written last: marks the run as done
            (rd / "checkpoint.pt").unlink(missing_ok=True)
            if world > 1:
                dist.barrier()
            if on_run_end is not None:
                on_run_end(arm, seed, final)
    return out
