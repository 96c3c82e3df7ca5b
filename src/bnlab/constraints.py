"""Projections applied to a parameter after each optimizer step (Keras' constraints).

A constraint maps a tensor to its projected value. bnlab layers hold their
constraints; :func:`bnlab.apply_constraints` applies every constraint of a model
in place and is meant to be called right after ``optimizer.step()``::

    optimizer.step()
    bnlab.apply_constraints(model)

The norms follow Keras: computed over ``axis`` (0 by default, the whole vector
for gamma and beta) with ``1e-7`` added to the denominator.
"""

from __future__ import annotations

from typing import Callable

import torch

from ._lookup import Spec, lookup
from ._lookup import serialize as _serialize

__all__ = ["NonNeg", "MaxNorm", "UnitNorm", "MinMaxNorm", "get", "serialize"]

_EPS = 1e-7  # keras.config.epsilon()


class Constraint(Spec):
    def __call__(self, w: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError


def _norms(w, axis):
    return torch.sqrt(w.square().sum(dim=axis, keepdim=True))


class NonNeg(Constraint):
    """Negative values set to zero."""

    def __call__(self, w):
        return w * (w >= 0).to(w.dtype)


class MaxNorm(Constraint):
    """Rescale so the norm over ``axis`` is at most ``max_value`` (2.0 by default)."""

    def __init__(self, max_value: float = 2.0, axis: int = 0):
        self.max_value, self.axis = float(max_value), axis

    def __call__(self, w):
        norms = _norms(w, self.axis)
        return w * (norms.clamp(0, self.max_value) / (_EPS + norms))


class UnitNorm(Constraint):
    """Rescale to unit norm over ``axis``."""

    def __init__(self, axis: int = 0):
        self.axis = axis

    def __call__(self, w):
        return w / (_EPS + _norms(w, self.axis))


class MinMaxNorm(Constraint):
    """Norm over ``axis`` moved towards ``[min_value, max_value]`` at ``rate`` (1.0 = exactly)."""

    def __init__(self, min_value: float = 0.0, max_value: float = 1.0, rate: float = 1.0, axis: int = 0):
        if min_value > max_value:
            raise ValueError(f"MinMaxNorm needs min_value <= max_value, got {min_value} > {max_value}")
        self.min_value, self.max_value, self.rate, self.axis = float(min_value), float(max_value), float(rate), axis

    def __call__(self, w):
        norms = _norms(w, self.axis)
        desired = self.rate * norms.clamp(self.min_value, self.max_value) + (1 - self.rate) * norms
        return w * (desired / (_EPS + norms))


_BY_NAME = {"non_neg": NonNeg, "nonneg": NonNeg, "max_norm": MaxNorm, "unit_norm": UnitNorm, "min_max_norm": MinMaxNorm}


_CLASSES = {c.__name__: c for c in (NonNeg, MaxNorm, UnitNorm, MinMaxNorm)}


def get(spec) -> Callable | None:
    """A constraint from ``None``, a name (``"non_neg"``, ``"max_norm"``, ...), a :func:`serialize` config,
    an instance or a callable."""
    return lookup(spec, _BY_NAME, "constraint", allow_none=True, classes=_CLASSES)


def serialize(constraint):
    """What :func:`get` rebuilds ``constraint`` from (``None``, a name, Keras' ``{"class_name", "config"}``
    for bnlab's classes, or the callable itself).

    >>> serialize(MaxNorm(3.0))
    {'class_name': 'MaxNorm', 'config': {'max_value': 3.0, 'axis': 0}}
    """
    return _serialize(constraint, _CLASSES)
