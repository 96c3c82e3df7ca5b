"""bnlab's compiled CPU kernels against the PyTorch paths, the NumPy reference and gradcheck.

Every test that needs the kernels is skipped (with the reason) where they could
not be built, e.g. on a machine without a C compiler; the fallback itself is
tested in-process by switching the kernels off.
"""

import os
import platform

import numpy as np
import pytest
import torch
import torch.nn.functional as TF

import bnlab
from bnlab import _kernels
from bnlab._kernels import ops
from bnlab import functional as F
from bnlab import reference as R

from .reference_checks import assert_train_matches_reference

needs_kernels = pytest.mark.skipif(_kernels.get() is None, reason=f"kernels unavailable: {_kernels.status()['reason']}")

# (shape, axis, how the input is laid out in memory)
LAYOUTS = [
    ((64, 16), -1, "contiguous"),  # rows
    ((5, 6, 7, 8), 1, "contiguous"),  # NCHW planes
    ((5, 6, 7, 8), 1, "channels_last"),  # planes seen in memory order: rows
    ((5, 7, 8, 6), -1, "contiguous"),  # NHWC, axis=-1
    ((5, 6, 7, 8), [1, 3], "contiguous"),  # feature axes apart: one copy
    ((5, 6, 14, 8), 1, "strided"),  # a sliced view: one copy
    ((3, 4, 5, 2, 3), 1, "contiguous"),  # 5-D
    ((2, 3, 5000), 1, "contiguous"),  # planes longer than one 4096-value chunk
    ((40000, 5), -1, "contiguous"),  # rows spanning several 512 KB chunks of the sums
]

ACTS = {
    None: lambda t: t,
    "relu": torch.relu,
    "leaky_relu": lambda t: TF.leaky_relu(t, 0.2),
    "silu": TF.silu,
    "gelu": TF.gelu,
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
}


def _make(shape, layout, dtype=torch.float64, offset=1.0, scale=3.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * scale + offset
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":
        x = x[:, :, ::2]
    return x.to(dtype)


@needs_kernels
@pytest.mark.parametrize("shape,axis,layout", LAYOUTS)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
def test_training_matches_reference(shape, axis, layout, dtype, tol):
    x = _make(shape, layout, dtype).requires_grad_()  # a sliced view is smaller than what it was cut from
    assert_train_matches_reference(x, axis, "kernel", tol)


@needs_kernels
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_output_keeps_the_input_layout_without_copies(layout):
    x = _make((4, 6, 5, 5), layout, torch.float32).requires_grad_()
    layer = bnlab.BatchNorm(axis=1)
    y = layer(x)
    assert y.stride() == x.stride()
    y.backward(torch.ones_like(y))
    assert x.grad.stride() == x.stride()


@needs_kernels
@pytest.mark.parametrize("act", list(ACTS))
@pytest.mark.parametrize("shape,axis", [((40, 6), -1), ((600, 6), -1), ((301, 70), -1), ((260, 130), -1), ((4, 6, 5, 7), 1)])
@pytest.mark.parametrize("offset", [0.3, 50.0])  # rows: the two-parameter forms, then the exact ones (mean far from 0)
def test_fused_activation_matches_composite(act, shape, axis, offset):
    x = _make(shape, "contiguous", torch.float64, offset=offset, scale=1.0).requires_grad_()
    fs = R.feature_shape(shape, axis)
    g = (torch.rand(fs, dtype=torch.float64) + 0.5).requires_grad_()
    b = (torch.randn(fs, dtype=torch.float64) * 0.3).requires_grad_()
    dy = torch.randn(shape, dtype=torch.float64)
    feat = F.normalize_axes(axis, x.ndim)
    mm, mv = torch.zeros(fs, dtype=torch.float64), torch.ones(fs, dtype=torch.float64)
    y = F.batch_norm(x, mm, mv, g, b, training=True, axis=feat, momentum=0.9, impl="kernel", activation=act,
                     negative_slope=0.2)
    ref_mm, ref_mv = mm.clone().zero_(), mv.clone().fill_(1)
    yr = ACTS[act](F.batch_norm(x, ref_mm, ref_mv, g, b, training=True, axis=feat, momentum=0.9, impl="composite"))
    torch.testing.assert_close(y, yr, atol=1e-12, rtol=1e-12)
    grads = torch.autograd.grad(y, (x, g, b), dy)
    grads_r = torch.autograd.grad(yr, (x, g, b), dy)
    for a, r in zip(grads, grads_r):
        torch.testing.assert_close(a, r, atol=1e-11, rtol=1e-11)
    torch.testing.assert_close(mm, ref_mm, atol=1e-14, rtol=1e-14)
    torch.testing.assert_close(mv, ref_mv, atol=1e-14, rtol=1e-14)
    # inference: fused too, against the same transform done by PyTorch ops
    with torch.no_grad():
        yi = F.batch_norm_inference(x, mm, mv, g, b, axis=feat, activation=act, negative_slope=0.2)
    yi_r = ACTS[act](torch.from_numpy(R.forward_inference(x.detach().numpy(), g.detach().numpy(), b.detach().numpy(),
                                                          mm.numpy(), mv.numpy(), 1e-3, axis=axis)))
    torch.testing.assert_close(yi, yi_r, atol=1e-12, rtol=1e-12)


@needs_kernels
@pytest.mark.parametrize("act", [None, "relu", "leaky_relu", "silu"])
@pytest.mark.parametrize("shape,axis", [((7, 3), -1), ((3, 2, 4, 5), 1), ((3, 4, 5, 2), -1)])
def test_gradcheck_and_gradgradcheck_through_the_kernel(act, shape, axis):
    x = (torch.randn(shape, dtype=torch.float64) + 0.2).requires_grad_()
    fs = R.feature_shape(shape, axis)
    g = (torch.rand(fs, dtype=torch.float64) + 0.5).requires_grad_()
    b = (torch.randn(fs, dtype=torch.float64) * 0.2).requires_grad_()
    feat = F.normalize_axes(axis, x.ndim)

    def fn(x, g, b):
        return F.batch_norm(x, None, None, g, b, training=True, axis=feat, impl="kernel", activation=act)

    assert torch.autograd.gradcheck(fn, (x, g, b))
    if act not in ("relu", "leaky_relu"):  # their second derivative is zero almost everywhere but not smooth for finite differences
        assert torch.autograd.gradgradcheck(fn, (x, g, b))


@needs_kernels
def test_bfloat16_is_computed_in_float32():
    x = torch.randn(300, 24) * 2 + 5
    xb = x.to(torch.bfloat16)
    for shape_fn, axis in ((lambda t: t, -1), (lambda t: t.view(25, 12, 24).permute(0, 2, 1).contiguous(), 1)):
        xi = shape_fn(xb).requires_grad_()
        y, mean, var, _ = F.batch_norm_train(xi, axis=axis, impl="kernel")
        assert y.dtype == torch.bfloat16 and mean.dtype == torch.float32
        ones, zeros = np.ones(24), np.zeros(24)
        yr, mr, vr = R.forward_train(xi.detach().double().numpy(), ones, zeros, 1e-3, axis)
        # float32 math, one bfloat16 rounding of the output (8 bits of mantissa)
        np.testing.assert_allclose(y.detach().double().numpy(), yr, atol=2e-2, rtol=1e-2)
        np.testing.assert_allclose(mean.double().numpy(), mr.reshape(-1), rtol=1e-5)
        np.testing.assert_allclose(var.double().numpy(), vr.reshape(-1), rtol=1e-4)
        # the same as rounding the float32 kernel's output
        y32 = F.batch_norm_train(xi.detach().float(), axis=axis, impl="kernel")[0]
        assert torch.equal(y.detach(), y32.to(torch.bfloat16))


@needs_kernels
def test_an_outlying_first_sample_still_gives_exact_statistics():
    # The one-pass sums are shifted by each feature's first value; far out, they would cancel.
    x = torch.randn(4000, 3, dtype=torch.float32)
    x[0] = torch.tensor([1e6, -3e5, 50.0])
    _, mean, var, _ = F.batch_norm_train(x, impl="kernel")
    xd = x.double()
    torch.testing.assert_close(mean.double(), xd.mean(0), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(var.double(), xd.var(0, unbiased=False), rtol=1e-5, atol=0)
    planes = x.t().reshape(1, 3, 4000).contiguous()
    _, mean_p, var_p, _ = F.batch_norm_train(planes, axis=1, impl="kernel")
    torch.testing.assert_close(var_p.double(), xd.var(0, unbiased=False), rtol=1e-5, atol=0)


@needs_kernels
@pytest.mark.parametrize("estimator", ["biased", "unbiased"])
@pytest.mark.parametrize("rows,path", [(50, "small"), (50, "no_grad"), (20000, "kernel")])
def test_moving_statistics_update_and_non_finite_guard(estimator, rows, path):
    # small: an (N, C) batch under F.SMALL_ROWS_NUMEL values with a graph (PyTorch's op + the
    # kernels' update); no_grad: the kernels without autograd; kernel: the kernels' Function
    layer = bnlab.BatchNorm(axis=-1, momentum=0.9, moving_variance_estimator=estimator)
    x = torch.randn(rows, 4) * 2 + 1
    x[3, 2] = float("nan")
    with torch.set_grad_enabled(path != "no_grad"):
        y = layer(x)
    expect_node = {"small": "NativeBatchNormBackward0", "no_grad": None, "kernel": "_KernelTrainBackward"}[path]
    assert (y.grad_fn and type(y.grad_fn).__name__) == expect_node
    mm, mv = layer.moving_mean, layer.moving_variance
    xd = x.double()
    expect_m = 0.1 * xd.mean(0)
    expect_v = 0.9 + 0.1 * xd.var(0, unbiased=estimator == "unbiased")
    keep = torch.tensor([True, True, False, True])
    torch.testing.assert_close(mm[keep].double(), expect_m[keep], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(mv[keep].double(), expect_v[keep], rtol=1e-6, atol=1e-7)
    assert mm[2].item() == 0.0 and mv[2].item() == 1.0  # bit for bit untouched
    # the next clean batch updates every feature (nothing of the NaN batch is carried over,
    # e.g. in the small path's per-layer buffers)
    mm1, mv1 = mm.double().clone(), mv.double().clone()
    x2 = torch.randn(rows, 4) * 3 - 2
    with torch.set_grad_enabled(path != "no_grad"):
        y2 = layer(x2)
    assert torch.isfinite(y2).all()
    x2d = x2.double()
    torch.testing.assert_close(layer.moving_mean.double(), 0.9 * mm1 + 0.1 * x2d.mean(0), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(layer.moving_variance.double(),
                               0.9 * mv1 + 0.1 * x2d.var(0, unbiased=estimator == "unbiased"), rtol=1e-6, atol=1e-7)
    one = bnlab.BatchNorm(axis=-1, moving_variance_estimator="unbiased")
    one(torch.randn(1, 4))  # one value per feature: no unbiased variance, so no update
    assert torch.equal(one.moving_variance, torch.ones(4))


@needs_kernels
@pytest.mark.parametrize(
    "shape,layout,node",
    [
        ((4, 6, 5, 5), "contiguous", "NativeBatchNormBackward0"),  # small NCHW: PyTorch's op
        ((4, 6, 5, 5), "channels_last", "NativeBatchNormBackward0"),
        ((3, 6, 7), "contiguous", "NativeBatchNormBackward0"),  # (N, C, L)
        ((2, 6, 3, 4, 5), "channels_last_3d", "NativeBatchNormBackward0"),
        ((30, 6, 10, 10), "contiguous", "_KernelTrainBackward"),  # above F.SMALL_PLANES_NUMEL
        ((60, 6, 10, 10), "channels_last", "_KernelTrainBackward"),  # above twice that
        ((4, 5, 5, 6), "nhwc", "_KernelTrainBackward"),  # features on the last axis: the kernels
    ],
)
def test_small_planes_take_pytorchs_op_with_bnlabs_conventions(shape, layout, node):
    # A small training batch with the features on axis 1, in a layout PyTorch's op takes as it is,
    # goes through that op (its C++ autograd node), the moving statistics through the kernels'
    # update (Keras momentum, biased variance, non-finite guard): all against the float64 reference.
    axis = -1 if layout == "nhwc" else 1
    ax = axis % len(shape)
    layer = bnlab.BatchNorm(axis=axis, momentum=0.9)
    x = torch.randn(shape, dtype=torch.float64) * 2 + 1
    where = [1] * len(shape)
    where[ax] = 2
    x[tuple(where)] = float("nan")  # feature 2 gets a NaN: its moving values must not move
    if layout in ("channels_last", "channels_last_3d"):
        x = x.contiguous(memory_format=getattr(torch, layout))
    xr = x.float().requires_grad_()
    y = layer(xr)
    assert type(y.grad_fn).__name__ == node
    assert y.stride() == xr.stride()
    red = tuple(d for d in range(x.dim()) if d != ax)
    keep = torch.tensor([c != 2 for c in range(6)])
    torch.testing.assert_close(layer.moving_mean[keep].double(), (0.1 * x.mean(red))[keep], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.moving_variance[keep].double(), (0.9 + 0.1 * x.var(red, unbiased=False))[keep],
                               rtol=1e-5, atol=1e-6)
    assert layer.moving_mean[2].item() == 0.0 and layer.moving_variance[2].item() == 1.0
    # a clean batch: output and gradients against the float64 reference
    x2 = (torch.randn(shape, dtype=torch.float64) * 3 - 1)
    if layout in ("channels_last", "channels_last_3d"):
        x2 = x2.contiguous(memory_format=getattr(torch, layout))
    with torch.no_grad():
        layer.gamma.copy_(torch.rand(6) + 0.5)
        layer.beta.copy_(torch.randn(6))
    x2r = x2.float().requires_grad_()
    y2 = layer(x2r)
    dy = torch.randn(shape, dtype=torch.float64)
    y2.backward(dy.float())
    xd = x2.clone().requires_grad_()
    fshape = [1] * x.dim()
    fshape[axis] = 6
    g, b = layer.gamma.detach().double().view(fshape), layer.beta.detach().double().view(fshape)
    var, mean = torch.var_mean(xd, red, correction=0, keepdim=True)
    ref = (xd - mean) / torch.sqrt(var + 1e-3) * g + b
    ref.backward(dy)
    torch.testing.assert_close(y2.detach().double(), ref.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x2r.grad.double(), xd.grad, rtol=1e-4, atol=1e-4)
    assert layer.num_batches_tracked.item() == 2


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_small_batch_path_without_moving_statistics(dtype):
    # F.batch_norm with no moving statistics on a small (N, C) batch that records a graph: PyTorch's
    # op without buffers; values and gradients against the float64 reference
    x = (torch.randn(40, 6, dtype=torch.float64) * 3 + 2).to(dtype).requires_grad_()
    gamma = torch.rand(6, dtype=dtype).add_(0.5).requires_grad_()
    beta = torch.randn(6, dtype=dtype).requires_grad_()
    y = F.batch_norm(x, None, None, gamma, beta, training=True, epsilon=1e-3)
    assert type(y.grad_fn).__name__ == "NativeBatchNormBackward0"
    dy = torch.randn_like(y)
    y.backward(dy)
    xd, gd, bd = (t.detach().double().requires_grad_() for t in (x, gamma, beta))
    var, mean = torch.var_mean(xd, 0, correction=0)
    ref = (xd - mean) / torch.sqrt(var + 1e-3) * gd + bd
    ref.backward(dy.double())
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(y.detach().double(), ref.detach(), **tol)
    for got, want in ((x.grad, xd.grad), (gamma.grad, gd.grad), (beta.grad, bd.grad)):
        torch.testing.assert_close(got.double(), want, **tol)


@needs_kernels
@pytest.mark.parametrize("estimator", ["biased", "unbiased"])
def test_small_batch_path_takes_bfloat16_data_with_float32_statistics(estimator):
    # bfloat16 (N, C) batches with a graph take PyTorch's mixed-type op (float32 parameters and
    # statistics, computed in float32) like float32 ones: same node, same moving-statistics
    # convention and non-finite guard, values within bfloat16 rounding of the float64 reference
    layer = bnlab.BatchNorm(axis=-1, momentum=0.9, moving_variance_estimator=estimator)
    x = (torch.randn(64, 5, dtype=torch.float64) * 2 + 1).to(torch.bfloat16)
    x[3, 2] = float("nan")
    xr = x.clone().requires_grad_()
    y = layer(xr)
    assert type(y.grad_fn).__name__ == "NativeBatchNormBackward0" and y.dtype == torch.bfloat16
    assert layer.moving_mean.dtype == torch.float32
    xd = x.double()
    keep = torch.tensor([True, True, False, True, True])
    torch.testing.assert_close(layer.moving_mean[keep].double(), 0.1 * xd.mean(0)[keep], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.moving_variance[keep].double(),
                               0.9 + 0.1 * xd.var(0, unbiased=estimator == "unbiased")[keep], rtol=1e-5, atol=1e-6)
    assert layer.moving_mean[2].item() == 0.0 and layer.moving_variance[2].item() == 1.0  # untouched
    # a clean batch: output and gradients against the float64 reference (gamma, beta non-trivial)
    with torch.no_grad():
        layer.gamma.copy_(torch.rand(5) + 0.5)
        layer.beta.copy_(torch.randn(5))
    x2 = (torch.randn(64, 5, dtype=torch.float64) * 3 - 2).to(torch.bfloat16).requires_grad_()
    y2 = layer(x2)
    dy = torch.randn(64, 5, dtype=torch.float64).to(torch.bfloat16)
    y2.backward(dy)
    xd = x2.detach().double().requires_grad_()
    var, mean = torch.var_mean(xd, 0, correction=0)
    ref = (xd - mean) / torch.sqrt(var + 1e-3) * layer.gamma.detach().double() + layer.beta.detach().double()
    ref.backward(dy.double())
    torch.testing.assert_close(y2.detach().double(), ref.detach(), rtol=1e-2, atol=2e-2)
    torch.testing.assert_close(x2.grad.double(), xd.grad, rtol=2e-2, atol=2e-2)
    assert layer.gamma.grad.dtype == torch.float32 and torch.isfinite(layer.gamma.grad).all()


@needs_kernels
def test_results_are_deterministic_for_a_thread_count():
    x = torch.randn(256, 64, 9, 9)
    layer = bnlab.BatchNorm(axis=1)
    old = torch.get_num_threads()
    try:
        outs = {}
        for threads in (1, 2):
            torch.set_num_threads(threads)
            runs = []
            for _ in range(3):
                xi = x.clone().requires_grad_()
                y = layer(xi)
                y.backward(torch.ones_like(y) * xi.detach())
                runs.append((y.detach(), xi.grad))
            for y, dx in runs[1:]:
                assert torch.equal(y, runs[0][0]) and torch.equal(dx, runs[0][1])
            outs[threads] = runs[0]
        torch.testing.assert_close(outs[1][0], outs[2][0], atol=1e-5, rtol=1e-5)
    finally:
        torch.set_num_threads(old)


@needs_kernels
@pytest.mark.parametrize("features", [1, 3, 7, 13, 40, 64, 100, 130, 300])
@pytest.mark.parametrize("offset", [0.3, 50.0])  # two-parameter forms, then the exact ones
def test_rows_split_across_threads(monkeypatch, features, offset):
    """Two threads on small inputs: each thread's share of super-rows, the leftover rows, the
    grouping of narrow rows in the streaming passes (normalize below 32 features, dx and the
    backward's sums below 64), and both builds of the backward's sums (unroll-and-jam off
    from 128 features on)."""
    monkeypatch.setattr(_kernels, "PARALLEL_MIN_NUMEL", 1)
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        super_rows = -(-1024 // features)
        rows = 2 * super_rows + 11  # two super-rows, then 11 rows that fit none
        x = _make((rows, features), "contiguous", torch.float64, offset=offset).requires_grad_()
        assert_train_matches_reference(x, -1, "kernel", 1e-12)
        mm = torch.randn(features, dtype=torch.float64) + offset
        mv = torch.rand(features, dtype=torch.float64) + 0.5
        g, b = torch.rand(features, dtype=torch.float64) + 0.5, torch.randn(features, dtype=torch.float64)
        with torch.no_grad():
            y = F.batch_norm_inference(x, mm, mv, g, b, epsilon=1e-3)
        expect = (x.detach() - mm) / torch.sqrt(mv + 1e-3) * g + b
        torch.testing.assert_close(y, expect, rtol=1e-12, atol=1e-12)
    finally:
        torch.set_num_threads(old)


@needs_kernels
@pytest.mark.parametrize("features", [16, 32, 64, 128, 48])  # 48: no loop of its own (the generic one, as a control)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("act", [None, "relu", "leaky_relu"])
@pytest.mark.parametrize("offset", [0.3, 50.0])  # two-parameter forms (fixed-width loops), then the exact ones
def test_fixed_width_rows_match_float64(monkeypatch, features, dtype, act, offset):
    """Rows of 16, 32 and 64 features have loops of their own for float32 and bfloat16 storage
    (bn_cpu.c, FIXED_WIDTHS): forward, backward and inference on two threads, against the same
    layer computed in float64 from the same (rounded) inputs."""
    monkeypatch.setattr(_kernels, "PARALLEL_MIN_NUMEL", 1)
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        rows = 2 * 2500 + 7  # several 1024-row chunks of the sums per thread, and rows left over
        gen = torch.Generator().manual_seed(3)
        pdtype = torch.float32  # parameters and statistics (also for bfloat16 data)
        # every input drawn once and rounded to the storage type, so both runs see the same numbers
        x64 = _make((rows, features), "contiguous", torch.float64, offset=offset).to(dtype).double()
        dy64 = torch.randn(rows, features, generator=gen, dtype=torch.float64).to(dtype).double()
        g64 = (torch.rand(features, generator=gen, dtype=torch.float64) + 0.5).to(pdtype).double()
        b64 = torch.randn(features, generator=gen, dtype=torch.float64).to(pdtype).double()
        if act is not None:  # no gradient where the activation's kink could fall either side in float32
            var, mean = torch.var_mean(x64, 0, correction=0)
            z64 = (x64 - mean) / torch.sqrt(var + 1e-3) * g64 + b64
            dy64 = torch.where(z64.abs() < 1e-3, 0.0, dy64)
        out = {}
        for dt, pdt in ((dtype, pdtype), (torch.float64, torch.float64)):
            layer = bnlab.BatchNormAct(activation=act or "identity", negative_slope=0.2, num_features=features).to(pdt)
            with torch.no_grad():
                layer.weight.copy_(g64)
                layer.bias.copy_(b64)
            x = x64.to(dt).requires_grad_()
            y = layer(x)
            y.backward(dy64.to(dt))
            layer.eval()
            with torch.no_grad():
                z = layer(x64.to(dt))
            outs = (y.detach(), x.grad, layer.weight.grad, layer.bias.grad, z, layer.running_mean, layer.running_var)
            out[dt] = [t.double() for t in outs]
        tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
        names = ("y", "dx", "dgamma", "dbeta", "inference", "moving mean", "moving var")
        for name, a, b in zip(names, out[dtype], out[torch.float64], strict=True):
            scale = b.abs().max().clamp(min=1.0)
            assert (a - b).abs().max() <= tol * scale, (name, (a - b).abs().max().item(), scale.item())
    finally:
        torch.set_num_threads(old)


@needs_kernels
@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="x86-64 instruction sets")
@pytest.mark.parametrize("march", ["haswell", "x86-64"])  # AVX2 without AVX-512; SSE2 only
def test_a_build_for_an_older_x86_agrees(tmp_path, monkeypatch, march):
    """The paths that depend on the instruction set (128-feature loops and 16-float vectors with
    AVX-512, 8-float vectors with AVX2, neither with SSE2) built for an older CPU give this
    machine's results: forward, backward, inference and moving statistics, rows of the fixed
    widths and one other and NCHW planes (dx from vector registers), float32 and bfloat16,
    ordinary and streamed outputs, two threads."""
    cc = os.environ.get("CC") or "cc"
    err = _kernels._compile(cc, [f"-march={march}", "-fopenmp"], tmp_path / "older.so")
    if err is not None:
        pytest.skip(f"{cc} cannot build for -march={march}: {err}")
    libs = (_kernels.get(), _kernels._open(tmp_path / "older.so"))
    monkeypatch.setattr(_kernels, "PARALLEL_MIN_NUMEL", 1)
    old_threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for threshold in (None, 1):  # the machine's streaming threshold, then every output streamed
            for lib in libs:
                lib.lib.bnlab_set_stream_min_bytes(_kernels.stream_min_bytes() if threshold is None else threshold)
            for features in (16, 32, 64, 128, 48, "planes"):  # planes: NCHW of 63 and 64 values
                for dtype in (torch.float32, torch.bfloat16):
                    shapes = [(6, 5, 7, 9), (4, 3, 8, 8)] if features == "planes" else [(1100, features)]
                    for x in (_make(shape, "contiguous", dtype, offset=0.3) for shape in shapes):
                        _agree(libs, x, dtype, monkeypatch, (features, dtype, threshold))
    finally:
        torch.set_num_threads(old_threads)
        for lib in libs:
            lib.lib.bnlab_set_stream_min_bytes(_kernels.stream_min_bytes())


def _agree(libs, x, dtype, monkeypatch, where):
    outs = []
    for lib in libs:
        monkeypatch.setitem(_kernels._state, "kernels", lib)
        outs.append([t.double() for t in _kernel_outputs(x, None)])
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    for a, b in zip(*outs, strict=True):
        assert (a - b).abs().max() <= tol * b.abs().max().clamp(min=1.0), where


@needs_kernels
def test_inference_with_gradients_uses_pytorch_and_agrees():
    layer = bnlab.BatchNorm(axis=1, num_features=3).eval()
    with torch.no_grad():
        layer.moving_mean.copy_(torch.tensor([0.5, -1.0, 2.0]))
        layer.moving_variance.copy_(torch.tensor([2.0, 0.5, 1.5]))
    x = torch.randn(4, 3, 5)
    with torch.no_grad():
        y_kernel = layer(x)
    xg = x.clone().requires_grad_()
    y_torch = layer(xg)  # needs a graph: the PyTorch path
    torch.testing.assert_close(y_kernel, y_torch.detach())
    y_torch.sum().backward()
    assert xg.grad is not None


def _kernels_off(monkeypatch):
    """Switch the kernels off in this process: every call then takes a PyTorch path."""
    monkeypatch.setattr(ops, "loaded", lambda: None)


@needs_kernels
@pytest.mark.parametrize(
    "case",
    ["2d", "nchw", "channels-last", "nhwc", "permuted-view", "float64", "bfloat16", "relu", "frozen-in-train",
     "no-affine"],
)
def test_inference_layouts_match_pytorchs_path_and_the_reference(monkeypatch, case):
    # A built layer's inference in every layout goes to the kernels (or PyTorch's op where they do
    # not take it): the same values as the PyTorch path and the float64 reference, in x's layout.
    torch.manual_seed(1)
    shape, axis = {"2d": ((37, 24), -1), "nhwc": ((3, 5, 4, 24), -1), "permuted-view": ((3, 24, 5, 4), 1)}.get(
        case, ((3, 24, 5, 4), 1))
    dtype = {"float64": torch.float64, "bfloat16": torch.bfloat16}.get(case, torch.float32)
    kwargs = {"center": False, "scale": False} if case == "no-affine" else {}
    layer = (bnlab.BatchNormAct(axis=axis, activation="relu") if case == "relu" else bnlab.BatchNorm(axis=axis, **kwargs))
    layer = layer.to(dtype if dtype is not torch.bfloat16 else torch.float32)
    x = (torch.randn(shape) * 3 + 1).to(dtype)
    if case == "channels-last":
        x = x.contiguous(memory_format=torch.channels_last)
    if case == "permuted-view":  # (N, C, H, W) seen through a permutation
        x = x.permute(0, 1, 3, 2)
    for _ in range(3):
        layer(x)  # moving statistics away from their initial values
    if case == "frozen-in-train":
        layer.trainable = False  # Keras: a frozen layer runs inference even in training mode
    else:
        layer.eval()
    with torch.no_grad():
        fast = layer(x)
        _kernels_off(monkeypatch)
        torch_path = layer(x)
    monkeypatch.undo()
    assert fast.dtype == x.dtype and fast.stride() == torch_path.stride()
    tol = 1e-2 if dtype is torch.bfloat16 else 1e-6
    torch.testing.assert_close(fast, torch_path, rtol=tol, atol=tol)
    c = shape[axis]
    ref = R.forward_inference(
        x.double().numpy(), np.ones(c) if layer.gamma is None else layer.gamma.detach().double().numpy(),
        np.zeros(c) if layer.beta is None else layer.beta.detach().double().numpy(),
        layer.moving_mean.double().numpy(), layer.moving_variance.double().numpy(), layer.epsilon, axis=axis)
    if case == "relu":
        ref = np.maximum(ref, 0)
    tol = 2e-2 if dtype is torch.bfloat16 else 1e-5
    np.testing.assert_allclose(fast.double().numpy(), ref, rtol=tol, atol=tol)
    # with gradients wanted the transform must record a graph (PyTorch's ops), not run the kernel
    if case != "frozen-in-train":
        y = layer(x.detach().float().requires_grad_() if dtype is torch.bfloat16 else x.detach().requires_grad_())
        assert y.requires_grad


@needs_kernels
@pytest.mark.parametrize(
    "case",
    ["2d", "2d-axis1", "2d-axis0", "nchw", "channels-last", "float64", "bfloat16", "unbiased", "cumulative",
     "renorm", "no-grad", "kernel-rows", "kernel-planes", "kernel-no-grad", "kernel-channels-last", "kernel-nhwc",
     "kernel-unbiased", "kernel-float64", "dropin-1d", "dropin-1d-3d", "dropin-2d", "dropin-2d-kernel",
     "dropin-cumulative", "dropin-eval"],
)
def test_training_layouts_match_pytorchs_path(case, monkeypatch):
    # Training batches of a built layer, in every layout and face: outputs, gradients, moving
    # statistics and counters with the kernels (and their small-batch route) as without them.
    shape, axis = {"2d": ((32, 24), -1), "2d-axis1": ((32, 24), 1), "2d-axis0": ((24, 32), 0),
                   "kernel-rows": ((300, 300), -1), "kernel-no-grad": ((300, 300), -1),
                   "kernel-planes": ((4, 24, 30, 30), 1), "dropin-1d": ((32, 24), 1), "dropin-1d-3d": ((8, 24, 10), 1),
                   "dropin-2d-kernel": ((8, 24, 30, 30), 1), "kernel-channels-last": ((8, 24, 30, 30), 1),
                   "kernel-nhwc": ((8, 30, 30, 24), -1), "kernel-unbiased": ((300, 300), -1),
                   "kernel-float64": ((300, 300), -1)}.get(case, ((6, 24, 5, 4), 1))
    kwargs = {"unbiased": {"moving_variance_estimator": "unbiased"}, "cumulative": {"momentum": None},
              "renorm": {"renorm": True}, "kernel-unbiased": {"moving_variance_estimator": "unbiased"}}.get(case, {})
    dtype = {"float64": torch.float64, "bfloat16": torch.bfloat16, "kernel-float64": torch.float64}.get(case, torch.float32)
    layers = []
    for _ in range(2):
        torch.manual_seed(3)
        if case.startswith("dropin"):  # PyTorch's faces: momentum the weight of the new value, unbiased variance
            face = {2: bnlab.nn.BatchNorm1d, 3: bnlab.nn.BatchNorm1d, 4: bnlab.nn.BatchNorm2d}[len(shape)]
            layer = face(shape[1], momentum=None if case == "dropin-cumulative" else 0.1)
        else:
            layer = bnlab.BatchNorm(axis=axis, **kwargs)
        layer(torch.randn(shape).to(dtype))  # built, statistics moved once
        if case == "dropin-eval":
            layer.eval()
        if dtype is torch.float64:
            layer = layer.double()
        layers.append(layer)
    torch.manual_seed(4)
    xs = [(torch.randn(shape) * 2 + 0.5).to(dtype) for _ in range(3)]
    if case in ("channels-last", "kernel-channels-last"):
        xs = [x.contiguous(memory_format=torch.channels_last) for x in xs]
    outs, grads = [], []
    for layer, kernels in zip(layers, (True, False), strict=True):
        if not kernels:
            _kernels_off(monkeypatch)
        ys, gs = [], []
        for x in xs:
            grad = not case.endswith("no-grad")
            xr = x.clone().requires_grad_(grad)
            with torch.set_grad_enabled(grad):
                y = layer(xr)
            if grad:
                y.float().pow(2).sum().backward()
                gs.append((xr.grad, layer.gamma.grad.clone(), layer.beta.grad.clone()))
            ys.append(y.detach())
        outs.append(ys)
        grads.append(gs)
    tol = dict(rtol=2e-2, atol=2e-2) if dtype is torch.bfloat16 else dict(rtol=1e-4, atol=1e-4)
    for a, b in zip(*outs, strict=True):
        assert a.stride() == b.stride()
        torch.testing.assert_close(a, b, **tol)
    for ga, gb in zip(*grads, strict=True):
        # dgamma, dbeta: sums over up to 7,200 values per feature, where PyTorch's float32 sums drift
        # by up to 1.2e-2 from a float64 reference (the kernels' by under 1e-3)
        for a, b, atol in zip(ga, gb, (1e-4, 3e-2, 3e-2), strict=True):
            torch.testing.assert_close(a, b, **(tol if dtype is torch.bfloat16 else dict(rtol=1e-4, atol=atol)))
    for (name, a), (_, b) in zip(layers[0].state_dict().items(), layers[1].state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    assert layers[0].num_batches_tracked.item() == (1 if case == "dropin-eval" else 4)


STATE_CHANGES = ["none", "load_state_dict", "data-swap", "swap-mean", "swap-var", "swap-counter", "replace-mean",
                 "replace-var", "replace-counter", "float-counter", "to-float64", "momentum-none", "unbiased",
                 "no-graph", "frozen", "eval", "rank", "features", "deepcopy", "epsilon", "momentum", "input-float64",
                 "input-meta", "virtual-batch", "mean-int32-in-place", "var-int32-in-place", "counter-float64-in-place",
                 "swap-gamma", "swap-beta", "replace-gamma", "replace-beta", "gamma-bfloat16-in-place",
                 "beta-bfloat16-in-place", "strides", "strided-view", "batch-size", "no-grad-mode", "shrink-gamma",
                 "shrink-mean", "neg-gamma", "strided-gamma", "empty-storage-var"]


def _outcome(fn):
    """``(result, None)``, or ``(None, exception type)`` when ``fn`` raises."""
    try:
        return fn(), None
    except Exception as e:  # noqa: BLE001 - compared with what the other path raises
        return None, type(e)


@needs_kernels
@pytest.mark.parametrize("kind", ["small", "kernel"])
@pytest.mark.parametrize("change", STATE_CHANGES)
def test_changes_between_batches_give_pytorchs_path_result(kind, change, monkeypatch):
    # Whatever is changed on a layer between training batches (tensors swapped under it, replaced,
    # re-viewed as another dtype or size, its settings), the next batches give what the same layer
    # gives with the kernels switched off (PyTorch's paths), or raise the same error: the kernels
    # never read or write through a tensor that is not what they were told.
    import copy

    torch.manual_seed(5)
    rows = 16 if kind == "small" else 10000  # (10000, 8): 80,000 values, past the small-batch route
    layer = bnlab.BatchNorm(axis=-1)
    x0 = torch.randn(rows, 8)
    for _ in range(2):
        layer(x0.clone().requires_grad_())
    if change == "load_state_dict":
        layer.load_state_dict({k: v * 0.5 if v.is_floating_point() else v for k, v in layer.state_dict().items()})
    elif change.startswith(("data-swap", "swap-")):  # same tensor objects, new storage
        if change in ("data-swap", "swap-mean"):
            layer.running_mean.data = torch.full((8,), 0.25)
        if change in ("data-swap", "swap-var"):
            layer.running_var.data = torch.full((8,), 2.0)
        if change in ("data-swap", "swap-counter"):
            layer.num_batches_tracked.data = torch.tensor(7)
        if change == "swap-gamma":
            layer.weight.data = torch.full((8,), 1.5)
        if change == "swap-beta":
            layer.bias.data = torch.full((8,), -0.5)
    elif change == "replace-mean":  # new tensors in the buffers' places
        layer.running_mean = torch.full((8,), 0.25)
    elif change == "replace-var":
        layer.running_var = torch.full((8,), 2.0)
    elif change == "replace-counter":
        layer.num_batches_tracked = torch.tensor(7)
    elif change == "replace-gamma":
        layer.weight = torch.nn.Parameter(torch.full((8,), 1.5))
    elif change == "replace-beta":
        layer.bias = torch.nn.Parameter(torch.full((8,), -0.5))
    elif change.endswith("-in-place"):  # the same memory seen as another dtype
        name, dt = change.split("-")[:2]
        t = {"gamma": layer.weight, "beta": layer.bias, "mean": layer.running_mean, "var": layer.running_var,
             "counter": layer.num_batches_tracked}[name]
        t.data = t.data.view(getattr(torch, dt))
    elif change == "shrink-gamma":  # fewer values than features (C once wrote 8 gradients into 1)
        layer.weight.data = layer.weight.data[:1]
    elif change == "shrink-mean":
        layer.running_mean.data = layer.running_mean.data[:1]
    elif change == "neg-gamma":  # a negative-bit view: its memory holds -gamma
        layer.weight.data = torch._neg_view(torch.full((8,), -1.5))
    elif change == "strided-gamma":
        layer.weight.data = torch.full((16,), 1.5)[::2]
    elif change == "empty-storage-var":  # the tensor's storage taken away under it
        layer.running_var.untyped_storage().resize_(0)
    elif change == "float-counter":  # a counter C cannot increment: PyTorch counts it
        layer.num_batches_tracked = torch.tensor(7.0)
    elif change == "virtual-batch":
        layer.virtual_batch_size = rows // 4
    elif change == "to-float64":
        layer = layer.double()
    elif change == "momentum-none":
        layer.momentum = None
    elif change == "momentum":
        layer.momentum = 0.5
    elif change == "epsilon":
        layer.epsilon = 0.25
    elif change == "unbiased":
        layer.moving_variance_estimator = "unbiased"
    elif change == "frozen":
        layer.trainable = False
    elif change == "eval":
        layer.eval()
    elif change == "deepcopy":
        layer = copy.deepcopy(layer)
    reference = copy.deepcopy(layer) if change != "empty-storage-var" else layer
    dtype = torch.float64 if change in ("to-float64", "input-float64") else torch.float32
    # rank: (N, L, C) after (N, C) batches, L = C so that only the rank tells the feature axis apart
    shape = {"rank": (rows // 8, 8, 8), "features": (rows, 6), "batch-size": (rows + 8, 8)}.get(change, (rows, 8))
    raised = set()
    for step in range(3):
        x = (torch.randn(shape) * 3 + step).to(dtype)
        if change == "strides" and step != 1:  # the same values laid out feature by feature: strides (1, N)
            x = x.t().contiguous().t()
        if change == "strided-view":  # every other row of a larger batch: a copy for the kernels
            x = torch.randn(2 * shape[0], 8)[::2] * 3 + step
        if change == "input-meta":
            x = torch.empty(shape, device="meta")
        grad = change not in ("no-graph", "no-grad-mode", "input-meta")
        if change == "no-graph":
            for bn in (layer, reference):
                bn.gamma.requires_grad_(False)
                bn.beta.requires_grad_(False)
        if change == "features":
            with pytest.raises(ValueError, match="built for 8 features, got 6"):
                layer(x)
            return
        outcomes = []
        for bn, kernels in ((layer, True), (reference, False)):
            if not kernels:
                _kernels_off(monkeypatch)
            xr = x.clone().requires_grad_(grad) if x.is_contiguous() else x.detach().requires_grad_(grad)
            with torch.set_grad_enabled(change != "no-grad-mode"):
                outcomes.append(_outcome(lambda: bn(xr)))
            monkeypatch.undo()
        (y, err), (y_ref, err_ref) = outcomes
        assert err is err_ref, (err, err_ref)
        if err is not None:
            raised.add(err)
            continue
        torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
        if grad:
            for t in (y, y_ref):
                t.float().pow(2).sum().backward()
            ga, gb = layer.gamma.grad, reference.gamma.grad
            assert (ga is None and gb is None) or torch.allclose(ga, gb, rtol=1e-3, atol=1e-3)
    refused = ("input-meta", "gamma-bfloat16-in-place", "beta-bfloat16-in-place", "shrink-gamma", "shrink-mean",
               "empty-storage-var", "mean-int32-in-place", "var-int32-in-place")
    if "counter" not in change:
        assert bool(raised) == (change in refused), raised
    if change != "empty-storage-var":
        for (name, a), (_, b) in zip(layer.state_dict().items(), reference.state_dict().items(), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)


@needs_kernels
def test_one_value_per_feature_on_the_kernels():
    # (1, C) batches go to the kernels too; the unbiased moving variance has no value to take then:
    # the update is skipped (PyTorch's paths do the same), nothing divides by zero
    x = torch.randn(1, 70000)
    for estimator in ("biased", "unbiased"):
        layer = bnlab.BatchNorm(axis=-1, moving_variance_estimator=estimator)
        for _ in range(3):
            y = layer(x)
            torch.testing.assert_close(y, torch.zeros_like(y))  # one value: normalizes to beta
        expected = torch.ones(70000) if estimator == "unbiased" else 0.99 ** 3 * torch.ones(70000)
        torch.testing.assert_close(layer.moving_variance, expected)
        assert layer.num_batches_tracked.item() == 3


def bn_mode(layer):
    """The training flag a layer in its current mode takes (frozen: inference)."""
    return layer.training and layer.trainable


def test_shortcut_keeps_the_full_paths_errors():
    # After a valid call the shortcut serves that rank; inputs the full path refuses still raise.
    bn1 = bnlab.nn.BatchNorm1d(4)
    bn1(torch.randn(8, 4))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        bn1(torch.randn(1, 4))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        bn1(torch.randn(1, 4, 1))
    for _ in range(2):  # the rank is cached after the first refusal: still refused
        with pytest.raises(ValueError, match="expected 2D or 3D input"):
            bn1(torch.randn(2, 4, 3, 3))
    bn = bnlab.BatchNorm(axis=-1)
    bn(torch.randn(8, 4))
    for training in (True, False):
        bn.train(training)
        with pytest.raises(ValueError, match="built for 4 features, got 5"):
            bn(torch.randn(8, 5))
    big = bnlab.nn.BatchNorm1d(70000)
    big(torch.randn(2, 70000))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        big(torch.randn(1, 70000))  # too large for the small path: the kernels' branch must not take it


def test_impl_kernel_refuses_what_it_cannot_do():
    x = torch.randn(8, 3)
    with pytest.raises(ValueError, match="impl='kernel' cannot run here"):
        F.batch_norm_train(x, mask=torch.ones(8, dtype=torch.bool), impl="kernel")
    with pytest.raises(ValueError, match="impl='kernel' cannot run here"):
        F.batch_norm_train(x.half(), impl="kernel")


def test_fallback_without_kernels(monkeypatch):
    x = torch.randn(20, 5, 3, 3) * 2 + 1
    expected = torch.nn.functional.batch_norm(x, None, None, None, None, True, 0.0, 1e-3)
    monkeypatch.setenv("BNLAB_KERNELS", "0")
    _kernels._reset()
    try:
        st = _kernels.status()
        assert not st["available"] and "BNLAB_KERNELS" in st["reason"]
        layer = bnlab.BatchNorm(axis=1)
        torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
        with pytest.raises(ValueError, match="BNLAB_KERNELS"):
            F.batch_norm_train(x, axis=1, impl="kernel")
    finally:
        monkeypatch.delenv("BNLAB_KERNELS")
        _kernels._reset()


def test_no_compiler_falls_back_cleanly(monkeypatch, tmp_path):
    monkeypatch.setenv("BNLAB_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "bnlab-no-such-compiler")
    _kernels._reset()
    try:
        with pytest.warns(_kernels.KernelWarning, match="no C compiler"):
            st = _kernels.status()
        assert not st["available"] and "no C compiler" in st["reason"]
        y = bnlab.BatchNorm(axis=-1)(torch.randn(6, 2))
        assert torch.isfinite(y).all()
    finally:
        _kernels._reset()


@pytest.mark.skipif(_kernels.get() is None, reason="no working C compiler here")
def test_build_is_cached_per_machine(monkeypatch, tmp_path):
    monkeypatch.setenv("BNLAB_KERNEL_CACHE", str(tmp_path))
    _kernels._reset()
    try:
        st = _kernels.status()
        assert st["available"], st["reason"]
        built = list(tmp_path.glob("bn_cpu-*"))
        assert len(built) == 1 and not list(tmp_path.glob("*.tmp"))  # no half-written library left
        _kernels._reset()

        def no_compiling(*a, **k):
            raise AssertionError("compiled again although a cached build exists")

        monkeypatch.setattr(_kernels, "_compile", no_compiling)
        assert _kernels.status()["available"]
    finally:
        _kernels._reset()


def test_transforms_and_inference_mode_take_a_safe_path():
    layer = bnlab.BatchNorm(num_features=3)
    x = torch.randn(5, 4, 3)
    with torch.inference_mode():
        y = layer(x)
    torch.testing.assert_close(y, F.batch_norm_train(x, impl="composite")[0])
    # vmap hands functions wrapped tensors: the kernels step aside for the PyTorch ops
    seen = []
    torch.func.vmap(lambda t: seen.append(ops.loaded()) or t)(x)
    assert seen == [None]
    assert ops.loaded() is _kernels.get()


_BROKEN_COMPILE = "#!/bin/sh\necho 'bn_cpu.c:1:1: error: this compiler is broken on purpose' >&2\nexit 1\n"
# every part compiles (an empty object file), the link fails
_BROKEN_LINK = (
    "#!/bin/sh\n"
    "case \" $* \" in *\" -c \"*) while [ \"$1\" != -o ]; do shift; done; : > \"$2\"; exit 0;; esac\n"
    "echo 'ld: error: this link fails on purpose' >&2\nexit 1\n"
)


@pytest.mark.parametrize("script,message", [(_BROKEN_COMPILE, "broken on purpose"), (_BROKEN_LINK, "link fails on purpose")])
def test_a_failing_compiler_falls_back_with_its_first_error(monkeypatch, tmp_path, script, message):
    fake = tmp_path / "fakecc"
    fake.write_text(script)
    fake.chmod(0o755)
    monkeypatch.setenv("BNLAB_KERNEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CC", str(fake))
    _kernels._reset()
    try:
        with pytest.warns(_kernels.KernelWarning, match=message):  # one warning, saying why
            st = _kernels.status()
        assert not st["available"]
        assert "could not build" in st["reason"] and message in st["reason"]
        assert not list((tmp_path / "cache").glob("*"))  # nothing half-written left behind
        x = torch.randn(4, 3, 5)
        y = bnlab.BatchNorm(axis=1)(x)  # runs on the PyTorch paths
        torch.testing.assert_close(y, F.batch_norm_train(x, axis=1, impl="composite")[0])
    finally:
        _kernels._reset()


@pytest.mark.skipif(_kernels.get() is None, reason="no working C compiler here")
def test_two_processes_building_at_once_leave_one_good_library(tmp_path):
    import os
    import subprocess
    import sys

    env = dict(os.environ, BNLAB_KERNEL_CACHE=str(tmp_path))
    code = "import bnlab._kernels as k, sys; sys.exit(0 if k.status()['available'] else 1)"
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env) for _ in range(2)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    assert len(list(tmp_path.glob("bn_cpu-*"))) == 1 and not list(tmp_path.glob("*.tmp"))


# --------------------------------------------------------------------------- streaming stores


def _kernel_outputs(x, act, slope=0.2):
    """Training forward (y), backward (dx, dgamma, dbeta) and inference of the layer, on the kernels."""
    c = x.shape[1] if x.dim() > 2 else x.shape[-1]
    axis = 1 if x.dim() > 2 else -1
    gen = torch.Generator().manual_seed(1)
    pdtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    layer = bnlab.BatchNormAct(activation=act or "identity", negative_slope=slope, axis=axis, num_features=c)
    layer = layer.to(pdtype)
    with torch.no_grad():
        layer.weight.copy_(torch.rand(c, generator=gen, dtype=pdtype) + 0.5)
        layer.bias.copy_(torch.randn(c, generator=gen, dtype=pdtype))
    xi = x.detach().clone().requires_grad_()
    y = layer(xi)
    y.backward(torch.randn(y.shape, generator=gen, dtype=torch.float64).to(y.dtype))
    layer.eval()
    with torch.no_grad():
        z = layer(x)
    return y.detach(), xi.grad, layer.weight.grad, layer.bias.grad, z, layer.running_mean.clone(), layer.running_var.clone()


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("act", [None, "relu", "leaky_relu"])
@pytest.mark.parametrize(
    "shape,layout",
    [
        ((700, 1), "contiguous"),  # rows of one feature
        ((300, 13), "contiguous"),  # rows not a whole number of cache lines
        ((90, 130), "contiguous"),
        ((9, 1100), "contiguous"),  # a row wider than the staging buffer
        ((6, 5, 7, 9), "contiguous"),  # planes of 63 values
        ((2, 3, 5000), "contiguous"),  # planes wider than the staging buffer
        ((6, 5, 7, 9), "channels_last"),
        ((70, 16), "contiguous"),  # widths with loops of their own (bn_cpu.c, FIXED_WIDTHS)
        ((3, 32, 5, 7), "channels_last"),
        ((50, 64), "contiguous"),
        ((40, 128), "contiguous"),  # 128: with AVX-512 only
    ],
)
@pytest.mark.parametrize("offset", [0.3, 50.0])  # rows: the two-parameter forms, then the exact ones
def test_streaming_stores_give_the_same_bits(monkeypatch, shape, layout, act, dtype, offset):
    """Outputs written through the staging buffer and non-temporal stores (every output
    streams with a threshold of one byte) equal the ordinary ones bit for bit, on two threads."""
    kernels = _kernels.get()
    monkeypatch.setattr(_kernels, "PARALLEL_MIN_NUMEL", 1)
    old_threads = torch.get_num_threads()
    torch.set_num_threads(2)
    x = _make(shape, layout, dtype, offset=offset)
    try:
        kernels.lib.bnlab_set_stream_min_bytes(0)
        plain = _kernel_outputs(x, act)
        kernels.lib.bnlab_set_stream_min_bytes(1)
        assert kernels.stream_min_bytes == 1
        streamed = _kernel_outputs(x, act)
    finally:
        kernels.lib.bnlab_set_stream_min_bytes(_kernels.stream_min_bytes())
        torch.set_num_threads(old_threads)
    for a, b in zip(plain, streamed):
        assert a.dtype == b.dtype and torch.equal(a, b)
    assert torch.isfinite(plain[0].float()).all()


def _plain_and_streamed(size, run):
    """Two buffers of ``size`` floats (filled with -7) written by ``run(kernels, buf)``, which
    returns the kernel's status: first with streaming off, then with every output streamed."""
    kernels = _kernels.get()
    outs = []
    try:
        for threshold in (0, 1):
            kernels.lib.bnlab_set_stream_min_bytes(threshold)
            buf = torch.full((size,), -7.0)
            assert run(kernels, buf) == 0
            outs.append(buf)
    finally:
        kernels.lib.bnlab_set_stream_min_bytes(_kernels.stream_min_bytes())
    return outs


@needs_kernels
@pytest.mark.parametrize("shift", [1, 3, 16])
@pytest.mark.parametrize("c", [67, 64])  # 64: float32 rows of whole vectors, stored from registers (bn_cpu.c)
def test_streaming_stores_into_unaligned_outputs(shift, c):
    """The partial cache lines at either end of an output that does not start on a 64-byte
    line are written too, and nothing around it is touched (called through ctypes)."""
    a = 257  # rows of 268 or 256 bytes: inference streams rows of at least 256 bytes
    x = torch.randn(a, c) * 2 + 1
    g, b = torch.rand(c) + 0.5, torch.randn(c)
    mm, mv = torch.randn(c), torch.rand(c) + 0.5
    plain, streamed = _plain_and_streamed(a * c + 2 * shift, lambda kernels, buf: kernels.infer[torch.float32](
        x.data_ptr(), buf.data_ptr() + shift * 4, a, c, 1, g.data_ptr(), b.data_ptr(), mm.data_ptr(),
        mv.data_ptr(), 1e-3, 0, 0.0, 2,
    ))
    assert torch.equal(plain, streamed)
    assert (streamed[:shift] == -7).all() and (streamed[-shift:] == -7).all()
    expect = (x - mm) / torch.sqrt(mv + 1e-3) * g + b
    torch.testing.assert_close(streamed[shift:-shift].view(a, c), expect, rtol=1e-5, atol=1e-5)


@needs_kernels
@pytest.mark.parametrize("shift", [0, 1, 4, 16])
@pytest.mark.parametrize("c", [32, 48, 67])
def test_streamed_dx_into_unaligned_outputs(shift, c):
    """The backward's dx, streamed (threshold one byte) or not, into an output at any offset: the
    same bits either way (float32 rows of whole vectors take the register path when aligned and
    the staged one otherwise), nothing around it touched, and the formula's values."""
    a = 300
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(a, c, generator=gen) * 2 + 0.5
    dy = torch.randn(a, c, generator=gen)
    g, b = torch.rand(c, generator=gen) + 0.5, torch.randn(c, generator=gen)
    var, mean = torch.var_mean(x, 0, correction=0)
    invstd = 1 / torch.sqrt(var + 1e-3)
    saved = torch.cat([mean, invstd])
    dg, db = torch.empty(c), torch.empty(c)
    plain, streamed = _plain_and_streamed(a * c + 2 * shift + 16, lambda kernels, buf: kernels.train_bwd[torch.float32](
        x.data_ptr(), dy.data_ptr(), buf.data_ptr() + shift * 4, a, c, 1, g.data_ptr(), b.data_ptr(),
        saved.data_ptr(), saved.data_ptr() + 4 * c, dg.data_ptr(), db.data_ptr(), 0, 0.0, 2,
    ))
    assert torch.equal(plain, streamed)
    assert (streamed[:shift] == -7).all() and (streamed[shift + a * c:] == -7).all()
    xh = (x - mean) * invstd
    expect = g * invstd / a * (a * dy - dy.sum(0) - xh * (dy * xh).sum(0))
    torch.testing.assert_close(streamed[shift:shift + a * c].view(a, c), expect, rtol=1e-4, atol=1e-5)


def test_stream_threshold_follows_the_cache_size_and_the_environment(monkeypatch, tmp_path):
    for name, level, size in (("index0", 1, "32K"), ("index2", 2, "1024K"), ("index3", 3, "32768K")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "size").write_text(size + "\n")
        (tmp_path / name / "level").write_text(f"{level}\n")
    assert _kernels.last_level_cache_bytes(tmp_path) == 32 << 20
    assert _kernels.last_level_cache_bytes(tmp_path / "missing") is None
    monkeypatch.setattr(_kernels, "last_level_cache_bytes", lambda: 8 << 20)
    monkeypatch.delenv("BNLAB_STREAM_MIN_BYTES", raising=False)
    assert _kernels.stream_min_bytes() == 4 << 20  # half the last-level cache
    monkeypatch.setattr(_kernels, "last_level_cache_bytes", lambda: None)
    assert _kernels.stream_min_bytes() == 32 << 20  # unknown cache
    monkeypatch.setenv("BNLAB_STREAM_MIN_BYTES", "0")
    assert _kernels.stream_min_bytes() == 0
    monkeypatch.setenv("BNLAB_STREAM_MIN_BYTES", "lots")
    with pytest.raises(ValueError, match="BNLAB_STREAM_MIN_BYTES must be a whole number of bytes, got 'lots'"):
        _kernels.stream_min_bytes()


@needs_kernels
@pytest.mark.parametrize("bad", ["numel", "dtype", "strided", "neg", "storage", "offset-past-storage", "none-x"])
@pytest.mark.parametrize("where", ["gamma", "moving_mean", "x"])
def test_the_boundary_refuses_what_c_must_not_see(bad, where):
    # bnlab._kernels.ops checks every tensor it hands to C, on every call, whatever the routing
    # decided: a tensor that is not what C is told raises BoundaryError before C runs (nothing
    # written: moving statistics and counter unchanged), never a wrong read or write.
    kernels = ops.loaded()
    c, rows = 8, 512
    x = torch.randn(rows, c)
    gamma, beta = torch.ones(c), torch.zeros(c)
    mm, mv, counter = torch.zeros(c), torch.ones(c), torch.tensor(0)

    def spoil(t):
        if bad == "numel":
            return t[:1]
        if bad == "dtype":
            return t.double()
        if bad == "strided":
            return torch.zeros(2 * t.numel())[::2].view(t.shape)
        if bad == "neg":
            return torch._neg_view(-t)
        if bad == "storage":
            u = t.clone()
            u.untyped_storage().resize_(0)
            return u
        if bad == "offset-past-storage":
            u = t.clone()
            u.untyped_storage().resize_(u.element_size() * (u.numel() - 1))
            return u
        return t.expand(*t.shape) if bad == "none-x" else t

    if bad == "none-x":  # overlapping strides (an expanded row) as the data
        if where != "x":
            pytest.skip("an overlapping view only matters for the data")
        x = torch.randn(1, c).expand(rows, c)
    elif where == "x":
        x = spoil(x) if bad != "numel" else x[:1]
    elif where == "gamma":
        gamma = spoil(gamma)
    else:
        mm = spoil(mm)
    before = (mm.clone() if mm.untyped_storage().nbytes() else None, counter.item())
    dims = (rows, c, 1) if bad != "numel" or where != "x" else (rows, c, 1)
    with pytest.raises(ops.BoundaryError):
        ops.train_forward(kernels, x, dims, gamma, beta, 1e-3, (mm, mv, 0.9, 1.0, counter), None, 0.01, False)
    assert counter.item() == before[1]
    if before[0] is not None and where != "moving_mean":
        assert torch.equal(mm, before[0])
    with pytest.raises(ops.BoundaryError):
        ops.inference(kernels, x, dims, gamma, beta, mm, mv, 1e-3, None, 0.01)


@needs_kernels
@pytest.mark.parametrize("act", ["relu", "leaky_relu"])
def test_fused_activation_gradients_at_nan_follow_pytorch(act, monkeypatch):
    # A NaN pre-activation: PyTorch's relu lets the gradient through (threshold_backward keeps it
    # unless the output is <= 0), its leaky relu scales it; the fused kernels do the same.
    torch.manual_seed(0)
    x = torch.randn(200, 400) * 2
    x[7, 3] = float("nan")
    results = []
    for kernels in (True, False):
        if not kernels:
            monkeypatch.setattr(ops, "loaded", lambda: None)
        layer = bnlab.BatchNormAct(axis=-1, activation=act, negative_slope=0.2, num_features=400)
        xr = x.clone().requires_grad_()
        layer(xr).backward(torch.ones_like(x))
        results.append((layer.beta.grad, xr.grad))
    (b_k, x_k), (b_t, x_t) = results
    torch.testing.assert_close(b_k, b_t, equal_nan=True)
    assert torch.isnan(b_k[3]) == torch.isnan(b_t[3]) and torch.isfinite(b_k[:3]).all()


@pytest.mark.parametrize("kernels", [True, False])
def test_a_nan_already_in_the_moving_statistics_stays_and_the_rest_moves(kernels, monkeypatch):
    # The one rule: a feature moves when its batch mean and variance are finite. A NaN put into the
    # moving mean by hand is not the batch's doing: it stays NaN (momentum * NaN), and the
    # feature's variance keeps its average, on every path alike.
    if not kernels:
        monkeypatch.setattr(ops, "loaded", lambda: None)
    for rows in (16, 10000):  # the small route and the kernels' route
        layer = bnlab.BatchNorm(axis=-1, momentum=0.5, num_features=4)
        with torch.no_grad():
            layer.moving_mean[1] = float("nan")
        x = torch.randn(rows, 4)
        layer(x)
        expected_var = 0.5 + 0.5 * x.var(0, unbiased=False)
        assert torch.isnan(layer.moving_mean[1])
        torch.testing.assert_close(layer.moving_variance, expected_var)
        torch.testing.assert_close(layer.moving_mean[[0, 2, 3]], 0.5 * x.mean(0)[[0, 2, 3]])
