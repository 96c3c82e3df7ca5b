"""Weight penalties with Keras' names and defaults.

A regularizer maps a parameter tensor to a scalar penalty that is *added to the
training loss*. bnlab layers hold their regularizers; the penalties of a whole
model are collected by :func:`bnlab.regularization_loss` (see there)::

    loss = criterion(model(x), y) + bnlab.regularization_loss(model)
"""

from __future__ import annotations

from typing import Callable

import torch

from ._lookup import Spec, lookup
from ._lookup import serialize as _serialize

__all__ = ["L1", "L2", "L1L2", "get", "serialize"]


class Regularizer(Spec):
    def __call__(self, w: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError


class L1L2(Regularizer):
    """``l1 * sum(|w|) + l2 * sum(w**2)``; both 0.0 by default (Keras)."""

    def __init__(self, l1: float = 0.0, l2: float = 0.0):
        if l1 < 0 or l2 < 0:
            raise ValueError(f"penalty factors must be >= 0, got l1={l1}, l2={l2}")
        self.l1, self.l2 = float(l1), float(l2)

    def __call__(self, w):
        penalty = w.new_zeros(())
        if self.l1:
            penalty = penalty + self.l1 * w.abs().sum()
        if self.l2:
            penalty = penalty + self.l2 * w.square().sum()
        return penalty


class L1(L1L2):
    """``l1 * sum(|w|)``, ``l1=0.01`` by default (Keras)."""

    def __init__(self, l1: float = 0.01):
        super().__init__(l1=l1)

    def get_config(self) -> dict:
        return {"l1": self.l1}


class L2(L1L2):
    """``l2 * sum(w**2)``, ``l2=0.01`` by default (Keras). Not halved: Keras' convention."""

    def __init__(self, l2: float = 0.01):
        super().__init__(l2=l2)

    def get_config(self) -> dict:
        return {"l2": self.l2}


_BY_NAME = {"l1": L1, "l2": L2, "l1_l2": lambda: L1L2(0.01, 0.01)}
_CLASSES = {c.__name__: c for c in (L1, L2, L1L2)}


def get(spec) -> Callable | None:
    """A regularizer from ``None``, a name (``"l1"``, ``"l2"``, ``"l1_l2"``), a :func:`serialize` config,
    an instance or a callable."""
    return lookup(spec, _BY_NAME, "regularizer", allow_none=True, classes=_CLASSES)


def serialize(regularizer):
    """What :func:`get` rebuilds ``regularizer`` from (``None``, a name, Keras' ``{"class_name", "config"}``
    for bnlab's classes, or the callable itself).

    >>> serialize(L2(0.001))
    {'class_name': 'L2', 'config': {'l2': 0.001}}
    """
    return _serialize(regularizer, _CLASSES)
