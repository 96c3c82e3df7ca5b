"""Initializers with Keras' names, defaults and meaning, for bnlab's parameters and statistics.

An initializer is called as ``init(shape, dtype=..., device=...)`` and returns a
new tensor. Strings name the simple ones: ``"zeros"``, ``"ones"``. Any callable
with that signature works too. With ``seed=None`` the random initializers draw
from PyTorch's global generator (so ``torch.manual_seed`` makes them
reproducible); with a seed they use a private generator and give the same
values on every call, as Keras does for a seeded initializer.
"""

from __future__ import annotations

from typing import Callable

import torch

from ._lookup import lookup

__all__ = ["Zeros", "Ones", "Constant", "RandomNormal", "RandomUniform", "TruncatedNormal", "get"]


class Initializer:
    def __call__(self, shape, dtype=torch.float32, device=None) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


class Zeros(Initializer):
    def __call__(self, shape, dtype=torch.float32, device=None):
        return torch.zeros(shape, dtype=dtype, device=device)


class Ones(Initializer):
    def __call__(self, shape, dtype=torch.float32, device=None):
        return torch.ones(shape, dtype=dtype, device=device)


class Constant(Initializer):
    """Every value equal to ``value`` (Keras' ``Constant(value=0.0)``)."""

    def __init__(self, value: float = 0.0):
        self.value = float(value)

    def __call__(self, shape, dtype=torch.float32, device=None):
        return torch.full(shape, self.value, dtype=dtype, device=device)


class _Random(Initializer):
    def __init__(self, seed: int | None = None):
        self.seed = seed

    def _generator(self):
        if self.seed is None:
            return None
        return torch.Generator().manual_seed(int(self.seed))

    def _finish(self, t, dtype, device):
        return t.to(dtype=dtype, device=device)


class RandomNormal(_Random):
    """Normal draws, ``mean=0.0``, ``stddev=0.05`` (Keras' defaults)."""

    def __init__(self, mean: float = 0.0, stddev: float = 0.05, seed: int | None = None):
        super().__init__(seed)
        self.mean, self.stddev = float(mean), float(stddev)

    def __call__(self, shape, dtype=torch.float32, device=None):
        t = torch.empty(shape, dtype=torch.float64).normal_(self.mean, self.stddev, generator=self._generator())
        return self._finish(t, dtype, device)


class RandomUniform(_Random):
    """Uniform draws in ``[minval, maxval)``, ``-0.05`` and ``0.05`` by default (Keras)."""

    def __init__(self, minval: float = -0.05, maxval: float = 0.05, seed: int | None = None):
        super().__init__(seed)
        if maxval < minval:
            raise ValueError(f"RandomUniform needs minval <= maxval, got {minval} > {maxval}")
        self.minval, self.maxval = float(minval), float(maxval)

    def __call__(self, shape, dtype=torch.float32, device=None):
        t = torch.empty(shape, dtype=torch.float64).uniform_(self.minval, self.maxval, generator=self._generator())
        return self._finish(t, dtype, device)


class TruncatedNormal(_Random):
    """Normal draws re-drawn beyond two standard deviations from the mean (Keras' rule)."""

    def __init__(self, mean: float = 0.0, stddev: float = 0.05, seed: int | None = None):
        super().__init__(seed)
        self.mean, self.stddev = float(mean), float(stddev)

    def __call__(self, shape, dtype=torch.float32, device=None):
        t = torch.empty(shape, dtype=torch.float64)
        torch.nn.init.trunc_normal_(
            t, self.mean, self.stddev, self.mean - 2 * self.stddev, self.mean + 2 * self.stddev,
            generator=self._generator(),
        )
        return self._finish(t, dtype, device)


_BY_NAME = {"zeros": Zeros, "ones": Ones}


def get(spec) -> Callable:
    """An initializer from a name (``"zeros"``, ``"ones"``), an instance or a callable."""
    return lookup(spec, _BY_NAME, "initializer", allow_none=False)
