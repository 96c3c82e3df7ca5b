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

Two rules are written once here and used by every path: the moving-average
update (:func:`update_moving_stats_`; its C twin in the kernels takes the same
momentum and factor) and the variance correction (:func:`variance_factor`:
Keras averages the biased batch variance, PyTorch and the paper's Algorithm 2
the unbiased one, ``var * M / (M - 1)``).

How a call is computed (bnlab's compiled CPU kernels, PyTorch's
``torch.batch_norm``, or bnlab's composite autograd Function) is chosen per
call by :mod:`bnlab._dispatch` from the input's metadata; every
implementation is tested against :mod:`bnlab.reference` and against the
others. ``impl=`` on the training functions forces one of them.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from . import _dispatch
from ._kernels import ACTIVATION_CODES as _ACT_CODES
from ._kernels import ops as _ops

_np_isfinite = np.isfinite

__all__ = [
    "ACTIVATIONS",
    "apply_activation",
    "normalize_axes",
    "as_acb",
    "moments",
    "normalize",
    "batch_norm",
    "batch_norm_train",
    "batch_norm_inference",
    "batch_norm_backward",
    "variance_factor",
    "update_moving_stats_",
    "renorm_correction",
    "update_renorm_stats_",
    "renorm_ramp",
    "ghost_batch_norm_train",
    "sync_batch_norm_train",
]

_LOW_PRECISION = (torch.float16, torch.bfloat16)

ACTIVATIONS = ("relu", "leaky_relu", "silu", "gelu", "sigmoid", "tanh", "identity")
"""Activations that may follow the normalization (``activation=``); ReLU and leaky ReLU fuse into the kernels."""


# --------------------------------------------------------------------------- axes and views

_AXES: dict = {}


def normalize_axes(axis: int | Sequence[int], ndim: int) -> tuple[int, ...]:
    """The feature axes as sorted non-negative ints; ``ValueError`` if any is outside ``ndim``.

    >>> normalize_axes(-1, 4)
    (3,)
    >>> normalize_axes([1, -1], 4)
    (1, 3)
    """
    key = (axis if isinstance(axis, int) else tuple(axis), ndim)
    axes = _AXES.get(key)
    if axes is None:
        axes = _normalize_axes(key[0], ndim)
        if len(_AXES) < 1024:
            _AXES[key] = axes
    return axes


def _normalize_axes(axis, ndim: int) -> tuple[int, ...]:
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    if not axes:
        raise ValueError("axis must name at least one feature axis, got an empty list")
    out = []
    for a in axes:
        if not isinstance(a, int) or isinstance(a, bool):
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
    return t.reshape(math.prod(s[:lo]), math.prod(s[lo:hi]), math.prod(s[hi:]))  # a view unless t is expanded


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
        x3 = x.view(math.prod(shape[:lo]), math.prod(shape[lo:hi + 1]), math.prod(shape[hi + 1:]))
        return x3, lambda y3: y3 if y3.shape == shape else y3.view(shape)
    perm = _dispatch.memory_perm(x, feature_axes)
    x3 = _to_acb(x, perm, feature_axes)
    pshape = [x.shape[d] for d in perm]
    inverse = [0] * len(perm)
    for i, d in enumerate(perm):
        inverse[d] = i
    return x3, lambda y3: y3.view(pshape).permute(inverse)


def _mask_as_acb(mask: Tensor, x: Tensor, feature_axes: tuple[int, ...]) -> Tensor:
    """The mask as a bool ``(A, 1, B)`` tensor laid out like ``x``'s ``(A, C, B)`` view.

    ``mask`` is a bool tensor of ``x.shape`` without the feature axes, or of
    the same rank with size-1 axes that broadcast, e.g. ``(N, T)`` or
    ``(N, 1)`` for an ``(N, T, C)`` input with ``axis=-1`` (Keras' masks have
    the input's rank minus one). A shorter shape is refused rather than
    aligned to the right: an ``(N,)`` mask for an ``(N, N, C)`` input would
    otherwise silently mask the wrong axis.
    """
    target = tuple(s for d, s in enumerate(x.shape) if d not in feature_axes)
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        got = mask.dtype if isinstance(mask, Tensor) else type(mask).__name__
        raise TypeError(f"mask must be a bool tensor, got {got}")
    fits = mask.dim() == len(target) and all(m in (1, t) for m, t in zip(mask.shape, target))
    if not fits:
        raise ValueError(
            f"mask must have the input's shape without the feature axes {feature_axes}: "
            f"expected {target}, got {tuple(mask.shape)} (size-1 axes broadcast)"
        )
    m = mask.to(device=x.device).expand(target)
    for a in feature_axes:
        m = m.unsqueeze(a)
    return _to_acb(m, _dispatch.memory_perm(x, feature_axes), feature_axes)


def _compute_dtype(x: Tensor) -> torch.dtype:
    if not x.is_floating_point():
        raise TypeError(f"batch normalization needs a floating-point input, got dtype {x.dtype}")
    return torch.float32 if x.dtype in _LOW_PRECISION else x.dtype


def _flat(t: Tensor | None, dtype) -> Tensor | None:
    if t is None or (t.dim() == 1 and t.dtype == dtype):
        return t
    return t.reshape(-1).to(dtype)


def _dense(t: Tensor | None, dtype) -> Tensor | None:
    """``t`` as a contiguous vector of ``dtype`` for PyTorch's op (itself when it already is one; a copy keeps the
    autograd link to ``t``)."""
    if t is None or (t.ndim == 1 and t.dtype is dtype and t.is_contiguous()):
        return t
    return t.reshape(-1).to(dtype).contiguous()


def apply_activation(y: Tensor, activation: str | None, negative_slope: float = 0.01) -> Tensor:
    """``activation`` (one of :data:`ACTIVATIONS`, or ``None``) applied to ``y`` with PyTorch ops."""
    return _activate(y, activation, negative_slope)


def _activate(y: Tensor, act: str | None, slope: float) -> Tensor:
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
    (bool, broadcastable to ``x.shape`` without the feature axes) only True
    positions count, whatever the others hold. The variance is computed in two
    passes (mean, then squared deviations), so data with a large offset keeps
    its precision. Results have the shape of the feature axes.

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
    mean, var, count = _masked_moments3(x3, _mask_as_acb(mask, x, feat))
    if correction:
        var = var * count / (count - correction)
    return mean.view(fshape), var.view(fshape)


def _masked_moments3(x3: Tensor, m3: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Mean, biased variance and count over the True positions of the bool ``(A, 1, B)`` mask.

    The excluded positions are selected away, not multiplied by zero, so NaN or
    inf there never reaches the statistics. A count of 0 gives mean 0 / var 0
    (the caller decides what that means).
    """
    count = m3.sum().to(x3.dtype) * 1  # every feature sees the same positions
    denom = count.clamp(min=1)
    zero = x3.new_zeros(())
    mean = torch.where(m3, x3, zero).sum((0, 2)) / denom
    var = torch.where(m3, (x3 - mean[None, :, None]).square(), zero).sum((0, 2)) / denom
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


def _train_invstd(var: Tensor, epsilon: float) -> Tensor:
    """``1 / sqrt(var + epsilon)`` for a training batch, and 0 where the batch variance and ``epsilon`` are both 0.

    The one exception to the formula, PyTorch's convention in its training op (``InvStd`` in ATen's
    batch-norm kernels): a constant feature with ``epsilon=0`` gives ``y = beta`` and zero gradients instead
    of ``0 * inf = NaN``. Every training route follows it (the compiled kernels too), so they agree.
    """
    inv = torch.rsqrt(var + epsilon)
    if epsilon == 0:
        inv = torch.where(var == 0, torch.zeros_like(inv), inv)
    return inv


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
    ``(A, 1, B)`` bool mask: masked positions were normalized but did not enter
    the statistics, so for them ``dx = gamma * invstd * dy``. ``count`` is the
    number of values per feature that entered the statistics (default ``A*B``).
    With ``w`` the mask, ``M`` the count::

        dx_i = gamma*invstd * (dy_i - w_i/M * sum(dy) - w_i*xhat_i/M * sum(dy*xhat))

    With a mask, a position whose ``dy`` is exactly 0 adds nothing to the sums,
    even where its input is not finite (padding the loss ignores).
    """
    a, c, b = x.shape
    m3 = mean.view(1, c, 1)
    s3 = invstd.view(1, c, 1)
    sum_dy = dy.sum((0, 2))
    k = s3 if gamma is None else s3 * gamma.view(1, c, 1)
    if weights is None:
        sum_dy_xhat = (dy * (x - m3)).sum((0, 2)) * invstd
        m = a * b if count is None else count
        # dx = k*dy + alpha*x + const, folded into two fused passes
        alpha = -k * s3 * (sum_dy_xhat / m).view(1, c, 1)
        const = -k * (sum_dy / m).view(1, c, 1) - alpha * m3
        dx = torch.addcmul(const, dy, k).addcmul_(x, alpha)
        return dx, sum_dy_xhat, sum_dy
    weights = weights.bool()
    sum_dy_xhat = torch.where(dy != 0, dy * (x - m3), dy.new_zeros(())).sum((0, 2)) * invstd
    m = weights.sum() if count is None else count
    m = m.clamp(min=1) if isinstance(m, Tensor) else max(m, 1)
    xhat = (x - m3) * s3
    t = (sum_dy.view(1, c, 1) + xhat * sum_dy_xhat.view(1, c, 1)) / m
    dx = k * torch.where(weights, dy - t, dy)
    return dx, sum_dy_xhat, sum_dy


class _BatchNormTrain(torch.autograd.Function):
    """Training-mode batch norm on an ``(A, C, B)`` view with the analytic backward.

    Returns ``(y, mean, var, count)``; the statistics are non-differentiable
    outputs so the caller can update moving statistics without recomputing them.
    ``mask3`` is ``None`` or a bool ``(A, 1, B)`` mask. ``fallback_mean``/
    ``fallback_var`` (``(C,)`` or ``None``) normalize a fully masked batch,
    which has no statistics of its own.
    """

    @staticmethod
    def forward(ctx, x3, gamma, beta, mask3, epsilon, fallback_mean, fallback_var):
        c = x3.shape[1]
        if mask3 is None:
            var, mean = torch.var_mean(x3, dim=(0, 2), correction=0)
            count = torch.tensor(x3.shape[0] * x3.shape[2], dtype=x3.dtype, device=x3.device)
            norm_mean, norm_var = mean, var
        else:
            mean, var, count = _masked_moments3(x3, mask3)
            norm_mean, norm_var = mean, var
            if fallback_mean is not None:
                has_data = count > 0
                norm_mean = torch.where(has_data, mean, fallback_mean.to(mean.dtype))
                norm_var = torch.where(has_data, var, fallback_var.to(var.dtype))
        invstd = _train_invstd(norm_var, epsilon)
        scale = invstd if gamma is None else invstd * gamma
        shift = -norm_mean * scale
        if beta is not None:
            shift = shift + beta
        y = torch.addcmul(shift.view(1, c, 1), x3, scale.view(1, c, 1))
        ctx.save_for_backward(x3, gamma, norm_mean, invstd, mask3, count)
        ctx.has_gamma = gamma is not None
        ctx.has_beta = beta is not None
        ctx.mark_non_differentiable(mean, var, count)
        return y, mean, var, count

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy, _dmean, _dvar, _dcount):
        x3, gamma, mean, invstd, mask3, count = ctx.saved_tensors
        dx, dgamma, dbeta = batch_norm_backward(dy.contiguous(), x3, mean, invstd, gamma, mask3,
                                                count if mask3 is not None else None)
        return (
            dx if ctx.needs_input_grad[0] else None,
            dgamma if ctx.has_gamma and ctx.needs_input_grad[1] else None,
            dbeta if ctx.has_beta and ctx.needs_input_grad[2] else None,
            None,
            None,
            None,
            None,
        )


def _differentiable_train(x3: Tensor, gamma, beta, epsilon: float, act, slope) -> Tensor:
    """Training transform in plain differentiable torch ops (for gradients of gradients)."""
    c = x3.shape[1]
    var, mean = torch.var_mean(x3.float() if x3.dtype == torch.bfloat16 else x3, dim=(0, 2), correction=0)
    scale = _train_invstd(var, epsilon)
    if gamma is not None:
        scale = scale * gamma
    y = (x3 - mean.view(1, c, 1)) * scale.view(1, c, 1)
    if beta is not None:
        y = y + beta.view(1, c, 1)
    return _activate(y, act, slope).to(x3.dtype)


class _KernelTrain(torch.autograd.Function):
    """Training-mode batch norm (+ ReLU / leaky ReLU) in the compiled kernels.

    ``apply(x, gamma, beta, plan)`` with ``plan = (feat, dims, epsilon, moving,
    act, slope, want_var, kernels)``: ``x`` is dense and its memory is the
    ``(A, C, B)`` array ``dims``; ``y`` and ``dx`` get ``x``'s strides, so no view
    enters the graph. ``moving`` is ``None`` or the moving statistics' update
    (see :func:`bnlab._kernels.ops.train_forward`), done inside the forward call.
    Returns ``y``, or ``(y, mean, var)`` with ``want_var`` (non-differentiable).
    """

    @staticmethod
    def forward(ctx, x, gamma, beta, plan):
        _feat, dims, epsilon, moving, act, slope, want_var, kernels = plan
        y, saved, var = _ops.train_forward(kernels, x, dims, gamma, beta, epsilon, moving, act, slope, want_var)
        ctx.save_for_backward(x, gamma, beta)
        ctx.state = (saved, plan)  # mean and invstd: an intermediate, not a saved input
        if want_var:
            mean = saved[:dims[1]].clone()
            ctx.mark_non_differentiable(mean, var)
            return y, mean, var
        return y

    @staticmethod
    def backward(ctx, dy, *_):
        x, gamma, beta = ctx.saved_tensors
        saved, (feat, dims, epsilon, _moving, act, slope, _want, kernels) = ctx.state
        need = ctx.needs_input_grad[:3]
        if torch.is_grad_enabled():
            # create_graph=True: differentiate a differentiable recomputation instead
            inputs = [t for t, n in zip((x, gamma, beta), need) if n]
            x3, restore = as_acb(x, feat)
            g = None if gamma is None else gamma.reshape(-1)
            bt = None if beta is None else beta.reshape(-1)
            y = restore(_differentiable_train(x3, g, bt, epsilon, act, slope))
            grads = iter(torch.autograd.grad(y, inputs, dy, create_graph=True, allow_unused=True))
            return tuple(next(grads) if n else None for n in need) + (None,)
        dx, dgamma, dbeta = _ops.train_backward(kernels, x, dy, dims, gamma, beta, saved, act, slope, need)
        return dx, dgamma, dbeta, None


# --------------------------------------------------------------------------- moving statistics


def variance_factor(count, source: str = "biased", target: str = "biased"):
    """The factor that turns a ``source`` batch variance of ``count`` values into a ``target`` one.

    ``"biased"`` divides the sum of squared deviations by ``M``, ``"unbiased"``
    by ``M - 1``: Keras' moving variance averages the biased one, PyTorch's
    and the paper's Algorithm 2 the unbiased one (``var * M / (M - 1)``). One
    value has no unbiased variance: the factor is then NaN, which makes the
    moving-statistics update skip that batch. ``count`` may be an int or a
    tensor (a masked batch's count).

    >>> variance_factor(4, "biased", "unbiased"), variance_factor(4, "unbiased", "biased")
    (1.3333333333333333, 0.75)
    """
    for name, value in (("source", source), ("target", target)):
        if value not in ("biased", "unbiased"):
            raise ValueError(f"{name} must be 'biased' or 'unbiased', got {value!r}")
    return _factor(count, source == "unbiased", target == "unbiased")


def _factor(count, source_unbiased: bool, target_unbiased: bool):
    """:func:`variance_factor` with the estimators as flags (the rule, written once)."""
    if source_unbiased == target_unbiased:
        return 1.0
    if isinstance(count, Tensor):
        ratio = count / (count - 1) if target_unbiased else (count - 1) / count
        return torch.where(count > 1, ratio, torch.full_like(ratio, math.nan))
    if count < 2:
        return math.nan
    return count / (count - 1) if target_unbiased else (count - 1) / count


def update_moving_stats_(
    moving_mean: Tensor,
    moving_variance: Tensor,
    batch_mean: Tensor,
    batch_variance: Tensor,
    momentum: float | Tensor,
    valid: Tensor | None = None,
    *,
    variance_factor: float | Tensor = 1.0,
    num_batches_tracked: Tensor | None = None,
) -> None:
    """In place: ``moving <- momentum * moving + (1 - momentum) * batch`` (Keras' convention).

    ``momentum`` is the weight of the OLD value (Keras; PyTorch's ``momentum`` is
    ``1 -`` this, see :mod:`bnlab.conventions`); it may be a 0-d tensor (the
    cumulative average uses ``1 - 1/num_batches``). The variance averaged is
    ``batch_variance * variance_factor`` (see :func:`variance_factor`). A
    feature whose new mean or variance would not be finite, or where ``valid``
    is False, keeps its moving values bit for bit, so no NaN or inf is ever
    written there. The check runs on the device, without a host sync.
    ``num_batches_tracked`` (a 0-d int64 tensor, PyTorch's batch counter),
    when given, counts this batch; ``momentum=None`` needs it: a cumulative
    average, the ``n``-th batch weighing ``1/n``.
    """
    _update(moving_mean, moving_variance, batch_mean.detach().reshape(-1), batch_variance.detach().reshape(-1),
            momentum, variance_factor, valid, num_batches_tracked)


def _update(moving_mean, moving_variance, mean, var, momentum, factor, valid=None, counter=None, scratch=None,
            kernels=None) -> None:
    """The one moving-statistics update (:func:`update_moving_stats_`), and ``counter += 1`` when given.

    ``momentum=None`` is the cumulative average: the batch is counted first and
    weighs ``1 / num_batches`` (a tensor, so no host sync). ``scratch``: the
    :class:`bnlab._kernels.ops.Scratch` that ``mean`` and ``var`` live in, zeroed
    and given back once read. The rule, in every implementation: a feature's
    moving values move only when its batch mean and (corrected) variance are
    both finite. Computed by the kernels' ``update_moving`` from a scratch
    (their checks refusing a buffer send it on); else with torch ops: one fused
    ``lerp`` over both buffers when every batch statistic is finite (checked
    in NumPy on the scratch's own memory), else :func:`_update_torch_`.
    """
    if momentum is None:
        if counter is None:
            raise ValueError("momentum=None (a cumulative average) needs num_batches_tracked")
        counter.add_(1)
        momentum, counter = 1.0 - 1.0 / counter.clamp(min=1).to(moving_mean.dtype), None
    scalar = not isinstance(momentum, Tensor) and not isinstance(factor, Tensor) and valid is None
    if scratch is not None and scalar and kernels is not None:
        try:
            _ops.update_moving(kernels, moving_mean, moving_variance, scratch, momentum, factor, counter)
            return
        except _ops.BoundaryError:
            pass  # an unusual buffer (strided, other dtype, neg bit): torch ops take it
    if moving_mean.is_cpu:
        _check_storage(moving_mean=moving_mean, moving_variance=moving_variance)
    if counter is not None:
        counter.add_(1)
    if (scratch is not None and scalar and moving_mean.dtype is scratch.dtype is moving_variance.dtype
            and not (moving_mean.is_neg() or moving_variance.is_neg())):
        # (the scratch's own memory: NumPy, no torch op, no version bump; one test for both statistics)
        if factor != 1.0:
            np.multiply(scratch.arrays[1], factor, out=scratch.arrays[1])
        if _np_isfinite(scratch.buffer).all():  # the common case (never warns, unlike a sum): one fused op for both
            if mean.shape != moving_mean.shape:  # (multi-axis features; a view costs autograd bookkeeping)
                mean = mean.view(moving_mean.shape)
            if var.shape != moving_variance.shape:
                var = var.view(moving_variance.shape)
            grad = moving_mean.requires_grad or moving_variance.requires_grad  # (a buffer set to require grad)
            with torch.no_grad() if grad else contextlib.nullcontext():
                torch._foreach_lerp_([moving_mean, moving_variance], [mean, var], 1.0 - momentum)
        else:
            with torch.no_grad():
                _update_torch_(moving_mean, moving_variance, mean, var, momentum, 1.0, valid)
    else:
        with torch.no_grad():
            _update_torch_(moving_mean, moving_variance, mean, var, momentum, factor, valid)
    if scratch is not None:  # zeroed through NumPy: no in-place torch op that autograd would see
        scratch.buffer.fill(0)
        _ops.give_back(scratch)


def _update_torch_(moving_mean, moving_variance, batch_mean, batch_var, momentum, var_factor, valid) -> None:
    """The update in torch ops (any device, tensor momentum or factor, a ``valid`` mask): ``lerp`` from the
    old value towards the batch's by ``1 - momentum``, for the features whose batch mean and (corrected)
    variance are finite."""
    if not (moving_mean.is_floating_point() and moving_variance.is_floating_point()):
        raise TypeError(f"the moving statistics must be floating-point tensors, got {moving_mean.dtype} and "
                        f"{moving_variance.dtype}")
    weight = 1.0 - momentum
    if isinstance(weight, Tensor):
        weight = weight.to(moving_mean.dtype)
    mean = batch_mean.reshape(moving_mean.shape).to(moving_mean.dtype)
    var = (batch_var * var_factor).reshape(moving_variance.shape).to(moving_variance.dtype)
    ok = torch.isfinite(mean) & torch.isfinite(var)
    if valid is not None:
        ok = ok & valid
    moving_mean.copy_(torch.where(ok, torch.lerp(moving_mean, mean, weight), moving_mean))
    moving_variance.copy_(torch.where(ok, torch.lerp(moving_variance, var, weight), moving_variance))


# --------------------------------------------------------------------------- whole transforms


def _acb_view(x: Tensor, feat: tuple[int, ...], dtype):
    """``x`` (in ``dtype``) as the ``(A, C, B)`` view PyTorch's op reduces over dims 0 and 2 (``(A, C)``
    when ``B`` is 1, where its kernel is fastest), and the map back to ``x``'s shape and layout."""
    x3, restore = as_acb(x if x.dtype == dtype else x.to(dtype), feat)
    return (x3.view(x3.shape[0], x3.shape[1]) if x3.shape[2] == 1 else x3), lambda y: restore(y.view(x3.shape))


def _aten(x, gamma, beta, mean, var, training: bool, epsilon: float) -> Tensor:
    """PyTorch's batch-norm op: in training it writes the batch mean and UNBIASED variance into
    ``mean`` and ``var`` (momentum 1: ``0 * buffer + statistic``), in inference it reads them.

    On the CPU ``torch.native_batch_norm`` (what ``torch.batch_norm`` ends in, without the layers
    of dispatch in between: it also takes bfloat16 data with float32 parameters); elsewhere
    ``torch.batch_norm``, which may choose cuDNN.
    """
    if x.is_cpu and x.numel():  # (an empty batch: torch.batch_norm, whose backward handles it)
        return torch.native_batch_norm(x, gamma, beta, mean, var, training, 1.0, epsilon)[0]
    return torch.batch_norm(x, gamma, beta, mean, var, training, 1.0, epsilon, torch.backends.cudnn.enabled)


def _channels(x: Tensor, feat: tuple[int, ...]) -> int:
    return x.shape[feat[0]] if len(feat) == 1 else math.prod(x.shape[a] for a in feat)


def _check_sizes(c: int, gamma, beta, moving_mean, moving_variance) -> None:
    """``ValueError`` unless every per-feature tensor given holds one value per feature (``c``)."""
    if ((gamma is not None and gamma.numel() != c) or (beta is not None and beta.numel() != c)
            or (moving_mean is not None and moving_mean.numel() != c)
            or (moving_variance is not None and moving_variance.numel() != c)):
        for name, t in (("gamma", gamma), ("beta", beta), ("moving_mean", moving_mean),
                        ("moving_variance", moving_variance)):
            if t is not None and t.numel() != c:
                raise ValueError(f"{name} must hold one value per feature: expected {c} values, got {t.numel()} "
                                 f"(shape {tuple(t.shape)})")


def _extent(t: Tensor) -> int:
    """Bytes of storage ``t``'s values reach: its offset, then its last element by its strides."""
    n = t.numel()
    if not n:
        return 0
    last = t.storage_offset() + (n - 1 if t.is_contiguous() else sum((s - 1) * st for s, st in zip(t.shape, t.stride())))
    return (last + 1) * t.element_size()


def _check_storage(**tensors: Tensor | None) -> None:
    """``ValueError`` for a tensor whose storage is smaller than its values reach (freed with
    ``untyped_storage().resize_(0)``, as FSDP-style code does, or shrunk): nothing may read or write it.
    (Not under ``torch.compile``, whose fake tensors have no storage to ask.)"""
    if torch.compiler.is_compiling():
        return
    for name, t in tensors.items():
        if t is not None and t.untyped_storage().nbytes() < _extent(t):
            raise ValueError(f"{name}'s storage holds {t.untyped_storage().nbytes()} bytes, fewer than its "
                             f"{t.numel()} values need (was its storage freed?)")


def _graph(x, gamma, beta) -> bool:
    return torch.is_grad_enabled() and (x.requires_grad or (gamma is not None and gamma.requires_grad)
                                        or (beta is not None and beta.requires_grad))


def _inference(x, feat, moving_mean, moving_variance, gamma, beta, epsilon, act=None, slope=0.01):
    """Inference transform (+ ``act``) of ``x`` with its feature axes ``feat`` already normalized."""
    if not x.is_floating_point():
        raise TypeError(f"batch normalization needs a floating-point input, got dtype {x.dtype}")
    if moving_mean is None or moving_variance is None:
        raise ValueError("inference normalizes with the moving statistics: expected moving_mean and moving_variance "
                         f"tensors, got {type(moving_mean).__name__} and {type(moving_variance).__name__}")
    _check_sizes(_channels(x, feat), gamma, beta, moving_mean, moving_variance)
    n, graph = x.numel(), _graph(x, gamma, beta)
    # (a graph, an empty or a small batch takes PyTorch's op whatever the kernels: no need to ask for them)
    kernels = None if graph or not n or _dispatch.small(x, feat, n) else _ops.loaded()
    route = _dispatch.inference_route(x, feat, n, kernels, (gamma, beta, moving_mean, moving_variance), graph)
    fused = act if act in _ACT_CODES else None
    if route.impl == "kernels":
        xd, dims = _dispatch.dense_acb(x, feat) if route.copy else (x, route.dims)
        try:
            y = _ops.inference(kernels, xd, dims, gamma, beta, moving_mean, moving_variance, epsilon, fused, slope)
            return y if fused == act else _activate(y, act, slope)
        except _ops.BoundaryError:
            pass  # an unusual per-feature tensor (strided, neg bit): PyTorch's op takes it
    dtype = torch.float32 if x.dtype in _LOW_PRECISION else x.dtype
    if x.is_cpu:
        _check_storage(gamma=gamma, beta=beta, moving_mean=moving_mean, moving_variance=moving_variance)
    xn, restore = (x, None) if route.native else _acb_view(x, feat, dtype)
    # contiguous statistics: PyTorch's CPU op in inference gives wrong input gradients for strided ones;
    # never differentiated (a buffer set to require gradients is still a statistic, as the kernels treat it)
    mean, var = _dense(moving_mean, dtype), _dense(moving_variance, dtype)
    if mean.requires_grad or var.requires_grad:
        mean, var = mean.detach(), var.detach()
    y = _aten(xn, _dense(gamma, dtype), _dense(beta, dtype), mean, var, False, epsilon)
    if restore is not None:
        y = restore(y)
    if y.dtype is not x.dtype:
        y = y.to(x.dtype)
    return y if act is None else _activate(y, act, slope)


def _train(x, feat, gamma, beta, epsilon, mask, impl, act=None, slope=0.01, moving=None, want_stats=False):
    """Training transform (+ ``act``) of ``x`` (``feat`` normalized), updating ``moving`` when given.

    ``moving``: ``None`` or ``(moving_mean, moving_variance, momentum,
    unbiased, counter)``: the statistics to update in place (``unbiased``: they
    average the unbiased batch variance), and a batch counter (a 0-d int64
    tensor or ``None``) counted once for a non-empty batch. ``momentum=None``
    is the cumulative average (weight ``1/n`` for the ``n``-th counted batch).
    Returns ``y``, or ``(y, mean, biased_var, count)`` with ``want_stats``.
    """
    if not x.is_floating_point():
        raise TypeError(f"batch normalization needs a floating-point input, got dtype {x.dtype}")
    c = _channels(x, feat)
    mm, mv, momentum, unbiased, counter = (None, None, None, False, None) if moving is None else moving
    _check_sizes(c, gamma, beta, mm, mv)
    n = x.numel()
    if not n and mm is not None and not want_stats:
        # An empty batch has no statistics: nothing is counted or updated; normalize (nothing) with the moving ones
        if mask is not None:
            _mask_as_acb(mask, x, feat)  # checked all the same
        return _inference(x, feat, mm, mv, gamma, beta, epsilon, act, slope)
    kernels = _ops.loaded()
    graph = _graph(x, gamma, beta)
    route = _dispatch.train_route(x, feat, n, c, kernels, (gamma, beta, mm, mv), mask is not None, impl, graph)
    args = (x, feat, c, gamma, beta, epsilon, mm, mv, momentum, unbiased, counter, want_stats, kernels)
    if route.impl == "kernels":
        out = _train_kernels(route, *args, act, slope, graph)
        if out is not None:
            return out
        if impl == "kernel":  # their boundary refused a per-feature tensor (strided, neg bit, ...)
            raise ValueError("impl='kernel' cannot run here: a per-feature tensor is not a contiguous vector "
                             "the kernels can take")
        route = _dispatch.Route("aten" if n > c else "composite")
    y, stats = (_train_aten(route, *args) if route.impl == "aten" else _train_composite(mask, *args))
    if act is not None:
        y = _activate(y, act, slope)
    return y if stats is None else (y, *stats)


def _train_aten(route, x, feat, c, gamma, beta, epsilon, mm, mv, momentum, unbiased, counter, want_stats, kernels):
    """PyTorch's op for the transform; the moving statistics from the batch statistics it writes."""
    dtype = torch.float32 if x.dtype in _LOW_PRECISION else x.dtype
    xn, restore = (x, None) if route.native else _acb_view(x, feat, dtype)
    scratch = None
    if mm is not None and x.is_cpu and not want_stats and (kernels is not None or not torch.compiler.is_compiling()):
        # (see ops.Scratch: written here, read by the update; not while torch.compile captures a graph)
        scratch = _ops.scratch(c, dtype)
        mean, var = scratch.mean, scratch.var
    else:
        mean, var = x.new_zeros(c, dtype=dtype), x.new_zeros(c, dtype=dtype)
    # with momentum 1 the op writes the batch mean and the UNBIASED batch variance into mean and var; gamma and beta
    # contiguous: PyTorch's CPU backward read a strided or expanded weight as if it were contiguous (x.grad from the
    # values between its elements; state fuzz, seeds 300377, 300723, 300778)
    y = _aten(xn, _dense(gamma, dtype), _dense(beta, dtype), mean, var, True, epsilon)
    if restore is not None:
        y = restore(y)
    if y.dtype is not x.dtype:
        y = y.to(x.dtype)
    count = x.numel() // c
    if mm is not None:
        _update(mm, mv, mean, var, momentum, _factor(count, True, unbiased), None, counter, scratch, kernels)
    return y, ((mean, var * _factor(count, True, False), count) if want_stats else None)


def _train_composite(mask, x, feat, c, gamma, beta, epsilon, mm, mv, momentum, unbiased, counter, want_stats, kernels):
    """bnlab's autograd Function: masks, and batches of one value per feature."""
    dtype = torch.float32 if x.dtype in _LOW_PRECISION else x.dtype
    mask3 = None if mask is None else _mask_as_acb(mask, x, feat)
    x3, restore = as_acb(x if x.dtype is dtype else x.to(dtype), feat)
    fallback = (None, None) if mm is None else (_flat(mm, dtype), _flat(mv, dtype))
    y3, mean, var, count = _BatchNormTrain.apply(x3, _flat(gamma, dtype), _flat(beta, dtype), mask3, epsilon, *fallback)
    y = restore(y3).to(x.dtype)
    if mask is None:
        count = x3.shape[0] * x3.shape[2]
    if mm is not None:
        # masked: skip when nothing (or, for the unbiased variance, one value) entered
        valid = count > (1 if unbiased else 0) if isinstance(count, Tensor) else None
        _update(mm, mv, mean, var, momentum, _factor(count, False, unbiased), valid, counter)
    return y, ((mean, var, count) if want_stats else None)


def _train_kernels(route, x, feat, c, gamma, beta, epsilon, mm, mv, momentum, unbiased, counter, want_stats, kernels,
                   act, slope, graph):
    """The kernels' transform (+ ReLU / leaky ReLU); the moving statistics are updated in the same call when
    the momentum is a number. ``None`` when their boundary refuses a per-feature tensor (nothing was
    written then)."""
    xd, dims = _dispatch.dense_acb(x, feat) if route.copy else (x, route.dims)
    count = dims[0] * dims[2]
    fused_update = mm is not None and isinstance(momentum, (int, float))
    moving = (mm, mv, momentum, _factor(count, False, unbiased), counter) if fused_update else None
    want_var = want_stats or (mm is not None and not fused_update)
    fused = act if act in _ACT_CODES else None  # SiLU, GELU, ...: PyTorch's vectorized ops after
    plan = (feat, dims, epsilon, moving, fused, slope, want_var, kernels)
    try:
        if graph:
            out = _KernelTrain.apply(xd, gamma, beta, plan)
        else:  # no graph to record (no_grad, recalibration, frozen weights): no autograd machinery
            y, saved, var = _ops.train_forward(kernels, xd, dims, gamma, beta, epsilon, moving, fused, slope,
                                               want_var)
            out = (y, saved[:dims[1]], var) if want_var else y
    except _ops.BoundaryError:
        return None
    y = out[0] if want_var else out
    if fused != act:
        y = _activate(y, act, slope)
    if mm is not None and not fused_update:  # a cumulative average or a tensor momentum
        _update(mm, mv, out[1], out[2], momentum, _factor(count, False, unbiased), None, counter)
    return (y, out[1], out[2], count) if want_stats else y


def batch_norm_inference(
    x: Tensor,
    moving_mean: Tensor,
    moving_variance: Tensor,
    gamma: Tensor | None = None,
    beta: Tensor | None = None,
    *,
    axis: int | Sequence[int] = -1,
    epsilon: float = 1e-3,
    activation: str | None = None,
    negative_slope: float = 0.01,
    mask: Tensor | None = None,
) -> Tensor:
    """Inference transform: ``gamma * (x - moving_mean) / sqrt(moving_variance + epsilon) + beta``.

    Parameters and statistics have the shape of the feature axes (or are flat).
    Half-precision inputs are computed in float32 and returned in their dtype.
    ``activation`` (one of :data:`ACTIVATIONS`, default none) is applied to the
    result; ReLU and leaky ReLU (``negative_slope``) in the same pass on CPU.
    A ``mask`` is checked as in training and otherwise ignored: inference
    normalizes every position with the moving statistics (Keras).
    """
    feat = normalize_axes(axis, x.ndim)
    if mask is not None:
        _mask_as_acb(mask, x, feat)
    return _inference(x, feat, moving_mean, moving_variance, gamma, beta, epsilon, activation, negative_slope)


def batch_norm_train(
    x: Tensor,
    gamma: Tensor | None = None,
    beta: Tensor | None = None,
    *,
    mask: Tensor | None = None,
    axis: int | Sequence[int] = -1,
    epsilon: float = 1e-3,
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
    autograd Function of torch ops) or ``"auto"`` (chosen per call; see
    :mod:`bnlab._dispatch`).
    """
    feat = normalize_axes(axis, x.ndim)
    if fallback is not None:
        if mask is None:
            fallback = None
        else:  # only a fully masked batch reads it: the composite path, given the statistics as "moving"
            return _train_fallback(x, feat, gamma, beta, epsilon, mask, fallback, impl)
    return _train(x, feat, gamma, beta, epsilon, mask, impl, want_stats=True)


def _train_fallback(x, feat, gamma, beta, epsilon, mask, fallback, impl):
    dtype = _compute_dtype(x)
    _check_sizes(_channels(x, feat), gamma, beta, fallback[0], fallback[1])
    _dispatch.train_route(x, feat, x.numel(), _channels(x, feat), None, (), True, impl, False)  # composite, or impl's error
    x3, restore = as_acb(x if x.dtype == dtype else x.to(dtype), feat)
    y3, mean, var, count = _BatchNormTrain.apply(x3, _flat(gamma, dtype), _flat(beta, dtype),
                                                 _mask_as_acb(mask, x, feat), epsilon, _flat(fallback[0], dtype),
                                                 _flat(fallback[1], dtype))
    return restore(y3).to(x.dtype), mean, var, count


def batch_norm(
    x: Tensor,
    moving_mean: Tensor | None,
    moving_variance: Tensor | None,
    gamma: Tensor | None = None,
    beta: Tensor | None = None,
    *,
    training: bool,
    axis: int | Sequence[int] = -1,
    momentum: float | Tensor | None = 0.99,
    epsilon: float = 1e-3,
    mask: Tensor | None = None,
    unbiased_moving_variance: bool = False,
    impl: str = "auto",
    activation: str | None = None,
    negative_slope: float = 0.01,
    num_batches_tracked: Tensor | None = None,
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
    means 0.9 here); ``None`` keeps a cumulative average, which needs
    ``num_batches_tracked`` (a 0-d int64 tensor, as PyTorch's layers keep).
    ``num_batches_tracked``, when given, counts each non-empty training batch.
    Shapes: statistics and parameters have the sizes of the feature axes, in
    increasing axis order. ``activation`` (one of :data:`ACTIVATIONS`) is
    applied to the result; ReLU and leaky ReLU are fused into the kernels.

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
        return _inference(x, feat, moving_mean, moving_variance, gamma, beta, epsilon, activation, negative_slope)
    moving = None
    if moving_mean is not None:
        if moving_variance is None:
            raise ValueError("moving_mean and moving_variance go together: got moving_variance=None")
        if momentum is None and num_batches_tracked is None:
            raise ValueError("momentum=None (a cumulative average) needs num_batches_tracked")
        moving = (moving_mean, moving_variance, momentum, unbiased_moving_variance, num_batches_tracked)
    return _train(x, feat, gamma, beta, epsilon, mask, impl, activation, negative_slope, moving)


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
    scale = _train_invstd(var_g, epsilon)[gid].unsqueeze(2)
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
    perm = _dispatch.memory_perm(x, feat)
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
        invstd = _train_invstd(var64, epsilon).to(x3.dtype)
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
