"""Batch normalization as pure tensor functions (no module state).

Ioffe, S. & Szegedy, C. (2015). *Batch Normalization: Accelerating Deep Network
Training by Reducing Internal Covariate Shift*. ICML, arXiv:1502.03167.
Algorithm 1 gives the training transform, Algorithm 2 the inference transform.

Notation used throughout (one feature ``c``; ``M`` values of it in the batch)::

    mean  = 1/M * sum_i x_i
    var   = 1/M * sum_i (x_i - mean)^2          # biased: what normalizes the batch
    xhat  = (x - mean) / sqrt(var + epsilon)
    y     = gamma * xhat + beta

    moving <- momentum * moving + (1 - momentum) * batch_statistic   # Keras convention

and the analytic backward pass, with ``invstd = 1/sqrt(var + epsilon)``::

    dx     = gamma * invstd / M * (M * dy - sum(dy) - xhat * sum(dy * xhat))
    dgamma = sum(dy * xhat)
    dbeta  = sum(dy)

Layout. Every input is seen as a 3-D view ``(A, C, B)``: ``A`` = all reduced axes
before the feature axes, ``C`` = the feature axes flattened, ``B`` = all reduced
axes after them. For a contiguous tensor this is a free ``view`` for any single
feature axis: ``(N, C, H, W)`` with ``axis=1`` is ``(N, C, H*W)`` and
``(N, H, W, C)`` with ``axis=-1`` is ``(N*H*W, C, 1)``. A channels-last tensor
is viewed in its memory order, so it is not copied either.

Two implementations compute training mode and are tested against each other
and against :mod:`bnlab.reference`:

* ``"aten"``: PyTorch's native batch-norm kernel applied to the ``(A, C, B)``
  view (it reduces dims 0 and 2, which is exactly bnlab's contract).
* ``"composite"``: bnlab's own :class:`torch.autograd.Function` with the
  analytic backward above; it is the one that supports masks and a batch of one.
* ``"kernel"``: bnlab's compiled CPU kernels (:mod:`bnlab._kernels`): one pass
  for the statistics and one to normalize in the forward, two passes over
  ``(x, dy)`` in the backward, ReLU / leaky ReLU fused into both, the moving
  statistics updated in the same call. ``"auto"`` picks it for float32,
  float64 and bfloat16 CPU tensors whenever the kernels could be built, and
  falls back to ``"aten"``/``"composite"`` otherwise (other devices, masks,
  ``torch.compile``/tracing, no C compiler, ``BNLAB_KERNELS=0``). One
  exception, for speed: in the layers' training step a small batch with the
  features on axis 1 that records a graph (``(N, C)`` up to ``SMALL_ROWS_NUMEL``
  values, NCHW and channels-last up to about ``SMALL_PLANES_NUMEL``) runs PyTorch's op,
  whose autograd node is C++, with the moving statistics updated by the kernels
  (:func:`_small_rows_train`).
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from . import _kernels

__all__ = [
    "normalize_axes",
    "as_acb",
    "moments",
    "normalize",
    "batch_norm",
    "batch_norm_train",
    "batch_norm_inference",
    "batch_norm_backward",
    "update_moving_stats_",
    "renorm_correction",
    "update_renorm_stats_",
    "renorm_ramp",
    "ghost_batch_norm_train",
    "sync_batch_norm_train",
]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------- axes and views


def normalize_axes(axis: int | Sequence[int], ndim: int) -> tuple[int, ...]:
    """The feature axes as sorted non-negative ints; ``ValueError`` if any is outside ``ndim``.

    >>> normalize_axes(-1, 4)
    (3,)
    >>> normalize_axes([1, -1], 4)
    (1, 3)
    """
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    if not axes:
        raise ValueError("axis must name at least one feature axis, got an empty list")
    out = []
    for a in axes:
        if not isinstance(a, int):
            raise TypeError(f"axis must be an int or a sequence of ints, got {axis!r}")
        if not -ndim <= a < ndim:
            raise ValueError(
                f"axis {a} is out of range for an input of rank {ndim} "
                f"(expected an axis in [{-ndim}, {ndim - 1}])"
            )
        out.append(a % ndim)
    if len(set(out)) != len(out):
        raise ValueError(f"axis {axis!r} names the same axis twice for an input of rank {ndim}")
    return tuple(sorted(out))


def _prod(sizes) -> int:
    return math.prod(sizes)


def _memory_perm(x: Tensor, feature_axes: tuple[int, ...]) -> list[int] | None:
    """Axis order in which ``x`` is laid out in memory, feature axes kept together.

    ``None`` means the identity (``x`` contiguous with adjacent feature axes).
    """
    lo, hi = feature_axes[0], feature_axes[-1]
    if hi - lo + 1 == len(feature_axes) and x.is_contiguous():
        return None
    order = sorted(range(x.ndim), key=lambda d: -x.stride(d))  # largest stride first
    first = min(order.index(a) for a in feature_axes)
    rest = [d for d in order if d not in feature_axes]
    return rest[:first] + list(feature_axes) + rest[first:]


def _to_acb(t: Tensor, perm: list[int] | None, feature_axes: tuple[int, ...]) -> Tensor:
    if perm is not None:
        t = t.permute(perm)
        if not t.is_contiguous():
            t = t.contiguous()  # the only copying path: strided or sliced inputs
        lo = perm.index(feature_axes[0])
    else:
        lo = feature_axes[0]
    hi = lo + len(feature_axes)
    s = t.shape
    return t.view(_prod(s[:lo]), _prod(s[lo:hi]), _prod(s[hi:]))


def as_acb(x: Tensor, feature_axes: tuple[int, ...]) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
    """View ``x`` as ``(A, C, B)`` with the feature axes flattened into ``C``.

    Returns the view and a function that maps a contiguous ``(A, C, B)`` result
    back to ``x``'s shape and memory layout. No copy is made when ``x`` is
    contiguous and the feature axes are adjacent, or when ``x`` is dense in some
    other memory order (e.g. ``channels_last``) in which the feature axes are
    adjacent; otherwise the input is copied once.
    """
    shape = x.shape
    lo, hi = feature_axes[0], feature_axes[-1]
    if hi - lo + 1 == len(feature_axes) and x.is_contiguous():  # the common case, kept cheap
        x3 = x.view(_prod(shape[:lo]), _prod(shape[lo : hi + 1]), _prod(shape[hi + 1 :]))
        return x3, lambda y3: y3 if y3.shape == shape else y3.view(shape)
    perm = _memory_perm(x, feature_axes)
    x3 = _to_acb(x, perm, feature_axes)
    pshape = [x.shape[d] for d in perm]
    inverse = [0] * len(perm)
    for i, d in enumerate(perm):
        inverse[d] = i
    return x3, lambda y3: y3.view(pshape).permute(inverse)


_CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}


def _channels_last(x: Tensor) -> bool:
    """Whether ``x`` is dense in PyTorch's channels-last format for its rank (one C call)."""
    return x.ndim in _CHANNELS_LAST and x.is_contiguous(memory_format=_CHANNELS_LAST[x.ndim])


def _acb_dims(x: Tensor, feature_axes: tuple[int, ...]) -> tuple[int, int, int] | None:
    """``(A, C, B)`` when ``x``'s memory already is a dense ``(A, C, B)`` array (no view or copy needed).

    True for a contiguous tensor with adjacent feature axes and for one dense in
    another memory order (e.g. ``channels_last``) in which they are adjacent;
    ``None`` otherwise. ``torch.empty_like(x)`` then has the same layout.
    """
    shape = x.shape
    lo, hi = feature_axes[0], feature_axes[-1]
    if hi - lo + 1 == len(feature_axes) and x.is_contiguous():
        return _prod(shape[:lo]), _prod(shape[lo : hi + 1]), _prod(shape[hi + 1 :])
    if lo == hi == 1 and _channels_last(x):  # the general test below (a permuted view) costs 5 us
        return shape[0] * _prod(shape[2:]), shape[1], 1
    perm = _memory_perm(x, feature_axes)
    if not x.permute(perm).is_contiguous():
        return None
    pshape = [shape[d] for d in perm]
    lo = perm.index(feature_axes[0])
    hi = lo + len(feature_axes)
    return _prod(pshape[:lo]), _prod(pshape[lo:hi]), _prod(pshape[hi:])


def _dense_acb(x: Tensor, feature_axes: tuple[int, ...]) -> tuple[Tensor, tuple[int, int, int]]:
    """``x`` (or, when its layout is not a dense ``(A, C, B)`` array, a contiguous copy of it) and ``(A, C, B)``."""
    dims = _acb_dims(x, feature_axes)
    if dims is None:  # strided, or feature axes apart in memory: one copy, laid out feature-axes-together
        perm = _memory_perm(x, feature_axes)
        inverse = [perm.index(d) for d in range(x.ndim)]
        x = x.permute(perm).contiguous().permute(inverse)
        dims = _acb_dims(x, feature_axes)
    return x, dims


def _mask_as_acb(mask: Tensor, x: Tensor, feature_axes: tuple[int, ...], dtype) -> Tensor:
    """The mask (``x.shape`` without the feature axes) as ``(A, 1, B)`` 0/1 weights, laid out like ``x``."""
    expected = tuple(s for d, s in enumerate(x.shape) if d not in feature_axes)
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        got = mask.dtype if isinstance(mask, Tensor) else type(mask).__name__
        raise TypeError(f"mask must be a bool tensor, got {got}")
    if tuple(mask.shape) != expected:
        raise ValueError(
            f"mask must have the input's shape without the feature axes {feature_axes}: "
            f"expected {expected}, got {tuple(mask.shape)}"
        )
    m = mask.to(device=x.device, dtype=dtype)
    for a in feature_axes:
        m = m.unsqueeze(a)
    return _to_acb(m, _memory_perm(x, feature_axes), feature_axes)


# --------------------------------------------------------------------------- elementary math


def moments(
    x: Tensor,
    axis: int | Sequence[int] = -1,
    mask: Tensor | None = None,
    *,
    correction: int = 0,
) -> tuple[Tensor, Tensor]:
    """Mean and variance of ``x`` per feature, reducing every axis except ``axis``.

    ``correction=0`` gives the biased variance (divide by the count ``M``),
    ``correction=1`` the unbiased one (divide by ``M - 1``). With a ``mask``
    (bool, ``x.shape`` without the feature axes) only True positions count.
    The variance is computed in two passes (mean, then squared deviations),
    so data with a large offset keeps its precision. Results have the shape
    of the feature axes.

    >>> x = torch.tensor([[1.0, 10.0], [3.0, 30.0]])
    >>> mean, var = moments(x, axis=-1)
    >>> mean.tolist(), var.tolist()
    ([2.0, 20.0], [1.0, 100.0])
    """
    feat = normalize_axes(axis, x.ndim)
    x3, _ = as_acb(x, feat)
    fshape = tuple(x.shape[a] for a in feat)
    if mask is None:
        var, mean = torch.var_mean(x3, dim=(0, 2), correction=correction)
        return mean.view(fshape), var.view(fshape)
    w3 = _mask_as_acb(mask, x, feat, x3.dtype)
    mean, var, count = _masked_moments3(x3, w3)
    if correction:
        var = var * count / (count - correction)
    return mean.view(fshape), var.view(fshape)


def _masked_moments3(x3: Tensor, w3: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    # Exact count (no epsilon bias); a count of 0 gives mean 0 / var 0 here and
    # is handled by the caller (see batch_norm_train).
    count = w3.sum()
    denom = count.clamp(min=1)
    mean = (x3 * w3).sum((0, 2)) / denom
    var = (w3 * (x3 - mean[None, :, None]).square()).sum((0, 2)) / denom
    return mean, var, count


def normalize(
    x: Tensor,
    mean: Tensor,
    variance: Tensor,
    gamma: Tensor | None,
    beta: Tensor | None,
    epsilon: float,
) -> Tensor:
    """``gamma * (x - mean) / sqrt(variance + epsilon) + beta``, broadcasting per-feature tensors.

    The statistics and parameters must already broadcast against ``x``; ``None``
    means ``gamma = 1`` or ``beta = 0``.
    """
    inv = torch.rsqrt(variance + epsilon)
    if gamma is not None:
        inv = inv * gamma
    shift = -mean * inv
    if beta is not None:
        shift = shift + beta
    return x * inv + shift


def batch_norm_backward(
    dy: Tensor,
    x: Tensor,
    mean: Tensor,
    invstd: Tensor,
    gamma: Tensor | None,
    weights: Tensor | None = None,
    count: Tensor | int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Analytic gradients ``(dx, dgamma, dbeta)`` of training-mode batch norm on ``(A, C, B)`` views.

    ``mean`` and ``invstd`` have shape ``(C,)``. ``weights`` is an optional
    ``(A, 1, B)`` 0/1 mask: masked positions were normalized but did not enter
    the statistics, so for them ``dx = gamma * invstd * dy``. ``count`` is the
    number of values per feature that entered the statistics (default ``A*B``).
    With ``w`` the mask, ``M`` the count::

        dx_i = gamma*invstd * (dy_i - w_i/M * sum(dy) - w_i*xhat_i/M * sum(dy*xhat))
    """
    a, c, b = x.shape
    m3 = mean.view(1, c, 1)
    s3 = invstd.view(1, c, 1)
    sum_dy = dy.sum((0, 2))
    sum_dy_xhat = (dy * (x - m3)).sum((0, 2)) * invstd
    k = s3 if gamma is None else s3 * gamma.view(1, c, 1)
    if weights is None:
        m = a * b if count is None else count
        # dx = k*dy + alpha*x + const, folded into two fused passes
        alpha = -k * s3 * (sum_dy_xhat / m).view(1, c, 1)
        const = -k * (sum_dy / m).view(1, c, 1) - alpha * m3
        dx = torch.addcmul(const, dy, k).addcmul_(x, alpha)
    else:
        m = (weights.sum() if count is None else count)
        m = m.clamp(min=1) if isinstance(m, Tensor) else max(m, 1)
        xhat = (x - m3) * s3
        t = (sum_dy.view(1, c, 1) + xhat * sum_dy_xhat.view(1, c, 1)) / m
        dx = k * (dy - weights * t)
    return dx, sum_dy_xhat, sum_dy


class _BatchNormTrain(torch.autograd.Function):
    """Training-mode batch norm on an ``(A, C, B)`` view with the analytic backward.

    Returns ``(y, mean, var, count)``; the statistics are non-differentiable
    outputs so the caller can update moving statistics without recomputing them.
    ``fallback_mean``/``fallback_var`` (``(C,)`` or ``None``) replace the batch
    statistics of a fully masked batch, which has none.
    """

    @staticmethod
    def forward(ctx, x3, gamma, beta, weights, epsilon, fallback_mean, fallback_var):
        c = x3.shape[1]
        if weights is None:
            var, mean = torch.var_mean(x3, dim=(0, 2), correction=0)
            count = torch.tensor(x3.shape[0] * x3.shape[2], dtype=x3.dtype, device=x3.device)
            norm_mean, norm_var = mean, var
        else:
            mean, var, count = _masked_moments3(x3, weights)
            norm_mean, norm_var = mean, var
            if fallback_mean is not None:
                has_data = count > 0
                norm_mean = torch.where(has_data, mean, fallback_mean.to(mean.dtype))
                norm_var = torch.where(has_data, var, fallback_var.to(var.dtype))
        invstd = torch.rsqrt(norm_var + epsilon)
        scale = invstd if gamma is None else invstd * gamma
        shift = -norm_mean * scale
        if beta is not None:
            shift = shift + beta
        y = torch.addcmul(shift.view(1, c, 1), x3, scale.view(1, c, 1))
        ctx.save_for_backward(x3, gamma, norm_mean, invstd, weights, count)
        ctx.has_gamma = gamma is not None
        ctx.has_beta = beta is not None
        ctx.mark_non_differentiable(mean, var, count)
        return y, mean, var, count

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy, _dmean, _dvar, _dcount):
        x3, gamma, mean, invstd, weights, count = ctx.saved_tensors
        dx, dgamma, dbeta = batch_norm_backward(
            dy.contiguous(), x3, mean, invstd, gamma, weights, count if weights is not None else None
        )
        return (
            dx if ctx.needs_input_grad[0] else None,
            dgamma if ctx.has_gamma and ctx.needs_input_grad[1] else None,
            dbeta if ctx.has_beta and ctx.needs_input_grad[2] else None,
            None,
            None,
            None,
            None,
        )


# --------------------------------------------------------------------------- compiled kernels

# storage dtype -> dtype of the per-feature parameters and statistics the kernels take
_KERNEL_PARAM_DTYPE = {torch.float32: torch.float32, torch.float64: torch.float64, torch.bfloat16: torch.float32}
_ACT_CODES = _kernels.ACTIVATION_CODES


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _kernels_for(x: Tensor, channels: int, *per_feature: Tensor | None):
    """The compiled kernels if they apply to ``x`` and these per-feature tensors, else ``None``."""
    pdtype = _KERNEL_PARAM_DTYPE.get(x.dtype)
    if pdtype is None or not x.is_cpu or (type(x) is not Tensor and type(x) is not torch.nn.Parameter):
        return None  # tensor subclasses and wrappers hold no plain memory to hand to C
    for t in per_feature:
        if t is not None and (t.dtype is not pdtype or not t.is_cpu or t.numel() != channels or not t.is_contiguous()):
            return None
    return _loaded_kernels()


def _loaded_kernels():
    """The compiled kernels, or ``None`` when they are unavailable or a graph is being captured.

    Under tracing, ``torch.compile`` or a functorch transform (vmap, grad) the
    graph must see the PyTorch ops instead of a call into C.
    """
    if torch._C._get_tracing_state() or torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        return None
    state = _kernels._state
    return state["kernels"] if state["tried"] else _kernels.get()


def _kernel_route(x: Tensor, feat: tuple[int, ...], *per_feature: Tensor | None):
    """``(x_dense, dims, kernels)`` when the compiled kernels take this call, else ``None``.

    The cheap checks come first, so an input the kernels refuse is never copied.
    """
    if not x.numel():
        return None
    channels = x.shape[feat[0]] if len(feat) == 1 else _prod(x.shape[a] for a in feat)
    kernels = _kernels_for(x, channels, *per_feature)
    if kernels is None:
        return None
    xd, dims = _dense_acb(x, feat)
    return xd, dims, kernels


def _records_graph(*tensors: Tensor | None) -> bool:
    """Whether autograd would record this call (grad mode on and some input needing a gradient)."""
    if torch.is_grad_enabled():
        for t in tensors:
            if t is not None and t.requires_grad:
                return True
    return False


#: Activations that may follow the normalization (``BatchNormAct``); ReLU and leaky ReLU fuse into the kernels.
ACTIVATIONS = ("relu", "leaky_relu", "silu", "gelu", "sigmoid", "tanh", "identity")


def _activate(y: Tensor, act: str | None, slope: float) -> Tensor:
    """The activation applied by PyTorch ops (the path where the kernels do not run)."""
    if act is None or act == "identity":
        return y
    if act == "relu":
        return torch.relu(y)
    if act == "leaky_relu":
        return torch.nn.functional.leaky_relu(y, slope)
    if act == "silu":
        return torch.nn.functional.silu(y)
    if act == "gelu":
        return torch.nn.functional.gelu(y)
    if act == "sigmoid":
        return torch.sigmoid(y)
    if act == "tanh":
        return torch.tanh(y)
    raise ValueError(f"unknown activation {act!r}; expected one of {ACTIVATIONS}")


def _differentiable_train(x3: Tensor, gamma, beta, epsilon: float, act, slope) -> Tensor:
    """Training transform in plain differentiable torch ops (for gradients of gradients)."""
    c = x3.shape[1]
    var, mean = torch.var_mean(x3.float() if x3.dtype == torch.bfloat16 else x3, dim=(0, 2), correction=0)
    scale = torch.rsqrt(var + epsilon)
    if gamma is not None:
        scale = scale * gamma
    y = (x3 - mean.view(1, c, 1)) * scale.view(1, c, 1)
    if beta is not None:
        y = y + beta.view(1, c, 1)
    return _activate(y, act, slope).to(x3.dtype)


def _kernel_train_forward(x, gamma, beta, plan):
    """The kernels' training forward: ``(y, saved, var, act_code, threads)``; ``saved`` = mean ++ invstd."""
    _feat, (a, c, b), epsilon, moving, act, slope, stats, kernels = plan
    pdtype = _KERNEL_PARAM_DTYPE[x.dtype]
    y = torch.empty_like(x)
    saved = torch.empty(2 * c, dtype=pdtype)
    p_mean = saved.data_ptr()
    var = torch.empty(c, dtype=pdtype) if stats else None
    mm, mv, momentum, var_factor, counter = (None, None, 0.0, 1.0, None) if moving is None else moving
    code = _ACT_CODES[act]
    threads = _kernels.threads_for(a * c * b)
    rc = kernels.train_fwd[x.dtype](
        x.data_ptr(), y.data_ptr(), a, c, b, _ptr(gamma), _ptr(beta), epsilon, p_mean, _ptr(var),
        p_mean + c * saved.element_size(), _ptr(mm), _ptr(mv), momentum, var_factor, code, slope, threads,
        _ptr(counter),
    )
    if rc:
        raise MemoryError("bnlab kernel could not allocate its scratch memory")
    return y, saved, var, code, threads


#: Training batches of an ``(N, C)`` matrix with at most this many values take the small-batch path
#: (:func:`_small_rows_train`). Measured (2 threads, float32, forward+backward against the native
#: module at (64, 64), (32, 128) and (256, 256)): ``torch.batch_norm`` with its two scratch buffers,
#: called bare, 0.81-0.90x; bnlab's layer through the kernels' autograd Function 1.14-1.27x, through
#: this path with buffers allocated per call 1.10-1.18x, with the layer's kept buffers and the
#: checks written out 0.93-1.11x (benchmarks/bench_layer.py --quick, three runs; the rest is the
#: layer's own Python and the ctypes update, about 1 us each).
SMALL_ROWS_NUMEL = 1 << 16
#: The same path for (N, C, ...) batches in PyTorch's layouts with the features on axis 1: up to
#: this many values when contiguous (NCHW), twice as many in a channels-last format. Layer
#: forward+backward through the kernels' Function against the native module (2 threads, float32,
#: 20 paired rounds): NCHW 1.43x at 2,048 values, 1.17x at 16,384, 0.95-0.97x at 32,768, 0.74x at
#: 65,536; channels-last 1.21x, 1.19x, 1.13-1.14x at 32,768, 0.90x at 65,536. Below these sizes
#: the Function's fixed cost (about 25 us per step) outweighs the kernels' speed.
SMALL_PLANES_NUMEL = 1 << 14


def _small_layout(x: Tensor) -> bool:
    """Whether a batch of at most ``SMALL_ROWS_NUMEL`` values with the features on axis 1 takes the small-batch path."""
    if x.dim() == 2:
        return True
    n = x.numel()
    if n <= SMALL_PLANES_NUMEL and x.is_contiguous():
        return True
    return n <= 2 * SMALL_PLANES_NUMEL and _channels_last(x)


def _c_counter(counter: Tensor) -> bool:
    """Whether the kernels can increment ``counter`` (a batch counter) through its address: a CPU int64 scalar."""
    return counter.dtype is torch.int64 and counter.is_cpu and counter.numel() == 1


def _small_rows_train(x, gamma, beta, moving_mean, moving_variance, momentum, epsilon, unbiased, scratch, counter=None):
    """Training forward of a small batch that records a graph, or ``None`` when this path does not apply.

    The batch is ``(N, C)``, or ``(N, C, ...)`` in a layout PyTorch's op takes as it is
    (contiguous or channels-last; see :func:`_small_layout`), the features on axis 1.

    On layers this small the fixed cost of a Python ``autograd.Function`` (about
    20 us per step) outweighs the arithmetic, so the normalization and its
    gradients come from ``torch.batch_norm``, whose autograd node is C++. The
    moving statistics are updated by the kernels' ``update_moving``, with the
    same conventions and non-finite guard as the kernel path. PyTorch's op with
    momentum 1 writes ``0 * buffer + statistic`` into two per-feature buffers:
    the batch mean and the *unbiased* variance (``(N - 1) / N`` turns it back
    into the biased one). ``update_moving`` reads them and resets them to zero,
    so a caller may keep them for its next batch: ``scratch`` is a dict (a
    layer's own) holding them by dtype; without it they are allocated here.
    bfloat16 data goes with float32 parameters and statistics (PyTorch's
    mixed-type CPU kernel, which computes in float32 as the kernels do).

    ``counter``: the layer's ``num_batches_tracked`` (a CPU int64 scalar) or
    ``None``; ``update_moving`` increments it in the same call, which on a
    ``(64, 64)`` layer saves a PyTorch op of 1.5-3 us per step (see
    :func:`_batch_norm_train_update`). When this function returns ``None`` it
    has not touched it.

    Every call of a small layer pays for this function's checks, so they are
    written out here (the ones :func:`_kernels_for` makes, for the tensors that
    reach C) rather than shared; a layer keeps what they found for its next
    batch (``BatchNorm._small_plan``).
    """
    c = x.shape[1]
    n = x.numel() // c  # values per feature
    pdt = _KERNEL_PARAM_DTYPE.get(x.dtype)  # parameters and statistics: float32 for bfloat16 data
    if n < 2 or pdt is None or not x.is_cpu \
            or (type(x) is not Tensor and type(x) is not torch.nn.Parameter) or not _records_graph(x, gamma, beta):
        return None
    for t in (gamma, beta):
        if t is not None and (t.dtype is not pdt or t.numel() != c or t.dim() != 1):
            return None  # the general paths deal with (or explain) mixed dtypes and shapes
    if moving_mean is None:
        return torch.batch_norm(x, gamma, beta, None, None, True, 0.0, epsilon, False)
    for t in (moving_mean, moving_variance):
        if t.dtype is not pdt or not t.is_cpu or t.numel() != c or not t.is_contiguous():
            return None
    if counter is not None and not _c_counter(counter):
        return None
    kernels = _loaded_kernels()
    if kernels is None:
        return None
    pair = None if scratch is None else scratch.get(pdt)
    if pair is None or pair[0].numel() != c:
        pair = (torch.zeros(c, dtype=pdt), torch.zeros(c, dtype=pdt))
        if scratch is not None:
            scratch[pdt] = pair
    mean, var = pair
    y = torch.batch_norm(x, gamma, beta, mean, var, True, 1.0, epsilon, False)
    # the stored variance is the biased one times M/(M-1) when unbiased (M = n > 1 here)
    factor = (n - 1) / n if not unbiased else 1.0
    kernels.update_moving[pdt](
        moving_mean.data_ptr(), moving_variance.data_ptr(), mean.data_ptr(), var.data_ptr(), c, float(momentum), factor,
        None if counter is None else counter.data_ptr(),
    )
    return y


class _KernelTrain(torch.autograd.Function):
    """Training-mode batch norm (+ optional ReLU / leaky ReLU) in compiled code.

    ``apply(x, gamma, beta, plan)`` with ``plan = (feat, dims, epsilon, moving,
    act, slope, stats, kernels)`` (one tuple: every argument of ``apply`` costs
    time on small layers). ``x`` is dense and its memory is the ``(A, C, B)``
    array ``dims`` (see :func:`_acb_dims`); ``y`` and ``dx`` get ``x``'s shape
    and strides, so no view enters the autograd graph. ``moving`` is ``None``
    or ``(moving_mean, moving_var, momentum, var_factor, counter)``, updated in
    place inside the forward call (features with non-finite statistics keep
    their values; ``counter``, an int64 scalar or ``None``, counts the batch).
    With ``stats=True`` the batch mean and biased variance are returned too
    (non-differentiable).
    """

    @staticmethod
    def forward(ctx, x, gamma, beta, plan):
        y, saved, var, code, threads = _kernel_train_forward(x, gamma, beta, plan)
        c, stats = plan[1][1], plan[6]
        ctx.save_for_backward(x, gamma, beta)
        # mean and invstd (one buffer) live on ctx: an intermediate, not a saved input
        ctx.state = (saved, plan, code, threads)
        if stats:
            mean = saved[:c].clone()
            ctx.mark_non_differentiable(mean, var)
            return y, mean, var
        return y

    @staticmethod
    def backward(ctx, dy, *_):
        x, gamma, beta = ctx.saved_tensors
        saved, (feat, (a, c, b), epsilon, _moving, act, slope, _stats, kernels), code, threads = ctx.state
        need_x, need_g, need_b = ctx.needs_input_grad[:3]
        if torch.is_grad_enabled():
            # create_graph=True: differentiate a differentiable recomputation instead
            inputs = [t for t, need in zip((x, gamma, beta), (need_x, need_g, need_b)) if need]
            x3, restore = as_acb(x, feat)
            g = None if gamma is None else gamma.reshape(-1)
            bt = None if beta is None else beta.reshape(-1)
            y = restore(_differentiable_train(x3, g, bt, epsilon, act, slope))
            grads = iter(torch.autograd.grad(y, inputs, dy, create_graph=True, allow_unused=True))
            return next(grads) if need_x else None, next(grads) if need_g else None, next(grads) if need_b else None, None
        if dy.dtype != x.dtype or dy.stride() != x.stride():
            dy = torch.empty_like(x).copy_(dy)  # x's memory layout
        dx = torch.empty_like(x) if need_x else None
        dgamma = torch.empty_like(gamma) if need_g else None
        dbeta = torch.empty_like(beta) if need_b else None
        p_mean = saved.data_ptr()
        rc = kernels.train_bwd[x.dtype](
            x.data_ptr(), dy.data_ptr(), _ptr(dx), a, c, b, _ptr(gamma), _ptr(beta), p_mean,
            p_mean + c * saved.element_size(), _ptr(dgamma), _ptr(dbeta), code, slope, threads,
        )
        if rc:
            raise MemoryError("bnlab kernel could not allocate its scratch memory")
        return dx, dgamma, dbeta, None


def _kernel_inference(kernels, x, dims, gamma, beta, moving_mean, moving_var, epsilon, act, slope) -> Tensor:
    a, c, b = dims
    y = torch.empty_like(x)
    rc = kernels.infer[x.dtype](
        x.data_ptr(), y.data_ptr(), a, c, b, _ptr(gamma), _ptr(beta), moving_mean.data_ptr(),
        moving_var.data_ptr(), epsilon, _ACT_CODES[act], slope, _kernels.threads_for(x.numel()),
    )
    if rc:
        raise MemoryError("bnlab kernel could not allocate its scratch memory")
    return y


# --------------------------------------------------------------------------- moving statistics


def update_moving_stats_(
    moving_mean: Tensor,
    moving_variance: Tensor,
    batch_mean: Tensor,
    batch_variance: Tensor,
    momentum: float | Tensor,
    valid: Tensor | None = None,
) -> None:
    """In place: ``moving <- momentum * moving + (1 - momentum) * batch`` (Keras' convention).

    ``momentum`` is the weight of the OLD value (Keras; PyTorch's ``momentum`` is
    ``1 -`` this, see :mod:`bnlab.conventions`); it may be a 0-d tensor (the
    cumulative average uses ``1 - 1/num_batches``). A feature whose batch mean
    or variance is not finite, or where ``valid`` is False, keeps its moving
    values bit for bit. The check runs on the device, without a host sync.
    """
    with torch.no_grad():
        _update_(moving_mean, moving_variance, batch_mean.detach().reshape(-1), batch_variance.detach().reshape(-1), momentum, 1.0, valid)


def _update_numpy_(moving_mean, moving_variance, batch_mean, batch_var, momentum, var_factor) -> None:
    # NumPy views share memory with the buffers: writing them writes the buffers.
    mm = moving_mean.numpy()
    mv = moving_variance.numpy()
    if mm.ndim != 1:
        mm, mv = mm.reshape(-1), mv.reshape(-1)
    bm, bv = batch_mean.numpy(), batch_var.numpy()
    if bm.dtype != mm.dtype:
        bm, bv = bm.astype(mm.dtype), bv.astype(mm.dtype)
    new_weight = 1.0 - momentum
    new_mean = mm * momentum + bm * new_weight
    new_var = mv * momentum + bv * (new_weight * var_factor)
    # One test for both: the sum is finite iff both are, except when two finite values
    # overflow together (~3e38), which then skips the update too: never writes inf/NaN.
    ok = np.isfinite(new_mean + new_var)
    np.copyto(mm, new_mean, where=ok)
    np.copyto(mv, new_var, where=ok)


_WEIGHT_COLUMNS: dict = {}


def _weight_column(momentum: float, var_factor: float, dtype, device) -> Tensor:
    # [[1 - momentum], [(1 - momentum) * var_factor]], cached: building a tiny
    # tensor costs more than the arithmetic it feeds on small layers.
    key = (momentum, var_factor, dtype, device)
    col = _WEIGHT_COLUMNS.get(key)
    if col is None:
        if len(_WEIGHT_COLUMNS) > 256:
            _WEIGHT_COLUMNS.clear()
        w = 1.0 - momentum
        col = _WEIGHT_COLUMNS[key] = torch.tensor([[w], [w * var_factor]], dtype=dtype, device=device)
    return col


def _update_(moving_mean, moving_variance, batch_mean, batch_var, momentum, var_factor, valid=None, force_torch=False) -> None:
    # batch_mean, batch_var: detached (C,) statistics; the stored variance is
    # batch_var * var_factor. This runs on every training step; on small layers
    # the fixed cost of each op dominates, so CPU buffers are updated through
    # zero-copy NumPy views (about 1 us per op here, against 3-7 us for a torch op).
    if (
        not force_torch
        and valid is None
        and moving_mean.device.type == "cpu"
        and batch_mean.device.type == "cpu"
        and not isinstance(momentum, Tensor)
        and not isinstance(var_factor, Tensor)
        and moving_mean.dtype in (torch.float32, torch.float64)
        and moving_mean.is_contiguous()
        and moving_variance.is_contiguous()
        and not torch.jit.is_tracing()
        and not torch.compiler.is_compiling()
    ):
        _update_numpy_(moving_mean, moving_variance, batch_mean, batch_var, float(momentum), float(var_factor))
        return
    with torch.no_grad():
        _update_torch_(moving_mean, moving_variance, batch_mean, batch_var, momentum, var_factor, valid)


def _update_torch_(moving_mean, moving_variance, batch_mean, batch_var, momentum, var_factor, valid) -> None:
    stats = torch.stack((batch_mean, batch_var))
    old = torch.stack((moving_mean.view(-1), moving_variance.view(-1)))
    if stats.dtype != old.dtype:
        stats = stats.to(old.dtype)
    if isinstance(momentum, Tensor) or isinstance(var_factor, Tensor):
        col = torch.stack((torch.ones((), dtype=old.dtype, device=old.device), torch.as_tensor(var_factor, dtype=old.dtype, device=old.device)))
        col = (col * (1.0 - momentum)).view(2, 1)
    else:
        col = _weight_column(float(momentum), float(var_factor), old.dtype, old.device)
    new = torch.addcmul(old * momentum, stats, col)
    # Finite check per feature, mean and variance together: x * 0 is 0 for finite
    # x and NaN for inf/NaN (one kernel, where torch.isfinite takes several).
    zero = new * 0.0
    ok = (zero[0] + zero[1]) == 0
    if valid is not None:
        ok = ok & valid
    torch.where(ok, new, old, out=new)
    (moving_mean if moving_mean.dim() == 1 else moving_mean.view(-1)).copy_(new[0])
    (moving_variance if moving_variance.dim() == 1 else moving_variance.view(-1)).copy_(new[1])


# --------------------------------------------------------------------------- whole transforms


def _compute_dtype(x: Tensor) -> torch.dtype:
    if not x.is_floating_point():
        raise TypeError(f"batch normalization needs a floating-point input, got dtype {x.dtype}")
    return torch.float32 if x.dtype in _LOW_PRECISION else x.dtype


def _flat(t: Tensor | None, dtype) -> Tensor | None:
    if t is None or (t.dim() == 1 and t.dtype == dtype):
        return t
    return t.reshape(-1).to(dtype)


def _native_layout(x: Tensor) -> bool:
    """``x`` is ``(N, C, ...)`` laid out as PyTorch's batch-norm kernels expect (contiguous or channels-last)."""
    if x.is_contiguous():
        return True
    if x.dim() == 4:
        return x.is_contiguous(memory_format=torch.channels_last)
    if x.dim() == 5:
        return x.is_contiguous(memory_format=torch.channels_last_3d)
    return False


def _same(t: Tensor) -> Tensor:
    return t


def _native_view(x3: Tensor) -> Tensor:
    # PyTorch's kernels are fastest on (N, C) when there is no trailing extent.
    return x3.view(x3.shape[0], x3.shape[1]) if x3.shape[2] == 1 else x3


def batch_norm_inference(
    x: Tensor,
    moving_mean: Tensor,
    moving_variance: Tensor,
    gamma: Tensor | None = None,
    beta: Tensor | None = None,
    *,
    axis: int | Sequence[int] = -1,
    epsilon: float = 1e-3,
) -> Tensor:
    """Inference transform: ``gamma * (x - moving_mean) / sqrt(moving_variance + epsilon) + beta``.

    Parameters and statistics have the shape of the feature axes (or are flat).
    Half-precision inputs are computed in float32 and returned in their dtype.
    """
    return _inference(x, normalize_axes(axis, x.ndim), moving_mean, moving_variance, gamma, beta, epsilon)


def _inference_one_axis(x, axis, moving_mean, moving_var, gamma, beta, epsilon, act, slope):
    """The kernels' inference of ``x`` with one feature axis and no graph to record, or ``None``.

    The checks of :func:`_kernel_route` and :func:`_records_graph` written out
    for the layouts the kernels take without any view: contiguous, or
    channels-last with the features on axis 1. Inference of a 4 MB batch takes
    about 1.05 copy-times in the kernel, and the layer's Python around it adds
    up to a fifth again; this path takes 1.5-4 us off the 11-19 us of a small
    layer's call and about 2 us at 4-8 MB. ``None`` means "use the general
    route" (any other case, including the ones that raise).
    """
    pdt = _KERNEL_PARAM_DTYPE.get(x.dtype)
    if pdt is None or not x.is_cpu or (type(x) is not Tensor and type(x) is not torch.nn.Parameter):
        return None
    if torch.is_grad_enabled() and (x.requires_grad or (gamma is not None and gamma.requires_grad)
                                    or (beta is not None and beta.requires_grad)):
        return None
    n = x.numel()
    if not n:
        return None
    shape = x.shape
    c = shape[axis]
    for t in (moving_mean, moving_var, gamma, beta):
        if t is not None and (t.dtype is not pdt or not t.is_cpu or t.numel() != c or not t.is_contiguous()):
            return None
    if x.is_contiguous():
        a, b = math.prod(shape[:axis]), math.prod(shape[axis + 1:])
    elif axis == 1 and _channels_last(x):
        a, b = n // c, 1
    else:
        return None
    kernels = _loaded_kernels()
    if kernels is None:
        return None
    return _kernel_inference(kernels, x, (a, c, b), gamma, beta, moving_mean, moving_var, epsilon, act, slope)


def _inference(x, feat, moving_mean, moving_variance, gamma, beta, epsilon, act=None, slope=0.01):
    fused = act if act in _ACT_CODES else None
    if len(feat) == 1 and moving_mean is not None:
        y = _inference_one_axis(x, feat[0], moving_mean, moving_variance, gamma, beta, epsilon, fused, slope)
        if y is not None:
            return y if fused == act else _activate(y, act, slope)
    route = None if _records_graph(x, gamma, beta) else _kernel_route(x, feat, gamma, beta, moving_mean, moving_variance)
    if route is not None:  # (the kernels take floating-point inputs only)
        xd, dims, kernels = route
        y = _kernel_inference(kernels, xd, dims, gamma, beta, moving_mean, moving_variance, epsilon, fused, slope)
        return y if fused == act else _activate(y, act, slope)
    dtype = _compute_dtype(x)  # raises for integer inputs
    return _activate(_inference_torch(x, feat, moving_mean, moving_variance, gamma, beta, epsilon, dtype), act, slope)


def _inference_torch(x, feat, moving_mean, moving_variance, gamma, beta, epsilon, dtype):
    if feat == (1,) and x.dtype == dtype and (x.dim() == 2 or _native_layout(x)):  # PyTorch's own layout
        xn, restore = x, _same
    else:
        x3, restore = as_acb(x if x.dtype == dtype else x.to(dtype), feat)
        xn = _native_view(x3)
    y = torch.batch_norm(
        xn,
        _flat(gamma, dtype),
        _flat(beta, dtype),
        _flat(moving_mean, dtype),
        _flat(moving_variance, dtype),
        False,
        0.0,
        epsilon,
        False,
    )
    y = restore(y)
    return y if y.dtype == x.dtype else y.to(x.dtype)


def _train(x, feat, gamma, beta, epsilon, mask, fallback, impl, try_kernel=True):
    """Shared training transform. Returns ``(y, (mean, var), count, unbiased)``.

    ``mean`` and ``var`` are the ``(C,)`` batch statistics; ``var`` is the
    unbiased variance when ``unbiased`` is True (aten path) and the biased one
    otherwise; ``count`` is an int, or a 0-d tensor with a mask.
    """
    dtype = x.dtype
    if dtype in _LOW_PRECISION:
        dtype = torch.float32
    elif not x.is_floating_point():
        _compute_dtype(x)  # raises with the message
    if impl in ("auto", "kernel") and try_kernel:
        route = None if mask is not None else _kernel_route(x, feat, gamma, beta)
        if route is not None:
            xd, dims, kernels = route
            y, mean, var = _KernelTrain.apply(xd, gamma, beta, (feat, dims, epsilon, None, None, 0.01, True, kernels))
            return y, (mean, var), dims[0] * dims[2], False
        if impl == "kernel":
            _kernels_refused(x, mask)
    if feat == (1,) and x.dtype == dtype and (x.dim() == 2 or _native_layout(x)):
        # (N, C, ...) is PyTorch's own layout (in any dense memory format): no view on the aten path
        x3, restore, channels = None, _same, x.shape[1]
        per_feature = x.numel() // channels if channels else 0
    else:
        x3, restore = as_acb(x if x.dtype == dtype else x.to(dtype), feat)
        per_feature, channels = x3.shape[0] * x3.shape[2], x3.shape[1]
    # gamma/beta as flat tensors of the compute dtype (already so for 1-D float32 parameters)
    g = gamma if gamma is None or (gamma.dim() == 1 and gamma.dtype == dtype) else _flat(gamma, dtype)
    b = beta if beta is None or (beta.dim() == 1 and beta.dtype == dtype) else _flat(beta, dtype)
    if impl == "aten" or (impl == "auto" and mask is None and per_feature > 1):
        if mask is not None or per_feature < 2:
            raise ValueError(
                "impl='aten' needs no mask and at least 2 values per feature "
                f"(got mask={'set' if mask is not None else None}, {per_feature} values)"
            )
        # The native kernel writes the batch mean and the UNBIASED batch variance
        # into the running buffers; with momentum 1 and zero buffers these are the
        # batch statistics themselves.
        # Two separate buffers, not views of one: native's backward saves them, and autograd
        # handles saved views much more slowly (measured: +25 us per call on small layers).
        mean = torch.zeros(channels, dtype=dtype, device=x.device)
        var = torch.zeros(channels, dtype=dtype, device=x.device)
        xn = x if x3 is None else _native_view(x3)
        y = restore(torch.batch_norm(xn, g, b, mean, var, True, 1.0, epsilon, False))
        return (y if y.dtype == x.dtype else y.to(x.dtype)), (mean, var), per_feature, True
    if impl not in ("auto", "composite"):
        raise ValueError(f"impl must be 'auto', 'kernel', 'aten' or 'composite', got {impl!r}")
    if x3 is None:
        x3, restore = as_acb(x, feat)
    weights = None if mask is None else _mask_as_acb(mask, x, feat, dtype)
    fb_mean, fb_var = (None, None) if fallback is None else (_flat(fallback[0], dtype), _flat(fallback[1], dtype))
    y3, mean, var, count = _BatchNormTrain.apply(x3, g, b, weights, epsilon, fb_mean, fb_var)
    return restore(y3).to(x.dtype), (mean, var), (count if mask is not None else per_feature), False


def batch_norm_train(
    x: Tensor,
    gamma: Tensor | None = None,
    beta: Tensor | None = None,
    *,
    axis: int | Sequence[int] = -1,
    epsilon: float = 1e-3,
    mask: Tensor | None = None,
    fallback: tuple[Tensor, Tensor] | None = None,
    impl: str = "auto",
) -> tuple[Tensor, Tensor, Tensor, Tensor | int]:
    """Training transform with batch statistics; returns ``(y, mean, biased_var, count)``.

    Gradients flow through the batch mean and variance. ``mean`` and
    ``biased_var`` are flat ``(C,)`` statistics in the compute dtype (float32 for
    half inputs), ``count`` the number of values per feature that entered them
    (an int, or a 0-d tensor with a mask). ``fallback`` = ``(mean, var)`` is used
    to normalize a fully masked batch, which has no statistics of its own.

    ``impl``: ``"kernel"`` (bnlab's compiled CPU kernels; float32/float64/bfloat16
    CPU tensors, no mask), ``"aten"`` (PyTorch's native kernel on the zero-copy
    view; no mask, at least 2 values per feature), ``"composite"`` (bnlab's
    autograd Function of torch ops) or ``"auto"`` (the first that applies).
    """
    feat = normalize_axes(axis, x.ndim)
    y, (mean, var), count, unbiased = _train(x, feat, gamma, beta, epsilon, mask, fallback, impl)
    return y, mean, (var * ((count - 1) / count) if unbiased else var), count


def batch_norm(
    x: Tensor,
    moving_mean: Tensor | None,
    moving_variance: Tensor | None,
    gamma: Tensor | None = None,
    beta: Tensor | None = None,
    *,
    training: bool,
    axis: int | Sequence[int] = -1,
    momentum: float | Tensor = 0.99,
    epsilon: float = 1e-3,
    mask: Tensor | None = None,
    unbiased_moving_variance: bool = False,
    impl: str = "auto",
) -> Tensor:
    """Batch normalization of ``x`` over every axis except ``axis`` (Keras conventions).

    Training (``training=True``)::

        y = gamma * (x - mean_B) / sqrt(var_B + epsilon) + beta
        moving_mean     <- momentum * moving_mean     + (1 - momentum) * mean_B
        moving_variance <- momentum * moving_variance + (1 - momentum) * var_B

    with ``mean_B``/``var_B`` the batch mean and biased variance (over True
    positions of ``mask`` only). ``unbiased_moving_variance=True`` stores
    ``var_B * M/(M-1)`` instead (PyTorch, and the paper's Algorithm 2).
    The moving statistics are updated in place when given; a feature whose
    statistics are not finite, an empty batch and a fully masked batch leave
    them untouched. Inference (``training=False``) uses the moving statistics.

    ``momentum`` is the weight of the OLD value (Keras: 0.99; PyTorch's 0.1
    means 0.9 here). Shapes: statistics and parameters have the sizes of the
    feature axes, in increasing axis order.

    >>> x = torch.randn(32, 4)
    >>> mm, mv = torch.zeros(4), torch.ones(4)
    >>> y = batch_norm(x, mm, mv, training=True)
    >>> bool(torch.allclose(y.mean(0), torch.zeros(4), atol=1e-5))
    True
    """
    feat = normalize_axes(axis, x.ndim)
    if not training:
        if moving_mean is None or moving_variance is None:
            raise ValueError("inference needs moving_mean and moving_variance")
        return _inference(x, feat, moving_mean, moving_variance, gamma, beta, epsilon)
    return _batch_norm_train_update(
        x, feat, moving_mean, moving_variance, gamma, beta, momentum, epsilon, mask, unbiased_moving_variance, impl
    )


def _batch_norm_train_update(x, feat, moving_mean, moving_variance, gamma, beta, momentum, epsilon, mask,
                             unbiased_moving_variance, impl="auto", act=None, slope=0.01, scratch=None, counter=None):
    """Training transform (+ ``act``) plus the in-place moving-statistics update (``feat`` already normalized).

    ``scratch``: a dict the caller keeps between calls (see :func:`_small_rows_train`).
    ``counter``: a batch counter (the layer's ``num_batches_tracked``) that this call
    increments once, or ``None``. The kernels count in C in the call that updates
    the moving statistics (PyTorch's ``add_`` is a visible part of a ``(64, 64)``
    layer's step, and costs a few us after a multi-MB kernel has swept the caches);
    the other paths count with ``add_``.
    """
    if impl == "auto" and feat == (1,) and mask is None and 0 < x.numel() <= SMALL_ROWS_NUMEL and _small_layout(x):
        y = _small_rows_train(x, gamma, beta, moving_mean, moving_variance, momentum, epsilon,
                              unbiased_moving_variance, scratch, counter)
        if y is not None:
            return _activate(y, act, slope)
    if x.numel() == 0 and moving_mean is not None:
        if counter is not None:
            counter.add_(1)
        # An empty batch has no statistics: normalize (nothing) with the moving ones.
        return _inference(x, feat, moving_mean, moving_variance, gamma, beta, epsilon, act, slope)
    if impl in ("auto", "kernel"):
        route = None if mask is not None else _kernel_route(x, feat, gamma, beta, moving_mean, moving_variance)
        if route is not None:
            xd, dims, kernels = route
            if counter is not None and not _c_counter(counter):
                counter.add_(1)  # not a counter C can increment: counted here
                counter = None
            # the kernel call increments counter (when there is one)
            moving = _moving_plan(moving_mean, moving_variance, momentum, dims[0] * dims[2], unbiased_moving_variance,
                                  counter)
            fused = act if act in _ACT_CODES else None  # SiLU, GELU, ...: PyTorch's vectorized ops after
            plan = (feat, dims, epsilon, moving, fused, slope, False, kernels)
            if _records_graph(xd, gamma, beta):
                y = _KernelTrain.apply(xd, gamma, beta, plan)
            else:  # no graph to record (no_grad, recalibration, frozen weights): skip autograd's machinery
                y = _kernel_train_forward(xd, gamma, beta, plan)[0]
            return y if fused == act else _activate(y, act, slope)
        if impl == "kernel":
            _kernels_refused(x, mask)
    if counter is not None:
        counter.add_(1)
    return _activate(
        _train_update_torch(x, feat, moving_mean, moving_variance, gamma, beta, momentum, epsilon, mask,
                            unbiased_moving_variance, impl),
        act, slope,
    )


def _moving_plan(moving_mean, moving_variance, momentum, count: int, unbiased: bool, counter=None):
    """``(moving_mean, moving_var, momentum, var_factor, counter)`` for the kernels, or ``None`` without moving statistics.

    The stored variance is the biased batch variance times ``var_factor``; one value
    per feature has no unbiased variance (factor NaN: the kernels skip the update).
    ``counter``: a CPU int64 scalar the kernel call increments, or ``None``.
    """
    if moving_mean is None:
        return None
    factor = (count / (count - 1) if count > 1 else math.nan) if unbiased else 1.0
    return moving_mean, moving_variance, float(momentum), factor, counter


def _kernels_refused(x: Tensor, mask) -> None:
    reason = _kernels.status()["reason"] if _kernels.get() is None else (
        f"they take float32/float64/bfloat16 CPU tensors with per-feature parameters and statistics of the "
        f"matching dtype and no mask (got {x.dtype} on {x.device}, mask={'set' if mask is not None else None})"
    )
    raise ValueError(f"impl='kernel' cannot run here: {reason}")


def _train_update_torch(x, feat, moving_mean, moving_variance, gamma, beta, momentum, epsilon, mask, unbiased_moving_variance, impl):
    fallback = None if moving_mean is None else (moving_mean, moving_variance)
    # the kernels were already asked (and declined) by the caller
    y, (mean, var), count, unbiased = _train(x, feat, gamma, beta, epsilon, mask, fallback, impl, try_kernel=False)
    if moving_mean is None:
        return y
    valid = None
    if isinstance(count, Tensor):  # masked: skip when nothing (or too little) entered
        valid = count > (1 if unbiased_moving_variance else 0)
        factor = count / (count - 1).clamp(min=1) if unbiased_moving_variance else 1.0
    elif unbiased == unbiased_moving_variance:
        factor = 1.0
    elif unbiased:  # have unbiased (aten), want biased
        factor = (count - 1) / count
    else:  # have biased, want unbiased; a single value has none (0/0 -> skipped)
        factor = count / (count - 1) if count > 1 else float("nan")
    _update_(moving_mean, moving_variance, mean, var, momentum, factor, valid)
    return y


# --------------------------------------------------------------------------- batch renormalization


def renorm_correction(
    mean: Tensor,
    variance: Tensor,
    renorm_mean: Tensor,
    renorm_stddev: Tensor,
    epsilon: float,
    rmin=None,
    rmax=None,
    dmax=None,
) -> tuple[Tensor, Tensor]:
    """Batch renormalization's correction ``(r, d)`` (Ioffe, 2017, arXiv:1702.03275, Algorithm 1).

    With Keras 3's conventions: ``sigma_B = sqrt(var_B + epsilon)``, the renorm
    standard deviation floored at ``sqrt(epsilon)``, ``r = sigma_B / sigma``,
    ``d = (mean_B - mu) / sigma``, ``r`` clipped to ``[rmin, rmax]`` and ``d`` to
    ``[-dmax, dmax]`` where given (floats or 0-d tensors). Both are returned
    without gradient: the paper treats them as constants.
    """
    with torch.no_grad():
        stddev = torch.sqrt(variance + epsilon)
        sigma = torch.clamp(renorm_stddev.to(stddev.dtype), min=math.sqrt(epsilon))
        r = stddev / sigma
        d = (mean - renorm_mean.to(mean.dtype)) / sigma
        if rmin is not None:
            r = torch.maximum(r, torch.as_tensor(rmin, dtype=r.dtype, device=r.device))
        if rmax is not None:
            r = torch.minimum(r, torch.as_tensor(rmax, dtype=r.dtype, device=r.device))
        if dmax is not None:
            dm = torch.as_tensor(dmax, dtype=d.dtype, device=d.device)
            d = torch.maximum(torch.minimum(d, dm), -dm)
    return r, d


def update_renorm_stats_(
    moving_mean, moving_variance, moving_stddev, renorm_mean, renorm_stddev,
    mean, variance, epsilon: float, momentum, renorm_momentum,
) -> None:
    """In place, Keras 3's renorm bookkeeping, skipping features with non-finite statistics.

    ``renorm_* <- renorm_momentum * renorm_* + (1 - renorm_momentum) * batch``
    (mean and ``sqrt(var + epsilon)``); the same with ``momentum`` for the
    inference statistics, tracked as a standard deviation, from which
    ``moving_variance = relu(moving_stddev**2 - epsilon)``.
    """
    with torch.no_grad():
        mean = mean.reshape(moving_mean.shape).to(moving_mean.dtype)
        stddev = torch.sqrt(variance.reshape(moving_mean.shape).to(moving_mean.dtype) + epsilon)
        ok = torch.isfinite(mean) & torch.isfinite(stddev)
        new = {
            renorm_mean: renorm_mean * renorm_momentum + mean * (1.0 - renorm_momentum),
            renorm_stddev: renorm_stddev * renorm_momentum + stddev * (1.0 - renorm_momentum),
            moving_mean: moving_mean * momentum + mean * (1.0 - momentum),
        }
        new_sd = moving_stddev * momentum + stddev * (1.0 - momentum)
        new[moving_stddev] = new_sd
        new[moving_variance] = torch.relu(new_sd * new_sd - epsilon)
        for buf, value in new.items():
            buf.copy_(torch.where(ok, value, buf))


def renorm_ramp(*, start: int = 5000, rmax_steps: int = 40000, dmax_steps: int = 25000, rmax: float = 3.0, dmax: float = 5.0) -> dict:
    """The clipping schedule of the Batch Renormalization paper (Ioffe, 2017, section 4).

    ``rmax`` stays 1 and ``dmax`` 0 (plain batch norm) for ``start`` steps, then
    both grow linearly to ``rmax`` at step ``rmax_steps`` and ``dmax`` at step
    ``dmax_steps``; ``rmin = 1 / rmax``. Use as ``renorm_clipping=renorm_ramp()``:
    each value is a function of the training step (a tensor, so no host sync).
    """

    def ramp(step, end, lo, hi):
        frac = ((step.to(torch.float64) - start) / max(end - start, 1)).clamp(0.0, 1.0)
        return lo + (hi - lo) * frac

    return {
        "rmax": lambda step: ramp(step, rmax_steps, 1.0, rmax),
        "rmin": lambda step: 1.0 / ramp(step, rmax_steps, 1.0, rmax),
        "dmax": lambda step: ramp(step, dmax_steps, 0.0, dmax),
    }


# --------------------------------------------------------------------------- ghost batch normalization


def ghost_batch_norm_train(
    x: Tensor,
    gamma: Tensor | None,
    beta: Tensor | None,
    *,
    axis: int | Sequence[int] = -1,
    epsilon: float = 1e-3,
    virtual_batch_size: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """Ghost batch normalization (Hoffer et al., 2017, arXiv:1705.08741) with tf-keras' grouping.

    The batch of ``N`` samples (axis 0) is split into ``G = ceil(N / k)``
    virtual batches, ``k = virtual_batch_size``; sample ``n`` belongs to group
    ``n mod G``, which is tf-keras' reshape to ``(k, -1, ...)`` when ``k``
    divides ``N``. When it does not, the groups hold ``k`` or ``k - 1``
    samples (tf-keras raises instead). Each group is normalized with its own
    mean and biased variance (over the group's samples and every other
    non-feature axis). Returns ``(y, mean, variance)``: the unweighted average
    over groups of their statistics, which tf-keras feeds to the moving
    averages. Computed for all groups at once (``index_add``), differentiable.
    """
    if virtual_batch_size < 1:
        raise ValueError(f"virtual_batch_size must be >= 1, got {virtual_batch_size}")
    feat = normalize_axes(axis, x.ndim)
    if 0 in feat:
        raise ValueError("ghost batch normalization groups samples along axis 0, which cannot be a feature axis")
    dtype = _compute_dtype(x)
    n = x.shape[0]
    groups = max(1, math.ceil(n / virtual_batch_size))
    x3, restore = as_acb(x if x.dtype == dtype else x.to(dtype), feat)
    a, c, b = x3.shape
    per_sample = a // max(n, 1)  # rows of the (A, C, B) view that belong to one sample
    # memory order may put axis 0 anywhere before the feature block; recover each row's sample
    rows = torch.arange(a, device=x.device)
    sample = _row_sample(x, feat, rows, n, per_sample)
    gid = sample % groups
    counts = torch.bincount(gid, minlength=groups).to(dtype) * b  # values per feature in each group
    s1 = x3.new_zeros(groups, c).index_add(0, gid, x3.sum(2))
    mean_g = s1 / counts.unsqueeze(1)
    xc = x3 - mean_g[gid].unsqueeze(2)
    s2 = x3.new_zeros(groups, c).index_add(0, gid, xc.square().sum(2))
    var_g = s2 / counts.unsqueeze(1)
    scale = torch.rsqrt(var_g + epsilon)[gid].unsqueeze(2)
    y = xc * scale
    if gamma is not None:
        y = y * gamma.reshape(1, c, 1).to(dtype)
    if beta is not None:
        y = y + beta.reshape(1, c, 1).to(dtype)
    y = restore(y.contiguous())
    return y.to(x.dtype), mean_g.detach().mean(0), var_g.detach().mean(0)


def _row_sample(x: Tensor, feat, rows: Tensor, n: int, per_sample: int) -> Tensor:
    # The (A, C, B) view orders its A rows by the memory order of the non-feature axes that
    # come before the feature block. In the common layouts axis 0 is outermost, so row r
    # belongs to sample r // per_sample; otherwise, find axis 0's stride among those rows.
    perm = _memory_perm(x, feat)
    order = list(range(x.ndim)) if perm is None else perm
    lead = order[: order.index(feat[0])] if perm is not None else [d for d in range(feat[0])]
    if not lead or lead[0] == 0:
        return rows // max(per_sample, 1)
    sizes = [x.shape[d] for d in lead]
    stride = math.prod(sizes[lead.index(0) + 1 :])
    return (rows // stride) % n


# --------------------------------------------------------------------------- synchronized batch normalization


def _merge_moments(stats: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Merge per-rank ``(count, mean, M2)`` rows (``stats``: ``(ranks, 3, C)``, float64) exactly.

    Chan, Golub & LeVeque's pairwise update: ranks with a count of 0 contribute
    nothing. Returns the total count (per feature), mean and M2.
    """
    n = torch.zeros_like(stats[0, 0])
    mean = torch.zeros_like(stats[0, 1])
    m2 = torch.zeros_like(stats[0, 2])
    for nb, mb, m2b in stats:
        total = n + nb
        safe = total.clamp(min=1)
        delta = mb - mean
        mean = mean + delta * (nb / safe)
        m2 = m2 + m2b + delta * delta * (n * nb / safe)
        n = total
    return n, mean, m2


class _SyncBatchNorm(torch.autograd.Function):
    """Training-mode BN over the union of all processes' batches (``torch.distributed``)."""

    @staticmethod
    def forward(ctx, x3, gamma, beta, epsilon, group):
        import torch.distributed as dist

        a, c, b = x3.shape
        count = a * b
        x64 = x3.detach().to(torch.float64)
        if count:
            mean_l = x64.mean((0, 2))
            m2_l = (x64 - mean_l.view(1, c, 1)).square().sum((0, 2))
        else:
            mean_l = x64.new_zeros(c)
            m2_l = x64.new_zeros(c)
        local = torch.stack((torch.full_like(mean_l, count), mean_l, m2_l))
        gathered = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
        dist.all_gather(gathered, local, group=group)
        n, mean64, m2 = _merge_moments(torch.stack(gathered))
        var64 = m2 / n.clamp(min=1)
        mean = mean64.to(x3.dtype)
        invstd = torch.rsqrt(var64 + epsilon).to(x3.dtype)
        scale = invstd if gamma is None else invstd * gamma
        shift = -mean * scale if beta is None else beta - mean * scale
        y = x3 * scale.view(1, c, 1) + shift.view(1, c, 1)
        ctx.save_for_backward(x3, gamma, mean, invstd)
        ctx.total = float(n[0]) if n.numel() else 0.0
        ctx.group = group
        ctx.has_beta = beta is not None
        stats_mean, stats_var = mean64.to(x3.dtype), var64.to(x3.dtype)
        total = n[0] if n.numel() else n.new_zeros(())
        ctx.mark_non_differentiable(stats_mean, stats_var, total)
        return y, stats_mean, stats_var, total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy, _dm, _dv, _dn):
        import torch.distributed as dist

        x3, gamma, mean, invstd = ctx.saved_tensors
        c = x3.shape[1]
        dy = dy.contiguous()
        sum_dy = dy.sum((0, 2))
        sum_dy_xmu = (dy * (x3 - mean.view(1, c, 1))).sum((0, 2))
        both = torch.stack((sum_dy, sum_dy_xmu))
        dist.all_reduce(both, group=ctx.group)  # the gradient of the global statistics needs global sums
        g_sum_dy, g_sum_dy_xmu = both
        total = max(ctx.total, 1.0)
        k = invstd if gamma is None else invstd * gamma
        xhat_coef = g_sum_dy_xmu * invstd * invstd / total
        dx = (dy - (g_sum_dy / total).view(1, c, 1) - (x3 - mean.view(1, c, 1)) * xhat_coef.view(1, c, 1)) * k.view(1, c, 1)
        dgamma = (sum_dy_xmu * invstd) if gamma is not None else None  # local: DDP reduces parameter gradients
        dbeta = sum_dy if ctx.has_beta else None
        return dx, dgamma, dbeta, None, None


def sync_batch_norm_train(x: Tensor, gamma, beta, *, axis=-1, epsilon=1e-3, group=None):
    """Training transform with statistics over every process of ``group``; returns ``(y, mean, var, count)``.

    Equal, up to float rounding, to one process normalizing the concatenation
    of all processes' batches: the merge of per-process counts, means and
    sums of squared deviations is exact (in float64), and the backward pass
    all-reduces the two per-feature sums the gradient needs. A process with an
    empty batch still takes part. Gradients of gamma and beta are the local
    contributions (as ``torch.nn.SyncBatchNorm``'s; DDP then reduces them).
    """
    feat = normalize_axes(axis, x.ndim)
    dtype = _compute_dtype(x)
    x3, restore = as_acb(x if x.dtype == dtype else x.to(dtype), feat)
    g, b = _flat(gamma, dtype), _flat(beta, dtype)
    y3, mean, var, count = _SyncBatchNorm.apply(x3.contiguous(), g, b, epsilon, group)
    return restore(y3).to(x.dtype), mean, var, count
