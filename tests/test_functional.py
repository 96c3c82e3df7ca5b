"""bnlab.functional against the NumPy reference, gradcheck, and its own two implementations."""

import numpy as np
import pytest
import torch

import bnlab
from bnlab import _dispatch, _kernels
from bnlab._kernels import ops
from bnlab import functional as F
from bnlab import reference as R

from .reference_checks import assert_train_matches_reference

CASES = [
    ((16, 5), -1),
    ((16, 5), 1),
    ((4, 3, 5, 6), 1),  # NCHW
    ((4, 5, 6, 3), -1),  # NHWC
    ((6, 7, 3), -1),  # (N, T, C)
    ((6, 3, 7), 1),  # (N, C, L)
    ((4, 3, 5, 6), [1, 3]),  # two feature axes, not adjacent
    ((4, 3, 5, 6), [2, 3]),  # two adjacent feature axes
    ((3, 2, 2, 2, 4), 1),  # 5-D
]


def _feat(shape, axis):
    return R.feature_shape(shape, axis)


def _mask_shape(shape, axis):
    feat = F.normalize_axes(axis, len(shape))
    return [s for d, s in enumerate(shape) if d not in feat]


@pytest.mark.parametrize("impl", ["kernel", "aten", "composite"])
@pytest.mark.parametrize("shape,axis", CASES)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
def test_train_forward_backward_match_reference(shape, axis, impl, dtype, tol):
    x = (torch.randn(shape, dtype=torch.float64) * 3 + 1).to(dtype).requires_grad_()
    assert_train_matches_reference(x, axis, impl, tol)


@pytest.mark.parametrize("shape,axis", CASES)
def test_masked_forward_backward_match_reference(shape, axis):
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    fs = _feat(shape, axis)
    g = (torch.rand(fs, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(fs, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(_mask_shape(shape, axis)) > 0.4
    mask.view(-1)[:2] = True  # at least two positions count
    dy = torch.randn(shape, dtype=torch.float64)
    y, mean, var, count = F.batch_norm_train(x, g, b, axis=axis, epsilon=1e-3, mask=mask)
    dx, dg, db = torch.autograd.grad(y, (x, g, b), dy)
    args = [t.detach().numpy() for t in (x, g, b)]
    yr, mr, vr = R.forward_train(*args, 1e-3, axis, mask.numpy())
    dxr, dgr, dbr = R.backward(dy.numpy(), args[0], args[1], 1e-3, axis, mask.numpy())
    np.testing.assert_allclose(y.detach().numpy(), yr, atol=1e-12)
    np.testing.assert_allclose(var.numpy().reshape(fs), vr, atol=1e-12)
    np.testing.assert_allclose(dx.numpy(), dxr, atol=1e-11)
    np.testing.assert_allclose(dg.numpy(), dgr, atol=1e-11)
    np.testing.assert_allclose(db.numpy(), dbr, atol=1e-11)
    assert int(count) == int(mask.sum())


@pytest.mark.parametrize("shape,axis", [((8, 3), -1), ((3, 2, 4, 5), 1), ((3, 4, 5, 2), -1), ((3, 2, 4, 2), [1, 3])])
@pytest.mark.parametrize("masked,impl", [(False, "kernel"), (False, "aten"), (False, "composite"), (True, "composite")])
def test_gradcheck_float64(shape, axis, masked, impl):
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    fs = _feat(shape, axis)
    g = (torch.rand(fs, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(fs, dtype=torch.float64, requires_grad=True)
    mask = None
    if masked:
        mask = torch.rand(_mask_shape(shape, axis)) > 0.3
        mask.view(-1)[:2] = True
    fn = lambda x, g, b: F.batch_norm_train(x, g, b, axis=axis, epsilon=1e-3, mask=mask, impl=impl)[0]  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, g, b))


def test_gradcheck_without_gamma_beta():
    x = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: F.batch_norm_train(x, impl="composite")[0], (x,))


def test_inference_matches_reference():
    x = torch.randn(5, 3, 4, 4, dtype=torch.float64)
    mm, mv = torch.randn(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64) + 0.1
    g, b = torch.randn(3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    y = F.batch_norm(x, mm, mv, g, b, training=False, axis=1, epsilon=1e-3)
    yr = R.forward_inference(x.numpy(), g.numpy(), b.numpy(), mm.numpy(), mv.numpy(), 1e-3, axis=1)
    np.testing.assert_allclose(y.numpy(), yr, atol=1e-12)


def test_moving_statistics_over_several_steps_match_reference():
    mm, mv = torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)
    ref = R.NumpyBatchNorm(4, momentum=0.95, epsilon=5e-3)
    for step in range(5):
        x = torch.randn(10, 4, dtype=torch.float64) * (step + 1) + step
        y = F.batch_norm(x, mm, mv, training=True, momentum=0.95, epsilon=5e-3)
        yr = ref(x.numpy(), training=True)
        np.testing.assert_allclose(y.numpy(), yr, atol=1e-12)
    np.testing.assert_allclose(mm.numpy(), ref.moving_mean, atol=1e-12)
    np.testing.assert_allclose(mv.numpy(), ref.moving_variance, atol=1e-12)


@pytest.mark.parametrize("impl", ["kernel", "aten", "composite"])
def test_large_offset_float32_is_stable(impl):
    x = 1e4 + torch.randn(512, 8)
    y = F.batch_norm_train(x, impl=impl)[0]
    std = y.double().std(0, unbiased=False)
    assert torch.allclose(std, torch.ones(8, dtype=torch.float64), atol=2e-3), std
    # the naive E[x^2] - E[x]^2 in float32 loses everything here; make sure that is what we avoid
    naive = (x * x).mean(0) - x.mean(0) ** 2
    assert not torch.allclose(naive.double(), x.double().var(0, unbiased=False), rtol=0.1)


def test_large_offset_float32_masked_is_stable():
    x = 1e4 + torch.randn(64, 30, 4)
    mask = torch.rand(64, 30) > 0.5
    y = F.batch_norm_train(x, mask=mask)[0]
    std = y[mask].double().std(0, unbiased=False)
    assert torch.allclose(std, torch.ones(4, dtype=torch.float64), atol=2e-3), std


@pytest.mark.parametrize(
    "make,axis",
    [
        (lambda: torch.randn(4, 5, 6, 3), -1),  # NHWC, axis=-1
        (lambda: torch.randn(4, 3, 5, 6), 1),  # NCHW, axis=1
        (lambda: torch.randn(4, 3, 5, 6).contiguous(memory_format=torch.channels_last), 1),
        (lambda: torch.randn(4, 3, 5, 6, 2).contiguous(memory_format=torch.channels_last_3d), 1),
    ],
)
def test_views_do_not_copy_and_keep_layout(make, axis):
    x = make()
    feat = F.normalize_axes(axis, x.ndim)
    x3, restore = F.as_acb(x, feat)
    assert x3.data_ptr() == x.data_ptr()  # a view, not a copy
    assert x3.shape[1] == x.shape[feat[0]]
    y = F.batch_norm_train(x, axis=axis)[0]
    assert y.stride() == x.stride()  # output in the input's layout
    ref = F.batch_norm_train(x.contiguous(), axis=axis, impl="composite")[0]
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (2, 3, 1, 4), (1, 3, 4, 4), (2, 1, 3, 3), (2, 3, 1, 1), (2, 3, 4, 5, 6), (2, 3, 1, 5, 1)])
def test_channels_last_dims_name_the_memory(shape):
    # The kernels see x's memory as an (A, C, B) array: channels-last formats take a shortcut in
    # acb_dims (one C call); whatever the shortcut says must be what the memory holds.
    fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
    x = torch.randn(shape).contiguous(memory_format=fmt)
    a, c, b = _dispatch.acb_dims(x, (1,))
    assert (a * c * b, c) == (x.numel(), shape[1])
    memory = torch.as_strided(x, (a, c, b), (c * b, b, 1))
    in_order = x.movedim(1, -1).reshape(a, c, b) if b == 1 else x.reshape(a, c, b)
    torch.testing.assert_close(memory, in_order, rtol=0, atol=0)


def test_strided_input_is_handled():
    base = torch.randn(8, 6, 10)
    x = base[:, ::2, 1:9]  # not dense in any order
    y = F.batch_norm_train(x, axis=1)[0]
    torch.testing.assert_close(y, F.batch_norm_train(x.contiguous(), axis=1)[0])


def test_update_skips_non_finite_features_bit_for_bit():
    mm = torch.tensor([0.5, 0.25, -1.0])
    mv = torch.tensor([2.0, 3.0, 4.0])
    before_m, before_v = mm.clone(), mv.clone()
    F.update_moving_stats_(mm, mv, torch.tensor([1.0, float("nan"), 2.0]), torch.tensor([1.0, 1.0, float("inf")]), 0.9)
    assert torch.equal(mm[1:], before_m[1:]) and torch.equal(mv[1:], before_v[1:])
    assert mm[0].item() == pytest.approx(0.9 * 0.5 + 0.1 * 1.0)
    assert mv[0].item() == pytest.approx(0.9 * 2.0 + 0.1 * 1.0)


def test_moments_public_api():
    x = torch.randn(7, 3, 5, dtype=torch.float64)
    mean, var = F.moments(x, axis=1)
    np.testing.assert_allclose(mean.numpy(), x.numpy().mean((0, 2)))
    np.testing.assert_allclose(var.numpy(), x.numpy().var((0, 2)))
    _, uvar = F.moments(x, axis=1, correction=1)
    np.testing.assert_allclose(uvar.numpy(), x.numpy().var((0, 2), ddof=1))
    mask = torch.rand(7, 5) > 0.5
    mask[0, 0] = mask[1, 1] = True
    mmean, mvar = F.moments(x, axis=1, mask=mask)
    sel = x.permute(0, 2, 1)[mask].numpy()
    np.testing.assert_allclose(mmean.numpy(), sel.mean(0))
    np.testing.assert_allclose(mvar.numpy(), sel.var(0))


def test_normalize_formula():
    x = torch.randn(10, 3, dtype=torch.float64)
    m, v, g, b = torch.randn(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64), torch.randn(3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    torch.testing.assert_close(F.normalize(x, m, v, g, b, 1e-3), g * (x - m) / torch.sqrt(v + 1e-3) + b)


def test_axis_errors():
    with pytest.raises(ValueError, match=r"axis 4 is out of range for an input of rank 4"):
        F.normalize_axes(4, 4)
    with pytest.raises(ValueError, match="same axis twice"):
        F.normalize_axes([1, -3], 4)
    with pytest.raises(TypeError, match="floating-point"):
        F.batch_norm_train(torch.ones(4, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="impl must be"):
        F.batch_norm_train(torch.ones(4, 3), impl="fast")


@pytest.mark.parametrize("var_factor", [1.0, 0.75])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_update_rules_backends_agree(var_factor, dtype):
    # One rule (functional._update): a feature moves only when its batch mean and variance are finite.
    # Three ways to it: the kernels' C from a scratch (zeroed once read), torch ops from a scratch (no
    # kernels: one fused lerp when every statistic is finite), torch ops feature by feature.
    stats = torch.randn(2, 33, dtype=dtype).abs()
    stats[0, 3] = float("nan")
    stats[1, 5] = float("inf")
    bufs = {}
    for backend in ("kernels", "scratch", "torch"):
        for finite in (True, False):
            if backend == "kernels" and _kernels.get() is None:
                continue
            batch = stats.nan_to_num(0.5, 0.5, 0.5) if finite else stats
            mm, mv = torch.linspace(-1, 1, 33, dtype=dtype), torch.linspace(0.5, 2, 33, dtype=dtype)
            counter = torch.tensor(4)
            if backend == "torch":
                F._update(mm, mv, batch[0], batch[1], 0.95, var_factor, counter=counter)
            else:
                scratch = ops.scratch(33, dtype)
                scratch.mean.copy_(batch[0])
                scratch.var.copy_(batch[1])
                F._update(mm, mv, scratch.mean, scratch.var, 0.95, var_factor, counter=counter, scratch=scratch,
                          kernels=_kernels.get() if backend == "kernels" else None)
                assert not scratch.mean.any() and not scratch.var.any()  # read, then zeroed for the next batch
            assert counter.item() == 5
            bufs[backend, finite] = (mm, mv)
    for finite in (True, False):
        found = [v for (k, f), v in bufs.items() if f == finite]
        for m, v in found[1:]:
            torch.testing.assert_close(m, found[0][0], rtol=2e-7, atol=1e-7)
            torch.testing.assert_close(v, found[0][1], rtol=2e-7, atol=1e-7)
        for m, v in found:
            if not finite:
                assert m[3].item() == torch.linspace(-1, 1, 33, dtype=dtype)[3].item()  # skipped, bit for bit
                assert v[5].item() == torch.linspace(0.5, 2, 33, dtype=dtype)[5].item()
            expected = 0.95 * torch.linspace(-1, 1, 33, dtype=torch.float64)[0].item() + 0.05 * stats[0, 0].item()
            assert m[0].item() == pytest.approx(expected, rel=1e-6)



@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_numpy_update_moves_features_whose_statistics_are_finite_but_sum_past_the_range(dtype, recwarn):
    # The NumPy path tests every statistic of the scratch at once (one isfinite over its buffer; a sum would
    # overflow): finite values near the range limit must still move the moving statistics, with no warning.
    big = torch.finfo(dtype).max / 2
    mm, mv = torch.zeros(4, dtype=dtype), torch.ones(4, dtype=dtype)
    scratch = ops.scratch(4, dtype)
    scratch.mean.copy_(torch.tensor([big, big, big, 1.0], dtype=dtype))
    scratch.var.copy_(torch.tensor([big, 2.0, 3.0, float("nan")], dtype=dtype))
    F._update(mm, mv, scratch.mean, scratch.var, 0.5, 1.0, scratch=scratch)
    assert mm.tolist() == [big / 2, big / 2, big / 2, 0.0]  # feature 3: its variance is NaN, so it stays
    assert mv.tolist() == [(1.0 + big) / 2, 1.5, 2.0, 1.0]
    assert not scratch.mean.any() and not scratch.var.any()
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


@pytest.mark.parametrize("training", [False, True])
def test_a_strided_statistic_whose_storage_was_shrunk_is_refused_on_pytorch_s_route(training):
    # Every other value of 16: its values reach 15 elements of storage. Shrunk to 9 elements, a check that counts
    # only offset + numel (8 <= 9) let PyTorch's op read past the storage; the check follows the strides.
    x = torch.randn(4, 8)  # a small batch: PyTorch's op takes it, not the kernels
    base = torch.ones(16)
    var = base[::2]
    base.untyped_storage().resize_(9 * 4)
    with pytest.raises(ValueError, match="storage holds 36 bytes"):
        if training:
            F.batch_norm(x, torch.zeros(8), var, training=True, axis=-1, momentum=0.9)
        else:
            F.batch_norm_inference(x, torch.zeros(8), var, axis=-1)


@pytest.mark.parametrize("impl", ["kernel", "aten", "composite"])
@pytest.mark.parametrize("shape", [(64, 16), (8, 4, 5, 5)])
def test_a_constant_feature_with_epsilon_zero_gives_beta_and_zero_gradients_on_every_route(impl, shape):
    # PyTorch's training op takes 1/sqrt(var + eps) as 0 when both are 0 (y = beta, no NaN); the kernels and the
    # composite path computed 0 * inf = NaN there, so the routes disagreed (found by the state fuzz, seed 100300).
    axis = 1 if len(shape) == 4 else -1
    c = shape[axis]
    x = torch.randn(shape, dtype=torch.float64).float()
    x.select(axis, 0).fill_(2.5)  # feature 0 constant, the others not
    x.requires_grad_(True)
    gamma = torch.full((c,), 1.5, requires_grad=True)
    beta = torch.linspace(-1, 1, c).requires_grad_(True)
    y, mean, var, _ = F.batch_norm_train(x, gamma, beta, axis=axis, epsilon=0.0, impl=impl)
    dy = torch.randn(shape)
    y.backward(dy)
    assert var[0] == 0 and torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    assert torch.equal(y.select(axis, 0), torch.full_like(y.select(axis, 0), beta[0].item()))
    assert torch.equal(x.grad.select(axis, 0), torch.zeros_like(x.grad.select(axis, 0))) and gamma.grad[0] == 0
    # the other features: the formula
    keep = [i for i in range(c) if i != 0]
    red = [d for d in range(len(shape)) if d != axis % len(shape)]
    xd = x.detach().double()
    m, v = xd.mean(red, keepdim=True), xd.var(red, unbiased=False, keepdim=True)
    want = (xd - m) / v.sqrt() * gamma.detach().double().view([-1 if d == axis % len(shape) else 1 for d in range(len(shape))]) \
        + beta.detach().double().view([-1 if d == axis % len(shape) else 1 for d in range(len(shape))])
    assert torch.allclose(y.detach().double().index_select(axis, torch.tensor(keep)), want.index_select(axis, torch.tensor(keep)),
                          atol=1e-4)


def test_inference_without_moving_statistics_is_refused_before_any_kernel_runs():
    # A FrozenBatchNorm whose running_mean was set to None crashed the process: the kernels' inference read a NULL
    # pointer (found by the state fuzz, seed 100421). Now every route refuses it with the same message.
    x = torch.randn(8, 3, 2)
    for mean, var in ((None, torch.ones(2)), (torch.zeros(2), None)):
        with pytest.raises(ValueError, match="expected moving_mean and moving_variance"):
            F.batch_norm_inference(x, mean, var, axis=-1)
    layer = bnlab.FrozenBatchNorm(2, axis=-1)
    layer.running_mean = None
    with pytest.raises(ValueError, match="moving statistics"):
        layer(x)


@pytest.mark.parametrize("how", ["strided", "expanded"])
@pytest.mark.parametrize("layout", ["sliced", "channels_last"])
def test_a_strided_or_expanded_gamma_gives_pytorch_s_op_the_right_gradients(how, layout):
    # PyTorch's CPU backward read a non-contiguous weight as contiguous on the (A, C, B) view (x.grad built from the
    # NaN between gamma's elements; found by the state fuzz, seeds 300377, 300723, 300778): bnlab hands it a dense one.
    c = 16
    if how == "strided":
        big = torch.full((2 * c,), float("nan"))
        big[::2] = torch.rand(c) + 0.5
        gamma = big[::2]
    else:
        gamma = torch.tensor([1.7]).expand(c)
    if layout == "sliced":
        x, axis = torch.randn(40, 2 * c)[:, ::2], -1
    else:
        x, axis = torch.randn(6, c, 5, 5).contiguous(memory_format=torch.channels_last)[:, :, :, 1:], 1
    dy = torch.randn(x.shape)
    grads = {}
    for impl in ("aten", "composite"):
        xx = x.detach().clone().requires_grad_(True)
        y = F.batch_norm_train(xx, gamma, None, axis=axis, epsilon=1e-3, impl=impl)[0]
        y.backward(dy)
        grads[impl] = xx.grad
    assert torch.isfinite(grads["aten"]).all()
    assert torch.allclose(grads["aten"], grads["composite"], atol=1e-4)
