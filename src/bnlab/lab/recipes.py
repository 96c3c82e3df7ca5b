"""Every experiment of the five tutorials as data: a :class:`Recipe` per experiment, in a registry.

A recipe says which data, model, loss, optimizer, metrics, epochs, batch size
and validation scheme the tutorial used, and which figures it reported, so a
report can set ours beside them. Every recipe runs with BN and without it (its
twin: the same model with the BN layers removed). Overrides are ``key=value``
strings checked against the recipe's fields::

    recipe = with_overrides(get("diabetes"), ["epochs=10", "batch_size=32"])

:func:`validate` is the one place that says what a recipe may hold: every
field's type and range, the allowed values of each choice, and the
combinations a recipe cannot honour (a validation split on a recipe that
validates on the test set, augmentation of inputs that are not images). It
runs on every override and on every recipe read back from a record, before
anything trains. A recipe's ``notes`` may name facts of the run
(``{train}`` rows, ``{updates}``, ...), filled in from the configuration that
actually ran (:func:`render_notes`).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import string
import typing
from dataclasses import dataclass, field
from typing import Callable, Iterable

__all__ = ["Recipe", "RECIPES", "get", "names", "with_overrides", "validate", "render_notes", "OverrideError"]


@dataclass(frozen=True)
class Recipe:
    name: str
    tutorial: str  # which seed document: "000" ... "004"
    title: str
    dataset: str
    model: str
    loss: str
    optimizer: str = "adam"
    learning_rate: float | None = None  # None: the optimizer's Keras default
    metrics: tuple[str, ...] = ()
    epochs: int = 10
    batch_size: int = 32
    validation_split: float = 0.0
    validation: str = "split"  # "split": validation_split of the training data; "test": the test set
    steps_per_epoch: int | None = None
    augment: bool = False
    shuffle: bool = True
    norm: str = "bnlab"  # the BN arm's layer: bnlab | renorm | ghost:K | scratch | scratch-bnlab | torch
    data_seed: int = 0  # the data split, fixed across seeds so that seeds vary only the training
    evaluate_test: bool = True
    check: str = ""  # an extra check after training: "recompute" re-computes BN outputs by hand
    model_kwargs: tuple[tuple[str, object], ...] = ()
    probes: int | None = None  # record probes (bnlab.lab.probes) every this many training steps; None: off
    landscape: int | None = None  # measure the loss landscape (bnlab.lab.landscape) every this many epochs; None: off
    reported: dict = field(default_factory=dict, compare=False, hash=False)  # the tutorial's figures, by arm
    reference: dict = field(default_factory=dict, compare=False, hash=False)  # other measured figures, by arm
    notes: str = ""
    stands_in_for: str = ""  # the recipe this offline one replaces on other data (its tutorial's figures do not apply)

    @property
    def offline(self) -> bool:
        from ..data import OFFLINE

        return self.dataset in OFFLINE

    @classmethod
    def from_dict(cls, d: dict) -> "Recipe":
        """Inverse of :meth:`to_dict` (as stored in a run's ``config.json``); ``ValueError`` for anything else."""
        if not isinstance(d, dict):
            raise ValueError(f"a recipe is a JSON object, not {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"recipe record has unknown fields {sorted(unknown)}")
        d = dict(d)
        if not isinstance(d.get("model_kwargs") or {}, dict) or not isinstance(d.get("metrics") or [], list):
            raise ValueError("recipe record: 'model_kwargs' must be an object and 'metrics' a list")
        d["model_kwargs"] = tuple(dict(d.get("model_kwargs") or {}).items())
        d["metrics"] = tuple(d.get("metrics") or ())
        for key in ("reported", "reference"):
            figs = d.get(key) or {}
            if not (isinstance(figs, dict) and all(isinstance(v, dict) for v in figs.values())):
                raise ValueError(f"recipe record: {key!r} must map arms to objects of figures")
            d[key] = {arm: {k: tuple(v) if isinstance(v, list) else v for k, v in f.items()} for arm, f in figs.items()}
        try:
            return cls(**d)
        except TypeError as exc:  # a required field missing
            raise ValueError(f"recipe record: {exc}") from None

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["model_kwargs"] = dict(self.model_kwargs)
        d["metrics"] = list(self.metrics)
        return d


_TUT = {
    "000": "Batch normalisation (Keras notebook, diabetes)",
    "001": "Batch Normalization Tensorflow Keras Example (CIFAR-10, sigmoid)",
    "002": "[MXDL-7] Batch Normalization (lecture: parameters, from-scratch layer, blobs)",
    "003": "Batch Normalization with Keras (KMNIST CNN)",
    "004": "A Deep Dive into Batch Normalization using Python 3 (MNIST MLP)",
}

RECIPES: dict[str, Recipe] = {}


def _add(r: Recipe) -> None:
    RECIPES[r.name] = r


_add(Recipe(
    name="diabetes", tutorial="000", title="Diabetes regression MLP with BN + Dropout and a customised BN layer",
    dataset="diabetes", model="diabetes_mlp", loss="mse", optimizer="adam", metrics=("mae",),
    epochs=100, batch_size=64, validation_split=0.15,
    reported={"bn": {"loss": 0.4790, "mae": 0.5648, "val_loss": 0.6657, "val_mae": 0.6595}},
    reference={"bn": {"val_loss": (0.685, 0.765), "val_mae": (0.689, 0.698)}},
    notes="Train on {train}, validate on {validation} (the last {validation_split:.0%} of the {training_rows} training rows). "
          "Reference: Keras 3 on TensorFlow re-run over 3 seeds with the recipe's settings and split (ranges).",
))
_add(Recipe(
    name="cifar10-sigmoid", tutorial="001", title="CIFAR-10 CNN with sigmoid activations, RMSprop and augmentation",
    dataset="cifar10", model="cifar_cnn", loss="categorical_crossentropy", optimizer="rmsprop",
    metrics=("accuracy",), epochs=10, batch_size=32, validation="test", steps_per_epoch=781, augment=True,
    model_kwargs=(("activation", "sigmoid"),),
    notes="Inputs go through keras.utils.normalize(x, axis=1) as in the tutorial; {steps_per_epoch} steps of "
          "{batch_size} per epoch, so an epoch sees {epoch_fraction:.0%} of the {train} training images (the tutorial's "
          "781 = int(50000/64) steps of 32 see half). The tutorial reports curves only.",
))
_add(Recipe(
    name="bn-params", tutorial="002", title="Observing gamma, beta and the moving statistics; re-computing BN by hand",
    dataset="observations", model="bn_params_mlp", loss="mse", optimizer="adam", epochs=10, batch_size=10,
    evaluate_test=False, check="recompute",
    notes="Random data; the check is that gamma * (h - moving_mean) / sqrt(moving_variance + eps) + beta "
          "equals the layer's inference output.",
))
_add(Recipe(
    name="blobs", tutorial="002", title="Two blobs, Dense(128) + BN + ReLU",
    dataset="blobs", model="blobs_mlp", loss="binary_crossentropy", optimizer="adam", learning_rate=0.01,
    metrics=("accuracy",), epochs=50, batch_size=300, validation="test",
    reference={"bn": {"test_accuracy": 0.805}},
    notes="Reference: Keras 3 re-run, mean test accuracy over 3 seeds.",
))
_add(Recipe(
    name="blobs-scratch", tutorial="002", title="Two blobs with the tutorial's from-scratch BN layer",
    dataset="blobs", model="blobs_mlp", loss="binary_crossentropy", optimizer="adam", learning_rate=0.01,
    metrics=("accuracy",), epochs=50, batch_size=300, validation="test", norm="scratch",
    reported={"bn": {"loss": 0.3523, "val_loss": 0.4481}},
    notes="norm=scratch is the tutorial's layer with its own epsilon 1e-5 and initial moving values "
          "(glorot-uniform mean, zero variance); norm=scratch-bnlab starts it like bnlab.BatchNorm.",
))
_add(Recipe(
    name="blobs-deep", tutorial="002", title="Two blobs, 11 x [Dense(128) + BN + ReLU]",
    dataset="blobs", model="blobs_mlp", loss="binary_crossentropy", optimizer="adam", learning_rate=0.01,
    metrics=("accuracy",), epochs=100, batch_size=300, validation="test", model_kwargs=(("depth", 11),),
    reported={"bn": {"test_accuracy": 0.84}, "no_bn": {"test_accuracy": 0.86}},
))
_add(Recipe(
    name="kmnist-cnn", tutorial="003", title="KMNIST CNN with BN after conv, pooling and dense layers",
    dataset="kmnist", model="kmnist_cnn", loss="sparse_categorical_crossentropy", optimizer="adam",
    metrics=("accuracy",), epochs=25, batch_size=250, validation_split=0.2,
    notes="The tutorial shows curves only; test loss and accuracy are printed after training.",
))
_add(Recipe(
    name="mnist-mlp", tutorial="004", title="MNIST MLP: Dense 128/64 + BN + ReLU",
    dataset="mnist", model="mnist_mlp", loss="sparse_categorical_crossentropy", optimizer="adam",
    metrics=("accuracy",), epochs=10, batch_size=32, validation="test",
    reported={"bn": {"loss": 0.0315, "accuracy": 0.9895, "val_loss": 0.0626, "val_accuracy": 0.9802}},
))
_add(Recipe(
    name="digits28-mlp", tutorial="004", title="The MNIST MLP on scikit-learn's digits resized to 28x28 (offline)",
    dataset="digits28", model="mnist_mlp", loss="sparse_categorical_crossentropy", optimizer="adam",
    metrics=("accuracy",), epochs=10, batch_size=32, validation="test", stands_in_for="mnist-mlp",
    notes="Stands in for mnist-mlp where MNIST cannot be downloaded: {train:,} training and {test} test images.",
))
_add(Recipe(
    name="digits28-cnn", tutorial="003", title="The KMNIST CNN on scikit-learn's digits resized to 28x28 (offline)",
    dataset="digits28", model="kmnist_cnn", loss="sparse_categorical_crossentropy", optimizer="adam",
    metrics=("accuracy",), epochs=25, batch_size=250, validation_split=0.2, stands_in_for="kmnist-cnn",
    notes="Stands in for kmnist-cnn where KMNIST cannot be downloaded. With {train:,} training images at batch "
          "{batch_size} over {epochs} epochs there are only {updates} updates, and at momentum {bn_momentum} the moving "
          "statistics keep {bn_momentum}^{updates} = {moving_kept:.0%} of their initial values. At the recipe's own "
          "settings (25 epochs at batch 250: 125 updates, 28% kept) the BN arm fits the training data but its inference-mode accuracy "
          "collapses (PyTorch's native BN does the same). Re-estimating the statistics fixes it; so does "
          "momentum 0.9.",
))

# The original paper's Figure 1 (not a seed document: tutorial "paper").
_FIG1_NOTES = (
    "Ioffe & Szegedy 2015 (arXiv:1502.03167), section 4.1 and Figure 1: three fully connected hidden layers of 100 "
    "sigmoid units, 50,000 steps of 60 examples, cross-entropy, with and without BN (before each sigmoid). An 'epoch' "
    "here is a block of {steps_per_epoch} steps drawn from an endlessly reshuffled stream (steps_per_epoch), so this "
    "run's {epochs} epochs are {updates:,} steps of {batch_size} (the recipe's 100 x 500 of 60 are the paper's 50,000) and "
    "val_accuracy, measured on the test set after every block, is test accuracy against steps (Figure 1 (a)); probes on the last hidden layer's sigmoid give Figure 1 (b, c). The paper gives no "
    "optimizer settings for this figure beyond mini-batches of 60; we use plain SGD with learning rate 0.1 for both "
    "arms, a conventional rate for MNIST MLPs (Keras' default SGD rate 0.01 barely trains the sigmoid network "
    "without BN in 10,000 steps). Weights: Glorot's Gaussian ('small random Gaussian values', scale not given)."
)
_add(Recipe(
    name="paper-fig1", tutorial="paper", title="Ioffe & Szegedy 2015, Figure 1: MNIST, 784-100-100-100-10 sigmoid MLP",
    dataset="mnist", model="paper_mlp", loss="sparse_categorical_crossentropy", optimizer="sgd", learning_rate=0.1,
    metrics=("accuracy",), epochs=100, batch_size=60, steps_per_epoch=500, validation="test", probes=100,
    notes=_FIG1_NOTES,
))
_add(Recipe(
    name="paper-fig1-digits28", tutorial="paper", title="The paper's Figure 1 network on scikit-learn's digits resized to 28x28 (offline)",
    dataset="digits28", model="paper_mlp", loss="sparse_categorical_crossentropy", optimizer="sgd", learning_rate=0.1,
    metrics=("accuracy",), epochs=100, batch_size=60, steps_per_epoch=500, validation="test", stands_in_for="paper-fig1",
    probes=100,
    notes="Stands in for paper-fig1 where MNIST cannot be downloaded: {train:,} training and {test} test images, so "
          "{updates:,} steps of {batch_size} pass over the training set about {passes:,.0f} times; it shows the mechanics and the qualitative "
          "picture, not the paper's MNIST figures. " + _FIG1_NOTES,
))


def names() -> list[str]:
    return list(RECIPES)


class OverrideError(ValueError):
    """A recipe field given a value it cannot take, or a combination the recipe cannot honour.

    The message names the key, what came and what is allowed.
    """


def get(name: str) -> Recipe:
    """The recipe called ``name``; a ``ValueError`` suggests the closest names otherwise."""
    try:
        return RECIPES[name]
    except KeyError:
        close = difflib.get_close_matches(name, RECIPES, n=3, cutoff=0.4)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(f"unknown recipe {name!r}.{hint} Known recipes: {', '.join(RECIPES)}") from None


# ----------------------------------------------------------------------------- what a field may hold


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _norm_ok(v) -> bool:
    from .models import NORM_LAYERS

    if not isinstance(v, str):
        return False
    if v.startswith("ghost:"):
        k = v[len("ghost:"):]
        return k.isascii() and k.isdigit() and int(k) >= 1
    return v in NORM_LAYERS


def _norm_allowed() -> str:
    from .models import NORM_LAYERS

    return f"one of {', '.join(NORM_LAYERS)}, or ghost:K with K an int >= 1"


def _optimizers() -> tuple[str, ...]:
    from .training import OPTIMIZERS

    return OPTIMIZERS


# field -> (check, what is allowed). The fields a user may override with key=value.
_RULES: dict[str, tuple[Callable[[object], bool], Callable[[], str] | str]] = {
    "epochs": (lambda v: _is_int(v) and v >= 1, "an int >= 1"),
    "batch_size": (lambda v: _is_int(v) and v >= 1, "an int >= 1"),
    "learning_rate": (lambda v: v is None or (_is_real(v) and math.isfinite(v) and v > 0),
                      "a finite number > 0, or none for the optimizer's Keras default"),
    "optimizer": (lambda v: v in _optimizers(), lambda: "one of " + ", ".join(_optimizers())),
    "validation_split": (lambda v: _is_real(v) and 0 < v < 1, "a fraction with 0 < validation_split < 1"),
    "validation": (lambda v: v in ("split", "test"),
                   "'split' (the last validation_split of the training data) or 'test' (the test set)"),
    "steps_per_epoch": (lambda v: v is None or (_is_int(v) and v >= 1), "an int >= 1, or none for whole passes over the data"),
    "augment": (lambda v: isinstance(v, bool), "true or false"),
    "shuffle": (lambda v: isinstance(v, bool), "true or false"),
    "norm": (_norm_ok, _norm_allowed),
    "data_seed": (lambda v: _is_int(v) and 0 <= v < 2**32, "an int from 0 to 4294967295"),
    "evaluate_test": (lambda v: isinstance(v, bool), "true or false"),
    "check": (lambda v: v in ("", "recompute"), "'recompute' or nothing"),
    "probes": (lambda v: v is None or (_is_int(v) and v >= 1), "an int >= 1 (training steps between probe records), or none"),
    "landscape": (lambda v: v is None or (_is_int(v) and v >= 1),
                  "an int >= 1 (epochs between loss-landscape measurements), or none"),
}
_OVERRIDABLE = tuple(_RULES)
# What defines the experiment itself: changing it makes another recipe, not an override.
_FIXED = ("name", "tutorial", "title", "dataset", "model", "loss", "metrics", "model_kwargs", "reported", "reference", "notes",
          "stands_in_for")


def _allowed(key: str) -> str:
    allowed = _RULES[key][1]
    return allowed() if callable(allowed) else allowed


def _check_field(key: str, value) -> None:
    if not _RULES[key][0](value):
        raise OverrideError(f"{key}={value!r}: expected {_allowed(key)}")


def validate(recipe: Recipe, overridden: Iterable[str] = ()) -> Recipe:
    """Check every field of ``recipe`` and the combinations it must honour; returns it, or raises :class:`OverrideError`.

    ``overridden`` names the fields the user set (``key=value``): a value the
    recipe would silently ignore is refused only when the user asked for it.
    A recipe's own ``validation_split`` may be 0 (no validation split).
    """
    from ..data import DATASETS, INPUT_SHAPES
    from .models import MODELS
    from .training import LOSSES, resolve_metrics

    overridden = set(overridden)
    for key in ("name", "tutorial", "title", "notes", "stands_in_for"):
        if not isinstance(getattr(recipe, key), str):
            raise OverrideError(f"{key}={getattr(recipe, key)!r}: expected a string")
    for key, known in (("dataset", DATASETS), ("model", MODELS), ("loss", LOSSES)):
        if getattr(recipe, key) not in known:
            raise OverrideError(f"{key}={getattr(recipe, key)!r}: expected one of {', '.join(sorted(known))}")
    try:
        resolve_metrics(list(recipe.metrics), LOSSES[recipe.loss])
    except (TypeError, ValueError) as exc:
        raise OverrideError(f"metrics={list(recipe.metrics)!r}: {exc}") from None
    for key in _RULES:
        value = getattr(recipe, key)
        if key == "validation_split" and key not in overridden and value == 0:
            continue  # a recipe without a validation split
        _check_field(key, value)
    if "validation_split" in overridden and recipe.validation == "test":
        raise OverrideError(
            f"validation_split={recipe.validation_split!r}: {recipe.name} validates on the test set (validation=test), "
            f"so a validation split would be ignored; add validation=split to hold out the last "
            f"{recipe.validation_split:.0%} of the training data instead")
    if "validation" in overridden and recipe.validation == "split" and recipe.validation_split == 0:
        raise OverrideError(
            f"validation='split': {recipe.name} has no validation split (validation_split=0.0); "
            f"add validation_split=F with 0 < F < 1")
    if recipe.augment and len(INPUT_SHAPES[recipe.dataset]) != 3:
        raise OverrideError(
            f"augment=True: the augmentation shears, zooms and flips images (C, H, W); "
            f"{recipe.name}'s {recipe.dataset} inputs have shape {INPUT_SHAPES[recipe.dataset]}")
    return recipe


def _parse(key: str, text: str) -> object:
    hint = typing.get_type_hints(Recipe)[key]
    args = typing.get_args(hint)  # (int, NoneType) for "int | None", () for "int"
    optional = type(None) in args
    base = next(a for a in args if a is not type(None)) if args else hint
    if optional and text.lower() in ("none", "null", ""):
        return None
    try:
        if base is bool:
            if text.lower() in ("true", "1", "yes", "on"):
                return True
            if text.lower() in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if base is int:
            return int(text)
        if base is float:
            return float(text)
        return str(text)
    except ValueError:
        raise OverrideError(f"{key}={text!r}: expected {'an ' if base is int else 'a '}{base.__name__}"
                            f"{' or none' if optional else ''} ({_allowed(key)})") from None


def with_overrides(recipe: Recipe, overrides) -> Recipe:
    """A copy of ``recipe`` with ``key=value`` overrides (strings) or a ``{key: value}`` dict applied, validated."""
    items = overrides.items() if isinstance(overrides, dict) else [_split_kv(o) for o in overrides]
    changes = {}
    for key, value in items:
        if key in _FIXED:
            raise OverrideError(f"{key} cannot be overridden: it defines the recipe ({recipe.name}: {key}="
                                f"{getattr(recipe, key)!r}); choose another recipe (bnlab list)")
        if key not in _RULES:
            close = difflib.get_close_matches(key, _OVERRIDABLE, n=3, cutoff=0.5)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise OverrideError(f"unknown override {key!r}.{hint} Overridable: {', '.join(sorted(_OVERRIDABLE))}")
        if key in changes:
            raise OverrideError(f"{key} is given twice ({changes[key]!r} and {value!r}): give it once")
        value = _parse(key, value) if isinstance(value, str) else value
        if isinstance(value, int) and not isinstance(value, bool) and key in ("learning_rate", "validation_split"):
            value = float(value)
        _check_field(key, value)
        changes[key] = value
    return validate(dataclasses.replace(recipe, **changes), overridden=changes)


def _split_kv(text) -> tuple[str, str]:
    if not isinstance(text, str) or "=" not in text:
        raise OverrideError(f"override {text!r} is not of the form key=value")
    key, value = text.split("=", 1)
    if not key.strip():
        raise OverrideError(f"override {text!r} has no key before '='")
    return key.strip(), value.strip()


class _Facts(dict):
    def __missing__(self, key):
        return "?"


class _Lenient(string.Formatter):
    def format_field(self, value, spec):
        try:
            return super().format_field(value, spec)
        except (TypeError, ValueError):  # "?" (a fact the record lacks) under a numeric format
            return str(value)


def render_notes(notes: str, facts: dict) -> str:
    """``notes`` with ``{placeholders}`` filled from the facts of the run that was made (a missing fact shows ``?``)."""
    try:
        return _Lenient().vformat(notes, (), _Facts(facts))
    except (ValueError, IndexError, KeyError, AttributeError):
        return notes
