"""Run one recipe, one arm (with or without BN), one seed: data, model, ``fit``, test evaluation, checks.

With a records directory, :func:`run` also records the recipe's diagnostics
there: probes every ``recipe.probes`` steps (:mod:`bnlab.lab.probes`,
``probes.csv``) and the loss landscape every ``recipe.landscape`` epochs
(:mod:`bnlab.lab.landscape`, ``landscape.jsonl``). Neither changes training.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .. import data as _data
from ..tools.distributed import rank_and_world
from . import models as _models
from .inspect import bn_layers, inspect_bn, moving_momentum
from .recipes import OverrideError, Recipe
from .training import History, evaluate, fit

__all__ = ["ARMS", "RunResult", "load_data", "build_model", "check_runnable", "facts", "steps_per_epoch", "run"]

ARMS = ("bn", "no_bn")


@dataclass
class RunResult:
    recipe: Recipe
    arm: str
    seed: int
    history: History
    test: dict = field(default_factory=dict)
    checks: dict = field(default_factory=dict)
    model: nn.Module | None = None
    seconds: float = 0.0

    @property
    def diverged_epoch(self) -> int | None:
        return self.history.diverged_epoch

    def final(self) -> dict:
        """Last-epoch training/validation figures plus test figures (none for a run that diverged)."""
        if self.diverged_epoch is not None:
            return {}
        return {**self.history.last(), **self.test}


def load_data(recipe: Recipe, progress=None) -> _data.Dataset:
    """The recipe's dataset with its fixed data split (``recipe.data_seed``)."""
    kwargs = {"seed": recipe.data_seed}
    if recipe.dataset in ("mnist", "kmnist", "cifar10") and progress is not None:
        kwargs["progress"] = progress
    return _data.load(recipe.dataset, **kwargs)


def build_model(recipe: Recipe, arm: str, seed: int) -> nn.Module:
    """The recipe's model for ``arm`` ("bn": with ``recipe.norm``; "no_bn": its twin), initialized from ``seed``."""
    if arm not in ARMS:
        raise ValueError(f"arm must be one of {ARMS}, got {arm!r}")
    torch.manual_seed(seed)
    norm = recipe.norm if arm == "bn" else None
    return _models.build(recipe.model, norm_layer=norm, **dict(recipe.model_kwargs))


def _train_rows(recipe: Recipe, n: int) -> int:
    if recipe.validation == "split" and recipe.validation_split:
        return int(n * (1.0 - recipe.validation_split))  # Keras: the last fraction validates
    return n


def steps_per_epoch(recipe: Recipe, n: int) -> int:
    """Optimizer steps in one epoch of ``recipe`` on ``n`` training rows (before its validation split)."""
    return recipe.steps_per_epoch or math.ceil(_train_rows(recipe, n) / recipe.batch_size)


def check_runnable(recipe: Recipe, dataset: _data.Dataset | None = None) -> None:
    """Refuse, with :class:`~bnlab.lab.recipes.OverrideError`, a valid recipe that still cannot run.

    The BN arm's model (with ``recipe.norm``) must take a training batch of the
    dataset's inputs: e.g. the tutorial's from-scratch layer normalizes
    ``(N, features)`` only, and PyTorch's BN refuses a batch of one sample.
    With the ``dataset``, the split must leave rows to train and to validate on,
    and the smallest training batch is the one tried. Nothing is trained and no
    random number generator is left changed.
    """
    shape, size = _data.INPUT_SHAPES[recipe.dataset], 2
    if dataset is not None:
        shape, n = tuple(dataset.x_train.shape[1:]), len(dataset.x_train)
        train = _train_rows(recipe, n)
        if recipe.validation == "split" and recipe.validation_split and not 1 <= train < n:
            raise OverrideError(f"validation_split={recipe.validation_split}: of {recipe.name}'s {n} training rows it leaves "
                                f"{train} to train on and {n - train} to validate on; both need at least one")
        size = train % recipe.batch_size or min(recipe.batch_size, train)  # the last, smallest batch of an epoch
    model = build_model(recipe, "bn", seed=0)
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        try:
            model.train()
            model(torch.zeros(size, *shape))
        except (RuntimeError, ValueError) as exc:
            what = f"norm={recipe.norm}" if recipe.norm != "bnlab" else f"batch_size={recipe.batch_size}"
            raise OverrideError(f"{what}: {recipe.name}'s model ({recipe.model}) cannot train a batch of {size} "
                                f"input(s) of shape {shape} with it: {str(exc).splitlines()[0]}") from None


def facts(recipe: Recipe, dataset: _data.Dataset) -> dict:
    """What the configuration that runs means in numbers: rows to train and validate on, steps, updates, BN momentum.

    Reports fill the recipe's notes with these (``recipes.render_notes``). ``passes``: how many
    times the updates go over the training rows.
    ``bn_momentum`` is the BN arm's weight of the old moving value (Keras'
    convention), when every BN layer shares one; ``moving_kept`` =
    ``bn_momentum ** updates``, the share of the initial moving statistics left
    after training.
    """
    n = len(dataset.x_train)
    train = _train_rows(recipe, n)
    validation = n - train if recipe.validation == "split" else (len(dataset.x_test) if recipe.validation == "test" else 0)
    steps = steps_per_epoch(recipe, n)
    momenta = {moving_momentum(m) for _, m in bn_layers(build_model(recipe, "bn", seed=0))}
    momentum = momenta.pop() if len(momenta) == 1 else None
    updates = steps * recipe.epochs
    return {
        "training_rows": n, "train": train, "validation": validation, "test": len(dataset.x_test),
        "steps_per_epoch": steps, "updates": updates, "epoch_fraction": min(1.0, steps * recipe.batch_size / max(train, 1)),
        "passes": updates * recipe.batch_size / max(train, 1),
        "bn_momentum": momentum, "moving_kept": momentum**updates if momentum is not None else None,
    }


def _targets(recipe: Recipe, y: torch.Tensor, num_classes: int | None) -> torch.Tensor:
    if recipe.loss == "categorical_crossentropy":
        return torch.nn.functional.one_hot(y.long(), num_classes).float()
    return y


def _diagnostics(recipe: Recipe, model: nn.Module, ds: _data.Dataset, y_train: torch.Tensor, seed: int,
                 records_dir, initial_epoch: int, callbacks) -> tuple:
    """``(Probes or None, callbacks)`` for the recipe's diagnostics in ``records_dir`` (first process only).

    A resumed run's probes continue at step ``initial_epoch * steps per epoch``
    (only training passes count, so that is the number of passes before), and
    its landscape records drop what came after the checkpoint. The landscape
    is measured on the rows ``fit`` trains on (before the validation split) and
    BEFORE the other callbacks, so a checkpoint never runs ahead of it.
    """
    from .probes import PROBES_CSV, Probes

    callbacks = list(callbacks)
    if records_dir is None or rank_and_world()[0] != 0 or (recipe.probes is None and recipe.landscape is None):
        return None, callbacks
    rd = Path(records_dir)
    steps = steps_per_epoch(recipe, len(ds.x_train))
    probes = None
    if recipe.probes is not None:
        probes = Probes(model, rd / PROBES_CSV, every=recipe.probes, step=initial_epoch * steps)
    if recipe.landscape is not None:
        from .landscape import LANDSCAPE_JSONL, etas_for, landscape_callback
        from .sweep import base_learning_rate

        train = _train_rows(recipe, len(ds.x_train))
        callbacks.insert(0, landscape_callback(
            rd / LANDSCAPE_JSONL, ds.x_train[:train], y_train[:train], loss=recipe.loss,
            etas=etas_for(base_learning_rate(recipe)), batch_size=recipe.batch_size, every=recipe.landscape, seed=seed,
            steps_per_epoch=steps, initial_epoch=initial_epoch))
    return probes, callbacks


def run(
    recipe: Recipe,
    *,
    arm: str = "bn",
    seed: int = 0,
    dataset: _data.Dataset | None = None,
    verbose: int = 0,
    device=None,
    callbacks=(),
    model: nn.Module | None = None,
    state: dict | None = None,
    history: History | None = None,
    initial_epoch: int = 0,
    records_dir: Path | str | None = None,
) -> RunResult:
    """Train ``recipe``'s model for one arm and seed; evaluate on the test set; run the recipe's check.

    ``model``/``state``/``history``/``initial_epoch`` resume an interrupted run.
    ``records_dir``: where the recipe's probes and landscape records go (see
    the module docstring; nothing is recorded without it, and only the first
    of several processes records).
    """
    t0 = time.perf_counter()
    ds = dataset or load_data(recipe)
    model = model or build_model(recipe, arm, seed)
    if rank_and_world()[1] > 1:
        from ..tools import convert_sync

        model = convert_sync(model)  # BN statistics over every process's share of the batch
    y_train = _targets(recipe, ds.y_train, ds.num_classes)
    y_test = _targets(recipe, ds.y_test, ds.num_classes)
    validation_data = (ds.x_test, y_test) if recipe.validation == "test" else None
    augment = None
    if recipe.augment:
        augment = lambda xb, gen: _data.random_affine(xb, generator=gen)  # noqa: E731
    probes, callbacks = _diagnostics(recipe, model, ds, y_train, seed, records_dir, initial_epoch, callbacks)
    with probes or contextlib.nullcontext():
        hist = fit(
            model, ds.x_train, y_train,
            loss=recipe.loss,
            optimizer={"name": recipe.optimizer, "lr": recipe.learning_rate},
            metrics=recipe.metrics,
            epochs=recipe.epochs,
            batch_size=recipe.batch_size,
            validation_split=recipe.validation_split if recipe.validation == "split" else 0.0,
            validation_data=validation_data,
            shuffle=recipe.shuffle,
            seed=seed,
            verbose=verbose,
            steps_per_epoch=recipe.steps_per_epoch,
            augment=augment,
            device=device,
            callbacks=callbacks,
            state=state,
            history=history,
            initial_epoch=initial_epoch,
        )
    test = {}
    if recipe.evaluate_test and hist.diverged_epoch is None:
        test = {f"test_{k}": v for k, v in evaluate(model, ds.x_test, y_test, loss=recipe.loss, metrics=recipe.metrics, batch_size=recipe.batch_size, device=device).items()}
    checks = {}
    if recipe.check == "recompute" and arm == "bn" and hist.diverged_epoch is None:
        layers = inspect_bn(model.cpu() if device else model, ds.x_train)
        checks["recompute_max_abs_diff"] = max(layer["max_abs_diff"] for layer in layers)
    return RunResult(recipe, arm, seed, hist, test, checks, model, time.perf_counter() - t0)
