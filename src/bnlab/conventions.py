"""Conversions between the conventions of Keras and PyTorch batch normalization.

The two frameworks compute the same normalization but disagree on three
book-keeping conventions. bnlab never converts silently: every layer states
which convention it uses, and these helpers convert between them.

| convention      | Keras (``keras.layers.BatchNormalization``) | PyTorch (``torch.nn.BatchNorm*d``) |
|-----------------|---------------------------------------------|------------------------------------|
| momentum        | weight of the OLD value (0.99)              | weight of the NEW value (0.1)      |
| epsilon         | 1e-3                                        | 1e-5                               |
| moving variance | biased batch variance (/M)                  | unbiased batch variance (/(M-1))   |

Both normalize a training batch with the *biased* batch variance; they only
differ in what they store for inference. Ioffe & Szegedy (2015, Algorithm 2)
use the unbiased estimate ``M/(M-1) * Var_B`` for inference, as PyTorch does.
"""

from __future__ import annotations

__all__ = [
    "keras_momentum_from_torch",
    "torch_momentum_from_keras",
    "biased_from_unbiased",
    "unbiased_from_biased",
    "KERAS_EPSILON",
    "TORCH_EPSILON",
]

KERAS_EPSILON = 1e-3
"""Keras' default ``epsilon`` of ``BatchNormalization``."""
TORCH_EPSILON = 1e-5
"""PyTorch's default ``eps`` of ``BatchNorm*d``."""


def keras_momentum_from_torch(momentum: float) -> float:
    """PyTorch's ``momentum`` (weight of the new batch statistic) as Keras' (weight of the old value).

    >>> keras_momentum_from_torch(0.1)
    0.9
    """
    _check_unit_interval(momentum, "momentum")
    return 1.0 - momentum


def torch_momentum_from_keras(momentum: float) -> float:
    """Keras' ``momentum`` (weight of the old value) as PyTorch's (weight of the new batch statistic).

    >>> round(torch_momentum_from_keras(0.99), 12)
    0.01
    """
    _check_unit_interval(momentum, "momentum")
    return 1.0 - momentum


def unbiased_from_biased(variance, count: int):
    """Bessel's correction: ``Var * M / (M - 1)`` for a statistic over ``count`` = M values."""
    if count < 2:
        raise ValueError(f"the unbiased variance needs at least 2 values per feature, got {count}")
    return variance * (count / (count - 1))


def biased_from_unbiased(variance, count: int):
    """Undo Bessel's correction: ``Var * (M - 1) / M`` for a statistic over ``count`` = M values."""
    if count < 2:
        raise ValueError(f"the unbiased variance needs at least 2 values per feature, got {count}")
    return variance * ((count - 1) / count)


def _check_unit_interval(value: float, name: str) -> None:
    if not (0.0 <= value <= 1.0):
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")
