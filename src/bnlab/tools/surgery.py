"""Model surgery on batch-norm layers: convert between libraries, freeze, fold into the layer before.

Each function walks a whole ``torch.nn.Module`` tree (one ``named_children``
recursion, as timm's converters do) and keeps weights and statistics, so the
converted model computes the same outputs.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from ..nn.batchnorm import BatchNorm, BatchNorm1d, BatchNorm2d, BatchNorm3d, BatchNormNd, _BatchNormBase
from ..nn.frozen import FrozenBatchNorm

__all__ = ["convert", "freeze", "unfreeze", "fold", "FoldReport"]

_TORCH_TO_BNLAB = {nn.BatchNorm1d: BatchNorm1d, nn.BatchNorm2d: BatchNorm2d, nn.BatchNorm3d: BatchNorm3d, nn.SyncBatchNorm: BatchNormNd}
_BNLAB_TO_TORCH = {BatchNorm1d: nn.BatchNorm1d, BatchNorm2d: nn.BatchNorm2d, BatchNorm3d: nn.BatchNorm3d}


def _replace(module: nn.Module, fn) -> nn.Module:
    """Apply ``fn(child) -> new child or None`` to every module of the tree, top-down."""
    new = fn(module)
    if new is not None:
        return new
    for name, child in module.named_children():
        replaced = _replace(child, fn)
        if replaced is not child:
            setattr(module, name, replaced)
    return module


def _copy_state(src: nn.Module, dst: nn.Module) -> nn.Module:
    dst.load_state_dict(src.state_dict())
    ref = next(iter(list(src.parameters()) + list(src.buffers())), None)
    if ref is not None:
        dst.to(device=ref.device)
    dst.train(src.training)
    for name in ("weight", "bias"):
        p_src, p_dst = getattr(src, name, None), getattr(dst, name, None)
        if isinstance(p_src, nn.Parameter) and isinstance(p_dst, nn.Parameter):
            p_dst.requires_grad_(p_src.requires_grad)
    return dst


def convert(model: nn.Module, to: str = "bnlab") -> nn.Module:
    """Swap PyTorch's batch norms for bnlab's drop-ins (``to="bnlab"``) or back (``to="torch"``).

    ``torch.nn.BatchNorm1d/2d/3d`` <-> ``bnlab.nn.BatchNorm1d/2d/3d`` (PyTorch's
    semantics, same state dict); ``torch.nn.SyncBatchNorm`` becomes
    ``bnlab.nn.BatchNormNd`` (the single-process equivalent). Weights,
    statistics, ``momentum``, ``eps``, train/eval mode and ``requires_grad`` are
    kept, so outputs are identical. Works in place on containers and returns
    the model (a lone BN module is returned converted).
    """
    if to not in ("bnlab", "torch"):
        raise ValueError(f"to must be 'bnlab' or 'torch', got {to!r}")
    table = _TORCH_TO_BNLAB if to == "bnlab" else _BNLAB_TO_TORCH

    def swap(m):
        cls = table.get(type(m))
        if cls is None:
            return None
        new = cls(m.num_features, eps=m.eps, momentum=m.momentum, affine=m.affine, track_running_stats=m.track_running_stats)
        return _copy_state(m, new)

    return _replace(model, swap)


def _bn_params(m: nn.Module):
    """(gamma, beta, mean, var, eps, axis) of a BN layer in inference form, or None if it is not one."""
    if isinstance(m, _BatchNormBase):
        if m.running_mean is None:
            return None
        return m.weight, m.bias, m.running_mean, m.running_var, m._epsilon(), m.axis
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        if m.running_mean is None:
            return None
        return m.weight, m.bias, m.running_mean, m.running_var, m.eps, 1
    if isinstance(m, FrozenBatchNorm):
        return m.weight, m.bias, m.running_mean, m.running_var, m.eps, m.axis
    return None


def freeze(model: nn.Module) -> nn.Module:
    """Replace every batch-norm layer (bnlab's or PyTorch's) by a :class:`bnlab.nn.FrozenBatchNorm`.

    The frozen layer keeps gamma, beta and the statistics as buffers and always
    normalizes with the statistics: no gradients, no updates, in ``train()`` mode
    too. :func:`unfreeze` restores the original kind of layer.
    """

    def swap(m):
        p = _bn_params(m)
        if p is None or isinstance(m, FrozenBatchNorm):
            return None
        gamma, beta, mean, var, eps, axis = p
        frozen = FrozenBatchNorm(tuple(mean.shape), axis=axis, eps=eps, device=mean.device, dtype=mean.dtype)
        with torch.no_grad():
            if gamma is not None:
                frozen.weight.copy_(gamma.detach())
            if beta is not None:
                frozen.bias.copy_(beta.detach())
            frozen.running_mean.copy_(mean)
            frozen.running_var.copy_(var)
            if getattr(m, "num_batches_tracked", None) is not None:
                frozen.num_batches_tracked.copy_(m.num_batches_tracked)
        frozen._unfreeze_spec = {"module": copy.deepcopy(m)}
        frozen.train(m.training)
        return frozen

    return _replace(model, swap)


def unfreeze(model: nn.Module) -> nn.Module:
    """Undo :func:`freeze`: each FrozenBatchNorm becomes the layer it was, with the frozen values.

    A FrozenBatchNorm not made by :func:`freeze` becomes a PyTorch-semantics
    ``bnlab.nn.BatchNormNd`` (channel dim 1) or a ``bnlab.BatchNorm`` (other axes).
    """

    def swap(m):
        if not isinstance(m, FrozenBatchNorm):
            return None
        spec = m._unfreeze_spec
        if spec is not None:
            new = copy.deepcopy(spec["module"])
        elif m.axis in (1,) and len(m.feature_shape) == 1:
            new = BatchNormNd(m.feature_shape[0], eps=m.eps)
        else:
            new = BatchNorm(axis=m.axis, num_features=m.feature_shape, epsilon=m.eps)
        with torch.no_grad():
            for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
                t = getattr(new, name, None)
                if t is not None:
                    t.copy_(getattr(m, name))
        new.train(m.training)
        return new

    return _replace(model, swap)


# ----------------------------------------------------------------------------- folding


@dataclass
class FoldReport:
    """What :func:`fold` did: ``folded`` (layer, bn) pairs and the BN layers ``left`` in place, with why."""

    folded: list[tuple[str, str]] = field(default_factory=list)
    left: list[tuple[str, str]] = field(default_factory=list)


def _fold_into(layer: nn.Module, bn: nn.Module) -> str | None:
    """Fold ``bn`` (eval form) into ``layer`` in place; returns why not, or None when done."""
    p = _bn_params(bn)
    if p is None:
        return "keeps no statistics (track_running_stats=False): it normalizes with batch statistics"
    gamma, beta, mean, var, eps, axis = p
    if mean.dim() != 1:
        return "has more than one feature axis"
    if isinstance(layer, nn.Linear):
        if axis not in (-1, 1):
            return f"normalizes axis {axis}, not the Linear layer's output features"
        out = layer.out_features
    elif isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        if axis != 1:
            return f"normalizes axis {axis}, not the convolution's channels (axis 1)"
        out = layer.out_channels
    else:
        return f"follows a {type(layer).__name__}, which has no weights to fold into"
    if mean.numel() != out:
        return f"has {mean.numel()} features but the layer before has {out} outputs"
    with torch.no_grad():
        w = layer.weight
        dt = torch.float64
        scale = torch.rsqrt(var.to(dt) + eps)
        if gamma is not None:
            scale = scale * gamma.detach().to(dt)
        shift = -mean.to(dt) * scale
        if beta is not None:
            shift = shift + beta.detach().to(dt)
        bias = layer.bias.detach().to(dt) if layer.bias is not None else torch.zeros(out, dtype=dt, device=w.device)
        new_w = (w.detach().to(dt) * scale.view(-1, *([1] * (w.dim() - 1)))).to(w.dtype)
        new_b = (bias * scale + shift).to(w.dtype)
        layer.weight.copy_(new_w)
        if layer.bias is None:
            layer.bias = nn.Parameter(new_b)
        else:
            layer.bias.copy_(new_b)
    return None


def _is_bn(m) -> bool:
    return isinstance(m, (_BatchNormBase, nn.modules.batchnorm._BatchNorm, FrozenBatchNorm))


def fold(model: nn.Module, *, verbose: bool = False) -> tuple[nn.Module, FoldReport]:
    """Fold each eval-mode BN into the Linear/Conv1d/2d/3d right before it; returns ``(model, report)``.

    ``y = gamma * (W x + b - mean) / sqrt(var + eps) + beta`` becomes
    ``W' x + b'`` with ``W' = W * s``, ``b' = (b - mean) * s + beta``,
    ``s = gamma / sqrt(var + eps)`` per output channel (computed in float64).
    Grouped and depthwise convolutions, layers without bias and BN without
    affine all fold. The model is traced with ``torch.fx`` so a BN is folded
    only where the layer's output feeds nothing but that BN; where tracing is
    impossible, consecutive modules of ``nn.Sequential`` containers are used.
    The input model is left untouched (a folded copy is returned); it must be
    in eval mode. BN layers that cannot be folded stay, listed in
    ``report.left`` with the reason.
    """
    if model.training:
        raise ValueError("fold() needs the model in eval mode (call model.eval()): a BN layer in training mode "
                         "normalizes with batch statistics, which cannot be folded into weights")
    model = copy.deepcopy(model)
    report = FoldReport()
    pairs = _pairs_fx(model)
    if pairs is None:
        pairs = _pairs_sequential(model)
    modules = dict(model.named_modules())
    for layer_name, bn_name in pairs:
        why = _fold_into(modules[layer_name], modules[bn_name])
        if why is None:
            _set_module(model, bn_name, nn.Identity())
            report.folded.append((layer_name, bn_name))
        else:
            report.left.append((bn_name, why))
    done = {b for _, b in report.folded} | {b for b, _ in report.left}
    for name, m in model.named_modules():
        if _is_bn(m) and name not in done:
            report.left.append((name, "does not directly follow a Linear/Conv layer whose only use it is"))
    if verbose:
        for name, why in report.left:
            print(f"fold: left {name}: {why}")
    return model, report


def _set_module(root: nn.Module, dotted: str, new: nn.Module) -> None:
    parent, _, leaf = dotted.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)


def _pairs_fx(model: nn.Module):
    import torch.fx

    class _Tracer(torch.fx.Tracer):
        def is_leaf_module(self, m, qualname):  # BN layers of any library are leaves, not traced into
            return _is_bn(m) or super().is_leaf_module(m, qualname)

    try:
        graph = _Tracer().trace(model)
    except Exception:  # noqa: BLE001 - any tracing failure: use the Sequential fallback
        return None
    modules = dict(model.named_modules())
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not _is_bn(modules.get(node.target)):
            continue
        src = node.args[0] if node.args else None
        if (isinstance(src, torch.fx.Node) and src.op == "call_module" and len(src.users) == 1
                and isinstance(modules.get(src.target), (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))):
            pairs.append((src.target, node.target))
    return pairs


def _pairs_sequential(model: nn.Module):
    pairs = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Sequential):
            children = list(m.named_children())
            for (a_name, a), (b_name, b) in zip(children, children[1:], strict=False):
                if _is_bn(b) and isinstance(a, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                    prefix = f"{name}." if name else ""
                    pairs.append((prefix + a_name, prefix + b_name))
    return pairs
