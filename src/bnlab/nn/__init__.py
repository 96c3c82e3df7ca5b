"""Modules: the Keras-faithful :class:`BatchNorm` and PyTorch drop-ins."""

from .batchnorm import BatchNorm, BatchNorm1d, BatchNorm2d, BatchNorm3d, BatchNormalization, BatchNormNd
from .act import BatchNormAct
from .frozen import FrozenBatchNorm

__all__ = ["BatchNormAct", "BatchNorm", "BatchNormalization", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "BatchNormNd", "FrozenBatchNorm"]
