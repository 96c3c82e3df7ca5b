"""The lab: the tutorials' experiments as recipes, their models, Keras-style training (needs the ``lab`` extra)."""

from .inspect import bn_layers, inspect_bn
from .models import MODELS, NORM_LAYERS, ScratchBatchNorm, build
from .recipes import RECIPES, OverrideError, Recipe, get, names, with_overrides
from .runner import ARMS, RunResult, build_model, load_data, run
from .training import History, evaluate, fit, predict

__all__ = [
    "ARMS", "History", "MODELS", "NORM_LAYERS", "OverrideError", "RECIPES", "Recipe", "RunResult",
    "ScratchBatchNorm", "bn_layers", "build", "build_model", "evaluate", "fit", "get", "inspect_bn",
    "load_data", "names", "predict", "run", "with_overrides",
]
