"""A whole experiment: one recipe, both arms (with / without BN), several seeds, written as records.

Every epoch of every run leaves a checkpoint (model, optimizer, RNG states,
history), so ``run_experiment(..., resume=True)`` continues a killed run where
it stopped and ends with the same history, digit for digit on CPU, as a run
that was never interrupted. Finished runs (``final.json`` present) are skipped
on resume.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.distributed as dist

from ..tools.distributed import rank_and_world
from . import records
from .recipes import Recipe
from .runner import ARMS, build_model, load_data, run
from .training import History, get_optimizer

__all__ = ["ExperimentError", "prepare_dir", "run_experiment", "default_out"]


class ExperimentError(RuntimeError):
    """The experiment cannot run as asked (directory conflicts, unwritable output, ...)."""


def default_out(recipe: Recipe) -> Path:
    return Path("runs") / f"{recipe.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def _config(recipe: Recipe, seeds, arms, argv, nproc: int = 1) -> dict:
    return {"recipe": recipe.to_dict(), "seeds": list(seeds), "arms": list(arms), "command": list(argv or []), "nproc": nproc}


def _comparable(cfg: dict) -> dict:
    r = {k: v for k, v in cfg["recipe"].items() if k not in ("reported", "reference", "notes", "title")}
    return {"recipe": r, "seeds": cfg["seeds"], "arms": cfg["arms"], "nproc": cfg.get("nproc", 1)}


def prepare_dir(out: Path, recipe: Recipe, seeds, arms, *, resume=False, overwrite=False, argv=None, nproc: int = 1) -> Path:
    """Create or check the records directory; write config.json and env.json."""
    out = Path(out)
    cfg = _config(recipe, seeds, arms, argv, nproc)
    cfg_path = out / "config.json"
    if out.exists() and not out.is_dir():
        raise ExperimentError(f"output path {out} exists and is not a directory")
    if cfg_path.exists():
        old = records.read_json(cfg_path)
        old_name = old.get("recipe", {}).get("name")
        if old_name != recipe.name and not overwrite:
            raise ExperimentError(f"{out} holds records of recipe {old_name!r}, not {recipe.name!r}: choose another --out, or --overwrite")
        if resume and not overwrite:
            if _comparable(old) != _comparable(cfg):
                raise ExperimentError(f"{out} was started with another configuration; --resume needs the same recipe, overrides and seeds (see {cfg_path})")
            return out
        if not overwrite:
            raise ExperimentError(f"{out} already holds a run of {recipe.name!r}: use --resume to continue it or --overwrite to start again")
        shutil.rmtree(out)
    elif out.exists() and any(out.iterdir()) and not overwrite:
        raise ExperimentError(f"{out} is not empty and holds no bnlab records: choose another --out, or --overwrite")
    elif out.exists() and overwrite:
        shutil.rmtree(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        records.write_json(cfg_path, cfg)
        records.write_json(out / "env.json", records.environment())
    except OSError as exc:
        raise ExperimentError(f"cannot write to {out}: {exc.strerror or exc}") from None
    return out


def _checkpoint_callback(path: Path, arm: str, seed: int, history: History, on_epoch: Callable | None, write: bool = True):
    def callback(epoch, logs, model, optimizer, state):
        if not write:
            return
        payload = {
            "arm": arm,
            "seed": seed,
            "epochs_done": epoch + 1,
            "model": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "optimizer": optimizer.state_dict(),
            "generator": state["generator"].get_state(),
            "torch_rng": torch.get_rng_state(),
            "stream_order": state.get("stream_order"),
            "stream_pos": int(state.get("stream_pos", 0)),
            "history": {k: list(v) for k, v in history.history.items()},
        }
        records.save_checkpoint(path / "checkpoint.pt", payload)
        records.write_history(path / "history.csv", history.history)
        if on_epoch is not None:
            on_epoch(arm, seed, epoch, logs)

    return callback


def _resume_state(recipe: Recipe, arm: str, seed: int, ckpt: dict):
    model = build_model(recipe, arm, seed)
    model.load_state_dict(ckpt["model"])
    opt = get_optimizer({"name": recipe.optimizer, "lr": recipe.learning_rate}, [p for p in model.parameters() if p.requires_grad])
    opt.load_state_dict(ckpt["optimizer"])
    gen = torch.Generator()
    gen.set_state(ckpt["generator"])
    torch.set_rng_state(ckpt["torch_rng"])
    state = {"generator": gen, "optimizer": opt, "stream_order": ckpt["stream_order"], "stream_pos": ckpt["stream_pos"]}
    history = History(history={k: list(v) for k, v in ckpt["history"].items()}, epoch=list(range(ckpt["epochs_done"])))
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
    ``on_run_end(arm, seed, final)`` let a front end show progress.
    """
    for arm in arms:
        if arm not in ARMS:
            raise ExperimentError(f"unknown arm {arm!r}; expected one of {ARMS}")
    dataset = load_data(recipe)  # first: a dataset that cannot be had leaves no directory behind
    rank, world = rank_and_world()
    main = rank == 0  # with several processes only the first writes records
    if main:
        out = prepare_dir(out, recipe, seeds, arms, resume=resume, overwrite=overwrite, argv=argv, nproc=world)
    if world > 1:
        dist.barrier()  # the directory is ready before anyone reads it
    out = Path(out)
    for arm in arms:
        for seed in seeds:
            rd = records.run_dir(out, arm, seed)
            if (rd / "final.json").exists():
                continue
            rd.mkdir(parents=True, exist_ok=True)
            model = state = None
            history = History()
            initial_epoch = 0
            if resume and (rd / "checkpoint.pt").exists():
                model, state, history, initial_epoch = _resume_state(recipe, arm, seed, records.load_checkpoint(rd / "checkpoint.pt"))
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
            records.write_history(rd / "history.csv", result.history.history)
            records.save_weights(rd / "weights.safetensors", result.model, {"recipe": recipe.name, "arm": arm, "seed": seed})
            final = {"arm": arm, "seed": seed, **result.final(), "checks": result.checks,
                     "seconds": time.perf_counter() - t0, "resumed_from_epoch": initial_epoch}
            records.write_json(rd / "final.json", final)  # written last: marks the run as done
            (rd / "checkpoint.pt").unlink(missing_ok=True)
            if world > 1:
                dist.barrier()
            if on_run_end is not None:
                on_run_end(arm, seed, final)
    return out
