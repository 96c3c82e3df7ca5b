"""Looking inside trained BN layers: their parameters, and their output re-computed by hand (tutorial 002)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

import bnlab

from .models import ScratchBatchNorm

__all__ = ["bn_layers", "inspect_bn"]


def _is_bn(m: nn.Module) -> bool:
    return isinstance(m, (bnlab.nn.batchnorm._BatchNormBase, ScratchBatchNorm, nn.modules.batchnorm._BatchNorm))


def bn_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, layer)`` for every batch-normalization layer in ``model`` (bnlab, tutorial's, PyTorch's)."""
    return [(n, m) for n, m in model.named_modules() if _is_bn(m)]


def _weights(m: nn.Module):
    """gamma, beta, moving mean, moving variance, epsilon and feature axis of any supported BN layer."""
    if isinstance(m, ScratchBatchNorm):
        return m.gamma, m.beta, m.mean_ema, m.var_ema, m.epsilon, -1
    eps = m._epsilon() if isinstance(m, bnlab.nn.batchnorm._BatchNormBase) else m.eps
    axis = m.axis if isinstance(m, bnlab.nn.batchnorm._BatchNormBase) else 1
    return m.weight, m.bias, m.running_mean, m.running_var, eps, axis


def inspect_bn(model: nn.Module, x: torch.Tensor) -> list[dict]:
    """For each BN layer: its parameters and the largest difference between its inference output on ``x``
    and ``gamma * (h - moving_mean) / sqrt(moving_variance + epsilon) + beta`` computed in NumPy (float64).
    """
    layers = bn_layers(model)
    captured: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    hooks = [m.register_forward_hook(lambda mod, inp, out, n=n: captured.__setitem__(n, (inp[0].detach(), out.detach()))) for n, m in layers]
    was = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    report = []
    for name, m in layers:
        if name not in captured:
            continue
        h, r = captured[name]
        g, b, mu, var, eps, axis = _weights(m)
        hn = h.double().numpy()
        feat = bnlab.functional.normalize_axes(axis, hn.ndim)
        shape = [hn.shape[d] if d in feat else 1 for d in range(hn.ndim)]

        def arr(t, default, shape=shape):
            return np.full(shape, default) if t is None else t.detach().double().numpy().reshape(shape)

        by_hand = arr(g, 1.0) * (hn - arr(mu, 0.0)) / np.sqrt(arr(var, 1.0) + eps) + arr(b, 0.0)
        report.append({
            "layer": name,
            "type": type(m).__name__,
            "epsilon": eps,
            "gamma": None if g is None else g.detach().numpy().copy(),
            "beta": None if b is None else b.detach().numpy().copy(),
            "moving_mean": mu.detach().numpy().copy(),
            "moving_variance": var.detach().numpy().copy(),
            "max_abs_diff": float(np.abs(by_hand - r.double().numpy()).max()) if r.numel() else 0.0,
        })
    return report
