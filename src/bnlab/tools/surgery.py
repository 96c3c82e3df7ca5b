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
    """Fold ``bn`` (eval form) into ``layer`` before it, in place; returns why not, or None when done."""
    s, t, axis = _affine(bn)
    if s is None:
        return t  # the reason
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
    if s.numel() != out:
        return f"has {s.numel()} features but the layer before has {out} outputs"
    with torch.no_grad():
        w = layer.weight
        dt = torch.float64
        bias = layer.bias.detach().to(dt) if layer.bias is not None else torch.zeros(out, dtype=dt, device=w.device)
        new_w = (w.detach().to(dt) * s.view(-1, *([1] * (w.dim() - 1)))).to(w.dtype)
        new_b = (bias * s + t).to(w.dtype)
        layer.weight.copy_(new_w)
        if layer.bias is None:
            layer.bias = nn.Parameter(new_b)
        else:
            layer.bias.copy_(new_b)
    return None


def _is_bn(m) -> bool:
    return isinstance(m, (_BatchNormBase, nn.modules.batchnorm._BatchNorm, FrozenBatchNorm))


def fold(model: nn.Module, *, return_report: bool = False, verbose: bool = False) -> nn.Module | tuple[nn.Module, FoldReport]:
    """Fold each eval-mode BN into a Linear/Conv1d/2d/3d next to it; returns the folded model.

    ``model = bnlab.fold(model)`` works as with PyTorch's ``fuse_conv_bn_eval``
    and ``torch.ao.quantization.fuse_modules``. With ``return_report=True`` it
    returns ``(folded, report)``, a :class:`FoldReport` of what was folded and
    what stayed and why; ``verbose=True`` prints what stayed.

    In eval mode BN is a per-channel affine map ``u -> s * u + t`` with
    ``s = gamma / sqrt(var + eps)``, ``t = beta - mean * s`` (computed in float64).

    *Into the layer before* (conv/linear then BN, the usual order):
    ``W' = W * s`` per output channel, ``b' = b * s + t``. Grouped and depthwise
    convolutions, layers without bias and BN without affine all fold.

    *Into the layer after* (BN placed after an activation or a pooling layer,
    as in the tutorials' Keras models): ``W' = W * s`` per input channel and
    ``b' = b + W t``. The walk from BN to that layer may cross identities and
    dropout (eval), other BN layers (their affine maps compose), ``Flatten`` of
    channel-first maps into a Linear layer (each channel's ``s``, ``t`` repeated
    over its positions), max pooling when every ``s >= 0`` (max commutes with
    a non-decreasing map) and average pooling without padding. A zero-padded
    convolution after BN is refused (its padding would not be shifted by ``t``);
    reflect, replicate and circular padding copy values, so those fold.

    The model is traced with ``torch.fx``; a fold is made only where every
    value on the way feeds nothing else. Where tracing is impossible,
    consecutive modules of ``nn.Sequential`` containers are used (folds into
    the layer before only). The input model is left untouched (a folded copy
    is returned); it must be in eval mode. BN layers that cannot be folded stay,
    listed in ``report.left`` with the reason.

    >>> import torch, bnlab
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), bnlab.nn.BatchNorm2d(4)).eval()
    >>> folded, report = bnlab.fold(net, return_report=True)
    >>> report.folded, type(bnlab.fold(net)[1]).__name__
    ([('0', '1')], 'Identity')
    """
    if model.training:
        raise ValueError("fold() needs the model in eval mode (call model.eval()): a BN layer in training mode "
                         "normalizes with batch statistics, which cannot be folded into weights")
    model = copy.deepcopy(model)
    report = FoldReport()
    graph = _trace(model)
    pairs = _pairs_sequential(model) if graph is None else _pairs_fx(model, graph)
    modules = dict(model.named_modules())
    refused = {}
    for layer_name, bn_name in pairs:
        why = _fold_into(modules[layer_name], modules[bn_name])
        if why is None:
            _set_module(model, bn_name, nn.Identity())
            report.folded.append((layer_name, bn_name))
        else:
            refused[bn_name] = why
    done = {b for _, b in report.folded}
    # the graph still holds: folded BN layers became Identity modules under the same names
    forward = {} if graph is None else _fold_forward(model, graph, done)
    for bn_name, outcome in forward.items():
        if isinstance(outcome, tuple):  # (target layer, [bn names absorbed])
            target, absorbed = outcome
            for b in absorbed:
                _set_module(model, b, nn.Identity())
                report.folded.append((target, b))
                done.add(b)
        else:
            refused.setdefault(bn_name, outcome)
    for name, m in list(model.named_modules()):
        if _is_bn(m) and name not in done:
            report.left.append((name, refused.get(name, "has no Linear/Conv layer next to it to fold into")))
    if verbose:
        for name, why in report.left:
            print(f"fold: left {name}: {why}")
    return (model, report) if return_report else model


def _affine(bn: nn.Module):
    """``(s, t, axis)`` of an eval-mode BN as float64 per-channel tensors, or ``(None, why, None)``."""
    p = _bn_params(bn)
    if p is None:
        return None, "keeps no statistics (track_running_stats=False): it normalizes with batch statistics", None
    gamma, beta, mean, var, eps, axis = p
    if mean.dim() != 1:
        return None, "has more than one feature axis", None
    dt = torch.float64
    s = torch.rsqrt(var.detach().to(dt) + eps)
    if gamma is not None:
        s = s * gamma.detach().to(dt)
    t = -mean.detach().to(dt) * s
    if beta is not None:
        t = t + beta.detach().to(dt)
    return s, t, axis


_POOL_MAX = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)
_POOL_AVG = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
_PASS = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)


def _fold_forward(model: nn.Module, graph, done: set) -> dict:
    """Fold BN layers into the Linear/Conv after them; ``{bn: (target, absorbed) or why}``."""
    modules = dict(model.named_modules())
    calls: dict = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    out: dict = {}
    for node in graph.nodes:
        if node.op != "call_module" or node.target in done or node.target in out or not _is_bn(modules[node.target]):
            continue
        result = _walk_forward(node, modules, calls, done)
        out[node.target] = result
        if isinstance(result, tuple):
            for b in result[1]:
                done.add(b)
    return out


def _walk_forward(node, modules, calls, done):
    s, t, axis = _affine(modules[node.target])
    if s is None:
        return t
    absorbed = [node.target]
    repeat = None  # set once a Flatten has spread each channel over several features
    cur = node
    while True:
        users = list(cur.users)
        if len(users) != 1:
            return "its output feeds more than one operation"
        nxt = users[0]
        if nxt.op != "call_module":
            return f"is followed by {nxt.op} {getattr(nxt.target, '__name__', nxt.target)!s}, which it cannot be moved through"
        m = modules[nxt.target]
        if calls.get(nxt.target, 0) != 1 and (_is_bn(m) or isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))):
            # its weights would change for every other call too (stateless layers may be shared)
            return f"is followed by {nxt.target}, which is called more than once"
        if isinstance(m, _PASS):
            pass
        elif _is_bn(m) and nxt.target not in done:
            s2, t2, axis2 = _affine(m)
            if s2 is None or axis2 != axis or s2.numel() != s.numel():
                return f"is followed by {nxt.target}, a BN it cannot be merged with"
            s, t = s2 * s, s2 * t + t2
            absorbed.append(nxt.target)
        elif isinstance(m, _POOL_MAX):
            if axis != 1:
                return f"normalizes axis {axis}, not the channels the pooling layer keeps apart"
            if bool((s < 0).any()):
                return "is followed by max pooling and has a negative scale gamma/sqrt(var+eps): max does not commute with it"
        elif isinstance(m, _POOL_AVG):
            pad = m.padding if isinstance(m.padding, tuple) else (m.padding,)
            if axis != 1 or any(pad) or getattr(m, "divisor_override", None):
                return "is followed by average pooling with padding or a divisor override (or on another axis)"
        elif isinstance(m, nn.Flatten):
            if axis != 1 or m.start_dim != 1 or m.end_dim != -1 or repeat is not None:
                return "is followed by a Flatten that does not keep channel-first blocks"
            repeat = True
        elif isinstance(m, nn.Linear):
            if repeat:
                if m.in_features % s.numel():
                    return f"is flattened into {nxt.target}, whose {m.in_features} inputs are not a multiple of {s.numel()} channels"
                r = m.in_features // s.numel()
                s, t = s.repeat_interleave(r), t.repeat_interleave(r)
            elif axis != -1:
                return (f"normalizes axis {axis} and is followed by {nxt.target}, which acts on the last axis "
                        "(fold cannot tell the input's rank; use axis=-1)")
            if m.in_features != s.numel():
                return f"has {s.numel()} features but {nxt.target} takes {m.in_features}"
            _scale_inputs(m, s, t)
            return nxt.target, absorbed
        elif isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            if repeat or axis != 1:
                return f"does not normalize the channels (axis 1) that {nxt.target} takes"
            pad = m.padding if isinstance(m.padding, tuple) else (m.padding,)
            padded = (m.padding != "valid") if isinstance(m.padding, str) else any(pad)
            if padded and m.padding_mode == "zeros":
                # reflect/replicate/circular padding copies values, so it commutes with the affine map; zeros do not
                return f"is followed by {nxt.target}, a zero-padded convolution: its padding would not be shifted"
            if m.in_channels != s.numel():
                return f"has {s.numel()} features but {nxt.target} takes {m.in_channels} channels"
            _scale_inputs(m, s, t)
            return nxt.target, absorbed
        else:
            return f"is followed by {type(m).__name__} ({nxt.target}), which it cannot be moved through"
        cur = nxt


def _scale_inputs(layer: nn.Module, s: torch.Tensor, t: torch.Tensor) -> None:
    """In place: ``layer(s * u + t) == layer'(u)`` for a Linear or an unpadded (grouped) conv."""
    with torch.no_grad():
        w = layer.weight.detach().to(torch.float64)
        out_ch = w.shape[0]
        if isinstance(layer, nn.Linear):
            S, T = s.view(1, -1).expand(out_ch, -1), t.view(1, -1).expand(out_ch, -1)
        else:
            cg = w.shape[1]  # input channels per group
            groups = layer.groups
            idx = (torch.arange(out_ch, device=w.device) // (out_ch // groups)).view(-1, 1) * cg + torch.arange(cg, device=w.device)
            S, T = s.to(w.device)[idx], t.to(w.device)[idx]  # (out, cg)
        shape = (out_ch, S.shape[1]) + (1,) * (w.dim() - 2)
        bias = layer.bias.detach().to(torch.float64) if layer.bias is not None else torch.zeros(out_ch, dtype=torch.float64, device=w.device)
        new_b = bias + (w * T.to(w.device).reshape(shape)).reshape(out_ch, -1).sum(1)
        layer.weight.copy_((w * S.to(w.device).reshape(shape)).to(layer.weight.dtype))
        if layer.bias is None:
            layer.bias = nn.Parameter(new_b.to(layer.weight.dtype))
        else:
            layer.bias.copy_(new_b.to(layer.bias.dtype))


def _set_module(root: nn.Module, dotted: str, new: nn.Module) -> None:
    parent, _, leaf = dotted.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)


def _trace(model: nn.Module):
    """``model``'s ``torch.fx`` graph with every BN layer a leaf, or ``None`` where tracing fails."""
    import torch.fx

    class _Tracer(torch.fx.Tracer):
        def is_leaf_module(self, m, qualname):  # BN layers of any library are leaves, not traced into
            return _is_bn(m) or super().is_leaf_module(m, qualname)

    try:
        return _Tracer().trace(model)
    except Exception:  # noqa: BLE001 - any tracing failure: use the Sequential fallback
        return None


def _pairs_fx(model: nn.Module, graph):
    import torch.fx

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
