"""How a batch is computed: the one place that chooses between the compiled kernels and PyTorch.

:mod:`bnlab.functional` says *what* is computed; this module says *how*, from
the input's metadata and the per-feature tensors, on every call, as PyTorch's
dispatcher does below ``torch.nn.functional.batch_norm``. A choice is a
:class:`Route`, a small immutable record; nothing here keeps tensors or
addresses between calls. Whatever route is taken, the tensors handed to C
are checked again at the boundary (:mod:`bnlab._kernels.ops`), so a wrong
route can be slow but never unsafe.

Implementations (``Route.impl``):

* ``"kernels"``: bnlab's compiled CPU kernels (float32, float64 and bfloat16
  data on the CPU, per-feature tensors in the matching dtype, no mask, not
  while a graph is being captured). The data is read in its own memory
  order when that is a dense ``(A, C, B)`` array, else copied once.
* ``"aten"``: PyTorch's ``torch.batch_norm`` on ``(N, C, ...)`` in a layout it
  takes as it is, or on the ``(A, C, B)`` view (it reduces dims 0 and 2, which
  is bnlab's contract). In training it also serves small batches that record
  a graph, where its autograd node, in C++, costs less than a Python one
  around the kernels.
* ``"composite"``: bnlab's own autograd Function of PyTorch ops; it takes
  masks and a batch of one value per feature.

Layout: every input is seen as a 3-D ``(A, C, B)`` array, ``A`` = the reduced
axes before the feature axes (in memory order), ``C`` = the feature axes,
``B`` = the reduced axes after them. ``(N, C, H, W)`` with ``axis=1`` is
``(N, C, H*W)``; ``(N, H, W, C)`` with ``axis=-1`` is ``(N*H*W, C, 1)``; a
channels-last ``(N, C, H, W)`` is ``(N*H*W, C, 1)`` in its memory order.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from . import _kernels
from ._kernels import ops

__all__ = [
    "Route", "train_route", "inference_route", "memory_perm", "acb_dims", "dense_acb", "channels_last",
    "SMALL_ROWS_NUMEL", "SMALL_PLANES_NUMEL",
]

#: Training batches with the features on axis 1 that record a graph and hold at most this many
#: values as an ``(N, C)`` matrix take ``"aten"`` instead of the kernels: below it a Python autograd
#: node's fixed cost outweighs the kernels' speed (the crossover was measured with
#: ``benchmarks/bench_layer.py``; inference uses the same sizes).
SMALL_ROWS_NUMEL = 1 << 16
#: The same for ``(N, C, ...)`` batches: up to this many values when contiguous, twice as many
#: channels-last.
SMALL_PLANES_NUMEL = 1 << 14


class Route(NamedTuple):
    """How one call is computed.

    ``impl``: ``"kernels"``, ``"aten"`` or ``"composite"``. ``dims``: ``(A, C, B)``
    of the input's memory for the kernels. ``copy``: the kernels need a dense copy
    of the input first (strided input, or feature axes apart in memory; see
    :func:`dense_acb`), whose dims are then the copy's. ``native``: PyTorch's op
    takes the input as it is (features on dim 1, in a layout and dtype it
    reads), else it gets the ``(A, C, B)`` view.
    """

    impl: str
    dims: tuple[int, int, int] | None = None
    copy: bool = False
    native: bool = False


_ATEN = Route("aten")
_ATEN_NATIVE = Route("aten", native=True)
_COMPOSITE = Route("composite")
_NATIVE_DTYPES = (torch.float32, torch.float64, torch.bfloat16)
_CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}


# --------------------------------------------------------------------------- memory layout


def channels_last(x: Tensor) -> bool:
    """Whether ``x`` is dense in PyTorch's channels-last format for its rank."""
    return x.ndim in _CHANNELS_LAST and x.is_contiguous(memory_format=_CHANNELS_LAST[x.ndim])


def memory_perm(x: Tensor, feature_axes: tuple[int, ...]) -> list[int] | None:
    """The axes in the order ``x`` lays them out in memory, feature axes kept together.

    ``None`` means the identity (``x`` contiguous with adjacent feature axes).
    """
    lo, hi = feature_axes[0], feature_axes[-1]
    if hi - lo + 1 == len(feature_axes) and x.is_contiguous():
        return None
    order = sorted(range(x.ndim), key=lambda d: -x.stride(d))  # largest stride first
    first = min(order.index(a) for a in feature_axes)
    rest = [d for d in order if d not in feature_axes]
    return rest[:first] + list(feature_axes) + rest[first:]


def acb_dims(x: Tensor, feature_axes: tuple[int, ...]) -> tuple[int, int, int] | None:
    """``(A, C, B)`` when ``x``'s memory is a dense ``(A, C, B)`` array as it is, else ``None``.

    True for a contiguous tensor with adjacent feature axes, and for one dense
    in another memory order (e.g. channels-last) in which they are adjacent.
    """
    shape = x.shape
    lo, hi = feature_axes[0], feature_axes[-1]
    if hi - lo + 1 == len(feature_axes) and x.is_contiguous():
        return math.prod(shape[:lo]), math.prod(shape[lo:hi + 1]), math.prod(shape[hi + 1:])
    if lo == hi == 1 and channels_last(x):
        return shape[0] * math.prod(shape[2:]), shape[1], 1
    perm = memory_perm(x, feature_axes)
    if not x.permute(perm).is_contiguous():
        return None
    pshape = [shape[d] for d in perm]
    lo = perm.index(feature_axes[0])
    hi = lo + len(feature_axes)
    return math.prod(pshape[:lo]), math.prod(pshape[lo:hi]), math.prod(pshape[hi:])


def dense_acb(x: Tensor, feature_axes: tuple[int, ...]) -> tuple[Tensor, tuple[int, int, int]]:
    """``x``, or a copy of it laid out feature-axes-together when it is not a dense ``(A, C, B)``
    array, and ``(A, C, B)``. The copy keeps ``x``'s shape (only its strides differ)."""
    dims = acb_dims(x, feature_axes)
    if dims is None:
        perm = memory_perm(x, feature_axes)
        inverse = [perm.index(d) for d in range(x.ndim)]
        x = x.permute(perm).contiguous().permute(inverse)
        dims = acb_dims(x, feature_axes)
    return x, dims


def small(x: Tensor, feature_axes: tuple[int, ...], n: int) -> bool:
    """A batch of ``n`` values small enough that PyTorch's op costs less than a call into the kernels."""
    if feature_axes != (1,):
        return False
    if x.ndim == 2:
        return n <= SMALL_ROWS_NUMEL
    if n <= SMALL_PLANES_NUMEL and x.is_contiguous():
        return True
    return n <= 2 * SMALL_PLANES_NUMEL and channels_last(x)


# --------------------------------------------------------------------------- routes


def _kernel_dtypes(x: Tensor, per_feature) -> bool:
    """The kernels take ``x`` and these per-feature tensors: dtype and device (the boundary checks the rest)."""
    pdt = ops.PARAM_DTYPE.get(x.dtype)
    if pdt is None or not x.is_cpu or x.is_neg() or (type(x) is not Tensor and type(x) is not torch.nn.Parameter):
        return False  # tensor subclasses and wrappers hold no plain memory to hand to C
    for t in per_feature:
        if t is not None and (t.dtype is not pdt or not t.is_cpu):
            return False
    return True


def _kernels_route(x: Tensor, feature_axes: tuple[int, ...]) -> Route:
    dims = acb_dims(x, feature_axes)
    return Route("kernels", copy=True) if dims is None else Route("kernels", dims)


def train_route(x: Tensor, feature_axes: tuple[int, ...], n: int, c: int, kernels, per_feature, masked: bool,
                impl: str, graph: bool) -> Route:
    """How to compute a training batch of ``n`` values, ``c`` per sample and feature axis position.

    ``kernels``: the loaded kernels (:func:`bnlab._kernels.ops.loaded`) or ``None``.
    ``per_feature``: gamma, beta and the moving statistics (any may be ``None``),
    already checked to hold one value per feature. ``impl``: ``"auto"`` or one
    implementation to force (``ValueError`` when it cannot take this call).
    ``graph``: whether autograd records this call.
    """
    if impl == "auto":
        if masked:
            return _COMPOSITE
        if graph and feature_axes == (1,) and n <= SMALL_ROWS_NUMEL and (x.ndim == 2 or small(x, feature_axes, n)):
            return _aten(x, feature_axes) if n > c else _COMPOSITE  # small: PyTorch's op, its autograd node is C++
        if kernels is not None and n and _kernel_dtypes(x, per_feature):
            return _kernels_route(x, feature_axes)
        return _aten(x, feature_axes) if n > c else _COMPOSITE  # (one value per feature: the composite path)
    if impl == "kernel":
        if masked or not n or kernels is None or not _kernel_dtypes(x, per_feature):
            raise ValueError(f"impl='kernel' cannot run here: {_kernel_refusal(x, masked, kernels)}")
        return _kernels_route(x, feature_axes)
    if impl == "aten":
        if masked or n // max(c, 1) < 2:
            raise ValueError("impl='aten' needs no mask and at least 2 values per feature "
                             f"(got mask={'set' if masked else None}, {n // max(c, 1)} values)")
        return _aten(x, feature_axes)
    if impl == "composite":
        return _COMPOSITE
    raise ValueError(f"impl must be 'auto', 'kernel', 'aten' or 'composite', got {impl!r}")


def inference_route(x: Tensor, feature_axes: tuple[int, ...], n: int, kernels, per_feature, graph: bool) -> Route:
    """How to compute an inference batch of ``n`` values: the kernels when they take it, no graph is
    recorded and the batch is not small; else PyTorch's op."""
    if graph or kernels is None or not n or small(x, feature_axes, n) or not _kernel_dtypes(x, per_feature):
        return _aten(x, feature_axes)
    return _kernels_route(x, feature_axes)


def _aten(x: Tensor, feature_axes: tuple[int, ...]) -> Route:
    """PyTorch's op: on ``x`` as it is when the features are on dim 1 in a layout and dtype it takes
    (bfloat16 with float32 parameters on the CPU), else on the ``(A, C, B)`` view."""
    if feature_axes == (1,) and (x.dtype in _NATIVE_DTYPES and (x.dtype is not torch.bfloat16 or x.is_cpu)) \
            and (x.ndim == 2 or x.is_contiguous() or channels_last(x)):
        return _ATEN_NATIVE
    return _ATEN


def _kernel_refusal(x: Tensor, masked: bool, kernels) -> str:
    if kernels is None:
        return _kernels.status()["reason"] if _kernels.get() is None else "a graph is being captured"
    return ("they take float32/float64/bfloat16 CPU tensors with per-feature parameters and statistics of the "
            f"matching dtype and no mask (got {x.dtype} on {x.device}, mask={'set' if masked else None})")
