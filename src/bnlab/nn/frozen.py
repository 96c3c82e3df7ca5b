"""FrozenBatchNorm: batch normalization with fixed statistics and affine, for fine-tuning.

Everything is a buffer (no parameters, no gradients to them), and the layer
always normalizes with its stored statistics, in ``train()`` mode too::

    y = weight * (x - running_mean) / sqrt(running_var + eps) + bias

The state dict has the keys of ``torch.nn.BatchNorm*d`` (and of
``torchvision.ops.FrozenBatchNorm2d``), so trained BN weights load into it.
Made by :func:`bnlab.freeze`, undone by :func:`bnlab.unfreeze`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import functional as F

__all__ = ["FrozenBatchNorm"]


class FrozenBatchNorm(nn.Module):
    """Frozen batch normalization over the feature axis ``axis`` (default 1, PyTorch's channel dim).

    Args:
        num_features (int or tuple): feature size(s).
        axis (int or list): the feature axis/axes (1 for ``(N, C, ...)``, -1 for channels-last).
        eps (float): added to the variance (copy the epsilon of the layer this replaces).
    """

    def __init__(self, num_features, axis=1, eps: float = 1e-5, device=None, dtype=None):
        super().__init__()
        shape = (num_features,) if isinstance(num_features, int) else tuple(num_features)
        kw = {"device": device, "dtype": dtype}
        self.axis = axis
        self.eps = float(eps)
        self.feature_shape = shape
        self.register_buffer("weight", torch.ones(shape, **kw))
        self.register_buffer("bias", torch.zeros(shape, **kw))
        self.register_buffer("running_mean", torch.zeros(shape, **kw))
        self.register_buffer("running_var", torch.ones(shape, **kw))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))
        self._unfreeze_spec: dict | None = None  # how bnlab.unfreeze rebuilds the original layer

    def forward(self, x: Tensor) -> Tensor:
        feat = F.normalize_axes(self.axis, x.ndim)
        got = tuple(x.shape[a] for a in feat)
        if got != self.feature_shape:
            raise ValueError(f"FrozenBatchNorm(axis={self.axis!r}) holds {self.feature_shape} features, got {got} (input shape {tuple(x.shape)})")
        return F.batch_norm_inference(x, self.running_mean, self.running_var, self.weight, self.bias, axis=feat,
                                      epsilon=self.eps)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        key = prefix + "num_batches_tracked"
        if key not in state_dict:  # torchvision's FrozenBatchNorm2d drops it
            state_dict[key] = torch.tensor(0, dtype=torch.long)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    def get_config(self) -> dict:
        """The constructor's arguments and ``dtype`` (its buffers' dtype now); :meth:`from_config` rebuilds it
        with default buffers (load a state dict for the values)."""
        shape = self.feature_shape
        return {"num_features": shape[0] if len(shape) == 1 else list(shape),
                "axis": self.axis if isinstance(self.axis, int) else list(self.axis), "eps": self.eps,
                "dtype": str(self.weight.dtype).replace("torch.", "")}

    @classmethod
    def from_config(cls, config: dict) -> "FrozenBatchNorm":
        config = dict(config)
        if isinstance(config.get("dtype"), str):
            config["dtype"] = getattr(torch, config["dtype"])
        return cls(**config)

    def extra_repr(self) -> str:
        n = self.feature_shape[0] if len(self.feature_shape) == 1 else self.feature_shape
        return f"{n}, axis={self.axis!r}, eps={self.eps}"
