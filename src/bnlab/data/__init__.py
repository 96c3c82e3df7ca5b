"""Datasets of the tutorials (needs the ``lab`` extra: scikit-learn)."""

from .augment import random_affine
from .datasets import DATASETS, INPUT_SHAPES, OFFICIAL_SPLIT, OFFLINE, Dataset, load
from .download import DownloadError, cache_dir

__all__ = ["DATASETS", "INPUT_SHAPES", "OFFICIAL_SPLIT", "OFFLINE", "Dataset", "DownloadError", "cache_dir", "load", "random_affine"]
