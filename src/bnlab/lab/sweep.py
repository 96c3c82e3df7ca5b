"""Planning and summarizing a grid of runs, e.g. BN against its remedies across batch sizes (pure functions, no I/O).

Wu & He (2018, "Group Normalization", arXiv:1803.08494, Figure 1) show BN's
error climbing as the batch per GPU shrinks below ~16; batch
renormalization (Ioffe, 2017, arXiv:1702.03275) and ghost batches (Hoffer et
al., 2017, arXiv:1705.08741) are bnlab's variants to set beside it. A sweep is
a recipe and a grid spec::

    cells = plan(recipe, "batch_size=2,4,8,16,32,64,128 norm=bn,renorm,ghost,none")

Each cell is one recipe (overrides applied) and one arm, with a deterministic
id (``batch_size=8+norm=renorm``: the keys with several values) that names its directory. Then
:func:`aggregate` gives the final metric per cell over seeds with a 95%
confidence interval, and :func:`bnlab.lab.plots.batch_size_figure` plots it.

Grid keys are the recipe's overridable fields (``batch_size``, ``learning_rate``,
``epochs``, ...) plus ``norm``, whose values are:

============  ============================================================
``bn``        bnlab.BatchNorm (``norm=bnlab``), the "bn" arm
``renorm``    batch renormalization (``norm=renorm``: r_max 3, d_max 5)
``ghost``     ghost batches of ``ghost_batch`` samples (``norm=ghost:K``)
``none``      the model without BN (the "no_bn" arm)
other         any ``norm`` the recipes take (``ghost:8``, ``torch``, ...)
============  ============================================================

Ghost batch size. Ghost batches normalize each group of ``K`` samples of a
batch with that group's statistics (Hoffer et al. use them to make a large
batch behave like small ones). They can only make the statistics' batch
SMALLER: with ``batch_size <= K`` the layer is plain BN. So in a batch-size
sweep ``ghost`` cannot rescue small batches; what it shows is whether
normalizing over groups of a size where BN works well keeps large batches
at small-batch quality. We take ``K = 16`` by default: the GN paper's
Figure 1 has BN at full accuracy down to 16 samples per batch and falling
below it, so 16 is the smallest group that is safely "a good BN batch".
Cells where the ghost layer is plain BN say so (``same_as``), so a runner may
skip them and report the bn cell's results for them. They stand for the ghost
cell, not equal it bit for bit: the ghost layer computes the same formula by
another code path, whose float32 outputs differ from plain BN's by rounding (a
few 1e-7 on unit-scale activations), which training may then amplify.

Learning rate. ``lr = base_lr * (batch_size / base_batch_size) ** p``, where
``base_lr`` is the cell's learning rate before scaling (the recipe's, or the
default of the cell's optimizer when the recipe gives none) and
``base_batch_size`` the recipe's batch size unless given. ``lr_scaling``:
``"linear"`` (p = 1: Goyal et al., 2017, arXiv:1706.02677; the GN paper does
the same, with SGD), ``"sqrt"`` (p = 1/2: the square-root rule Malladi et al.,
2022, arXiv:2205.10287, derive for Adam and RMSprop, whose steps do not grow
with the gradient), ``"none"``, or ``"auto"`` (the default): linear for SGD,
square root for Adam and RMSprop, decided for each cell by its own optimizer
(a grid may vary ``optimizer``). Linear scaling of Adam's rate would have
``digits28-cnn`` (Adam's 1e-3 at batch 250) train at 8e-6 at batch 2, which
mostly measures a learning rate too small to train, not BN. A grid that sets
``learning_rate`` itself is not scaled.

The metric a sweep compares (:func:`default_metric`): test accuracy for a
classifier that is evaluated on the test set, else validation accuracy, else
the test or validation loss. A diverged run counts as NaN in its cell and
is counted (``nonfinite``), not dropped.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import numpy as np
import torch

from .analysis import welch_interval
from .recipes import _OVERRIDABLE, OverrideError, Recipe, with_overrides
from .training import get_optimizer

__all__ = ["SweepError", "Cell", "parse_grid", "plan", "base_learning_rate", "scaled_learning_rate", "scaling_for", "norm_setting",
           "cell_id", "default_metric", "work", "mean_interval", "aggregate", "SWEEP_NORMS", "GHOST_BATCH"]

GHOST_BATCH = 16
SWEEP_NORMS = ("bn", "renorm", "ghost", "none")
_SCALINGS = ("auto", "linear", "sqrt", "none")
_POWER = {"linear": 1.0, "sqrt": 0.5, "none": 0.0}
_ADAPTIVE = ("adam", "rmsprop")  # optimizers whose step does not grow with the gradient: square-root scaling under "auto"


class SweepError(ValueError):
    """A grid spec or sweep setting that cannot be planned (says what was expected and what came)."""


@dataclass(frozen=True)
class Cell:
    """One point of the grid: its settings as written in the spec, the recipe to run and the arm."""

    id: str
    settings: dict  # {"batch_size": 8, "norm": "renorm"}, values parsed
    recipe: Recipe
    arm: str  # "bn" or "no_bn"
    same_as: str | None = None  # the id of a cell that runs the same model (ghost with batch <= K)
    lr_scaling: str = "none"  # the rule this cell's learning rate was scaled by ("none": not scaled, e.g. the grid sets it)
    base_learning_rate: float | None = None  # the rate it was scaled from: its recipe's, or its optimizer's default


def parse_grid(spec: str | Sequence[str]) -> dict[str, list[str]]:
    """``"batch_size=2,4,8 norm=bn,none"`` (or its whitespace-split tokens) -> ``{"batch_size": ["2", "4", "8"], ...}``.

    Keys keep the order given; values stay strings (:func:`plan` parses them
    against the recipe's field types).
    """
    tokens = spec.split() if isinstance(spec, str) else [t for s in spec for t in s.split()]
    if not tokens:
        raise SweepError("empty grid: expected key=v1,v2,... items such as 'batch_size=2,4,8 norm=bn,none'")
    grid: dict[str, list[str]] = {}
    for tok in tokens:
        key, sep, values = tok.partition("=")
        if not sep or not key:
            raise SweepError(f"grid item {tok!r}: expected key=v1,v2,... (e.g. batch_size=2,4,8)")
        if key in grid:
            raise SweepError(f"grid key {key!r} is given twice")
        if key != "norm" and key not in _OVERRIDABLE:
            raise SweepError(f"grid key {key!r}: expected norm or a recipe field ({', '.join(sorted(_OVERRIDABLE))})")
        vals = values.split(",")
        if any(v == "" for v in vals):
            raise SweepError(f"grid item {tok!r}: empty value (expected comma-separated values, no spaces)")
        dup = sorted({v for v in vals if vals.count(v) > 1})
        if dup:
            raise SweepError(f"grid key {key!r} repeats {dup}")
        grid[key] = vals
    return grid


def norm_setting(name: str, ghost_batch: int = GHOST_BATCH) -> tuple[str, str | None]:
    """A sweep's norm name -> ``(arm, recipe norm)``: ``bn`` -> ("bn", "bnlab"), ``none`` -> ("no_bn", None), ..."""
    if name == "none":
        return "no_bn", None
    named = {"bn": "bnlab", "renorm": "renorm", "ghost": f"ghost:{ghost_batch}"}
    return "bn", named.get(name, name)


def base_learning_rate(recipe: Recipe) -> float:
    """The recipe's learning rate, or its optimizer's default when it gives none (Keras' defaults, as ``fit``)."""
    if recipe.learning_rate is not None:
        return float(recipe.learning_rate)
    opt = get_optimizer({"name": recipe.optimizer, "lr": None}, [torch.zeros(1, requires_grad=True)])
    return float(opt.defaults["lr"])


def scaling_for(recipe: Recipe, scaling: str = "auto") -> str:
    """The rule ``scaling`` stands for with ``recipe``'s optimizer: ``"auto"`` is ``"sqrt"`` for Adam and RMSprop, else ``"linear"``."""
    if scaling not in _SCALINGS:
        raise SweepError(f"lr_scaling must be one of {', '.join(_SCALINGS)}, got {scaling!r}")
    if scaling == "auto":
        return "sqrt" if recipe.optimizer in _ADAPTIVE else "linear"
    return scaling


def scaled_learning_rate(base_lr: float, batch_size: int, base_batch_size: int, scaling: str = "linear") -> float:
    """``base_lr * (batch_size / base_batch_size) ** p`` with ``p = 1`` (linear), ``1/2`` (sqrt) or 0 (none)."""
    if scaling not in _POWER:
        raise SweepError(f"lr_scaling must be one of {', '.join(_POWER)} here, got {scaling!r}")
    return base_lr * (batch_size / base_batch_size) ** _POWER[scaling]


def cell_id(settings: Mapping[str, object]) -> str:
    """``{"batch_size": 8, "norm": "ghost:8"}`` -> ``"batch_size=8+norm=ghost-8"``: stable, and safe as a directory name."""
    return "+".join(f"{k}={re.sub(r'[^A-Za-z0-9._-]', '-', str(v))}" for k, v in settings.items())


def plan(recipe: Recipe, spec: str | Sequence[str], *, lr_scaling: str = "auto", base_batch_size: int | None = None,
         ghost_batch: int = GHOST_BATCH) -> list[Cell]:
    """The cells of ``spec`` for ``recipe``, in grid order (the first key varies slowest).

    Each cell's recipe has the grid's overrides applied (type-checked as
    ``key=value`` overrides are), the norm's layer, and the scaled learning
    rate (see the module docstring): ``lr_scaling`` is resolved for each cell
    from its own optimizer and scales its own base rate (:attr:`Cell.lr_scaling`,
    :attr:`Cell.base_learning_rate`), so a grid over ``optimizer=`` scales each
    optimizer's rate by its rule. Bad values raise :class:`SweepError`.
    """
    grid = parse_grid(spec)
    if not isinstance(ghost_batch, int) or isinstance(ghost_batch, bool) or ghost_batch < 1:
        raise SweepError(f"ghost_batch must be a positive int, got {ghost_batch!r}")
    if base_batch_size is not None and (not isinstance(base_batch_size, int) or isinstance(base_batch_size, bool) or base_batch_size < 1):
        raise SweepError(f"base_batch_size must be a positive int, got {base_batch_size!r}")
    scaling_for(recipe, lr_scaling)  # an unknown rule fails before any cell is planned
    base_bs = base_batch_size or recipe.batch_size
    varying = [k for k, v in grid.items() if len(v) > 1] or list(grid)  # a key with one value sets every cell: not in the id

    def _id(settings):
        return cell_id({k: settings[k] for k in varying})

    cells, by_id = [], {}
    for combo in itertools.product(*grid.values()):
        raw = dict(zip(grid, combo, strict=True))
        overrides = {k: v for k, v in raw.items() if k != "norm"}
        arm = "bn"  # without norm in the grid: the recipe's own BN layer
        if "norm" in raw:
            arm, norm = norm_setting(raw["norm"], ghost_batch)
            if norm is not None:
                overrides["norm"] = norm
        try:
            r = with_overrides(recipe, overrides)
        except OverrideError as exc:
            raise SweepError(f"cell {cell_id(raw)}: {exc}") from None
        # The rule and the rate to scale from are the cell's: a grid over optimizer= scales SGD's rate linearly, Adam's by the root.
        rule = "none" if "learning_rate" in grid else scaling_for(r, lr_scaling)
        base_lr = base_learning_rate(r)
        if rule != "none":
            r = dataclasses.replace(r, learning_rate=scaled_learning_rate(base_lr, r.batch_size, base_bs, rule))
        settings = {k: (getattr(r, k) if k != "norm" else v) for k, v in raw.items()}
        cid = _id(settings)
        if cid in by_id:
            raise SweepError(f"two cells have the id {cid!r}: {by_id[cid]} and {raw}")
        by_id[cid] = raw
        cells.append(Cell(cid, settings, r, arm, lr_scaling=rule, base_learning_rate=base_lr))
    for i, c in enumerate(cells):  # a ghost batch that holds the whole batch is plain BN: point at its bn cell
        twin = _id({**c.settings, "norm": "bn"})
        if c.settings.get("norm") == "ghost" and c.recipe.batch_size <= ghost_batch and twin in by_id:
            cells[i] = dataclasses.replace(c, same_as=twin)
    return cells


def default_metric(recipe: Recipe) -> str:
    """The final figure a sweep of ``recipe`` compares (see the module docstring)."""
    kind = "accuracy" if "accuracy" in recipe.metrics else "loss"
    return f"test_{kind}" if recipe.evaluate_test else f"val_{kind}"


#: Work of one step beyond its samples', in samples: digits28-cnn on 2 cores took about 17 ms + 1.7 ms per sample a step.
STEP_OVERHEAD = 10


def work(recipe: Recipe, n_train: int) -> float:
    """Rough work of a run (``epochs x steps x (batch + STEP_OVERHEAD)``), to estimate a sweep's time left."""
    from .runner import steps_per_epoch

    return recipe.epochs * steps_per_epoch(recipe, n_train) * (recipe.batch_size + STEP_OVERHEAD)


# ----------------------------------------------------------------------------- summarizing


def mean_interval(values, level: float = 0.95) -> tuple[float, float, float]:
    """Mean and Student's t interval ``mean +- t_{n-1} s / sqrt(n)``: ``(mean, low, high)``, NaN bounds below 2 values.

    This is :func:`bnlab.lab.analysis.welch_interval` of the values against a
    constant: with no spread in the second group, Welch's standard error is
    ``s / sqrt(n)`` and its degrees of freedom are ``n - 1``, the one-sample t
    interval exactly.
    """
    a = np.asarray(values, dtype=float)
    if a.size == 0:
        return math.nan, math.nan, math.nan
    mean, low, high, _ = welch_interval(a, np.zeros(2), level)
    return mean, low, high


def aggregate(runs: Iterable[tuple[Mapping, int, Mapping]], metric: str, by: Sequence[str] = ("norm", "batch_size"),
              level: float = 0.95) -> list[dict]:
    """Final ``metric`` per group over seeds: ``runs`` yields ``(settings, seed, final)``.

    Returns one row per group (sorted): the ``by`` settings, ``n`` (seeds),
    ``mean``, ``low``, ``high`` (the ``level`` t interval over the finite
    values), ``values`` (every seed's, in seed order) and ``nonfinite`` (how
    many were NaN or infinite: diverged runs, counted and shown, not hidden).
    A run whose ``final`` has ``diverged_epoch`` set (``final.json`` of a run
    that diverged carries no figures) counts as NaN. Any other run without
    ``metric`` in its final figures is an error.
    """
    groups: dict[tuple, list[tuple[int, float]]] = {}
    for settings, seed, final in runs:
        missing = [k for k in by if k not in settings]
        if missing:
            raise SweepError(f"run settings {dict(settings)} lack {missing} to group by")
        if final.get("diverged_epoch") is not None:
            value = math.nan
        elif metric in final:
            value = float(final[metric])
        else:
            raise SweepError(f"run {cell_id(settings)} seed {seed} has no final {metric!r}; it has {sorted(final)}")
        groups.setdefault(tuple(settings[k] for k in by), []).append((seed, value))
    rows = []
    for key in sorted(groups, key=lambda t: tuple((isinstance(v, str), v) for v in t)):
        vals = [v for _, v in sorted(groups[key])]
        finite = [v for v in vals if math.isfinite(v)]
        mean, low, high = mean_interval(finite, level)
        rows.append({**dict(zip(by, key, strict=True)), "n": len(vals), "mean": mean, "low": low, "high": high,
                     "values": vals, "nonfinite": len(vals) - len(finite)})
    return rows
