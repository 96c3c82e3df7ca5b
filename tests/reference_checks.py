"""Checks shared by the test modules: one implementation of the training transform against the NumPy reference."""

import numpy as np
import torch

from bnlab import functional as F
from bnlab import reference as R


def assert_train_matches_reference(x: torch.Tensor, axis, impl: str, tol: float) -> None:
    """``F.batch_norm_train(x, ..., impl=impl)``: outputs, statistics and gradients against :mod:`bnlab.reference`.

    ``x`` requires grad; gamma, beta and dy are drawn here in ``x``'s dtype.
    """
    dtype, shape = x.dtype, tuple(x.shape)
    fs = R.feature_shape(shape, axis)
    g = (torch.rand(fs, dtype=torch.float64) + 0.5).to(dtype).requires_grad_()
    b = torch.randn(fs, dtype=torch.float64).to(dtype).requires_grad_()
    dy = torch.randn(shape, dtype=torch.float64).to(dtype)
    y, mean, var, count = F.batch_norm_train(x, g, b, axis=axis, epsilon=1e-3, impl=impl)
    dx, dg, db = torch.autograd.grad(y, (x, g, b), dy)
    xn, gn, bn, dyn = (t.detach().double().numpy() for t in (x, g, b, dy))
    yr, mr, vr = R.forward_train(xn, gn, bn, 1e-3, axis)
    dxr, dgr, dbr = R.backward(dyn, xn, gn, 1e-3, axis)
    assert y.shape == x.shape and y.dtype == dtype and dx.shape == x.shape
    np.testing.assert_allclose(y.detach().double().numpy(), yr, atol=tol, rtol=tol)
    np.testing.assert_allclose(mean.double().numpy().reshape(fs), mr, atol=tol, rtol=tol)
    np.testing.assert_allclose(var.double().numpy().reshape(fs), vr, atol=tol, rtol=tol)
    np.testing.assert_allclose(dx.double().numpy(), dxr, atol=tol * 10, rtol=tol * 10)
    np.testing.assert_allclose(dg.double().numpy(), dgr, atol=tol * 10, rtol=tol * 10)
    np.testing.assert_allclose(db.double().numpy(), dbr, atol=tol * 10, rtol=tol * 10)
    assert count == int(np.prod(shape)) // int(np.prod(fs))
