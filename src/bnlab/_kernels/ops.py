"""The compiled kernels' entry points, each tensor checked on every call before C sees its address.

This is the only module that hands tensor addresses to C. Every function here
checks, on that call, every tensor whose address it passes: dtype, device,
number of values against the dims it is told, dense memory, storage large
enough, no negative bit (complex dtypes, the only ones with a conjugate bit,
never get here). A tensor that fails raises :class:`BoundaryError` naming it;
nothing is cached between calls, so memory safety never depends on a cache or
on the routing above being right (a wrong route can be slow, never unsafe).

Data tensors (``x``, ``dy``) are ``(A, C, B)`` arrays in memory: dense and
non-overlapping with ``A * C * B`` values in the memory order the routing
chose. Their outputs are allocated here with :func:`torch.empty_like`, which
keeps the strides of such a tensor; comparing the strides of the two is the
density check. Per-feature tensors (``gamma``, ``beta``, statistics) are
contiguous vectors of ``C`` values in the parameter dtype: the data dtype for
float32/float64, float32 for bfloat16 data.
"""

from __future__ import annotations

import threading

import numpy as np
import torch
from torch import Tensor

from . import ACTIVATION_CODES, _state, get, threads_for

__all__ = ["BoundaryError", "PARAM_DTYPE", "Scratch", "loaded", "scratch", "give_back", "train_forward",
           "train_backward", "inference", "update_moving"]

#: storage dtype of the data -> dtype of the per-feature parameters and statistics the kernels take
PARAM_DTYPE = {torch.float32: torch.float32, torch.float64: torch.float64, torch.bfloat16: torch.float32}


class BoundaryError(RuntimeError):
    """A tensor about to be handed to C is not what the kernel was told (a routing bug, or state
    changed under a running call); raised instead of calling C."""


def loaded():
    """The loaded kernels, or ``None`` when they are unavailable or a graph is being captured.

    Under tracing, ``torch.compile`` or a functorch transform (vmap, grad) the
    graph must see PyTorch ops instead of a call into C.
    """
    if torch._C._get_tracing_state() or torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        return None
    return _state["kernels"] if _state["tried"] else get()


def _vector(t: Tensor | None, pdt, c: int, name: str):
    """Address of a per-feature tensor (``None`` -> NULL) after checking it holds ``c`` values C may use."""
    if t is None:
        return None
    if (t.dtype is pdt and t.is_cpu and t.numel() == c and t.is_contiguous() and not t.is_neg()
            and t.untyped_storage().nbytes() >= (t.storage_offset() + c) * t.element_size()):
        return t.data_ptr()
    raise BoundaryError(
        f"{name}: expected a contiguous CPU {pdt} tensor of {c} values within its storage, got "
        f"{t.dtype} on {t.device}, {t.numel()} values, strides {t.stride()}, neg bit {t.is_neg()}"
    )


_pool = threading.local()


class Scratch:
    """Two vectors of ``c`` zeros for PyTorch's ``torch.batch_norm`` to write a batch's mean and
    unbiased variance into (with momentum 1 it writes ``0 * buffer + statistic``).

    The memory belongs to one NumPy array of ``2 * c`` values made here
    (``buffer``: the mean, then the variance; ``arrays``: its two halves);
    ``mean`` and ``var`` are tensors over the halves (:func:`torch.from_numpy`).
    :func:`update_moving` reads the statistics through the buffer's own
    addresses, never through the tensors, and zeroes them; the NumPy path
    does the same (one finiteness test over the whole buffer). So C touches only memory this
    object owns and sized itself, whatever happens to the tensors, and no
    in-place torch op bumps the tensors' version (autograd saves them, but
    never reads them, in training mode). A NumPy array that other objects
    view cannot be resized, so the addresses stay valid.
    """

    __slots__ = ("mean", "var", "buffer", "arrays", "addresses", "c", "dtype")

    def __init__(self, c: int, dtype):
        self.c, self.dtype = c, dtype
        npdt = {torch.float32: "float32", torch.float64: "float64"}[dtype]
        self.buffer = np.zeros(2 * c, dtype=npdt)
        self.arrays = (self.buffer[:c], self.buffer[c:])
        self.mean, self.var = (torch.from_numpy(a) for a in self.arrays)
        self.addresses = tuple(a.ctypes.data for a in self.arrays)


def scratch(c: int, dtype) -> Scratch:
    """A zeroed :class:`Scratch` (float32 or float64) from this thread's pool, or a new one.

    It is out of the pool until given back (:func:`give_back`, once zeroed):
    a pair not given back (the call in between failed) is simply not reused.
    """
    pairs = getattr(_pool, "pairs", None)
    if pairs is None:
        pairs = _pool.pairs = {}
    s = pairs.pop((c, dtype), None)
    if s is None:
        if len(pairs) > 64:  # a model with many sizes: keep the memory bounded
            pairs.clear()
        s = Scratch(c, dtype)
    return s


def give_back(s: Scratch) -> None:
    """Return a zeroed :class:`Scratch` to this thread's pool."""
    pairs = getattr(_pool, "pairs", None)
    if pairs is not None:
        pairs[(s.c, s.dtype)] = s


def _data(x: Tensor, dims: tuple[int, int, int], name: str) -> None:
    """Check a data tensor's dtype, device, size and storage (density is checked against its output)."""
    a, c, b = dims
    n = a * c * b
    if not (x.dtype in PARAM_DTYPE and x.is_cpu and x.numel() == n and not x.is_neg()
            and x.untyped_storage().nbytes() >= (x.storage_offset() + n) * x.element_size()):
        raise BoundaryError(
            f"{name}: expected a CPU float32/float64/bfloat16 tensor of {a}x{c}x{b} values within its storage, "
            f"got {x.dtype} on {x.device}, shape {tuple(x.shape)}, neg bit {x.is_neg()}"
        )


def _output_like(x: Tensor, name: str) -> Tensor:
    """A new tensor with ``x``'s strides; that they match proves ``x`` dense and non-overlapping."""
    out = torch.empty_like(x)
    if out.stride() != x.stride():
        raise BoundaryError(f"{name}: expected dense, non-overlapping memory, got strides {x.stride()} "
                            f"for shape {tuple(x.shape)}")
    return out


def _failed(rc: int) -> None:
    if rc:
        raise MemoryError("bnlab kernel could not allocate its scratch memory")


# Tensors allocated in this module for a call (outputs, gradients, the forward's saved statistics,
# which live on the autograd context until the backward) are made with the sizes C is told and go
# to C without a second look; everything that comes from outside is checked.


def train_forward(kernels, x: Tensor, dims, gamma, beta, epsilon: float, moving, act, slope: float, want_var: bool):
    """Training forward: ``(y, saved, var)``.

    ``saved`` holds the batch mean then ``1/sqrt(var + epsilon)`` (``2 * C``
    values, what the backward needs); ``var`` the biased batch variance when
    ``want_var``, else ``None``. ``moving`` is ``None`` or ``(moving_mean,
    moving_var, momentum, var_factor, counter)``: updated in the same call,
    ``moving <- momentum * moving + (1 - momentum) * statistic`` with the
    variance times ``var_factor``, features with non-finite statistics kept;
    ``counter`` (an int64 scalar or ``None``) is incremented once.
    """
    a, c, b = dims
    pdt = PARAM_DTYPE.get(x.dtype)
    _data(x, dims, "x")
    y = _output_like(x, "x")
    saved = torch.empty(2 * c, dtype=pdt)
    var = torch.empty(c, dtype=pdt) if want_var else None
    p_mean = saved.data_ptr()
    mm = mv = counter = None
    momentum, factor = 0.0, 1.0
    if moving is not None:
        mm, mv, momentum, factor, counter = moving
    rc = kernels.train_fwd[x.dtype](
        x.data_ptr(), y.data_ptr(), a, c, b, _vector(gamma, pdt, c, "gamma"), _vector(beta, pdt, c, "beta"), epsilon,
        p_mean, None if var is None else var.data_ptr(), p_mean + c * saved.element_size(),
        _vector(mm, pdt, c, "moving_mean"), _vector(mv, pdt, c, "moving_variance"), float(momentum), float(factor),
        ACTIVATION_CODES[act], slope, threads_for(a * c * b), _vector(counter, torch.int64, 1, "num_batches_tracked"),
    )
    _failed(rc)
    return y, saved, var


def train_backward(kernels, x: Tensor, dy: Tensor, dims, gamma, beta, saved: Tensor, act, slope: float, need):
    """Gradients ``(dx, dgamma, dbeta)`` of the training transform; ``need`` says which (``None`` otherwise).

    ``saved`` is :func:`train_forward`'s (kept on the autograd context). ``dgamma``
    and ``dbeta`` have the parameters' shapes.
    """
    a, c, b = dims
    pdt = PARAM_DTYPE.get(x.dtype)
    _data(x, dims, "x")
    if dy.dtype is not x.dtype or dy.stride() != x.stride() or dy.is_neg() or not dy.is_cpu:
        dy = torch.empty_like(x).copy_(dy)  # into x's memory layout (also resolves a neg bit)
    _data(dy, dims, "dy")
    need_x, need_g, need_b = need
    dx = _output_like(x, "x") if need_x else None
    if dx is not None and dy.stride() != dx.stride():
        raise BoundaryError(f"dy: expected the strides of x {x.stride()}, got {dy.stride()}")
    dgamma = torch.empty(gamma.shape, dtype=pdt) if need_g else None  # (the parameters' shapes: no view)
    dbeta = torch.empty(beta.shape, dtype=pdt) if need_b else None
    if saved.numel() != 2 * c or saved.dtype is not pdt:
        raise BoundaryError(f"saved statistics: expected {2 * c} {pdt} values, got {saved.numel()} {saved.dtype}")
    p_saved = saved.data_ptr()
    rc = kernels.train_bwd[x.dtype](
        x.data_ptr(), dy.data_ptr(), None if dx is None else dx.data_ptr(), a, c, b, _vector(gamma, pdt, c, "gamma"),
        _vector(beta, pdt, c, "beta"), p_saved, p_saved + c * saved.element_size(),
        None if dgamma is None else dgamma.data_ptr(), None if dbeta is None else dbeta.data_ptr(),
        ACTIVATION_CODES[act], slope, threads_for(a * c * b),
    )
    _failed(rc)
    return dx, dgamma, dbeta


def inference(kernels, x: Tensor, dims, gamma, beta, moving_mean, moving_var, epsilon: float, act, slope: float) -> Tensor:
    """``act(gamma * (x - moving_mean) / sqrt(moving_var + epsilon) + beta)``."""
    a, c, b = dims
    pdt = PARAM_DTYPE.get(x.dtype)
    if moving_mean is None or moving_var is None:  # (C reads both: NULL is for gamma and beta only)
        raise BoundaryError("inference needs the moving mean and variance, got None")
    _data(x, dims, "x")
    y = _output_like(x, "x")
    rc = kernels.infer[x.dtype](
        x.data_ptr(), y.data_ptr(), a, c, b, _vector(gamma, pdt, c, "gamma"), _vector(beta, pdt, c, "beta"),
        _vector(moving_mean, pdt, c, "moving_mean"), _vector(moving_var, pdt, c, "moving_variance"), epsilon,
        ACTIVATION_CODES[act], slope, threads_for(a * c * b),
    )
    _failed(rc)
    return y


def update_moving(kernels, moving_mean, moving_var, s: Scratch, momentum: float, var_factor: float, counter) -> None:
    """``moving <- momentum * moving + (1 - momentum) * statistic`` in C, from a :class:`Scratch`.

    The variance averaged is the scratch's times ``var_factor``; the arithmetic
    is in float64, and a feature whose new mean or variance would not be
    finite keeps its values. The scratch is zeroed and given back to the pool.
    ``counter``: an int64 scalar incremented once, or ``None``.
    """
    if moving_mean is None or moving_var is None:  # (C updates both: NULL is for the counter only)
        raise BoundaryError("the moving-statistics update needs the moving mean and variance, got None")
    pdt, c = s.dtype, s.c
    kernels.update_moving[pdt](_vector(moving_mean, pdt, c, "moving_mean"), _vector(moving_var, pdt, c, "moving_variance"),
                               s.addresses[0], s.addresses[1], c, momentum, var_factor,
                               _vector(counter, torch.int64, 1, "num_batches_tracked"))
    give_back(s)  # (zeroed by C)
