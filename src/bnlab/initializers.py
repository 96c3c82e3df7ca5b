"""Initializers with Keras' names, defaults and meaning, for bnlab's parameters and statistics.

An initializer is called as ``init(shape, dtype=..., device=...)`` and returns a
new tensor. Strings name the simple ones: ``"zeros"``, ``"ones"``. With
``seed=None`` the random initializers draw from PyTorch's global generator (so
``torch.manual_seed`` makes them reproducible); with a seed they use a private
generator and give the same values on every call, as Keras does for a seeded
initializer.

Any other callable works in either of the two styles users bring along, and
:func:`get` adapts it to the call above:

* **Keras style**, ``fn(shape, dtype[, device]) -> Tensor`` (Keras'
  ``initializer(shape, dtype=None)``): it returns a new tensor, which is cast to
  the dtype and moved to the device asked for when it comes back otherwise;
  ``device`` is passed only where the callable accepts it.
* **PyTorch's in-place style**, ``fn(tensor)`` fills the tensor it is given
  (``torch.nn.init.ones_``, ``functools.partial(torch.nn.init.constant_,
  val=2.0)``, ``lambda t: t.fill_(2.0)``): it gets a zero tensor of the shape,
  dtype and device asked for, under ``torch.no_grad()``, and must fill that one
  (returning it, as ``torch.nn.init`` does, or ``None``); returning another
  tensor is an error, since its values would otherwise be lost silently.

How :func:`get` tells them apart, from the callable's signature only (it never
calls a callable to find out: a trial call would draw random numbers):

1. A function of ``torch.nn.init`` (also inside ``functools.partial``), or one
   whose first parameter is named ``tensor`` (the name every ``torch.nn.init``
   function uses): in-place.
2. First parameter named ``shape`` (Keras' name), or a callable that accepts a
   ``dtype`` keyword (a parameter of that name, or ``**kwargs``): Keras style.
   So are PyTorch's factory functions (``torch.ones``, ``torch.randn``, ...:
   functions of the ``torch`` namespace whose signature Python cannot read),
   which take ``(shape, dtype=, device=)``.
3. Otherwise a callable that takes exactly one positional argument cannot be
   Keras style (Keras passes ``dtype``): in-place.
4. Anything else (or a callable whose signature cannot be read) is refused
   with a ``TypeError`` that says so; wrap it as :class:`KerasStyle` or
   :class:`InPlace` to say which it is.
"""

from __future__ import annotations

import functools
import inspect
from typing import Callable

import torch

from ._lookup import Spec, lookup
from ._lookup import serialize as _serialize

__all__ = ["Initializer", "Zeros", "Ones", "Constant", "RandomNormal", "RandomUniform", "TruncatedNormal", "KerasStyle", "InPlace", "get", "serialize"]


class Initializer(Spec):
    def __call__(self, shape, dtype=torch.float32, device=None) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError


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


class KerasStyle(Initializer):
    """A Keras-style callable, ``fn(shape, dtype[, device]) -> Tensor``, as a bnlab initializer.

    ``fn`` gets the shape as a tuple, ``dtype`` as a keyword where it accepts
    one (else as its second argument, if it takes one) and ``device`` only as a
    keyword it accepts; what it returns is cast to ``dtype`` and moved to
    ``device`` when it comes back otherwise.
    """

    def __init__(self, fn: Callable):
        self.fn = fn
        self._takes_device = _accepts_keyword(fn, "device")
        self._dtype_by_keyword = _accepts_keyword(fn, "dtype")
        sig = _signature(fn)
        self._dtype_second = not self._dtype_by_keyword and sig is not None and len(_positional(sig)) >= 2

    def __call__(self, shape, dtype=torch.float32, device=None):
        args, kwargs = (tuple(shape),), {}
        if self._dtype_by_keyword:
            kwargs["dtype"] = dtype
        elif self._dtype_second:
            args += (dtype,)
        if self._takes_device:
            kwargs["device"] = device
        t = self.fn(*args, **kwargs)
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"initializer {self.fn!r} (Keras style: (shape, dtype) -> Tensor) returned "
                            f"{type(t).__name__}, expected a tensor")
        return t.to(dtype=dtype if dtype is not None else t.dtype, device=device)

    def __repr__(self) -> str:
        return f"KerasStyle({self.fn!r})"


class InPlace(Initializer):
    """PyTorch's in-place style, ``fn(tensor)`` filling the tensor it gets, as a bnlab initializer.

    ``fn`` gets a zero tensor of the shape, dtype and device asked for, under
    ``torch.no_grad()``, and must fill it; it may return that tensor (as
    ``torch.nn.init`` functions do) or ``None``.
    """

    def __init__(self, fn: Callable):
        self.fn = fn

    def __call__(self, shape, dtype=torch.float32, device=None):
        t = torch.zeros(tuple(shape), dtype=dtype, device=device)
        with torch.no_grad():
            out = self.fn(t)
        if out is not None and not (isinstance(out, torch.Tensor) and out.data_ptr() == t.data_ptr() and out.shape == t.shape):
            got = f"a new {type(out).__name__}" if not isinstance(out, torch.Tensor) else "a new tensor"
            raise TypeError(f"initializer {self.fn!r} (in-place style: fills the tensor it gets) returned {got} "
                            "instead of filling the tensor it was given; fill it in place, or write it Keras style "
                            "as fn(shape, dtype) -> Tensor")
        return t

    def __repr__(self) -> str:
        return f"InPlace({self.fn!r})"


def _signature(fn: Callable) -> inspect.Signature | None:
    try:
        return inspect.signature(fn)
    except (TypeError, ValueError):
        return None


def _positional(sig: inspect.Signature) -> list[inspect.Parameter]:
    return [p for p in sig.parameters.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


def _accepts_keyword(fn: Callable, name: str) -> bool:
    sig = _signature(fn)
    if sig is None:
        return False
    return any(p.kind is p.VAR_KEYWORD or (p.name == name and p.kind is not p.POSITIONAL_ONLY) for p in sig.parameters.values())


def _is_torch_init(fn: Callable) -> bool:
    while isinstance(fn, functools.partial):
        fn = fn.func
    return getattr(fn, "__module__", None) == "torch.nn.init"


def _style(fn: Callable) -> str | None:
    """``"in_place"``, ``"keras"`` or ``None`` (cannot tell): the rule in this module's docstring."""
    if _is_torch_init(fn):
        return "in_place"
    sig = _signature(fn)
    if sig is None:  # a builtin: torch.ones(shape, dtype=, device=) and its kin are Keras style
        return "keras" if getattr(torch, getattr(fn, "__name__", ""), None) is fn else None
    positional = _positional(sig)
    first = positional[0].name if positional else None
    if first == "tensor":
        return "in_place"
    if first == "shape" or _accepts_keyword(fn, "dtype"):
        return "keras"
    try:
        sig.bind(None)
    except TypeError:
        return None
    return "in_place"


_BY_NAME = {"zeros": Zeros, "ones": Ones}
_CLASSES = {c.__name__: c for c in (Zeros, Ones, Constant, RandomNormal, RandomUniform, TruncatedNormal)}


def serialize(initializer):
    """What :func:`get` rebuilds ``initializer`` from: a name, ``{"class_name": ..., "config": {...}}`` for
    bnlab's classes (Keras' format, JSON), or the callable itself (a function cannot be written as data).

    >>> serialize(RandomNormal(mean=1.0, stddev=0.5, seed=3))
    {'class_name': 'RandomNormal', 'config': {'seed': 3, 'mean': 1.0, 'stddev': 0.5}}
    """
    return _serialize(initializer, _CLASSES)


def get(spec) -> Initializer:
    """An initializer from a name (``"zeros"``, ``"ones"``), a :func:`serialize` config, an instance or a
    callable of either style.

    A :class:`Initializer` (including :class:`KerasStyle` and :class:`InPlace`)
    is returned as it is. Another callable is wrapped as :class:`InPlace` or
    :class:`KerasStyle` by its signature, never by calling it:

    1. a ``torch.nn.init`` function (also in ``functools.partial``) or first
       parameter named ``tensor``: in-place;
    2. first parameter named ``shape``, or it accepts a ``dtype`` keyword, or a
       factory function of the ``torch`` namespace (``torch.ones``): Keras style;
    3. otherwise, one positional argument and no ``dtype``: in-place;
    4. otherwise a ``TypeError`` (wrap it in :class:`KerasStyle` or :class:`InPlace`).

    >>> import functools, torch
    >>> get(torch.nn.init.ones_)((2,))
    tensor([1., 1.])
    >>> get(functools.partial(torch.nn.init.constant_, val=2.0))((2,), dtype=torch.float64)
    tensor([2., 2.], dtype=torch.float64)
    >>> get(lambda shape, dtype: torch.full(shape, 3.0, dtype=dtype))((2,))
    tensor([3., 3.])
    """
    if isinstance(spec, Initializer):
        return spec
    fn = lookup(spec, _BY_NAME, "initializer", allow_none=False, classes=_CLASSES)
    if isinstance(fn, Initializer):
        return fn
    style = _style(fn)
    if style == "in_place":
        return InPlace(fn)
    if style == "keras":
        return KerasStyle(fn)
    raise TypeError(
        f"cannot tell how to call the initializer {fn!r}: expected Keras style fn(shape, dtype[, device]) -> Tensor "
        "(first parameter named 'shape', or accepting dtype) or PyTorch's in-place style fn(tensor) (first parameter "
        "named 'tensor', or one argument); wrap it as bnlab.initializers.KerasStyle(fn) or InPlace(fn) to say which"
    )
