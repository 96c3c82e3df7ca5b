"""The tutorials' architectures, each with a ``norm_layer`` so BN and its variants drop in.

``norm_layer`` is a constructor called as ``norm_layer(num_features, axis=...,
**bn_kwargs)`` (default: :class:`bnlab.BatchNorm`), a name from
:data:`NORM_LAYERS` (``"bnlab"``, ``"renorm"``, ``"ghost:K"``, ``"scratch"``, ``"torch"``), or ``None`` for
the model without batch normalization (its twin). Dense and convolution layers
are initialized as Keras initializes them (glorot-uniform kernels, zero biases;
he-uniform where tutorial 001 asks for it), so results compare with the
tutorials'. Images are channels-first, so BN on convolution outputs uses
``axis=1``.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

import bnlab

__all__ = ["NORM_LAYERS", "ScratchBatchNorm", "TorchBatchNorm", "MODELS", "build", "dense", "conv2d"]


class ScratchBatchNorm(nn.Module):
    """Tutorial 002's "custom BatchNormalization layer", written with plain torch ops and autograd.

    Training: batch mean and (biased) variance over axis 0, normalize, scale and
    shift, then ``ema <- rho * ema + (1 - rho) * batch``; inference: the EMAs.
    Its own defaults are the tutorial's: ``epsilon=1e-5`` and Keras'
    ``add_weight`` default initial values (mean EMA glorot-uniform, variance
    EMA zeros). ``bnlab_defaults=True`` starts it like :class:`bnlab.BatchNorm`
    (epsilon 1e-3, moving mean 0, moving variance 1) so the two can be compared
    number for number.
    """

    def __init__(self, num_features: int, axis: int = -1, momentum: float = 0.99, epsilon: float | None = None, bnlab_defaults: bool = False):
        super().__init__()
        if axis not in (-1, 1):
            raise ValueError(f"ScratchBatchNorm normalizes (N, C) inputs only (axis -1 or 1), got axis={axis}")
        self.rho = momentum
        self.epsilon = (1e-3 if bnlab_defaults else 1e-5) if epsilon is None else epsilon
        self.gamma = nn.Parameter(torch.ones(num_features))
        self.beta = nn.Parameter(torch.zeros(num_features))
        if bnlab_defaults:
            mean_ema, var_ema = torch.zeros(num_features), torch.ones(num_features)
        else:
            limit = (6.0 / (num_features + num_features)) ** 0.5  # glorot_uniform of a 1-D weight
            mean_ema, var_ema = torch.empty(num_features).uniform_(-limit, limit), torch.zeros(num_features)
        self.register_buffer("mean_ema", mean_ema)
        self.register_buffer("var_ema", var_ema)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if self.training:
            mean = inputs.mean(dim=0)
            var = inputs.var(dim=0, unbiased=False)
            with torch.no_grad():
                self.mean_ema.mul_(self.rho).add_((1 - self.rho) * mean)
                self.var_ema.mul_(self.rho).add_((1 - self.rho) * var)
        else:
            mean, var = self.mean_ema, self.var_ema
        h_hat = (inputs - mean) / torch.sqrt(var + self.epsilon)
        return self.gamma * h_hat + self.beta


def _bnlab(num_features, axis=-1, **kw):
    return bnlab.BatchNorm(axis=axis, num_features=num_features, **kw)


class TorchBatchNorm(nn.modules.batchnorm._BatchNorm):
    """PyTorch's native BN (``torch.nn.BatchNorm*d`` semantics) for any ``(N, C, ...)`` input.

    Built from Keras-style arguments (``momentum`` = weight of the old value).
    Used to compare bnlab with the native layer in the same architectures.
    """

    def __init__(self, num_features, axis=-1, momentum=0.99, epsilon=1e-3, **kw):
        if kw:
            raise ValueError(f"norm_layer='torch' takes no Keras-only arguments, got {sorted(kw)}")
        if axis not in (-1, 1):
            raise ValueError(f"torch's BatchNorm normalizes dim 1, got axis={axis}")
        super().__init__(num_features, eps=epsilon, momentum=1.0 - momentum)

    def _check_input_dim(self, input):
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")


NORM_LAYERS: dict[str, Callable | None] = {
    "bnlab": _bnlab,
    "renorm": lambda n, axis=-1, **kw: _bnlab(n, axis=axis, renorm=True, renorm_clipping={"rmax": 3.0, "rmin": 1 / 3.0, "dmax": 5.0}, **kw),
    "scratch": ScratchBatchNorm,
    "scratch-bnlab": lambda n, axis=-1, **kw: ScratchBatchNorm(n, axis, bnlab_defaults=True, **kw),
    "torch": TorchBatchNorm,
    "none": None,
}


def _norm_factory(norm_layer):
    if norm_layer is None or norm_layer == "none":
        return None
    if isinstance(norm_layer, str) and norm_layer.startswith("ghost:"):
        try:
            k = int(norm_layer.split(":", 1)[1])
        except ValueError:
            raise ValueError(f"norm={norm_layer!r}: expected ghost:K with an integer virtual batch size K") from None
        return lambda n, axis=-1, **kw: _bnlab(n, axis=axis, virtual_batch_size=k, **kw)
    if isinstance(norm_layer, str):
        try:
            return NORM_LAYERS[norm_layer]
        except KeyError:
            raise ValueError(f"unknown norm_layer {norm_layer!r}; expected one of {sorted(NORM_LAYERS)} or a callable") from None
    return norm_layer


def dense(n_in: int, n_out: int, bias: bool = True, init: str = "glorot_uniform") -> nn.Linear:
    """``keras.layers.Dense``: glorot-uniform (or he-uniform) kernel, zero bias."""
    layer = nn.Linear(n_in, n_out, bias=bias)
    _keras_init(layer, init)
    return layer


def conv2d(c_in: int, c_out: int, k: int = 3, padding: str = "valid", init: str = "glorot_uniform") -> nn.Conv2d:
    """``keras.layers.Conv2D`` (stride 1): ``padding`` ``"valid"`` or ``"same"``."""
    layer = nn.Conv2d(c_in, c_out, k, padding=0 if padding == "valid" else "same")
    _keras_init(layer, init)
    return layer


def _keras_init(layer, init):
    if init == "glorot_uniform":
        nn.init.xavier_uniform_(layer.weight)
    elif init == "he_uniform":
        nn.init.kaiming_uniform_(layer.weight, nonlinearity="relu")  # bound sqrt(6 / fan_in)
    else:
        raise ValueError(f"unknown kernel initializer {init!r}")
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)


_ACT = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid, "softmax": lambda: nn.Softmax(dim=-1), "linear": nn.Identity, "tanh": nn.Tanh}


def _seq(*layers):
    return nn.Sequential(*[m for m in layers if m is not None])


# ----------------------------------------------------------------------------- architectures


def diabetes_mlp(norm_layer="bnlab", n_in: int = 10, custom_bn: dict | None = None, head: bool = True) -> nn.Sequential:
    """Tutorial 000: Dense(64, relu) BN Dropout(.5) BN Dropout(.5) Dense(256, relu) [BN(custom)] Dense(1)."""
    nl = _norm_factory(norm_layer)
    bn = (lambda n, **kw: nl(n, axis=-1, **kw)) if nl else (lambda n, **kw: None)
    custom = dict(momentum=0.95, epsilon=0.005,
                  beta_initializer=bnlab.initializers.RandomNormal(mean=0.0, stddev=0.05),
                  gamma_initializer=bnlab.initializers.Constant(value=0.9)) if custom_bn is None else custom_bn
    if nl is not None and nl is not _bnlab:
        custom = {k: v for k, v in custom.items() if k in ("momentum", "epsilon")}
    layers = [dense(n_in, 64), nn.ReLU(), bn(64), nn.Dropout(0.5), bn(64), nn.Dropout(0.5), dense(64, 256), nn.ReLU()]
    if head:
        layers += [bn(256, **custom), dense(256, 1)]
    return _seq(*layers)


def bn_params_mlp(norm_layer="bnlab") -> nn.Sequential:
    """Tutorial 002: Dense(4, no bias) -> BN(rho 0.99, eps 1e-3) -> ReLU -> Dense(1, sigmoid)."""
    nl = _norm_factory(norm_layer)
    return _seq(dense(3, 4, bias=False), nl(4, axis=-1, momentum=0.99, epsilon=0.001) if nl else None, nn.ReLU(), dense(4, 1), nn.Sigmoid())


def blobs_mlp(norm_layer="bnlab", hidden: int = 128, depth: int = 1) -> nn.Sequential:
    """Tutorial 002: ``depth`` x [Dense(128, no bias) -> BN -> ReLU] -> Dense(1, sigmoid) (1 or 11 blocks)."""
    nl = _norm_factory(norm_layer)
    layers, n_in = [], 2
    for _ in range(depth):
        layers += [dense(n_in, hidden, bias=False), nl(hidden, axis=-1) if nl else None, nn.ReLU()]
        n_in = hidden
    return _seq(*layers, dense(n_in, 1), nn.Sigmoid())


def mnist_mlp(norm_layer="bnlab", in_shape=(1, 28, 28), num_classes: int = 10) -> nn.Sequential:
    """Tutorial 004: Flatten Dense(128) BN ReLU Dense(64) BN ReLU Dense(10, softmax)."""
    nl = _norm_factory(norm_layer)
    n_in = int(torch.tensor(in_shape).prod())
    return _seq(
        nn.Flatten(), dense(n_in, 128), nl(128, axis=-1) if nl else None, nn.ReLU(),
        dense(128, 64), nl(64, axis=-1) if nl else None, nn.ReLU(), dense(64, num_classes), nn.Softmax(dim=-1),
    )


def kmnist_cnn(norm_layer="bnlab", in_channels: int = 1, num_classes: int = 10) -> nn.Sequential:
    """Tutorial 003: Conv32-BN-Pool-BN-Conv64-BN-Pool-BN-Flatten-Dense256-BN-Dense10 (relu, softmax)."""
    nl = _norm_factory(norm_layer)
    bn2d = (lambda c: nl(c, axis=1)) if nl else (lambda c: None)
    return _seq(
        conv2d(in_channels, 32), nn.ReLU(), bn2d(32), nn.MaxPool2d(2), bn2d(32),
        conv2d(32, 64), nn.ReLU(), bn2d(64), nn.MaxPool2d(2), bn2d(64),
        nn.Flatten(), dense(5 * 5 * 64, 256), nn.ReLU(), nl(256, axis=-1) if nl else None,
        dense(256, num_classes), nn.Softmax(dim=-1),
    )


def cifar_cnn(norm_layer="bnlab", activation: str = "sigmoid", num_classes: int = 10) -> nn.Sequential:
    """Tutorial 001: 2 x [Conv, Conv, Pool] with 32 then 64 filters ('same'), BN after each conv, Dense(128), Dense(10)."""
    nl = _norm_factory(norm_layer)
    bn2d = (lambda c: nl(c, axis=1)) if nl else (lambda c: None)
    act = _ACT[activation]
    return _seq(
        conv2d(3, 32, padding="same"), act(), bn2d(32),
        conv2d(32, 32, padding="same", init="he_uniform"), act(), bn2d(32), nn.MaxPool2d(2),
        conv2d(32, 64, padding="same", init="he_uniform"), act(), bn2d(64),
        conv2d(64, 64, padding="same", init="he_uniform"), act(), bn2d(64), nn.MaxPool2d(2),
        nn.Flatten(), dense(8 * 8 * 64, 128, init="he_uniform"), act(), dense(128, num_classes), nn.Softmax(dim=-1),
    )


def paper_mlp(norm_layer="bnlab", in_shape=(1, 28, 28), hidden: tuple[int, ...] = (100, 100, 100),
              num_classes: int = 10) -> nn.Sequential:
    """Ioffe & Szegedy (2015, arXiv:1502.03167), Figure 1: Flatten, 3 x [Dense(100) (BN) sigmoid], Dense(10, softmax).

    The paper's words (section 4.1): "3 fully-connected hidden layers with 100
    activations each. Each hidden layer computes y = g(Wu + b) with sigmoid
    nonlinearity, and the weights W initialized to small random Gaussian
    values", then a 10-way layer with cross-entropy; BN goes before each
    sigmoid, ``g(BN(Wu))``, where the bias is dropped ("its effect will be
    canceled by the subsequent mean subtraction", section 3.2). The scale of
    "small" is not given; we draw the weights from Glorot's Gaussian
    ``N(0, 2 / (fan_in + fan_out))`` (std 0.049 for the first layer, 0.1 for
    the others), biases zero. 784-100-100-100-10: 99,710 parameters without
    BN; with BN 99,410 weights and biases, plus gamma and beta (600 trainable)
    and the moving statistics (600 not trainable) of three BN layers.
    """
    nl = _norm_factory(norm_layer)
    layers, n_in = [nn.Flatten()], int(torch.tensor(in_shape).prod())
    for width in hidden:
        linear = nn.Linear(n_in, width, bias=nl is None)
        layers += [linear, nl(width, axis=-1) if nl else None, nn.Sigmoid()]
        n_in = width
    layers += [nn.Linear(n_in, num_classes), nn.Softmax(dim=-1)]
    for m in layers:
        if isinstance(m, nn.Linear):
            nn.init.xavier_normal_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return _seq(*layers)


MODELS: dict[str, Callable[..., nn.Module]] = {
    "diabetes_mlp": diabetes_mlp,
    "bn_params_mlp": bn_params_mlp,
    "blobs_mlp": blobs_mlp,
    "mnist_mlp": mnist_mlp,
    "kmnist_cnn": kmnist_cnn,
    "cifar_cnn": cifar_cnn,
    "paper_mlp": paper_mlp,
}


def build(name: str, norm_layer="bnlab", **kwargs) -> nn.Module:
    """Build a registered architecture; ``norm_layer=None`` gives its twin without BN."""
    try:
        builder = MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; expected one of {sorted(MODELS)}") from None
    return builder(norm_layer=norm_layer, **kwargs)
