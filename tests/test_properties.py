"""Property tests: random shapes, axes, dtypes and masks against the NumPy reference."""

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import bnlab
from bnlab import reference as R


@st.composite
def problems(draw):
    ndim = draw(st.integers(2, 4))
    shape = tuple(draw(st.lists(st.integers(1, 5), min_size=ndim, max_size=ndim)))
    n_feat = draw(st.integers(1, min(2, ndim - 1)))
    axes = sorted(draw(st.lists(st.integers(0, ndim - 1), min_size=n_feat, max_size=n_feat, unique=True)))
    axis = axes[0] - ndim if n_feat == 1 and draw(st.booleans()) else (axes[0] if n_feat == 1 else axes)
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    use_mask = draw(st.booleans())
    seed = draw(st.integers(0, 2**16))
    return shape, axis, dtype, use_mask, seed


@settings(max_examples=60, deadline=None)
@given(problems())
def test_layer_matches_reference(problem):
    shape, axis, dtype, use_mask, seed = problem
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 0.5).to(dtype)
    feat = bnlab.functional.normalize_axes(axis, len(shape))
    mshape = [s for d, s in enumerate(shape) if d not in feat]
    mask = None
    if use_mask:
        mask = torch.rand(mshape, generator=g) > 0.4
    bn = bnlab.BatchNorm(axis=axis, momentum=0.8, dtype=dtype)
    y = bn(x, mask=mask)
    ref = R.NumpyBatchNorm(R.feature_shape(shape, axis), momentum=0.8)
    count = int(np.prod(mshape)) if mask is None else int(mask.sum())
    tol = 1e-10 if dtype == torch.float64 else 3e-4
    assert y.shape == x.shape and y.dtype == dtype
    assert torch.isfinite(bn.moving_mean).all() and torch.isfinite(bn.moving_variance).all()
    if count == 0:
        # nothing entered the statistics: normalized with the (initial) moving ones, nothing updated
        assert torch.equal(bn.moving_mean, torch.zeros_like(bn.moving_mean))
        np.testing.assert_allclose(y.detach().double().numpy(), ref(x.double().numpy(), training=False, axis=axis), atol=tol)
        return
    yr = ref(x.double().numpy(), training=True, axis=axis, mask=None if mask is None else mask.numpy())
    np.testing.assert_allclose(y.detach().double().numpy(), yr, atol=tol, rtol=tol)
    np.testing.assert_allclose(bn.moving_mean.double().numpy(), ref.moving_mean, atol=tol, rtol=tol)
    np.testing.assert_allclose(bn.moving_variance.double().numpy(), ref.moving_variance, atol=tol, rtol=tol)


@settings(max_examples=30, deadline=None)
@given(problems())
def test_composite_and_aten_agree(problem):
    shape, axis, dtype, _, seed = problem
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=dtype)
    feat = bnlab.functional.normalize_axes(axis, len(shape))
    if int(np.prod([s for d, s in enumerate(shape) if d not in feat])) < 2:
        return  # aten needs two values per feature; the layer routes these to the composite path
    dy = torch.randn(shape, generator=g, dtype=dtype)
    outs = []
    for impl in ("aten", "composite"):
        xi = x.clone().requires_grad_()
        y, m, v, _ = bnlab.functional.batch_norm_train(xi, axis=axis, impl=impl)
        (dx,) = torch.autograd.grad(y, xi, dy)
        outs.append((y.detach(), m, v, dx))
    tol = 1e-9 if dtype == torch.float64 else 2e-4
    for a, b in zip(*outs, strict=True):
        torch.testing.assert_close(a, b, atol=tol, rtol=tol)
