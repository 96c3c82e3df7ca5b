"""Batch normalization in plain NumPy, to be read next to the equations.

This is the readable reference: no views, no fused kernels, one line per
equation of Ioffe & Szegedy (2015, arXiv:1502.03167, Algorithms 1 and 2) in the
notation of the lecture in tutorial 002 (``h`` the layer input, ``rho`` the
momentum)::

    E[h_j]      = mean over the batch of h_{i,j}
    Var[h_j]    = mean over the batch of (h_{i,j} - E[h_j])^2        (biased)
    hhat_{i,j}  = (h_{i,j} - E[h_j]) / sqrt(Var[h_j] + eps)
    r_{i,j}     = gamma_j * hhat_{i,j} + beta_j
    E_ema       <- rho * E_ema   + (1 - rho) * E[h_j]
    Var_ema     <- rho * Var_ema + (1 - rho) * Var[h_j]
    inference:  r_{i,j} = gamma_j * (h_{i,j} - E_ema) / sqrt(Var_ema + eps) + beta_j

The test-suite uses these functions as the oracle for :mod:`bnlab.functional`
and :class:`bnlab.BatchNorm`. Everything is computed in float64 unless the
caller passes another ``dtype``.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "feature_shape",
    "moments",
    "forward_train",
    "forward_inference",
    "backward",
    "update_moving",
    "NumpyBatchNorm",
]


def _axes(axis, ndim):
    axes = (axis,) if np.isscalar(axis) else tuple(axis)
    return tuple(sorted(int(a) % ndim for a in axes))


def _reduce_axes(axis, ndim):
    feat = _axes(axis, ndim)
    return tuple(d for d in range(ndim) if d not in feat)


def feature_shape(shape, axis=-1):
    """Shape of gamma/beta/moving statistics for inputs of ``shape``."""
    return tuple(shape[a] for a in _axes(axis, len(shape)))


def _bcast(v, shape, axis):
    """Per-feature array reshaped to broadcast against an input of ``shape``."""
    feat = _axes(axis, len(shape))
    return np.reshape(v, [shape[d] if d in feat else 1 for d in range(len(shape))])


def _weights(x, axis, mask, dtype):
    """0/1 weights of ``x``'s shape: the mask broadcast over the feature axes (all ones without a mask)."""
    if mask is None:
        return np.ones(x.shape, dtype=dtype)
    return np.broadcast_to(np.expand_dims(np.asarray(mask, dtype=dtype), _axes(axis, x.ndim)), x.shape)


def moments(x, axis=-1, mask=None, dtype=np.float64):
    """Batch mean and biased variance per feature; with ``mask``, of the True positions only.

    Returns ``(mean, var, count)``.
    """
    x = np.asarray(x, dtype=dtype)
    red = _reduce_axes(axis, x.ndim)
    w = _weights(x, axis, mask, dtype)
    count = w.sum(axis=red)  # same for every feature
    mean = (w * x).sum(axis=red) / count
    var = (w * (x - _bcast(mean, x.shape, axis)) ** 2).sum(axis=red) / count
    return mean, var, count.reshape(-1)[0]


def forward_train(x, gamma, beta, eps, axis=-1, mask=None, dtype=np.float64):
    """Training-mode output and the batch statistics: ``(y, mean, var)``."""
    x = np.asarray(x, dtype=dtype)
    mean, var, _ = moments(x, axis, mask, dtype)
    hhat = (x - _bcast(mean, x.shape, axis)) / np.sqrt(_bcast(var, x.shape, axis) + eps)
    y = _bcast(gamma, x.shape, axis) * hhat + _bcast(beta, x.shape, axis)
    return y, mean, var


def forward_inference(x, gamma, beta, moving_mean, moving_var, eps, axis=-1, dtype=np.float64):
    """Inference-mode output from the moving statistics."""
    x = np.asarray(x, dtype=dtype)
    hhat = (x - _bcast(moving_mean, x.shape, axis)) / np.sqrt(_bcast(moving_var, x.shape, axis) + eps)
    return _bcast(gamma, x.shape, axis) * hhat + _bcast(beta, x.shape, axis)


def backward(dy, x, gamma, eps, axis=-1, mask=None, dtype=np.float64):
    """Gradients ``(dx, dgamma, dbeta)`` of :func:`forward_train`, by the chain rule step by step.

    Written the long way (through d hhat, d var, d mean) rather than with the
    closed form used by :func:`bnlab.functional.batch_norm_backward`, so that
    the two check each other.
    """
    x = np.asarray(x, dtype=dtype)
    dy = np.asarray(dy, dtype=dtype)
    red = _reduce_axes(axis, x.ndim)
    w = _weights(x, axis, mask, dtype)
    mean, var, count = moments(x, axis, mask, dtype)
    mu = _bcast(mean, x.shape, axis)
    inv = 1.0 / np.sqrt(_bcast(var, x.shape, axis) + eps)
    hhat = (x - mu) * inv
    dgamma = (dy * hhat).sum(axis=red)
    dbeta = dy.sum(axis=red)
    dhhat = dy * _bcast(gamma, x.shape, axis)
    # hhat = (x - mu) * (var + eps)^(-1/2); mu and var depend on x through the weights w.
    dvar = (dhhat * (x - mu) * -0.5 * inv**3).sum(axis=red, keepdims=True)
    dmu = (-dhhat * inv).sum(axis=red, keepdims=True)
    # d var / d mu = -2/M * sum w (x - mu) = 0 exactly, so it is left out.
    dx = dhhat * inv + dvar * 2.0 * w * (x - mu) / count + dmu * w / count
    return dx, dgamma, dbeta


def update_moving(moving, batch_stat, momentum):
    """``momentum * moving + (1 - momentum) * batch_stat`` (Keras: momentum weighs the OLD value)."""
    return momentum * np.asarray(moving) + (1.0 - momentum) * np.asarray(batch_stat)


class NumpyBatchNorm:
    """The tutorial's "custom BatchNormalization layer", in NumPy.

    Holds ``gamma``, ``beta``, ``moving_mean`` and ``moving_variance``; in
    training it normalizes with the batch statistics and updates the moving
    ones, in inference it uses the moving ones. Unlike the tutorial's layer it
    only updates the moving statistics in training.
    """

    def __init__(self, num_features, momentum=0.99, epsilon=1e-3, dtype=np.float64):
        shape = (num_features,) if np.isscalar(num_features) else tuple(num_features)
        self.momentum, self.epsilon, self.dtype = momentum, epsilon, dtype
        self.gamma = np.ones(shape, dtype)
        self.beta = np.zeros(shape, dtype)
        self.moving_mean = np.zeros(shape, dtype)
        self.moving_variance = np.ones(shape, dtype)

    def __call__(self, x, training=False, axis=-1, mask=None):
        if not training:
            return forward_inference(
                x, self.gamma, self.beta, self.moving_mean, self.moving_variance,
                self.epsilon, axis, self.dtype,
            )
        y, mean, var = forward_train(x, self.gamma, self.beta, self.epsilon, axis, mask, self.dtype)
        self.moving_mean = update_moving(self.moving_mean, mean, self.momentum)
        self.moving_variance = update_moving(self.moving_variance, var, self.momentum)
        return y
