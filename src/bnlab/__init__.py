"""bnlab: batch normalization for PyTorch with Keras' exact semantics, and a lab that shows what it does.

>>> import torch, bnlab
>>> bn = bnlab.BatchNorm(num_features=4)        # Keras defaults: axis=-1, momentum=0.99, epsilon=1e-3
>>> y = bn(torch.randn(32, 4))
"""

from . import constraints, conventions, functional, initializers, nn, regularizers
from .nn import BatchNorm, BatchNormAct, BatchNormalization, FrozenBatchNorm
from .tools import apply_constraints, convert, convert_sync, fold, freeze, recalibrate, regularization_loss, summary, sync_running_stats, unfreeze

__version__ = "0.1.0"

__all__ = [
    "BatchNorm",
    "BatchNormalization",
    "BatchNormAct",
    "FrozenBatchNorm",
    "apply_constraints",
    "convert",
    "convert_sync",
    "sync_running_stats",
    "fold",
    "freeze",
    "recalibrate",
    "unfreeze",
    "regularization_loss",
    "summary",
    "constraints",
    "conventions",
    "functional",
    "initializers",
    "nn",
    "regularizers",
]
