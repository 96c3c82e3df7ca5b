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

Runs are independent: each (arm, seed) writes only its own directory, so
``jobs=N`` runs them in N worker processes (:func:`execute`) with the same
bytes as one process, ``only=`` runs a part (one task of a cluster's job
array), and :func:`merge` puts the parts' directories together.
:func:`run_sweep` runs a grid of cells (:mod:`bnlab.lab.sweep`), each cell an
experiment directory under the sweep's.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
import torch.distributed as dist

from ..tools.distributed import rank_and_world
from . import records, sweep
from .recipes import OverrideError, Recipe
from .runner import ARMS, build_model, check_runnable, facts, load_data, run
from .training import History, get_optimizer

__all__ = ["ExperimentError", "prepare_dir", "run_experiment", "select_runs", "Task", "execute", "run_sweep", "read_sweep", "sweep_config", "merge", "default_out", "rng_state",
           "set_rng_state", "CHECKPOINT_SECONDS"]

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


# Diagnostics a run may record beside its history (bnlab.lab.probes, bnlab.lab.landscape); their digests go into final.json.
_DIAGNOSTICS = ("probes.csv", "probes.json", "landscape.jsonl")

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


def _run_one(recipe: Recipe, out: Path, arm: str, seed: int, dataset, *, resume: bool, device=None,
             on_epoch: Callable | None = None, on_run_start: Callable | None = None) -> dict | None:
    """Train one arm and seed into ``out/<arm>/seed-<k>``; its ``final.json`` figures, or None if it had finished before.

    Every process of a ``--nproc`` run calls this; only the first writes records.
    """
    rank, world = rank_and_world()
    main = rank == 0
    rd = records.run_dir(out, arm, seed)
    if (rd / "final.json").exists():
        records.read_final(rd / "final.json", arm, seed)  # a damaged record stops here, named
        return None
    rd.mkdir(parents=True, exist_ok=True)
    if main:
        for stale in rd.glob(".*.tmp"):  # a write that a kill interrupted before its rename
            stale.unlink(missing_ok=True)
    model = state = None
    history = History()
    initial_epoch = 0
    if resume and (rd / "checkpoint.pt").exists():
        model, state, history, initial_epoch = _resume_state(recipe, arm, seed, rd / "checkpoint.pt")
    else:
        model = build_model(recipe, arm, seed)
    if on_run_start is not None and main:
        on_run_start(arm, seed, initial_epoch)
    cb = _checkpoint_callback(rd, arm, seed, history, on_epoch if main else None, write=main)
    t0 = time.perf_counter()
    result = run(
        recipe, arm=arm, seed=seed, dataset=dataset, model=model, state=state, history=history,
        initial_epoch=initial_epoch, callbacks=[cb], device=device, records_dir=rd,
    )
    if not main:
        dist.barrier()  # wait until the first process has written this run's records
        return None
    hist = result.history
    diverged, diverged_in = hist.diverged_epoch, "training" if hist.diverged_epoch is not None else None
    figures = result.final()
    if diverged is None and not all(math.isfinite(v) for v in figures.values()):
        diverged, diverged_in, figures = len(hist.epoch), "test evaluation", {}  # finite training, non-finite test
    records.write_history(rd / "history.csv", hist.history)
    records.save_weights(rd / "weights.safetensors", result.model, {"recipe": recipe.name, "arm": arm, "seed": seed})
    names = ["history.csv", "weights.safetensors", *(n for n in _DIAGNOSTICS if (rd / n).exists())]
    digests = {name: records.sha256(rd / name) for name in names}
    final = {"arm": arm, "seed": seed, "epochs": len(hist.epoch), "diverged_epoch": diverged, "diverged_in": diverged_in,
             **figures, "checks": result.checks, "seconds": time.perf_counter() - t0, "resumed_from_epoch": initial_epoch,
             "sha256": digests}
    records.write_json(rd / "final.json", final)  # written last: marks the run as done
    (rd / "checkpoint.pt").unlink(missing_ok=True)
    if world > 1:
        dist.barrier()
    return final


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
    jobs: int = 1,
    only: Iterable[tuple[str, int]] | None = None,
) -> Path:
    """Run ``recipe`` for every arm and seed into ``out``; returns ``out``.

    ``on_run_start(arm, seed, epochs_done)``, ``on_epoch(arm, seed, epoch, logs)`` and
    ``on_run_end(arm, seed, final)`` let a front end show progress. A run whose
    figures stop being finite is recorded as diverged (``final.json``:
    ``diverged_epoch``) and the experiment goes on with the next run.

    ``jobs``: runs at once, each (arm, seed) in its own process
    (:func:`execute`); the records are the same bytes whatever ``jobs`` is.
    ``only``: the (arm, seed) pairs to run in this call, of ``arms`` x
    ``seeds`` (the configuration still names them all, so that directories
    which ran different pairs can be merged with :func:`merge`); an existing
    directory of the same configuration is joined, its finished runs kept.
    """
    for arm in arms:
        if arm not in ARMS:
            raise ExperimentError(f"unknown arm {arm!r}; expected one of {ARMS}")
    if not seeds or any(not isinstance(s, int) or isinstance(s, bool) or s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise ExperimentError(f"seeds must be distinct ints >= 0, got {list(seeds)!r}")
    pairs = select_runs(arms, seeds, only)
    check_runnable(recipe)  # a configuration that cannot run fails before anything is loaded, written or trained
    dataset = load_data(recipe)  # then a dataset that cannot be had leaves no directory behind
    check_runnable(recipe, dataset)
    rank, world = rank_and_world()
    if jobs > 1 and world > 1:
        raise ExperimentError(f"jobs={jobs} with {world} processes: run several processes per run (--nproc) or several runs at once (--jobs), not both")
    if rank == 0:  # with several processes only the first writes records
        out = prepare_dir(out, recipe, seeds, arms, resume=resume or only is not None, overwrite=overwrite, argv=argv,
                          nproc=world, data_facts=facts(recipe, dataset))
    if world > 1:
        dist.barrier()  # the directory is ready before anyone reads it
    out = Path(out)
    if jobs > 1:
        tasks = [Task(recipe, out, arm, seed, resume) for arm, seed in pairs]
        execute(tasks, jobs, on_epoch=on_epoch and (lambda t, *a: on_epoch(*a)),
                on_run_start=on_run_start and (lambda t, *a: on_run_start(*a)),
                on_run_end=on_run_end and (lambda t, *a: on_run_end(*a)))
        return out
    for arm, seed in pairs:
        final = _run_one(recipe, out, arm, seed, dataset, resume=resume, device=device, on_epoch=on_epoch, on_run_start=on_run_start)
        if final is not None and on_run_end is not None:
            on_run_end(arm, seed, final)
    return out


def select_runs(arms: Sequence[str], seeds: Sequence[int], only: Iterable[tuple[str, int]] | None) -> list[tuple[str, int]]:
    """The (arm, seed) pairs to run, in arm-major order: all of them, or those of ``only`` (each checked)."""
    pairs = [(arm, seed) for arm in arms for seed in seeds]
    if only is None:
        return pairs
    wanted = list(dict.fromkeys((str(a), s) for a, s in only))
    stray = [f"{s}/{a}" for a, s in wanted if (a, s) not in pairs]
    if stray:
        raise ExperimentError(f"--only {', '.join(stray)}: not a run of this experiment; its arms are {', '.join(arms)} "
                              f"and its seeds {', '.join(map(str, seeds))}")
    if not wanted:
        raise ExperimentError("--only selects no run")
    return [p for p in pairs if p in wanted]


# ----------------------------------------------------------------------------- several runs at once


@dataclass(frozen=True)
class Task:
    """One run for :func:`execute`: ``recipe``'s ``arm`` and ``seed`` into the records directory ``out`` (prepared)."""

    recipe: Recipe
    out: Path
    arm: str
    seed: int
    resume: bool = False


_WORKER: dict = {}  # in a worker process: the events queue and the datasets loaded so far


def _worker_init(queue, threads: int) -> None:
    torch.set_num_threads(threads)
    _WORKER.update(queue=queue, data={})


def _worker_run(index: int, recipe_dict: dict, out: str, arm: str, seed: int, resume: bool) -> None:
    q = _WORKER["queue"]
    recipe = Recipe.from_dict(recipe_dict)
    key = (recipe.dataset, recipe.data_seed)
    if key not in _WORKER["data"]:
        _WORKER["data"][key] = load_data(recipe)
    final = _run_one(recipe, Path(out), arm, seed, _WORKER["data"][key], resume=resume,
                     on_epoch=lambda *a: q.put((index, "epoch", a)), on_run_start=lambda *a: q.put((index, "start", a)))
    q.put((index, "end", None if final is None else (arm, seed, final)))


def execute(tasks: Sequence[Task], jobs: int, *, on_epoch: Callable | None = None, on_run_start: Callable | None = None,
            on_run_end: Callable | None = None) -> None:
    """Run ``tasks`` in ``jobs`` worker processes (spawned), in order as workers come free.

    Each run writes only its own directory, exactly as it would in this
    process, so the records are the same bytes whatever ``jobs`` is (every
    run seeds its own generators; a worker gets ``cpu_count // jobs``
    threads, and the lab trains every offline recipe on one thread anyway).
    Callbacks get the task first: ``on_epoch(task, arm, seed, epoch, logs)``,
    ``on_run_start(task, arm, seed, epochs_done)``, ``on_run_end(task, arm, seed,
    final)`` (not called for a run that had finished before), called here,
    in the order each worker sent them. The first run that raises stops the
    queue (runs under way finish) and its error is raised here.
    """
    import concurrent.futures as cf
    import multiprocessing as mp
    import os
    import queue as queue_mod

    ctx = mp.get_context("spawn")  # a fork of a process that ran torch's thread pools can hang
    events = ctx.Queue()
    threads = max(1, (os.cpu_count() or 1) // jobs)
    handlers = {"epoch": on_epoch, "start": on_run_start, "end": on_run_end}

    def drain(timeout: float) -> None:
        while True:
            try:
                index, kind, args = events.get(timeout=timeout)
            except queue_mod.Empty:
                return
            timeout = 0
            if handlers[kind] is not None and args is not None:
                handlers[kind](tasks[index], *args)

    with cf.ProcessPoolExecutor(max_workers=min(jobs, len(tasks)) or 1, mp_context=ctx, initializer=_worker_init,
                                initargs=(events, threads)) as pool:
        futures = [pool.submit(_worker_run, i, t.recipe.to_dict(), str(t.out), t.arm, t.seed, t.resume) for i, t in enumerate(tasks)]
        pending = set(futures)
        try:
            while pending:
                done, pending = cf.wait(pending, timeout=0.2, return_when=cf.FIRST_COMPLETED)
                drain(0)
                for fut in done:
                    fut.result()  # a worker's error stops here
            drain(0.5)  # what the last workers sent just before they returned
        except BaseException:
            for fut in pending:
                fut.cancel()
            raise


# ----------------------------------------------------------------------------- sweeps

SWEEP_JSON = "sweep.json"
# 2: "lr_scaling" is the rule asked for ("auto", ...) and each cell records the rule it resolved to and the rate it scaled.
# 1 (read, not resumed): "lr_scaling" was the base recipe's resolved rule, applied with the base recipe's rate to every cell.
SWEEP_FORMAT = "bnlab-sweep/2"
_SWEEP_FORMAT_1 = "bnlab-sweep/1"


def _cell_record(c: sweep.Cell) -> dict:
    return {"id": c.id, "settings": c.settings, "arm": c.arm, "norm": c.recipe.norm if c.arm == "bn" else None,
            "batch_size": c.recipe.batch_size, "learning_rate": c.recipe.learning_rate, "lr_scaling": c.lr_scaling,
            "base_learning_rate": c.base_learning_rate, "same_as": c.same_as}


def sweep_config(recipe: Recipe, spec, *, seeds, lr_scaling: str, base_batch_size: int | None, ghost_batch: int,
                 metric: str, argv=None) -> dict:
    """What ``sweep.json`` holds: the base recipe, the grid and its rules (``lr_scaling`` as asked, e.g. ``"auto"``), the
    seeds, the metric and the cells they plan, each with the rule it resolved to and the rate it scaled from."""
    cells = sweep.plan(recipe, spec, lr_scaling=lr_scaling, base_batch_size=base_batch_size, ghost_batch=ghost_batch)
    return {"format": SWEEP_FORMAT, "recipe": recipe.to_dict(), "grid": sweep.parse_grid(spec),
            "lr_scaling": lr_scaling, "base_batch_size": base_batch_size or recipe.batch_size,
            "ghost_batch": ghost_batch, "seeds": list(seeds), "metric": metric, "command": list(argv or []),
            "cells": [_cell_record(c) for c in cells]}


def read_sweep(root: Path) -> tuple[dict, list]:
    """``(sweep.json, its cells)``, checked: the cells are planned again from the recipe, grid and rules it records.

    :class:`~bnlab.lab.records.RecordError` names the file when it is damaged
    or its cells (ids, learning rates and rules) are not what its recipe and
    grid give. A format-1 file (older bnlab, which recorded the base recipe's
    resolved rule) is read with each cell's rule and base rate filled in as
    that bnlab applied them: the rule for every cell and the base recipe's rate.
    """
    from .recipes import Recipe as _Recipe
    from .recipes import validate

    path = Path(root) / SWEEP_JSON
    cfg = records.read_json(path)
    if not isinstance(cfg, dict) or cfg.get("format") not in (SWEEP_FORMAT, _SWEEP_FORMAT_1):
        raise records.RecordError(path, f"is not a bnlab sweep record (expected format {SWEEP_FORMAT!r})")
    try:
        recipe = validate(_Recipe.from_dict(cfg["recipe"]))
        spec = [f"{k}={','.join(v)}" for k, v in cfg["grid"].items()]
        cells = sweep.plan(recipe, spec, lr_scaling=cfg["lr_scaling"], base_batch_size=cfg["base_batch_size"],
                           ghost_batch=cfg["ghost_batch"])
        seeds = cfg["seeds"]
        assert isinstance(seeds, list) and seeds and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds)
        assert isinstance(cfg["metric"], str)
        stored = cfg.get("cells", [])
        assert isinstance(stored, list) and all(isinstance(c, dict) for c in stored)
        if cfg["format"] == _SWEEP_FORMAT_1:
            rule = "none" if "learning_rate" in cfg["grid"] else cfg["lr_scaling"]
            filled = {"lr_scaling": rule, "base_learning_rate": sweep.base_learning_rate(recipe)}
            cfg = {**cfg, "cells": [{**filled, **c} for c in stored]}
    except (KeyError, TypeError, ValueError, AttributeError, AssertionError) as exc:
        raise records.RecordError(path, f"is damaged or from another bnlab ({type(exc).__name__}: {str(exc)[:160]})") from None
    if [c.get("id") for c in cfg["cells"]] != [c.id for c in cells]:
        raise records.RecordError(path, "lists other cells than its recipe and grid give")
    if cfg["format"] == SWEEP_FORMAT:
        planned = json.loads(json.dumps(records._jsonable([_cell_record(c) for c in cells])))
        if cfg["cells"] != planned:
            raise records.RecordError(path, "records other settings, learning rates or rules for its cells than its recipe, "
                                            "grid and rules give")
    return cfg, cells


def _sweep_comparable(cfg: dict) -> dict:
    return {k: v for k, v in cfg.items() if k not in ("command",)}


def run_sweep(
    recipe: Recipe,
    spec,
    out: Path,
    *,
    seeds: Sequence[int] = (0, 1, 2),
    lr_scaling: str = "auto",
    base_batch_size: int | None = None,
    ghost_batch: int = sweep.GHOST_BATCH,
    metric: str | None = None,
    resume: bool = False,
    overwrite: bool = False,
    argv=None,
    jobs: int = 1,
    only: Iterable[tuple[str, int]] | None = None,
    on_plan: Callable | None = None,
    on_epoch: Callable | None = None,
    on_run_start: Callable | None = None,
    on_run_end: Callable | None = None,
) -> Path:
    """Run every cell of the grid ``spec`` (:func:`bnlab.lab.sweep.plan`) over ``seeds`` into ``out``; returns ``out``.

    ``out/sweep.json`` records the grid; each cell is an experiment directory
    ``out/<cell id>`` with its one arm (``norm=none`` is the no-BN arm),
    written as :func:`run_experiment` writes one. A cell that runs the same
    model as another (``same_as``: a ghost batch holding the whole batch) is
    not run; its twin's results stand for it (the same formula, not the same
    bits: see :mod:`bnlab.lab.sweep`). Every cell's configuration is
    checked before anything is written. ``only``: the (cell id, seed) pairs to
    run. ``on_plan(tasks, works)`` gets the :class:`Task` list and each task's
    rough work (:func:`bnlab.lab.sweep.work`) before the first run; the other
    callbacks get the task first, as in :func:`execute`.
    """
    if not seeds or any(not isinstance(s, int) or isinstance(s, bool) or s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise ExperimentError(f"seeds must be distinct ints >= 0, got {list(seeds)!r}")
    cells = sweep.plan(recipe, spec, lr_scaling=lr_scaling, base_batch_size=base_batch_size, ghost_batch=ghost_batch)
    metric = metric or sweep.default_metric(cells[0].recipe)  # the grid may set evaluate_test
    cfg = sweep_config(recipe, spec, seeds=seeds, lr_scaling=lr_scaling, base_batch_size=base_batch_size,
                       ghost_batch=ghost_batch, metric=metric, argv=argv)
    ran = [c for c in cells if c.same_as is None]
    ids = [c.id for c in ran]
    pairs = [(c.id, s) for c in ran for s in seeds]
    if only is not None:
        wanted = list(dict.fromkeys(only))
        stray = [f"{c}/{s}" for c, s in wanted if (c, s) not in pairs]
        if stray:
            twins = {c.id: c.same_as for c in cells if c.same_as is not None}
            skipped = sorted({c for c, _ in wanted if c in twins})
            why = "".join(f"; {c} is the same model as {twins[c]} (a ghost batch that holds the whole batch is plain BN), "
                          f"so it is not run and the report gives it {twins[c]}'s results" for c in skipped)
            raise ExperimentError(f"--only {', '.join(stray)}: not a run of this sweep{why}; its cells are {', '.join(ids)} "
                                  f"and its seeds {', '.join(map(str, seeds))}")
        if not wanted:  # as select_runs: an empty selection is a mistake, not a sweep that ran
            raise ExperimentError("--only selects no run")
        pairs = [p for p in pairs if p in wanted]
    datasets = {}
    for c in ran:  # every cell that cannot run fails here, named, before anything is written
        try:
            check_runnable(c.recipe)
            key = (c.recipe.dataset, c.recipe.data_seed)
            if key not in datasets:
                datasets[key] = load_data(c.recipe)
            check_runnable(c.recipe, datasets[key])
        except OverrideError as exc:
            raise OverrideError(f"cell {c.id}: {exc}") from None
    for c in ran:
        prefixes = ("", "val_", *(("test_",) if c.recipe.evaluate_test else ()))
        if metric not in {f"{p}{m}" for p in prefixes for m in ("loss", *c.recipe.metrics)}:
            raise OverrideError(f"metric {metric!r}: cell {c.id} of {recipe.name} records loss{', ' if recipe.metrics else ''}"
                                f"{', '.join(recipe.metrics)} as {', '.join(p + '*' if p else 'training' for p in prefixes)} figures")
    out = Path(out)
    _prepare_sweep_dir(out, cfg, ids, resume=resume or only is not None, overwrite=overwrite)
    by_id = {c.id: c for c in ran}
    for c in ran:
        key = (c.recipe.dataset, c.recipe.data_seed)
        prepare_dir(out / c.id, c.recipe, seeds, [c.arm], resume=True, argv=argv, data_facts=facts(c.recipe, datasets[key]))
    tasks = [Task(by_id[cid].recipe, out / cid, by_id[cid].arm, seed, resume) for cid, seed in pairs]
    if on_plan is not None:
        n_train = {key: len(ds.x_train) for key, ds in datasets.items()}
        on_plan(tasks, [sweep.work(t.recipe, n_train[(t.recipe.dataset, t.recipe.data_seed)]) for t in tasks])
    if jobs > 1:
        execute(tasks, jobs, on_epoch=on_epoch, on_run_start=on_run_start, on_run_end=on_run_end)
        return out
    for t in tasks:
        ds = datasets[(t.recipe.dataset, t.recipe.data_seed)]
        final = _run_one(t.recipe, t.out, t.arm, t.seed, ds, resume=resume,
                         on_epoch=on_epoch and (lambda *a, t=t: on_epoch(t, *a)),
                         on_run_start=on_run_start and (lambda *a, t=t: on_run_start(t, *a)))
        if final is not None and on_run_end is not None:
            on_run_end(t, t.arm, t.seed, final)
    return out


def _prepare_sweep_dir(out: Path, cfg: dict, cell_ids: Sequence[str], *, resume: bool, overwrite: bool) -> None:
    """Create or check a sweep directory (as :func:`prepare_dir` does an experiment's) and write ``sweep.json``."""
    path = out / SWEEP_JSON
    if out.exists() and not out.is_dir():
        raise ExperimentError(f"output path {out} exists and is not a directory")
    if out.exists() and any(out.iterdir()):
        own = {SWEEP_JSON, "sweep.csv", *cell_ids, *_OWN_NAMES}
        if overwrite:
            if not all(p.name in own or (p.name.startswith(".") and p.name.endswith(".tmp")) for p in out.iterdir()):
                raise ExperimentError(f"{out} holds files that bnlab did not write; --overwrite only replaces a sweep "
                                      "directory: choose another --out")
            shutil.rmtree(out)
        elif not path.exists():
            raise ExperimentError(f"{out} is not empty and holds no bnlab sweep: choose another --out, or --overwrite")
        else:
            old, _ = read_sweep(out)
            if old["format"] != SWEEP_FORMAT:
                raise ExperimentError(f"{out} holds a sweep of an older bnlab ({old['format']}: its learning rates came from "
                                      "the base recipe's rule); it can be reported and merged, not continued: choose another --out")
            if not resume:
                raise ExperimentError(f"{out} already holds a sweep: use --resume to continue it or --overwrite to start again")
            if _sweep_comparable(old) != _sweep_comparable(json.loads(json.dumps(records._jsonable(cfg)))):
                raise ExperimentError(f"{out} was started with another sweep (recipe, grid, seeds, learning-rate rule or "
                                      f"metric); --resume needs the same ones (see {path})")
            return
    try:
        out.mkdir(parents=True, exist_ok=True)
        records.write_json(path, cfg)
    except OSError as exc:
        raise ExperimentError(f"cannot write to {out}: {exc.strerror or exc}") from None


# ----------------------------------------------------------------------------- merging directories


def _copy_run(src: Path, dst: Path) -> None:
    """Copy one ended run's records (not its checkpoint), ``final.json`` last so a cut copy is an unfinished run."""
    names = sorted(p.name for p in src.iterdir() if p.is_file() and p.name not in ("final.json", "checkpoint.pt")
                   and not p.name.endswith(".tmp"))
    for name in [*names, "final.json"]:
        records.atomic_write_bytes(dst / name, (src / name).read_bytes())


def _merge_plan(sources: Sequence[Path], out: Path, seeds=None) -> tuple[dict, list[tuple[Path, Path, str]]]:
    """Check experiment directories of one configuration for merging into ``out``: ``(merged config.json, runs to copy)``.

    Nothing is written: the configurations, every run to copy (its files
    against the digests its ``final.json`` recorded) and every run that ended
    in two places are all checked first, so a refused merge leaves ``out`` as
    it was. The merged configuration lists the union of the sources' seeds
    and arms (and ``seeds``, and those of an earlier merge in ``out``).
    """
    cfgs = [records.read_config(src / "config.json") for src in sources]
    first = cfgs[0]
    for src, cfg in zip(sources, cfgs, strict=True):
        a, b = _comparable(first), _comparable(cfg)
        if (a["recipe"], a["nproc"]) != (b["recipe"], b["nproc"]):
            raise ExperimentError(f"{src} holds another experiment than {sources[0]} (recipe {cfg['recipe']['name']!r}, its "
                                  "overrides or processes differ): only runs of one configuration merge")
    seeds = sorted(set(seeds or []).union(*(c["seeds"] for c in cfgs)))
    arms = [a for a in ARMS if any(a in c["arms"] for c in cfgs)]
    if out.exists() and not out.is_dir():
        raise ExperimentError(f"output path {out} exists and is not a directory")
    if (out / "config.json").exists():
        old = records.read_config(out / "config.json")
        if _comparable(old)["recipe"] != _comparable(first)["recipe"]:
            raise ExperimentError(f"{out} holds records of another experiment: choose another --out")
        seeds, arms = sorted(set(seeds) | set(old["seeds"])), [a for a in ARMS if a in arms or a in old["arms"]]
    elif out.exists() and any(out.iterdir()):
        raise ExperimentError(f"{out} is not empty and holds no bnlab records: choose another --out")
    copies = []
    for arm in arms:
        for seed in seeds:
            dst = records.run_dir(out, arm, seed)
            have = records.read_final(dst / "final.json", arm, seed) if (dst / "final.json").exists() else None
            have_in = out
            for src in sources:
                rd = records.run_dir(src, arm, seed)
                if rd.resolve() == dst.resolve() or not (rd / "final.json").exists():
                    continue
                final = records.read_final(rd / "final.json", arm, seed)
                if have is not None:
                    if have["sha256"] != final["sha256"]:
                        raise ExperimentError(f"{arm} seed {seed} ended in both {have_in} and {src} with different records; "
                                              "merge one of them")
                    continue
                for name, digest in final["sha256"].items():
                    records.check_digest(rd / name, {name: digest})
                copies.append((rd, dst, f"{src}: {arm} seed {seed}"))
                have, have_in = final, src
    cfg = {**first, "seeds": seeds, "arms": arms, "command": ["merge", *map(str, sources)]}
    return cfg, copies


def _merge_write(sources: Sequence[Path], out: Path, cfg: dict, copies) -> list[str]:
    """Write what :func:`_merge_plan` checked: ``config.json`` first (a cut merge is an earlier merge of this experiment,
    to merge again), then each run, ``final.json`` last; returns one line per run copied."""
    out.mkdir(parents=True, exist_ok=True)
    records.write_json(out / "config.json", cfg)
    if not (out / "env.json").exists():
        records.atomic_write_bytes(out / "env.json", (sources[0] / "env.json").read_bytes())
    for rd, dst, _ in copies:
        _copy_run(rd, dst)
    return [line for _, _, line in copies]


def merge(sources: Sequence[Path], out: Path) -> tuple[Path, list[str]]:
    """Merge records directories of one experiment, or of one sweep, into ``out``: ``(out, runs copied)``.

    The cluster's way to run a grid: a job array runs ``bnlab run ... --only
    SEED/ARM --out DIR-k`` (or ``bnlab sweep ... --only CELL/SEED``), each
    task into its own directory; merging puts every ended run (finished or
    diverged, with its files checked against the digests ``final.json``
    recorded) into one. The sources must share their configuration (recipe
    and overrides; for sweeps the grid and its rules) but may name different
    seeds, whose union the merged configuration lists. ``out`` may be new,
    or an earlier merge of the same experiment (runs it already holds are
    kept; a run that ended in two sources with different records is an
    error). Sources are only read.
    """
    sources = [Path(s) for s in sources]
    out = Path(out)
    if not sources:
        raise ExperimentError("nothing to merge: give the records directories")
    kinds = {src: ("sweep" if (src / SWEEP_JSON).is_file() else "experiment" if (src / "config.json").is_file() else None)
             for src in sources}
    bad = [str(s) for s, k in kinds.items() if k is None]
    if bad:
        raise ExperimentError(f"{', '.join(bad)}: no bnlab records (no config.json or sweep.json)")
    if len(set(kinds.values())) > 1:
        raise ExperimentError("a sweep merges only with sweeps, an experiment only with experiments")
    if any(s.resolve() == out.resolve() for s in sources[1:]):
        raise ExperimentError(f"--out {out} is one of the later sources; merge into a new directory or the first source")
    if out.exists() and not out.is_dir():
        raise ExperimentError(f"output path {out} exists and is not a directory")
    if kinds[sources[0]] == "experiment":  # everything is checked before anything is written: a refused merge leaves no --out
        return out, _merge_write(sources, out, *_merge_plan(sources, out))
    swept = [read_sweep(src) for src in sources]
    first = swept[0][0]
    for src, (cfg, _) in zip(sources, swept, strict=True):
        if {k: v for k, v in cfg.items() if k not in ("command", "seeds")} != {k: v for k, v in first.items() if k not in ("command", "seeds")}:
            raise ExperimentError(f"{src} holds another sweep than {sources[0]} (recipe, grid, learning-rate rule or metric "
                                  "differ): only one sweep's directories merge")
    seeds = sorted(set().union(*(c["seeds"] for c, _ in swept)))
    if (out / SWEEP_JSON).exists():
        old, _ = read_sweep(out)
        if {k: v for k, v in old.items() if k not in ("command", "seeds")} != {k: v for k, v in first.items() if k not in ("command", "seeds")}:
            raise ExperimentError(f"{out} holds another sweep: choose another --out")
        seeds = sorted(set(seeds) | set(old["seeds"]))
    elif out.exists() and any(out.iterdir()):
        raise ExperimentError(f"{out} is not empty and holds no bnlab sweep: choose another --out")
    plans = []
    for cell in swept[0][1]:
        if cell.same_as is not None:
            continue
        cell_sources = [src / cell.id for src in sources if (src / cell.id / "config.json").is_file()]
        if cell_sources:
            plans.append((cell_sources, out / cell.id, *_merge_plan(cell_sources, out / cell.id, seeds)))
    out.mkdir(parents=True, exist_ok=True)
    records.write_json(out / SWEEP_JSON, {**first, "seeds": seeds, "command": ["merge", *map(str, sources)]})
    copied = []
    for cell_sources, cell_out, cfg, copies in plans:
        copied += _merge_write(cell_sources, cell_out, cfg, copies)
    return out, copied
