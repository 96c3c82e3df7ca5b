"""Run one recipe, one arm (with or without BN), one seed: data, model, ``fit``, test evaluation, checks."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn

from .. import data as _data
from ..tools.distributed import rank_and_world
from . import models as _models
from .inspect import inspect_bn
from .recipes import Recipe
from .training import History, evaluate, fit

__all__ = ["ARMS", "RunResult", "load_data", "build_model", "run"]

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

    def final(self) -> dict:
        """Last-epoch training/validation figures plus test figures."""
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


def _targets(recipe: Recipe, y: torch.Tensor, num_classes: int | None) -> torch.Tensor:
    if recipe.loss == "categorical_crossentropy":
        return torch.nn.functional.one_hot(y.long(), num_classes).float()
    return y


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
) -> RunResult:
    """Train ``recipe``'s model for one arm and seed; evaluate on the test set; run the recipe's check.

    ``model``/``state``/``history``/``initial_epoch`` resume an interrupted run.
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
    if recipe.evaluate_test:
        test = {f"test_{k}": v for k, v in evaluate(model, ds.x_test, y_test, loss=recipe.loss, metrics=recipe.metrics, batch_size=recipe.batch_size, device=device).items()}
    checks = {}
    if recipe.check == "recompute" and arm == "bn":
        layers = inspect_bn(model.cpu() if device else model, ds.x_train)
        checks["recompute_max_abs_diff"] = max(layer["max_abs_diff"] for layer in layers)
    return RunResult(recipe, arm, seed, hist, test, checks, model, time.perf_counter() - t0)
