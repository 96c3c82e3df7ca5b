"""Re-estimate BN moving statistics as exact population statistics ("precise BN").

Wu & Johnson (2021), *Rethinking "Batch" in BatchNorm*, arXiv:2105.07576,
section 3: moving averages lag behind the weights; statistics computed over
many batches with the final weights are better population estimates. This is
also the step weight averaging needs (Izmailov et al., 2018, SWA: the averaged
weights come with no statistics of their own).
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from ..nn.batchnorm import _BatchNormBase
from ..functional import normalize_axes

__all__ = ["recalibrate"]


class _Pool:
    """Exact running count, mean and sum of squared deviations per feature (Chan et al.'s merge)."""

    def __init__(self):
        self.n = 0
        self.mean = None
        self.m2 = None

    def add(self, x: torch.Tensor, feat: tuple[int, ...]) -> None:
        red = tuple(d for d in range(x.ndim) if d not in feat)
        x = x.detach().double()
        nb = x.numel() // max(1, int(torch.tensor([x.shape[a] for a in feat]).prod()))
        if nb == 0:
            return
        mb = x.mean(dim=red)
        m2b = ((x - mb.view([x.shape[d] if d in feat else 1 for d in range(x.ndim)])) ** 2).sum(dim=red)
        if self.n == 0:
            self.n, self.mean, self.m2 = nb, mb, m2b
            return
        n = self.n + nb
        delta = mb - self.mean
        self.mean = self.mean + delta * (nb / n)
        self.m2 = self.m2 + m2b + delta**2 * (self.n * nb / n)
        self.n = n


def _layers(model: nn.Module):
    out = []
    for name, m in model.named_modules():
        if isinstance(m, _BatchNormBase) and m.running_mean is not None:
            out.append((name, m, m.axis, m.moving_variance_estimator == "unbiased"))
        elif isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            out.append((name, m, 1, True))
    return out


@torch.no_grad()
def recalibrate(model: nn.Module, data: Iterable, num_batches: int | None = None, device=None) -> dict[str, int]:
    """Recompute every BN layer's moving mean and variance over ``data``; returns samples seen per layer.

    The model runs in training mode over the batches (each BN normalizes with
    its batch statistics, as in training), gradients off, and each BN layer's
    *input* is pooled exactly across all batches: count-weighted mean and
    variance, not an average of per-batch statistics. The stored variance is
    biased or unbiased as the layer's own convention says (Keras face: biased;
    PyTorch face: unbiased). Weights are untouched; modes are restored.

    ``data`` yields input tensors, or tuples whose first element is the input.
    PyTorch's own BN layers refuse a one-sample batch in training mode; give
    batches of at least two samples.
    """
    layers = _layers(model)
    pools = {name: _Pool() for name, *_ in layers}
    hooks = []
    for name, m, axis, _ in layers:
        def hook(mod, inputs, output, name=name, axis=axis):
            x = inputs[0]
            pools[name].add(x, normalize_axes(axis, x.ndim))
        hooks.append(m.register_forward_hook(hook))
    modes = {m: m.training for m in model.modules()}
    saved = {name: (m.running_mean.clone(), m.running_var.clone()) for name, m, *_ in layers}
    try:
        model.train()
        for i, batch in enumerate(data):
            if num_batches is not None and i >= num_batches:
                break
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            model(x.to(device) if device is not None else x)
    finally:
        for h in hooks:
            h.remove()
        for m, mode in modes.items():
            m.train(mode)
    seen = {}
    for name, m, _, unbiased in layers:
        pool = pools[name]
        seen[name] = pool.n
        if pool.n == 0:  # nothing reached this layer: keep what it had
            m.running_mean.copy_(saved[name][0])
            m.running_var.copy_(saved[name][1])
            continue
        var = pool.m2 / (pool.n - 1 if unbiased and pool.n > 1 else pool.n)
        m.running_mean.copy_(pool.mean.view(m.running_mean.shape).to(m.running_mean.dtype))
        m.running_var.copy_(var.view(m.running_var.shape).to(m.running_var.dtype))
    return seen
