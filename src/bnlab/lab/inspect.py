"""Looking inside trained BN layers: their parameters, and their output re-computed by hand (tutorial 002)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

import bnlab

from .models import ScratchBatchNorm

__all__ = ["bn_layers", "inspect_bn", "moving_momentum", "format_layer"]


def _is_bn(m: nn.Module) -> bool:
    return isinstance(m, (bnlab.nn.batchnorm._BatchNormBase, ScratchBatchNorm, nn.modules.batchnorm._BatchNorm))


def bn_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, layer)`` for every batch-normalization layer in ``model`` (bnlab, tutorial's, PyTorch's)."""
    return [(n, m) for n, m in model.named_modules() if _is_bn(m)]


def moving_momentum(m: nn.Module) -> float | None:
    """The layer's weight of the OLD moving value per update (Keras' ``momentum``; PyTorch's is 1 minus it).

    None for a cumulative average (PyTorch's ``momentum=None``) or a layer that does not say.
    """
    if isinstance(m, ScratchBatchNorm):
        return float(m.rho)
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        return None if m.momentum is None else 1.0 - float(m.momentum)
    old = getattr(m, "_old_weight", None)
    value = old() if callable(old) else None
    return None if value is None else float(value)


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


_ROWS = (("gamma", "gamma (γ)"), ("beta", "beta (β)"), ("moving_mean", "moving mean"), ("moving_variance", "moving variance"))


def format_layer(layer: dict, max_features: int = 8) -> list[str]:
    """Lines of text for one entry of :func:`inspect_bn`: an aligned table of gamma, beta, moving mean and
    moving variance per feature (the first and last ``max_features // 2`` when there are more), then the check
    that the layer's inference output is ``gamma * (h - moving mean) / sqrt(moving variance + epsilon) + beta``."""
    n = len(layer["moving_mean"])
    half = max(max_features // 2, 1)
    shown = list(range(n)) if n <= max_features else [*range(half), None, *range(n - half, n)]
    label = max(len(name) for _, name in _ROWS)

    def cell(v):
        return "…".rjust(11) if v is None else f" {v:>10.4g}"

    lines = [f"layer {layer['layer']} ({layer['type']}, epsilon {layer['epsilon']:g}): {n} feature(s)",
             f"  {'feature':<{label}}" + "".join("…".rjust(11) if i is None else f"{i:>11}" for i in shown)]
    for key, name in _ROWS:
        values = layer[key]
        if values is None:
            lines.append(f"  {name:<{label}}" + "  (none: the layer has no " + name.split()[0] + ")")
            continue
        lines.append(f"  {name:<{label}}" + "".join(cell(None if i is None else float(values[i])) for i in shown))
    ok = layer["max_abs_diff"] < 1e-5
    lines.append(f"  max |layer output − (γ (h − moving mean) / sqrt(moving variance + ε) + β)| = {layer['max_abs_diff']:.2e} "
                 f"{'(matches)' if ok else '(DOES NOT MATCH)'}")
    return lines
