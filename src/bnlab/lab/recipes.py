"""Every experiment of the five tutorials as data: a :class:`Recipe` per experiment, in a registry.

A recipe says which data, model, loss, optimizer, metrics, epochs, batch size
and validation scheme the tutorial used, and which figures it reported, so a
report can set ours beside them. Every recipe runs with BN and without it (its
twin: the same model with the BN layers removed). Overrides are ``key=value``
strings checked against the recipe's fields::

    recipe = with_overrides(get("diabetes"), ["epochs=10", "batch_size=32"])
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field

__all__ = ["Recipe", "RECIPES", "get", "names", "with_overrides", "OverrideError"]


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
    reported: dict = field(default_factory=dict, compare=False, hash=False)  # the tutorial's figures, by arm
    reference: dict = field(default_factory=dict, compare=False, hash=False)  # other measured figures, by arm
    notes: str = ""

    @property
    def offline(self) -> bool:
        from ..data import OFFLINE

        return self.dataset in OFFLINE

    @classmethod
    def from_dict(cls, d: dict) -> "Recipe":
        """Inverse of :meth:`to_dict` (as stored in a run's ``config.json``)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"recipe record has unknown fields {sorted(unknown)}")
        d = dict(d)
        d["model_kwargs"] = tuple(dict(d.get("model_kwargs") or {}).items())
        d["metrics"] = tuple(d.get("metrics") or ())
        for key in ("reported", "reference"):
            d[key] = {arm: {k: tuple(v) if isinstance(v, list) else v for k, v in figs.items()} for arm, figs in (d.get(key) or {}).items()}
        return cls(**d)

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
    notes="Train on 337, validate on 60 (the last 15% of the 397 training rows). Reference: Keras 3 on "
          "TensorFlow re-run over 3 seeds with the same split (ranges).",
))
_add(Recipe(
    name="cifar10-sigmoid", tutorial="001", title="CIFAR-10 CNN with sigmoid activations, RMSprop and augmentation",
    dataset="cifar10", model="cifar_cnn", loss="categorical_crossentropy", optimizer="rmsprop",
    metrics=("accuracy",), epochs=10, batch_size=32, validation="test", steps_per_epoch=781, augment=True,
    model_kwargs=(("activation", "sigmoid"),),
    notes="Inputs go through keras.utils.normalize(x, axis=1) as in the tutorial; 781 steps of 32 per epoch "
          "(int(50000/64)), so an epoch sees half the training set. The tutorial reports curves only.",
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
    metrics=("accuracy",), epochs=10, batch_size=32, validation="test",
    notes="Stands in for mnist-mlp where MNIST cannot be downloaded: 1,437 training and 360 test images.",
))
_add(Recipe(
    name="digits28-cnn", tutorial="003", title="The KMNIST CNN on scikit-learn's digits resized to 28x28 (offline)",
    dataset="digits28", model="kmnist_cnn", loss="sparse_categorical_crossentropy", optimizer="adam",
    metrics=("accuracy",), epochs=25, batch_size=250, validation_split=0.2,
    notes="Stands in for kmnist-cnn where KMNIST cannot be downloaded. With 1,149 training images at batch "
          "250 there are only 125 updates, and at momentum 0.99 the moving statistics keep 0.99^125 = 28% of "
          "their initial values: the BN arm then fits the training data but its inference-mode accuracy "
          "collapses (PyTorch's native BN does the same). Re-estimating the statistics fixes it; so does "
          "momentum 0.9.",
))

# The original paper's Figure 1 (not a seed document: tutorial "paper").
_FIG1_NOTES = (
    "Ioffe & Szegedy 2015 (arXiv:1502.03167), section 4.1 and Figure 1: three fully connected hidden layers of 100 "
    "sigmoid units, 50,000 steps of 60 examples, cross-entropy, with and without BN (before each sigmoid). An 'epoch' "
    "here is a block of 500 steps drawn from an endlessly reshuffled stream (steps_per_epoch), so epochs=100 is the "
    "paper's 50,000 steps and val_accuracy, measured on the test set after every block, is test accuracy against "
    "steps (Figure 1 (a)); probes on the last hidden layer's sigmoid give Figure 1 (b, c). The paper gives no "
    "optimizer settings for this figure beyond mini-batches of 60; we use plain SGD with learning rate 0.1 for both "
    "arms, a conventional rate for MNIST MLPs (Keras' default SGD rate 0.01 barely trains the sigmoid network "
    "without BN in 10,000 steps). Weights: Glorot's Gaussian ('small random Gaussian values', scale not given)."
)
_add(Recipe(
    name="paper-fig1", tutorial="paper", title="Ioffe & Szegedy 2015, Figure 1: MNIST, 784-100-100-100-10 sigmoid MLP",
    dataset="mnist", model="paper_mlp", loss="sparse_categorical_crossentropy", optimizer="sgd", learning_rate=0.1,
    metrics=("accuracy",), epochs=100, batch_size=60, steps_per_epoch=500, validation="test",
    notes=_FIG1_NOTES,
))
_add(Recipe(
    name="paper-fig1-digits28", tutorial="paper", title="The paper's Figure 1 network on scikit-learn's digits resized to 28x28 (offline)",
    dataset="digits28", model="paper_mlp", loss="sparse_categorical_crossentropy", optimizer="sgd", learning_rate=0.1,
    metrics=("accuracy",), epochs=100, batch_size=60, steps_per_epoch=500, validation="test",
    notes="Stands in for paper-fig1 where MNIST cannot be downloaded: 1,437 training and 360 test images, so 50,000 "
          "steps of 60 pass over the training set about 2,100 times; it shows the mechanics and the qualitative "
          "picture, not the paper's MNIST figures. " + _FIG1_NOTES,
))


def names() -> list[str]:
    return list(RECIPES)


class OverrideError(ValueError):
    """An override names an unknown field or gives a value of the wrong type."""


def get(name: str) -> Recipe:
    """The recipe called ``name``; a ``ValueError`` suggests the closest names otherwise."""
    try:
        return RECIPES[name]
    except KeyError:
        close = difflib.get_close_matches(name, RECIPES, n=3, cutoff=0.4)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(f"unknown recipe {name!r}.{hint} Known recipes: {', '.join(RECIPES)}") from None


_OVERRIDABLE = {
    f.name: f for f in dataclasses.fields(Recipe)
    if f.name not in ("name", "tutorial", "title", "reported", "reference", "notes", "model_kwargs", "metrics")
}


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
                            f"{' or none' if optional else ''}") from None


def with_overrides(recipe: Recipe, overrides) -> Recipe:
    """A copy of ``recipe`` with ``key=value`` overrides (strings) or a ``{key: value}`` dict applied."""
    items = overrides.items() if isinstance(overrides, dict) else [_split_kv(o) for o in overrides]
    changes = {}
    for key, value in items:
        if key not in _OVERRIDABLE:
            close = difflib.get_close_matches(key, _OVERRIDABLE, n=3, cutoff=0.5)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise OverrideError(f"unknown override {key!r}.{hint} Overridable: {', '.join(sorted(_OVERRIDABLE))}")
        changes[key] = _parse(key, value) if isinstance(value, str) else value
    if "norm" in changes:
        from .models import NORM_LAYERS

        norm = changes["norm"]
        if norm not in NORM_LAYERS and not (norm.startswith("ghost:") and norm[6:].isdigit() and int(norm[6:]) > 0):
            raise OverrideError(f"norm={norm!r}: expected one of {', '.join(NORM_LAYERS)} or ghost:K (K a positive int)")
    if "validation" in changes and changes["validation"] not in ("split", "test"):
        raise OverrideError(f"validation={changes['validation']!r}: expected 'split' or 'test'")
    for key in ("epochs", "batch_size"):
        if key in changes and changes[key] < (0 if key == "epochs" else 1):
            raise OverrideError(f"{key}={changes[key]}: must be {'>= 0' if key == 'epochs' else '>= 1'}")
    return dataclasses.replace(recipe, **changes)


def _split_kv(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise OverrideError(f"override {text!r} is not of the form key=value")
    key, value = text.split("=", 1)
    return key.strip(), value.strip()
