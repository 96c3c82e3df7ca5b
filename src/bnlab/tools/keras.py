"""Keras 3 weights <-> PyTorch models with bnlab's layers (needs h5py: ``pip install 'bnlab[keras]'``).

A Keras model and its PyTorch twin (same layers in the same order: Dense ->
``nn.Linear``, Conv1D/Conv2D -> ``nn.Conv1d/2d``, BatchNormalization ->
``bnlab.BatchNorm`` or ``torch.nn.BatchNorm*d``) then predict the same. Every
conversion is listed in the returned report:

* Dense kernels are ``(in, out)`` in Keras, ``(out, in)`` in PyTorch: transposed.
* Conv kernels are ``(kh, kw, in, out)`` in Keras, ``(out, in, kh, kw)`` in PyTorch.
* A Dense after ``Flatten`` of a convolution's output reads features in
  height-width-channel order in Keras (channels-last) and channel-height-width
  order in PyTorch: its kernel rows are permuted (needs ``input_shape``).
* BN: gamma, beta, moving mean, moving variance map onto ``weight``, ``bias``,
  ``running_mean``, ``running_var``. Into ``bnlab.BatchNorm`` nothing else
  changes. Into ``torch.nn.BatchNorm*d`` the report states the conventions:
  Keras momentum ``m`` is PyTorch's ``1 - m``, the variance Keras stored is
  biased while PyTorch will keep averaging unbiased ones, and epsilon differs
  unless set (1e-3 vs 1e-5).

Layers are matched in order within each kind. A ``.keras`` file gives the
order from its config; for a bare ``.weights.h5`` the order is Keras'
automatic naming (``dense``, ``dense_1``, ...), so models with custom layer
names should be loaded from their ``.keras`` file.
"""

from __future__ import annotations

import io
import json
import re
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..nn.batchnorm import _BatchNormBase

__all__ = ["load_weights", "save_weights"]

_KIND_OF_CLASS = {"Dense": "dense", "Conv1D": "conv1d", "Conv2D": "conv2d", "BatchNormalization": "bn"}


def _h5():
    try:
        import h5py
    except ImportError:
        raise ImportError("Keras weight files need h5py: pip install 'bnlab[keras]'") from None
    return h5py


def _torch_layers(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    out = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            out.append((name, m, "dense"))
        elif isinstance(m, nn.Conv2d):
            out.append((name, m, "conv2d"))
        elif isinstance(m, nn.Conv1d):
            out.append((name, m, "conv1d"))
        elif isinstance(m, (_BatchNormBase, nn.modules.batchnorm._BatchNorm)):
            out.append((name, m, "bn"))
    return out


def _kind_from_vars(arrays: list[np.ndarray]) -> str | None:
    if not arrays:
        return None
    k = arrays[0]
    if k.ndim == 2:
        return "dense"
    if k.ndim == 4:
        return "conv2d"
    if k.ndim == 3:
        return "conv1d"
    if all(a.ndim == 1 and a.shape == k.shape for a in arrays) and len(arrays) in (2, 3, 4):
        return "bn"
    return None


def _natural(name: str):
    m = re.match(r"^(.*?)(?:_(\d+))?$", name)
    return (m.group(1), int(m.group(2) or 0))


def _read(path: Path) -> tuple[list[tuple[str, list[np.ndarray]]], dict]:
    """Keras layers with weights, in model order where known, and their configs by name."""
    h5py = _h5()
    configs: dict[str, dict] = {}
    order: list[str] | None = None
    if path.suffix == ".keras":
        with zipfile.ZipFile(path) as z:
            config = json.loads(z.read("config.json"))
            blob = z.read("model.weights.h5")
        order = []

        def walk(cfg):
            for layer in cfg.get("config", {}).get("layers", []):
                name = layer.get("config", {}).get("name")
                if layer.get("class_name") in ("Sequential", "Functional"):
                    walk(layer)
                elif name:
                    order.append(name)
                    configs[name] = {"class_name": layer.get("class_name"), **layer.get("config", {})}

        walk(config)
        handle = h5py.File(io.BytesIO(blob), "r")
    else:
        handle = h5py.File(path, "r")
    layers = {}
    with handle as f:
        def visit(name, obj):
            if isinstance(obj, h5py.Group) and name.endswith("/vars") and len(obj):
                layer = name.split("/")[-2]
                layers[layer] = [np.array(obj[str(i)]) for i in range(len(obj))]

        f.visititems(visit)
    names = [n for n in (order or []) if n in layers] if order else sorted(layers, key=_natural)
    return [(n, layers[n]) for n in names], configs


def _flatten_inputs(model: nn.Module, input_shape) -> dict[str, tuple[int, ...]]:
    """For each Linear, the (C, H, W) of the Flatten output it reads, when it reads one."""
    shapes: dict[str, tuple[int, ...]] = {}
    last_flatten: list = [None]
    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Flatten):
            hooks.append(m.register_forward_hook(lambda mod, inp, out: last_flatten.__setitem__(0, tuple(inp[0].shape[1:]))))
        elif isinstance(m, nn.Linear):
            def hook(mod, inp, out, name=name):
                if last_flatten[0] is not None and len(last_flatten[0]) >= 2:
                    shapes[name] = last_flatten[0]
                last_flatten[0] = None
            hooks.append(m.register_forward_hook(hook))
    was = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros((1, *input_shape)))
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    return shapes


def _bn_slots(m) -> list[str]:
    slots = []
    if m.weight is not None:
        slots.append("weight")
    if m.bias is not None:
        slots.append("bias")
    return slots + ["running_mean", "running_var"]


def load_weights(model: nn.Module, path, *, input_shape=None) -> list[str]:
    """Load a Keras 3 ``.weights.h5`` or ``.keras`` file into ``model``; returns the conversions applied.

    ``input_shape`` (without the batch dimension, channels-first) is needed when
    a Linear layer reads a flattened convolution output.
    """
    path = Path(path)
    keras_layers, configs = _read(path)
    torch_layers = _torch_layers(model)
    needs_shape = any(k in ("conv1d", "conv2d") for _, _, k in torch_layers) and any(isinstance(m, nn.Flatten) for m in model.modules())
    if needs_shape and input_shape is None:
        raise ValueError("this model flattens convolution outputs into a Linear layer: pass input_shape (channels-first, "
                         "without the batch dimension) so the Dense kernel rows can be permuted from Keras' order")
    flat = _flatten_inputs(model, input_shape) if needs_shape else {}
    by_kind: dict[str, list] = {}
    for name, arrays in keras_layers:
        kind = _KIND_OF_CLASS.get(configs.get(name, {}).get("class_name")) or _kind_from_vars(arrays)
        if kind is not None:
            by_kind.setdefault(kind, []).append((name, arrays))
    want = {k: sum(1 for *_, kk in torch_layers if kk == k) for k in ("dense", "conv1d", "conv2d", "bn")}
    have = {k: len(v) for k, v in by_kind.items()}
    if any(want[k] != have.get(k, 0) for k in want):
        raise ValueError(f"layer counts differ: the PyTorch model has {want}, the Keras file has "
                         f"{ {k: have.get(k, 0) for k in want} } (Dense, Conv1D, Conv2D, BatchNormalization)")
    report = []
    cursor = {k: 0 for k in want}
    with torch.no_grad():
        for tname, m, kind in torch_layers:
            kname, arrays = by_kind[kind][cursor[kind]]
            cursor[kind] += 1
            cfg = configs.get(kname, {})
            if kind == "dense":
                kernel = arrays[0]
                if tname in flat:
                    chw = flat[tname]  # PyTorch reads (C, H, W); Keras wrote rows in (H, W, C) order
                    c, spatial = chw[0], chw[1:]
                    kernel = kernel.reshape(*spatial, c, -1)
                    kernel = np.moveaxis(kernel, -2, 0).reshape(int(np.prod(chw)), -1)
                    report.append(f"{kname} -> {tname}: kernel rows permuted from Keras' {tuple(spatial) + (c,)} order to {chw}")
                _assign(m.weight, kernel.T, kname, tname)
                if m.bias is not None:
                    _assign(m.bias, arrays[1], kname, tname)
                report.append(f"{kname} -> {tname} (Linear): kernel {arrays[0].shape} transposed to {tuple(m.weight.shape)}")
            elif kind in ("conv1d", "conv2d"):
                perm = (3, 2, 0, 1) if kind == "conv2d" else (2, 1, 0)
                _assign(m.weight, np.transpose(arrays[0], perm), kname, tname)
                if m.bias is not None:
                    _assign(m.bias, arrays[1], kname, tname)
                report.append(f"{kname} -> {tname} ({type(m).__name__}): kernel {arrays[0].shape} permuted to {tuple(m.weight.shape)}")
            else:
                slots = _bn_slots(m)
                if len(slots) != len(arrays):
                    raise ValueError(f"{kname} has {len(arrays)} weights but {tname} expects {len(slots)} ({slots}): "
                                     "center/scale differ")
                for slot, arr in zip(slots, arrays, strict=True):
                    _assign(getattr(m, slot), arr, kname, tname)
                report.append(_bn_note(kname, tname, m, cfg))
    return report


def _assign(target: torch.Tensor, value: np.ndarray, kname: str, tname: str) -> None:
    value = np.asarray(value)
    if tuple(value.shape) != tuple(target.shape):
        raise ValueError(f"{kname} -> {tname}: expected shape {tuple(target.shape)}, got {tuple(value.shape)}")
    target.copy_(torch.from_numpy(np.ascontiguousarray(value)).to(target.dtype))


def _bn_note(kname, tname, m, cfg) -> str:
    k_eps, k_mom = cfg.get("epsilon"), cfg.get("momentum")
    if isinstance(m, _BatchNormBase) and not isinstance(m, nn.modules.batchnorm._BatchNorm):
        eps, mom = m._epsilon(), m._old_weight()
        note = f"{kname} -> {tname} ({type(m).__name__}): gamma, beta, moving mean and variance copied"
        if type(m).__name__ == "BatchNorm":
            if k_eps is not None and abs(k_eps - eps) > 1e-12:
                note += f"; WARNING epsilon differs (Keras {k_eps}, bnlab {eps}): outputs will differ"
            if k_mom is not None and mom is not None and abs(k_mom - mom) > 1e-12:
                note += f"; momentum differs (Keras {k_mom}, bnlab {mom}): only further training is affected"
            return note
    else:
        eps, mom = m.eps, m.momentum
        note = f"{kname} -> {tname} ({type(m).__name__}): gamma, beta, moving mean and variance copied"
    note += (f"; PyTorch conventions: epsilon {eps}" + (f" (Keras used {k_eps}: set eps={k_eps} to match)" if k_eps is not None and abs(k_eps - eps) > 1e-12 else "")
             + (f", momentum {mom} = Keras {1 - mom:.4g}" if mom is not None else ", cumulative momentum")
             + "; Keras stored the biased variance, PyTorch will keep averaging unbiased ones")
    return note


def save_weights(model: nn.Module, path, *, input_shape=None) -> list[str]:
    """Write ``model``'s Dense/Conv/BN weights as a Keras 3 ``.weights.h5`` (the reverse of :func:`load_weights`).

    Layers are named as a freshly built Keras model names them (``dense``,
    ``dense_1``, ``conv2d``, ``batch_normalization``, ...), so
    ``keras_model.load_weights(path)`` loads them into the Keras twin.
    """
    h5py = _h5()
    path = Path(path)
    torch_layers = _torch_layers(model)
    needs_shape = any(k in ("conv1d", "conv2d") for _, _, k in torch_layers) and any(isinstance(m, nn.Flatten) for m in model.modules())
    if needs_shape and input_shape is None:
        raise ValueError("pass input_shape: a Linear layer reads a flattened convolution output")
    flat = _flatten_inputs(model, input_shape) if needs_shape else {}
    prefix = {"dense": "dense", "conv1d": "conv1d", "conv2d": "conv2d", "bn": "batch_normalization"}
    counts: dict[str, int] = {}
    report = []
    tmp = path.with_name(f".{path.name}.tmp")
    with h5py.File(tmp, "w") as f:
        for tname, m, kind in torch_layers:
            i = counts.get(kind, 0)
            counts[kind] = i + 1
            kname = prefix[kind] + (f"_{i}" if i else "")
            if kind == "dense":
                kernel = m.weight.detach().cpu().numpy().T
                if tname in flat:
                    chw = flat[tname]
                    kernel = np.moveaxis(kernel.reshape(*chw, -1), 0, -2).reshape(int(np.prod(chw)), -1)
                arrays = [kernel] + ([m.bias.detach().cpu().numpy()] if m.bias is not None else [])
            elif kind in ("conv1d", "conv2d"):
                perm = (2, 3, 1, 0) if kind == "conv2d" else (2, 1, 0)
                arrays = [np.transpose(m.weight.detach().cpu().numpy(), perm)] + ([m.bias.detach().cpu().numpy()] if m.bias is not None else [])
            else:
                arrays = [getattr(m, s).detach().cpu().numpy() for s in _bn_slots(m)]
            g = f.create_group(f"layers/{kname}/vars")
            for j, arr in enumerate(arrays):
                g.create_dataset(str(j), data=np.ascontiguousarray(arr))
            report.append(f"{tname} -> {kname}: {len(arrays)} arrays")
    tmp.replace(path)
    return report
