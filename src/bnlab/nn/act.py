"""BatchNormAct: batch normalization followed by an activation, in one module.

The state dict is exactly :class:`bnlab.BatchNorm`'s (the activation holds no
weights), so weights trained with a separate BN and activation load into it,
as timm's ``BatchNormAct2d`` does. On CPU, ReLU and leaky ReLU are fused into
bnlab's compiled kernels (:mod:`bnlab._kernels`), forward and backward: the
forward writes ``act(bn(x))`` in the same pass that normalizes, and the
backward rebuilds the pre-activation from ``x`` on the fly instead of reading a
saved intermediate, so neither pass stores or reloads the normalized tensor
(the memory-traffic argument of in-place activated BN, Rota Bulo et al., 2018,
arXiv:1712.02616, without its invertibility requirement). SiLU, GELU, sigmoid
and tanh run as PyTorch ops after the kernel (their vectorized transcendental
functions beat scalar ones in the kernel), as does every
activation where the kernels do not run (GPU, masks, renorm, ghost or
synchronized statistics, no C compiler); the results are the same.
"""

from __future__ import annotations

from ..functional import ACTIVATIONS
from .batchnorm import BatchNorm

__all__ = ["BatchNormAct", "ACTIVATIONS"]


class BatchNormAct(BatchNorm):
    """``activation(BatchNorm(x))`` with Keras' BN arguments plus ``activation`` (and ``negative_slope``).

    Example::

        >>> import torch, bnlab
        >>> layer = bnlab.nn.BatchNormAct(axis=1, num_features=8, activation="relu")
        >>> y = layer(torch.randn(4, 8, 5, 5))
        >>> bool((y >= 0).all())
        True
    """

    def __init__(self, *, activation: str = "relu", negative_slope: float = 0.01, **bn_kwargs):
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        super().__init__(**bn_kwargs)
        self.activation = activation
        self.negative_slope = float(negative_slope)
        self._act = None if activation == "identity" else activation
        self._slope = self.negative_slope

    def get_config(self) -> dict:
        """:meth:`BatchNorm.get_config` plus ``activation`` and ``negative_slope``."""
        return {**super().get_config(), "activation": self.activation, "negative_slope": self.negative_slope}

    def extra_repr(self) -> str:
        extra = f", negative_slope={self.negative_slope}" if self.activation == "leaky_relu" else ""
        return super().extra_repr() + f", activation={self.activation!r}{extra}"
