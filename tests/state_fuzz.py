"""The state-mutation fuzz harness: cases, a child-process runner and the comparison (see test_state_fuzz.py).

A *case* is plain JSON: a layer of bnlab's family (its class and arguments)
and 3-8 *steps*: forward calls (training or inference, with a backward), and
between them changes to the layer's parameters and buffers (``.data =``
another size, dtype, strides, storage offset or a negative view,
``resize_``, ``set_``, a new tensor, ``requires_grad``), to its settings
(momentum, epsilon, trainable, mode, dtype) and to the input (shape, dtype,
layout: channels-last, transposed, sliced, offset, negative and conjugate
views, overlapping and zero strides, zero-size storage). Cases come from a
seed (:func:`generate`), so each is named and rerun by its seed; a few are
written out by hand (:data:`NAMED`), the crash of issue 20 among them.

A child process (``python tests/state_fuzz.py run CASES.json OUT MODE ID...``)
runs cases and writes, per case, the outcome of every step (the error's type,
or nothing) to ``OUT/results.jsonl`` and every output, gradient, parameter and
buffer after each step to ``OUT/<id>.npz``. Mode ``kernels`` is the library as
installed; ``composite`` sets ``BNLAB_KERNELS=0`` (the PyTorch paths, the
reference); ``native`` builds ``torch.nn.BatchNorm*d`` for bnlab's PyTorch
drop-ins (an oracle for their semantics). Only public names of bnlab are used,
so the harness outlives a redesign of the internals.

By hand::

    python tests/state_fuzz.py show 1234             # the case of seed 1234
    python tests/state_fuzz.py check 1234 issue20-weight-shrink   # run both modes, compare, print
"""

from __future__ import annotations

import faulthandler
import json
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# --------------------------------------------------------------------------- cases


def _pick(rng: random.Random, weighted: dict):
    keys = list(weighted)
    return rng.choices(keys, weights=[weighted[k] for k in keys])[0]


def _layer_spec(rng: random.Random) -> dict:
    kind = _pick(rng, {"BatchNorm": 30, "BatchNormAct": 12, "BatchNorm1d": 16, "BatchNorm2d": 14, "BatchNorm3d": 6,
                       "FrozenBatchNorm": 8})
    dtype = _pick(rng, {"float32": 75, "float64": 12, "bfloat16": 9, "float16": 4})
    big = rng.random() < 0.25  # above the small-batch path: the kernels' own batches
    spec = {"kind": kind, "dtype": dtype, "big": big}
    if kind in ("BatchNorm", "BatchNormAct"):
        axis = _pick(rng, {-1: 45, 1: 45, "1,3": 10})
        rank = {-1: rng.choice([2, 2, 3, 4]), 1: rng.choice([2, 3, 4, 4, 5]), "1,3": 4}[axis]
        features = [rng.choice([3, 4]), rng.choice([2, 5])] if axis == "1,3" else [_features(rng, big, rank)]
        kw = {
            "axis": [1, 3] if axis == "1,3" else axis,
            "momentum": _pick(rng, {0.99: 40, 0.9: 20, 0.5: 10, 0.0: 8, 1.0: 7, None: 15}),
            "epsilon": _pick(rng, {1e-3: 60, 1e-5: 25, 0.1: 15}),
            # (BatchNormAct always adds beta: without it a constant feature's pre-activation is rounding noise
            # around 0, where the activation's slope depends on that noise's sign)
            "center": kind == "BatchNormAct" or rng.random() < 0.85,
            "scale": rng.random() < 0.85,
            "moving_variance_estimator": _pick(rng, {"biased": 75, "unbiased": 25}),
        }
        variant = _pick(rng, {"plain": 70, "renorm": 15, "ghost": 15})
        if variant == "renorm" and kw["momentum"] is not None:
            kw.update(renorm=True, moving_variance_estimator="biased", renorm_momentum=rng.choice([0.99, 0.5]))
            if rng.random() < 0.5:
                kw["renorm_clipping"] = {"rmax": 2.0, "rmin": 0.5, "dmax": 1.0}
        elif variant == "ghost":
            kw.update(virtual_batch_size=rng.choice([2, 3, 4]), moving_variance_estimator="biased")
        if kind == "BatchNormAct":
            kw["activation"] = rng.choice(["relu", "leaky_relu"])
            kw["negative_slope"] = rng.choice([0.01, 0.2])
        kw["num_features"] = None if rng.random() < 0.15 else (features if len(features) > 1 else features[0])
        spec.update(kwargs=kw, rank=rank, features=features)
    elif kind == "FrozenBatchNorm":
        axis = rng.choice([1, -1])
        rank = rng.choice([2, 3, 4])
        features = [_features(rng, big, rank)]
        spec.update(kwargs={"num_features": features[0], "axis": axis, "eps": rng.choice([1e-5, 1e-3])}, rank=rank, features=features)
    else:
        rank = {"BatchNorm1d": rng.choice([2, 3]), "BatchNorm2d": 4, "BatchNorm3d": 5}[kind]
        features = [_features(rng, big, rank)]
        spec.update(kwargs={
            "num_features": features[0],
            "eps": _pick(rng, {1e-5: 70, 1e-3: 30}),
            "momentum": _pick(rng, {0.1: 60, None: 15, 0.0: 8, 1.0: 7, 0.5: 10}),
            "affine": rng.random() < 0.85,
            "track_running_stats": rng.random() < 0.85,
        }, rank=rank, features=features)
    return spec


def _features(rng: random.Random, big: bool, rank: int) -> int:
    if big:
        return rng.choice([1100, 2048, 9000]) if rank == 2 else rng.choice([16, 32])
    return rng.choice([1, 2, 3, 5, 8, 16, 33, 64, 128])


def _input_shape(rng: random.Random, layer: dict) -> list[int]:
    """A shape for the layer's rank and feature axes; big layers get more than 65,536 values."""
    rank, feats = layer["rank"], layer["features"]
    axis = layer["kwargs"].get("axis", 1)
    n = _pick(rng, {1: 4, 2: 12, 3: 10, 4: 20, 8: 25, 32: 15, 64: 10})
    if layer["big"]:
        n = max(n, 4)
    spatial_choices = [1, 2, 3, 5, 7]
    shape = [n] + [rng.choice(spatial_choices) for _ in range(rank - 1)]
    if axis == [1, 3]:
        shape[1], shape[3] = feats
        return shape
    ax = axis if axis >= 0 else rank + axis
    if ax == 0:
        ax = 1
    shape[ax] = feats[0]
    if layer["big"]:
        per_sample = math.prod(shape[1:])
        if n * per_sample <= 1 << 16:
            if rank == 2:
                shape[0] = (1 << 16) // per_sample + rng.choice([1, 7])
            else:
                free = [i for i in range(1, rank) if i != ax]
                side = max(2, int(math.ceil(((1 << 16) / (n * feats[0])) ** (1 / len(free)))) + 1)
                for i in free:
                    shape[i] = side
    return shape


def _input_spec(rng: random.Random, layer: dict, shape: list[int], seed: int) -> dict:
    rank = len(shape)
    layouts = {"contiguous": 40, "transposed": 8, "sliced": 8, "offset": 6, "neg": 10, "expand": 4, "overlap": 4}
    if rank in (4, 5):
        layouts["channels_last"] = 15
    if shape[0] == 0:
        layouts["zero_storage"] = 20
    dtype = layer["dtype"] if rng.random() < 0.8 else _pick(rng, {"float32": 30, "float64": 25, "bfloat16": 15, "float16": 10,
                                                                   "int64": 5, "complex64": 5})
    layout = _pick(rng, layouts)
    if dtype == "complex64":
        layout = rng.choice(["contiguous", "conj"])
    return {
        "shape": shape, "dtype": dtype, "layout": layout, "seed": seed,
        "requires_grad": rng.random() < 0.7 and dtype not in ("int64",),
        "scale": _pick(rng, {1.0: 70, 1e-3: 10, 100.0: 20}),
        "offset": _pick(rng, {0.0: 60, 3.0: 25, 50.0: 15}),
        "special": _pick(rng, {None: 85, "nan": 5, "inf": 3, "constant": 7}),
    }


_PARAM_NAMES = ("weight", "bias")
_BUFFER_NAMES = ("running_mean", "running_var", "num_batches_tracked")
_RENORM_BUFFERS = ("moving_stddev", "renorm_mean", "renorm_stddev")

MUTATIONS = {
    "shrink": 14,  # .data = .data[:k]  (issue 20's crash)
    "grow": 6,  # .data = a longer tensor
    "dtype": 8,  # .data = .data.to(other dtype)
    "strided": 8,  # .data = every other value of a longer tensor (NaN in the gaps)
    "offset": 6,  # .data = a view at a storage offset (NaN before it)
    "expand": 4,  # .data = one value expanded (stride 0: overlapping memory)
    "neg": 6,  # .data = torch._neg_view(-values)  (same values, negative bit)
    "resize_": 6,  # t.resize_(m) in place (grown values filled)
    "set_": 6,  # t.set_(another storage, offset, size, stride)
    "clone": 4,  # .data = a copy (another address, same everything else)
    "replace": 5,  # layer.<name> = a new Parameter / tensor (other size or dtype sometimes)
    "none": 2,  # layer.<name> = None
    "requires_grad": 6,  # toggle
    "fill_nan": 2,  # one NaN written into it
}


def _mutation_spec(rng: random.Random, layer: dict) -> dict:
    names = list(_PARAM_NAMES) + list(_BUFFER_NAMES)
    if layer["kwargs"].get("renorm"):
        names += list(_RENORM_BUFFERS)
    target = rng.choices(names, weights=[5 if n in _PARAM_NAMES else 4 if n != "num_batches_tracked" else 1 for n in names])[0]
    how = _pick(rng, MUTATIONS)
    spec = {"op": "mutate", "target": target, "how": how, "seed": rng.randrange(1 << 30)}
    if how == "shrink":
        spec["keep"] = rng.choice([0, 1, -1])  # -1: all but one
    elif how == "grow":
        spec["extra"] = rng.choice([1, 5])
    elif how == "dtype":
        spec["dtype"] = rng.choice(["float64", "float32", "bfloat16", "float16", "int64", "complex64"])
    elif how in ("resize_", "set_"):
        spec["delta"] = rng.choice([-1, 0, 1, 3])
    elif how == "replace":
        spec["delta"] = rng.choice([0, 0, -1, 2])
        spec["dtype"] = rng.choice([None, None, "float64", "float32"])
    return spec


def _setting_spec(rng: random.Random, layer: dict) -> dict:
    keras = layer["kind"] in ("BatchNorm", "BatchNormAct")
    frozen = layer["kind"] == "FrozenBatchNorm"
    choices = {"train": 20, "eval": 20, "momentum": 0 if frozen else 15, "epsilon": 10, "trainable": 10 if keras else 0,
               "to_dtype": 8, "requires_grad_module": 5}
    what = _pick(rng, choices)
    spec = {"op": "set", "what": what}
    if what == "momentum":
        spec["value"] = rng.choice([0.0, 0.5, 0.9, 0.99, 1.0, None]) if keras else rng.choice([0.0, 0.1, 0.5, 1.0, None])
    elif what == "epsilon":
        spec["value"] = rng.choice([1e-5, 1e-3, 0.5, 0.0])
    elif what == "trainable":
        spec["value"] = rng.random() < 0.5
    elif what == "to_dtype":
        spec["value"] = _pick(rng, {"float32": 50, "float64": 30, "bfloat16": 15, "float16": 5})
    elif what == "requires_grad_module":
        spec["value"] = rng.random() < 0.5
    return spec


def generate(seed: int) -> dict:
    """The case of ``seed``: a layer and 3-8 steps (forwards with mutations and setting changes between them)."""
    rng = random.Random(seed)
    layer = _layer_spec(rng)
    shape = _input_shape(rng, layer)
    base = _input_spec(rng, layer, shape, rng.randrange(1 << 30))
    steps = []
    n_steps = rng.randint(3, 8)
    for i in range(n_steps):
        last = i == n_steps - 1
        kind = "forward" if (i == 0 or last) else _pick(rng, {"forward": 45, "mutate": 38, "set": 17})
        if kind == "forward":
            x = dict(base, seed=rng.randrange(1 << 30))
            r = rng.random()
            if r < 0.12:  # another batch size, same features
                x["shape"] = [rng.choice([0, 1, 2, 5, 16])] + list(shape[1:])
                if math.prod(x["shape"]) == 0 and rng.random() < 0.5:
                    x["layout"] = "zero_storage"  # no storage at all behind the empty batch
            elif r < 0.27:  # another input: layout, dtype, values
                x = _input_spec(rng, layer, shape, x["seed"])
            elif r < 0.30:  # other features: an error for every path
                x["shape"] = list(shape)
                ax = layer["kwargs"].get("axis", 1)
                ax = 1 if isinstance(ax, list) else (ax if ax >= 0 else len(shape) + ax)
                x["shape"][max(ax, 1) if len(shape) > 1 else 0] += 1
            keras = layer["kind"] in ("BatchNorm", "BatchNormAct")
            steps.append({
                "op": "forward", "input": x,
                "training": _pick(rng, {None: 70, True: 15, False: 15}) if keras else None,
                "mask": keras and rng.random() < 0.08 and layer["kwargs"].get("virtual_batch_size") is None
                        and not layer["kwargs"].get("renorm"),
                "backward": rng.random() < 0.75,
                "clear_grads": rng.random() < 0.7,
                "grad_seed": rng.randrange(1 << 30),
            })
        elif kind == "mutate":
            steps.append(_mutation_spec(rng, layer))
        else:
            steps.append(_setting_spec(rng, layer))
    return {"id": f"g{seed}", "seed": seed, "layer": layer, "steps": steps, "threads": rng.choice([1, 1, 1, 2]),
            "init_seed": rng.randrange(1 << 30)}


def _forward(shape, dtype="float32", layout="contiguous", seed=0, requires_grad=True, training=None, backward=True, **extra):
    x = {"shape": shape, "dtype": dtype, "layout": layout, "seed": seed, "requires_grad": requires_grad, "scale": 1.0,
         "offset": 0.5, "special": None}
    return {"op": "forward", "input": x, "training": training, "mask": False, "backward": backward, "clear_grads": True,
            "grad_seed": seed + 1, **extra}


def _issue20_shrink(name: str, targets: tuple[str, ...]) -> dict:
    """Issue 20: ``bn = BatchNorm1d(70000)``, a forward+backward, then ``bn.<t>.data = bn.<t>.data[:1]`` and more batches."""
    layer = {"kind": "BatchNorm1d", "dtype": "float32", "big": True, "rank": 2, "features": [70000],
             "kwargs": {"num_features": 70000, "eps": 1e-5, "momentum": 0.1, "affine": True, "track_running_stats": True}}
    steps = [_forward([4, 70000], seed=1)]
    steps += [{"op": "mutate", "target": t, "how": "shrink", "keep": 1, "seed": 7} for t in targets]
    steps += [_forward([4, 70000], seed=s) for s in (2, 3, 4)]
    return {"id": name, "seed": None, "layer": layer, "steps": steps, "threads": 1, "init_seed": 5}


def _neg_input(name: str, kind: str, shape: list[int], training_steps: bool) -> dict:
    """Issue 20: an input with the negative bit (``torch._neg_view``) in training and in inference."""
    kwargs = ({"num_features": shape[1], "axis": 1} if kind == "BatchNorm" else
              {"num_features": shape[1], "eps": 1e-5, "momentum": 0.1, "affine": True, "track_running_stats": True})
    layer = {"kind": kind, "dtype": "float32", "big": math.prod(shape) > 1 << 16, "rank": len(shape), "features": [shape[1]],
             "kwargs": kwargs}
    steps = [_forward(shape, layout="neg", seed=s) for s in (11, 12)] if training_steps else []
    steps += [{"op": "set", "what": "eval"}, _forward(shape, layout="neg", seed=13), _forward(shape, layout="neg", seed=14)]
    return {"id": name, "seed": None, "layer": layer, "steps": steps, "threads": 1, "init_seed": 6}


#: Cases written out by hand: issue 20's crash (weight, bias, the moving statistics shrunk) and negative views.
NAMED = {c["id"]: c for c in (
    _issue20_shrink("issue20-weight-shrink", ("weight",)),
    _issue20_shrink("issue20-bias-shrink", ("bias",)),
    _issue20_shrink("issue20-stats-shrink", ("running_mean", "running_var")),
    _neg_input("issue20-neg-input-rows", "BatchNorm1d", [64, 16], True),
    _neg_input("issue20-neg-input-big", "BatchNorm1d", [8, 9000], True),
    _neg_input("issue20-neg-input-planes", "BatchNorm", [8, 16, 24, 24], True),
    _neg_input("issue20-neg-input-small-planes", "BatchNorm2d", [4, 3, 5, 5], True),
)}


def _harness_check(name: str, how: str) -> dict:
    layer = {"kind": "BatchNorm1d", "dtype": "float32", "big": False, "rank": 2, "features": [3],
             "kwargs": {"num_features": 3, "eps": 1e-5, "momentum": 0.1, "affine": True, "track_running_stats": True}}
    steps = [_forward([8, 3], seed=21), {"op": "fault", "mode": "kernels", "how": how}, _forward([8, 3], seed=22)]
    return {"id": name, "seed": None, "layer": layer, "steps": steps, "threads": 1, "init_seed": 8, "deadline_s": 5}


#: Cases that misbehave on purpose in the tested mode only, so each run shows the harness catches and names
#: a crash (SIGSEGV), a hang and a difference: (case, the kind of failure expected).
HARNESS_CHECKS = {
    "harness-nudge": (_harness_check("harness-nudge", "nudge"), "mismatch"),
    "harness-hang": (_harness_check("harness-hang", "hang"), "hang"),
    "harness-crash": (_harness_check("harness-crash", "segfault"), "crash"),
}


def case(key: str | int) -> dict:
    """A named case, or the generated case of a seed (``1234`` or ``"g1234"``)."""
    if isinstance(key, str) and key in NAMED:
        return NAMED[key]
    if isinstance(key, str) and key in HARNESS_CHECKS:
        return HARNESS_CHECKS[key][0]
    return generate(int(str(key).lstrip("g")))


def describe(c: dict) -> str:
    """One line per step: what the case does."""
    lay = c["layer"]
    kw = ", ".join(f"{k}={v!r}" for k, v in lay["kwargs"].items())
    lines = [f"{c['id']}: {lay['kind']}({kw}) dtype={lay['dtype']} threads={c['threads']}"]
    for i, s in enumerate(c["steps"]):
        lines.append(f"  step {i}: {describe_step(s)}")
    return "\n".join(lines)


def describe_step(s: dict) -> str:
    if s["op"] == "forward":
        x = s["input"]
        extra = "".join([f", training={s['training']}" if s["training"] is not None else "", ", mask" if s["mask"] else "",
                         ", backward" if s["backward"] else "", f", special={x['special']}" if x["special"] else ""])
        return f"forward x{tuple(x['shape'])} {x['dtype']} {x['layout']} requires_grad={x['requires_grad']}{extra}"
    if s["op"] == "fault":
        return f"fault ({s['how']} in {s['mode']} only)"
    if s["op"] == "mutate":
        args = {k: v for k, v in s.items() if k not in ("op", "target", "how", "seed")}
        return f"mutate {s['target']}: {s['how']} {args if args else ''}".rstrip()
    return f"set {s['what']}" + (f" = {s['value']!r}" if "value" in s else "")


# --------------------------------------------------------------------------- running a case (in a child process)


def _torch():
    import torch

    return torch


def _dtype(name: str):
    return getattr(_torch(), name)


def _build(c: dict, mode: str):
    import bnlab

    torch = _torch()
    lay = c["layer"]
    kw = dict(lay["kwargs"])
    dt = _dtype(lay["dtype"])
    kind = lay["kind"]
    if kind in ("BatchNorm", "BatchNormAct"):
        cls = bnlab.BatchNorm if kind == "BatchNorm" else bnlab.BatchNormAct
        if kw.get("num_features") is None:  # built by the first batch: random values through the initializers
            kw.update({f"{name}_initializer": _initializer(name, c["init_seed"] + i)
                       for i, name in enumerate(("gamma", "beta", "moving_mean", "moving_variance"))})
        layer = cls(dtype=dt, **kw)
    elif kind == "FrozenBatchNorm":
        layer = bnlab.FrozenBatchNorm(dtype=dt, **kw)
    else:
        cls = getattr(torch.nn if mode == "native" else bnlab.nn, kind)
        layer = cls(dtype=dt, **kw)
    _randomize(layer, c["init_seed"])
    return layer


def _values(name: str, shape, gen):
    """Non-trivial values for a parameter or statistic (float64): positive scales and variances, offsets away from 0."""
    torch = _torch()
    if name in ("running_var", "moving_variance", "moving_stddev", "renorm_stddev", "weight", "gamma"):
        return torch.rand(shape, generator=gen, dtype=torch.float64) + 0.5
    if name in ("bias", "beta"):  # |beta| >= 0.25: a constant feature's pre-activation stays off the activation's kink
        sign = torch.randint(0, 2, shape, generator=gen).double() * 2 - 1
        return sign * (0.25 + 0.5 * torch.rand(shape, generator=gen, dtype=torch.float64))
    return torch.randn(shape, generator=gen, dtype=torch.float64) * 0.5


def _initializer(name: str, seed: int):
    """A Keras-style initializer (``fn(shape, dtype, device)``) drawing :func:`_values` from its own seed."""
    torch = _torch()

    def init(shape, dtype=None, device=None):
        return _values(name, tuple(shape), torch.Generator().manual_seed(seed)).to(dtype=dtype, device=device)

    return init


def _randomize(layer, seed: int) -> None:
    """Values of parameters and statistics that are not the initial ones (each tensor its own draw)."""
    torch = _torch()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(layer.named_parameters()) + list(layer.named_buffers()):
            if t.is_floating_point():
                t.copy_(_values(name, t.shape, gen).to(t.dtype))


def _make_input(spec: dict):
    """``(leaf, input)``: the tensor gradients reach, and what the layer is given (a view of it, or it)."""
    torch = _torch()
    gen = torch.Generator().manual_seed(spec["seed"])
    shape = tuple(spec["shape"])
    base = torch.randn(shape, generator=gen, dtype=torch.float64) * spec["scale"] + spec["offset"]
    if spec["special"] == "constant":
        base = torch.full(shape, spec["offset"] + 1.0, dtype=torch.float64)
    elif spec["special"] in ("nan", "inf") and base.numel():
        base.view(-1)[int(torch.randint(base.numel(), (1,), generator=gen))] = math.nan if spec["special"] == "nan" else math.inf
    layout, rg = spec["layout"], spec["requires_grad"]
    if spec["dtype"] == "complex64":
        leaf = torch.complex(base.float(), base.flip(-1).float() if base.dim() else base.float()).requires_grad_(rg)
        return leaf, leaf.conj() if layout == "conj" else leaf  # (a conjugate view: the conj bit set)
    dt = _dtype(spec["dtype"])
    x = base.to(dt)
    if layout == "contiguous":
        leaf = x.clone().requires_grad_(rg)
        return leaf, leaf
    if layout == "channels_last":
        fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        leaf = x.contiguous(memory_format=fmt).requires_grad_(rg)
        return leaf, leaf
    if layout == "transposed":  # the same values, memory in the other axis order
        leaf = x.transpose(0, -1).contiguous().transpose(0, -1).detach().requires_grad_(rg)
        return leaf, leaf
    if layout == "sliced":  # every other value of a tensor twice as long in the last axis (NaN in the gaps)
        big = torch.full((*shape[:-1], 2 * shape[-1]) if shape else (2,), math.nan, dtype=dt)
        big[..., ::2] = x
        leaf = big[..., ::2].detach().requires_grad_(rg)
        return leaf, leaf
    if layout == "offset":  # a view 7 values into its storage (NaN before)
        flat = torch.full((x.numel() + 7,), math.nan, dtype=dt)
        flat[7:] = x.reshape(-1)
        leaf = flat[7:].view(shape).detach().requires_grad_(rg)
        return leaf, leaf
    if layout == "neg":  # the values, through a negative-bit view of their negation
        leaf = (-x).requires_grad_(rg)
        return leaf, torch._neg_view(leaf)
    if layout == "expand" and shape and shape[0] > 0:  # one sample repeated (stride 0 on the batch axis)
        leaf = x[:1].clone().requires_grad_(rg)
        return leaf, leaf.expand(shape)
    if layout == "overlap" and len(shape) >= 2 and shape[0] > 1 and x.numel() > 0:  # samples overlapping by half
        strides = list(torch.empty(shape).stride())
        strides[0] = max(1, strides[0] // 2)
        needed = sum((n - 1) * s for n, s in zip(shape, strides)) + 1
        leaf = base.reshape(-1)[:needed].to(dt).clone().requires_grad_(rg)
        return leaf, leaf.as_strided(shape, strides)
    if layout == "zero_storage" and x.numel() == 0:
        leaf = torch.empty(0, dtype=dt).requires_grad_(rg)
        return leaf, leaf.as_strided(shape, torch.empty(shape).stride())
    leaf = x.clone().requires_grad_(rg)  # a layout this shape cannot have
    return leaf, leaf


def _mask_for(x, layer):
    torch = _torch()
    axis = layer.axis
    axes = {a % x.dim() for a in (axis if isinstance(axis, (list, tuple)) else [axis])} if x.dim() else set()
    shape = tuple(n for i, n in enumerate(x.shape) if i not in axes)
    gen = torch.Generator().manual_seed(3)
    return torch.rand(shape, generator=gen) < 0.7


def _mutate(layer, s: dict) -> None:
    torch = _torch()
    name, how = s["target"], s["how"]
    t = getattr(layer, name, None)
    if t is None and how not in ("replace",):
        raise LookupError(f"the layer has no {name}")  # (the same in every mode: a step that does nothing)
    gen = torch.Generator().manual_seed(s["seed"])
    with torch.no_grad():
        if how == "shrink":
            n = t.shape[0] if t.dim() else 1
            k = {0: 0, 1: 1, -1: max(n - 1, 0)}[s["keep"]]
            t.data = t.data.reshape(-1)[:k] if t.dim() == 0 else t.data[:k]
        elif how == "grow":
            flat = t.data.reshape(-1)
            t.data = torch.cat([flat, torch.full((s["extra"],), 0.75, dtype=flat.dtype) if flat.is_floating_point()
                                else torch.ones(s["extra"], dtype=flat.dtype)])
        elif how == "dtype":
            t.data = t.data.to(_dtype(s["dtype"]))
        elif how == "strided":
            d = t.data
            big = torch.full((*d.shape[:-1], 2 * d.shape[-1]) if d.dim() else (2,), math.nan if d.is_floating_point() else 7,
                             dtype=d.dtype)
            big[..., ::2] = d if d.dim() else d.reshape(1)
            t.data = big[..., ::2] if d.dim() else big[0]
        elif how == "offset":
            d = t.data
            flat = torch.full((d.numel() + 5,), math.nan if d.is_floating_point() else 7, dtype=d.dtype)
            flat[5:] = d.reshape(-1)
            t.data = flat[5:].view(d.shape)
        elif how == "expand":
            d = t.data
            t.data = d.reshape(-1)[:1].expand(d.shape) if d.numel() else d
        elif how == "neg":
            t.data = torch._neg_view((-t.data).clone())
        elif how == "resize_":
            n = t.numel()
            m = max(0, n + s["delta"])
            t.resize_(m)
            if m > n:
                t.view(-1)[n:] = 0.25
        elif how == "set_":
            n = t.numel()
            m = max(0, n + s["delta"])
            src = torch.randn(2 * m + 3, generator=gen, dtype=torch.float64).abs().add(0.5).to(t.dtype)
            t.set_(src.untyped_storage(), 3, (m,), (2,))
        elif how == "clone":
            t.data = t.data.clone()
        elif how == "replace":
            ref = t if t is not None else torch.ones(1)
            n = max(0, (ref.shape[0] if ref.dim() else 1) + s["delta"]) if ref.dim() else None
            dt = _dtype(s["dtype"]) if s["dtype"] else ref.dtype
            new = (torch.rand(n if n is not None else (), generator=gen, dtype=torch.float64) + 0.5).to(dt)
            if not dt.is_floating_point:
                new = torch.zeros(n if n is not None else (), dtype=dt)
            if name in _PARAM_NAMES and isinstance(t, torch.nn.Parameter):
                setattr(layer, name, torch.nn.Parameter(new, requires_grad=t.requires_grad and dt.is_floating_point))
            else:
                setattr(layer, name, new)
        elif how == "none":
            setattr(layer, name, None)
        elif how == "requires_grad":
            t.requires_grad_(not t.requires_grad)
        elif how == "fill_nan":
            if t.is_floating_point() and t.numel():
                t.view(-1)[0] = math.nan
        else:
            raise ValueError(f"unknown mutation {how!r}")


def _set(layer, s: dict) -> None:
    torch = _torch()
    what = s["what"]
    if what == "train":
        layer.train()
    elif what == "eval":
        layer.eval()
    elif what == "momentum":
        layer.momentum = s["value"]
    elif what == "epsilon":
        setattr(layer, "epsilon" if hasattr(layer, "epsilon") else "eps", s["value"])
    elif what == "trainable":
        layer.trainable = s["value"]
    elif what == "to_dtype":
        layer.to(_dtype(s["value"]))
    elif what == "requires_grad_module":
        layer.requires_grad_(s["value"])


def _fault(layer, s: dict, mode: str) -> None:
    """The harness's own check (:data:`HARNESS_CHECKS`): misbehave in one mode only."""
    torch = _torch()
    if s["mode"] != mode:
        return
    if s["how"] == "segfault":
        import ctypes

        ctypes.string_at(0)  # reads address 0: SIGSEGV
    elif s["how"] == "hang":
        time.sleep(3600)
    elif s["how"] == "nudge":
        with torch.no_grad():
            layer.running_mean.add_(0.5)


def _finite_min(t) -> float:
    finite = t[t.isfinite()]
    return float(finite.min()) if finite.numel() else 0.0


def _conditioning(layer, x, inference: bool) -> dict | None:
    """How much float rounding a forward on ``x`` may amplify (see :func:`compare_case`), or None.

    ``amp = max|x| / sqrt(v + eps)`` with ``v`` the smallest variance the layer
    divides by (the batch's per feature, in float64, in training; the moving
    variance in inference): a relative rounding error of ``x`` or of its mean
    reaches ``y`` multiplied by ``amp`` (a constant feature with a large mean
    is the worst case). ``M``: values per feature.
    """
    torch = _torch()
    try:
        if not (x.is_floating_point() and x.numel()):
            return None
        x64 = x.detach().resolve_neg().double()
        axis = getattr(layer, "axis", 1)
        feats = {a % x.dim() for a in (axis if isinstance(axis, (list, tuple)) else [axis])}
        red = [d for d in range(x.dim()) if d not in feats]
        m = x64[torch.isfinite(x64)]
        xmax = float(m.abs().max()) if m.numel() else 0.0
        per = x64.reshape(-1).numel() // max(1, math.prod(x.shape[d] for d in feats))
        v = _finite_min(x64.var(dim=red, correction=0)) if red and per > 1 else 0.0  # (features with NaN/inf: their own)
        rv = getattr(layer, "running_var", None)
        if inference and rv is not None and rv.is_floating_point() and rv.numel():
            v = max(0.0, _finite_min(rv.detach().resolve_neg().double()))
        eps = float(getattr(layer, "epsilon", getattr(layer, "eps", 1e-5)) or 1e-12)
        w = getattr(layer, "weight", None)
        gmax = 1.0
        if isinstance(w, torch.Tensor) and w.is_floating_point() and w.numel():
            gw = w.detach().resolve_neg().double()
            gw = gw[torch.isfinite(gw)]
            gmax = max(1.0, float(gw.abs().max())) if gw.numel() else 1.0
        inv = 1.0 / math.sqrt(max(v, 0.0) + eps)
        # gamp: what dx's rounding is multiplied by, gamma * invstd per unit of dy (a sum that cancels to about 0,
        # e.g. the gradient of an expanded input whose rows are equal, keeps that rounding whatever x's scale)
        return {"amp": xmax * inv, "gamp": gmax * inv, "xmax": xmax, "M": per}
    except Exception:  # noqa: BLE001 - a hint only
        return None


def _state(layer) -> dict:
    out = {}
    for name, p in layer.named_parameters():
        out[f"param.{name}"] = p
        if p.grad is not None:
            out[f"grad.{name}"] = p.grad
    for name, b in layer.named_buffers():
        out[f"buffer.{name}"] = b
    return out


def _fits_storage(t) -> bool:
    """Whether every element of ``t`` lies inside its storage."""
    if t.numel() == 0:
        return True
    extent = t.storage_offset() + sum((n - 1) * st for n, st in zip(t.shape, t.stride())) + 1
    return t.untyped_storage().nbytes() >= extent * t.element_size()


def _to_numpy(t) -> np.ndarray:
    torch = _torch()
    # a copy first: numpy() would mark the tensor's own storage as not resizable (and it may change later)
    t = t.detach().resolve_conj().resolve_neg().cpu().clone()
    if t.dtype in (torch.bfloat16, torch.float16):
        t = t.float()
    return t.numpy()


def run_case(c: dict, mode: str) -> tuple[list[dict], dict[str, np.ndarray]]:
    """Run every step; ``(per-step records, arrays)``. A step that raises is recorded and the case goes on."""
    torch = _torch()
    torch.manual_seed(c["init_seed"])
    torch.set_num_threads(c["threads"])
    records, arrays = [], {}
    layer = None
    try:
        layer = _build(c, mode)
        build_error = None
    except Exception as err:  # noqa: BLE001 - recorded and compared
        build_error = err
    for i, s in enumerate(c["steps"]):
        print(f"  step {i}: {describe_step(s)}", file=sys.stderr, flush=True)
        tensors, error, cond = {}, None, None
        if layer is None:
            error = build_error
        else:
            try:
                if s["op"] == "forward":
                    if s["clear_grads"]:
                        for p in layer.parameters():
                            p.grad = None
                    leaf, x = _make_input(s["input"])
                    tensors["x.leaf"] = leaf  # (kept in the record even if the call raises)
                    kwargs = {}
                    keras = c["layer"]["kind"] in ("BatchNorm", "BatchNormAct")
                    if keras and s["training"] is not None:
                        kwargs["training"] = s["training"]
                    if keras and s["mask"]:
                        kwargs["mask"] = _mask_for(x, layer)
                    inference = (kwargs.get("training") is False or not layer.training
                                 or getattr(layer, "trainable", True) is False) and getattr(layer, "running_var", None) is not None
                    cond = _conditioning(layer, x, inference or c["layer"]["kind"] == "FrozenBatchNorm")
                    y = layer(x, **kwargs)
                    tensors["y"] = y
                    if s["backward"] and y.requires_grad:
                        g = torch.randn(y.shape, generator=torch.Generator().manual_seed(s["grad_seed"]), dtype=torch.float64)
                        (y * g.to(y.dtype)).sum().backward()  # (y.backward(g) imports sympy: seconds per child)
                        if leaf.grad is not None:
                            tensors["x.grad"] = leaf.grad
                elif s["op"] == "mutate":
                    _mutate(layer, s)
                elif s["op"] == "fault":
                    _fault(layer, s, mode)
                else:
                    _set(layer, s)
            except Exception as err:  # noqa: BLE001 - recorded and compared
                error = err
        if layer is not None:
            tensors.update(_state(layer))
        meta = {}
        for name, t in tensors.items():
            key = f"s{i}.{name}"
            if not _fits_storage(t):  # (a resize_ that failed half-way leaves one: reading it reads past its memory)
                meta[name] = [str(t.dtype).replace("torch.", ""), list(t.shape), "unreadable: larger than its storage"]
                continue
            try:
                arrays[key] = _to_numpy(t)
                meta[name] = [str(t.dtype).replace("torch.", ""), list(t.shape)]
            except Exception as err:  # noqa: BLE001 - a tensor that cannot be read back is itself a finding
                meta[name] = [str(t.dtype).replace("torch.", ""), list(t.shape), f"unreadable: {type(err).__name__}: {err}"]
        records.append({
            "step": i,
            "cond": cond,
            "error": None if error is None else [type(error).__name__, str(error)[:400]],
            "where": None if error is None else "".join(traceback.format_tb(error.__traceback__)[-2:])[-600:],
            "tensors": meta,
        })
    return records, arrays


def _write_atomic_npz(path: Path, arrays: dict) -> None:
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def child_main(cases_file: str, out: str, mode: str, ids: list[str], deadline_s: float | None) -> int:
    """Run ``ids`` from ``cases_file`` in ``mode``; append one JSON line per finished case to ``out/results.jsonl``."""
    faulthandler.enable()
    if mode == "composite":
        os.environ["BNLAB_KERNELS"] = "0"
    import warnings

    import bnlab  # noqa: F401 - imported before any case's deadline starts
    import torch  # noqa: F401

    warnings.simplefilter("ignore")
    cases = {c["id"]: c for c in json.loads(Path(cases_file).read_text())}
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "results.jsonl", "a", encoding="utf-8") as fh:
        for cid in ids:
            print(f"case {cid}", file=sys.stderr, flush=True)  # the last one named before a crash
            deadline = cases[cid].get("deadline_s", deadline_s)
            if deadline:  # a hang prints where it is and exits (the parent's timeout is later)
                faulthandler.dump_traceback_later(deadline, exit=True)
            t0 = time.perf_counter()
            records, arrays = run_case(cases[cid], mode)
            faulthandler.cancel_dump_traceback_later()
            _write_atomic_npz(out_dir / f"{cid}.npz", arrays)
            fh.write(json.dumps({"id": cid, "seconds": time.perf_counter() - t0, "steps": records}) + "\n")
            fh.flush()
    return 0


# --------------------------------------------------------------------------- the parent: batches, crashes, comparison


@dataclass
class Outcome:
    """What one mode did with a batch of cases: records by case id, where the arrays are, the cases that died."""

    records: dict = field(default_factory=dict)
    out_dir: Path | None = None
    died: dict = field(default_factory=dict)  # case id -> "crash: signal 11 ..." / "hang ..." (named alone)


def _child(cases_file: Path, out: Path, mode: str, ids: list[str], per_case_s: float, timeout: float) -> tuple[int | None, str]:
    env = dict(os.environ)
    env.pop("BNLAB_KERNELS", None)
    import bnlab

    src = str(Path(bnlab.__file__).resolve().parents[1])
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONFAULTHANDLER"] = "1"
    cmd = [sys.executable, str(Path(__file__).resolve()), "run", str(cases_file), str(out), mode, f"{per_case_s:.0f}", *ids]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        return proc.returncode, proc.stderr
    except subprocess.TimeoutExpired as err:
        text = err.stderr.decode(errors="replace") if isinstance(err.stderr, bytes) else (err.stderr or "")
        return None, text


def _read_records(out: Path) -> dict:
    path = out / "results.jsonl"
    if not path.exists():
        return {}
    records = {}
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a crash
        records[row["id"]] = row
    return records


def _how_it_died(rc: int | None, stderr: str) -> str:
    lines = stderr.strip().splitlines()
    steps = [ln.strip() for ln in lines if ln.startswith("  step ")]
    at = f"in {steps[-1]}" if steps else "before its first step"
    tail = "\n".join(ln for ln in lines[-8:] if not ln.startswith(("case ", "  step ")))
    if rc is None:
        return f"hang {at} (killed after the timeout)\n{tail}"
    if "Timeout (" in stderr:
        return f"hang {at} (faulthandler's deadline)\n{tail}"
    if rc < 0:
        return f"crash {at}: signal {-rc}\n{tail}"
    return f"exit {rc} {at} without results\n{tail}"


def _solo(cases_file: Path, work: Path, mode: str, cid: str, per_case_s: float) -> tuple[dict | None, str]:
    """Run one case in a child of its own: ``(its record, "")`` or ``(None, how the child died)``."""
    solo = work / f"{mode}-solo-{cid}"
    rc, stderr = _child(cases_file, solo, mode, [cid], per_case_s, timeout=per_case_s + 30.0)
    rec = _read_records(solo).get(cid)
    if rc == 0 and rec is not None:
        (solo / f"{cid}.npz").replace(work / mode / f"{cid}.npz")
        return rec, ""
    return None, _how_it_died(rc, stderr)


def run_batch(cases_file: Path, work: Path, mode: str, ids: list[str], per_case_s: float = 15.0) -> Outcome:
    """Run ``ids`` in one child, naming the case of any crash or hang by rerunning it in a child of its own.

    When the child dies, the case it was running is rerun alone: if that dies
    too, it is the crash (or hang) to report, and the cases after it go on in
    a new child. If it runs alone, the damage came from a case before it (heap
    corruption that crashes later): those are rerun one by one, each alone, and
    any that dies is named; if none does, the batch's death is reported with
    the cases it ran. Each case has ``per_case_s`` seconds (then faulthandler
    prints where it hangs and the child exits).
    """
    out = work / mode
    outcome = Outcome(out_dir=out)
    remaining = list(ids)
    while remaining:
        rc, stderr = _child(cases_file, out, mode, remaining, per_case_s, timeout=30.0 + per_case_s * len(remaining))
        records = _read_records(out)
        done = [i for i in remaining if i in records]
        outcome.records.update({i: records[i] for i in done})
        if rc == 0 and len(done) == len(remaining):
            break
        culprit = next(i for i in remaining if i not in records)
        rec, how = _solo(cases_file, work, mode, culprit, per_case_s)
        if rec is None:
            outcome.died[culprit] = how
        else:
            outcome.records[culprit] = rec
            for i in done:  # a delayed crash: which earlier case dies alone?
                rec_i, how_i = _solo(cases_file, work, mode, i, per_case_s)
                if rec_i is None:
                    outcome.records.pop(i, None)
                    outcome.died[i] = how_i
            if not any(i in outcome.died for i in done):
                outcome.died[f"batch before {culprit}"] = (
                    f"the child died while running {culprit} but no case dies alone; it had run {', '.join(done) or 'nothing'} "
                    f"before: " + _how_it_died(rc, stderr))
        remaining = remaining[remaining.index(culprit) + 1:]
        (out / "results.jsonl").unlink(missing_ok=True)  # the next child starts a fresh list
    return outcome


TOLERANCES = {  # (rtol, atol as a share of the reference's largest magnitude, at least 1), by the coarsest dtype so far
    "float64": (1e-7, 1e-9),
    "float32": (1e-4, 2e-5),
    "float16": (5e-3, 5e-3),
    "bfloat16": (2e-2, 2e-2),
}
#: Unit roundoff of each float dtype; a case's tolerance grows with its worst ``amp`` (:func:`_conditioning`)
#: as ``AMPLIFIED * roundoff * amp``, for rounding that the normalization itself magnifies.
ROUNDOFF = {"float64": 2.0 ** -53, "float32": 2.0 ** -24, "float16": 2.0 ** -11, "bfloat16": 2.0 ** -8}
AMPLIFIED = 32.0


def _tolerance(dtype: str, amp: float, terms: int) -> tuple[float, float]:
    """``(rtol, atol)`` for the coarsest dtype so far, widened for rounding the normalization amplifies."""
    rtol, atol = TOLERANCES.get(dtype, TOLERANCES["float32"])
    extra = AMPLIFIED * ROUNDOFF.get(dtype, ROUNDOFF["float32"]) * amp * math.sqrt(terms)
    return max(rtol, extra), max(atol, extra)


def compare_arrays(a: np.ndarray, b: np.ndarray, dtype: str, amp: float = 0.0, terms: int = 1,
                   skip: np.ndarray | None = None, cast: bool = False) -> str | None:
    """Why ``a`` (tested) differs from ``b`` (reference), or ``None``: same shape, NaN and inf places, values close.

    ``dtype``: the coarsest float dtype the case has used so far (it sets the
    tolerance); ``amp``: the largest rounding amplification seen so far;
    ``terms``: how many amplified values a result sums (a parameter's gradient
    sums over every value of its feature: ``sqrt(terms)`` more rounding);
    ``skip``: places not compared (see :func:`_at_the_kink`); ``cast``: integers
    that were floats (a statistic re-viewed as int64 after training: values
    within rounding of .5 may truncate apart), equal within 1.
    """
    if a.shape != b.shape:
        return f"shape {a.shape} vs {b.shape}"
    if skip is not None and skip.shape == a.shape:
        a, b = a[~skip], b[~skip]
    if a.size == 0:
        return None
    if a.dtype.kind in "biu" or b.dtype.kind in "biu":
        if np.array_equal(a, b) or (cast and a.dtype == b.dtype and np.abs(a.astype(np.int64) - b.astype(np.int64)).max() <= 1):
            return None
        where = np.flatnonzero(a.ravel() != b.ravel())[:4]
        return f"values differ (integers) at {where.tolist()}: {a.ravel()[where]} vs {b.ravel()[where]}"
    na, nb = np.isnan(a), np.isnan(b)
    if (na != nb).any():
        return f"NaN in different places ({int(na.sum())} vs {int(nb.sum())} NaN)"
    fa, fb = np.isfinite(a), np.isfinite(b)
    if (fa != fb).any() or not np.array_equal(a[~fa & ~na], b[~fb & ~nb]):
        return "inf in different places"
    if not fa.any():
        return None
    rtol, atol = _tolerance(dtype, amp, terms)
    cplx = a.dtype.kind == "c" or b.dtype.kind == "c"
    a64, b64 = a[fa].astype(np.complex128 if cplx else np.float64), b[fb].astype(np.complex128 if cplx else np.float64)
    scale = max(1.0, float(np.abs(b64).max()))
    err = np.abs(a64 - b64)
    bad = err > atol * scale + rtol * np.abs(b64)
    if bad.any():
        worst = int(np.argmax(err))
        return (f"values differ at {int(bad.sum())} of {a64.size} places (max |diff| {float(err.max()):.3g}, "
                f"e.g. {a64.ravel()[worst]:.6g} vs {b64.ravel()[worst]:.6g})")
    return None


def _at_the_kink(c: dict, yt: np.ndarray, yr: np.ndarray, atol: float) -> tuple[np.ndarray, np.ndarray] | None:
    """For BatchNormAct: the outputs whose pre-activation may be within rounding of 0, and their features.

    ReLU's and leaky ReLU's slope jumps at 0: where the two modes' pre-activations
    differ by rounding around 0, their gradients differ by a whole slope (``g``
    against ``0`` or ``slope * g``), a difference of rounding, not of the code.
    Both activations keep ``|y| <= |pre|``, so those places are among the ones
    with ``|y|`` within the tolerance of 0 in either mode: for leaky ReLU, any
    such ``y``; for ReLU, a positive one (where both give 0 both gradients are 0).
    NaN is never among them. Returns ``(mask over y, mask over the features, that mask over y's shape)`` or None.
    """
    if c["layer"]["kind"] != "BatchNormAct" or yt.shape != yr.shape or yt.size == 0:
        return None
    finite = np.isfinite(yr)
    scale = max(1.0, float(np.abs(yr[finite]).max())) if finite.any() else 1.0
    d = atol * scale
    with np.errstate(invalid="ignore"):
        if c["layer"]["kwargs"].get("activation") == "relu":
            near = ((yt > 0) & (yt <= d)) | ((yr > 0) & (yr <= d))
        else:
            near = (np.abs(yt) <= d) | (np.abs(yr) <= d)
    axis = c["layer"]["kwargs"].get("axis", -1)
    feats = sorted({a % yt.ndim for a in (axis if isinstance(axis, list) else [axis])})
    others = tuple(d for d in range(yt.ndim) if d not in feats)
    columns = np.broadcast_to(near.any(axis=others, keepdims=True), near.shape) if others else near
    return near, (near.any(axis=others) if others else near), columns


def compare_case(c: dict, tested: dict, reference: dict, tested_npz: Path, reference_npz: Path, what: str = "kernels vs composite") -> list[str]:
    """Differences between two modes' runs of a case, step by step (an empty list: they agree)."""
    problems = []
    ta = np.load(tested_npz, allow_pickle=False) if tested_npz.exists() else {}
    ra = np.load(reference_npz, allow_pickle=False) if reference_npz.exists() else {}
    coarsest, amp, gamp, terms = "float64", 0.0, 0.0, 1  # all only grow: what a step rounds, later steps inherit
    kinked = None  # features whose gradients met the activation's kink (parameters' gradients accumulate)
    apart = None  # the step where a float statistic cast to an integer truncated apart (x.5 within rounding)
    for st, sr in zip(tested["steps"], reference["steps"], strict=True):
        i = st["step"]
        for meta in list(st["tensors"].values()) + list(sr["tensors"].values()):
            if meta[0] in ROUNDOFF and ROUNDOFF[meta[0]] > ROUNDOFF[coarsest]:
                coarsest = meta[0]
        amp = max([amp] + [r["cond"]["amp"] for r in (st, sr) if r.get("cond")])
        gamp = max([gamp] + [r["cond"].get("gamp", 0.0) for r in (st, sr) if r.get("cond")])
        terms = max([terms] + [r["cond"]["M"] for r in (st, sr) if r.get("cond")])
        where = f"step {i} ({describe_step(c['steps'][i])})"
        et, er = st["error"], sr["error"]
        if (et is None) != (er is None) or (et and er and et[0] != er[0]):
            show = lambda e: "no error" if e is None else f"{e[0]}: {e[1][:160]}"  # noqa: E731
            problems.append(f"{where}: {what} raise differently: {show(et)} | {show(er)}")
        kink = None
        if f"s{i}.y" in ta and f"s{i}.y" in ra:
            kink = _at_the_kink(c, ta[f"s{i}.y"], ra[f"s{i}.y"], _tolerance(coarsest, amp, 1)[1])
            if kink is not None:
                kinked = kink[1] if kinked is None or kinked.shape != kink[1].shape else kinked | kink[1]
        names = set(st["tensors"]) | set(sr["tensors"])
        for name in sorted(names):
            mt, mr = st["tensors"].get(name), sr["tensors"].get(name)
            if mt is None or mr is None:
                problems.append(f"{where}: {name} only in {'the first' if mr is None else 'the second'} ({what})")
                continue
            if len(mt) > 2 or len(mr) > 2:
                if len(mt) != len(mr):
                    problems.append(f"{where}: {name} unreadable in one: {mt[2:] or mr[2:]}")
                continue
            if mt[:2] != mr[:2]:
                problems.append(f"{where}: {name} is {mt[0]}{tuple(mt[1])} vs {mr[0]}{tuple(mr[1])} ({what})")
                continue
            key = f"s{i}.{name}"
            if apart is not None:  # the two states differ by whole units since then: their values say nothing more
                continue
            skip = None
            if name == "x.grad" and kink is not None:
                # BN's backward couples every value of a feature (its sums): a kink anywhere in a feature moves all
                # of that feature's dx (seed 201158), so the whole feature is skipped; a leaf other than y's shape
                # sums over the kink: skip it all
                skip = kink[2] if kink[2].shape == ta[key].shape else np.ones(ta[key].shape, bool) if kink[0].any() else None
            elif name.startswith("grad.") and kinked is not None:
                skip = kinked
            # a gradient sums over every value of its feature, and so does y's batch mean: a float32 reduction over M
            # values (PyTorch's op sums them in order) rounds by up to ~sqrt(M) units, which the normalization then
            # amplifies (seed 100198: x = 3 + 1e-3 N(0, 1), M = 3,136; PyTorch's op was 1e-4 off a float64 truth,
            # the kernels 4e-6)
            # the moving statistics are reductions over M values too (the kernels sum float32 deviations within
            # a chunk: seed 600560, a feature whose first value lay 3 standard deviations out, mean off by 2e-6 of one)
            stat = name.startswith("buffer.") and "num_batches" not in name
            a_, b_ = ta[key], ra[key]
            if ((stat or name.startswith("param.")) and a_.dtype.kind in "iu" and a_.dtype == b_.dtype
                    and a_.shape == b_.shape and not np.array_equal(a_, b_)
                    and np.abs(a_.astype(np.int64) - b_.astype(np.int64)).max() <= 1):
                apart = i  # (seed 600292: a running mean of 49.5 +- rounding became 49 in one mode, 50 in the other)
                continue
            why = compare_arrays(ta[key], ra[key], coarsest if mt[0] in ROUNDOFF else mt[0],
                                 max(amp, gamp) if "grad" in name else amp,
                                 terms if ("grad" in name or name == "y" or stat) else 1, skip,
                                 cast=stat or name.startswith("param."))
            if why:
                problems.append(f"{where}: {name} {mt[0]}{tuple(mt[1])}: {why} ({what})")
    return problems


@dataclass
class Failure:
    case_id: str
    seed: int | None
    kind: str  # "crash", "hang", "mismatch", "errors differ", "reference died"
    details: list[str]

    def __str__(self) -> str:
        rerun = f"python tests/state_fuzz.py check {self.case_id}"
        head = f"{self.case_id} (seed {self.seed}): {self.kind}; rerun: {rerun}"
        *found, case_text = self.details
        first = found[0].split(":", 1)[0] if found else ""
        shown = [d for d in found if d.split(":", 1)[0] == first][:8]
        rest = len(found) - len(shown)
        lines = shown + ([f"... and {rest} more differences after that"] if rest else []) + [case_text]
        return head + "\n" + "\n".join("    " + d.replace("\n", "\n    ") for d in lines)


def run_cases(cases: list[dict], work: Path, modes: tuple[str, str] = ("kernels", "composite"), batch_size: int = 100,
              workers: int = 2, per_case_s: float = 15.0, confirm: int = 5) -> tuple[list[Failure], dict]:
    """Run every case in both modes (batches in parallel children) and compare; ``(failures, stats)``.

    The first ``confirm`` differences found in a batch are rerun alone in both
    modes: one that goes away is reported as coming from the cases before it
    in the same process (memory they damaged), not from its own steps.
    """
    from concurrent.futures import ThreadPoolExecutor

    work.mkdir(parents=True, exist_ok=True)
    cases_file = work / "cases.json"
    cases_file.write_text(json.dumps(cases))
    by_id = {c["id"]: c for c in cases}
    batches = [[c["id"] for c in cases[i:i + batch_size]] for i in range(0, len(cases), batch_size)]
    failures: list[Failure] = []
    stats = {"cases": len(cases), "batches": len(batches), "died_alone": 0, "confirmed": 0}
    t0 = time.perf_counter()

    def one(job):
        b, mode = job
        return b, mode, run_batch(cases_file, work / f"batch{b}", mode, batches[b], per_case_s)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(one, (b, m)) for b in range(len(batches)) for m in modes]
        results: dict[int, dict[str, Outcome]] = {}
        for fut in futures:
            b, mode, outcome = fut.result()
            results.setdefault(b, {})[mode] = outcome
            if len(results[b]) == len(modes):
                found = _compare_batch(by_id, batches[b], results.pop(b), modes)
                if len(batches[b]) > 1:
                    confirmed = _confirm_alone(found, cases_file, work / f"batch{b}", modes, per_case_s, by_id, batches[b],
                                               budget=max(0, confirm - stats["confirmed"]))
                    stats["confirmed"] += confirmed
                stats["died_alone"] += sum(f.kind in ("crash", "hang", "exit") for f in found)
                failures += found
                shutil.rmtree(work / f"batch{b}", ignore_errors=True)
    stats["seconds"] = time.perf_counter() - t0
    return failures, stats


def _confirm_alone(found: list[Failure], cases_file: Path, work: Path, modes: tuple[str, str], per_case_s: float,
                   by_id: dict, batch: list[str], budget: int) -> int:
    """Rerun the batch's differences alone (both modes); mark those that vanish. Returns how many were rerun."""
    done = 0
    for f in found:
        if done >= budget or f.kind not in ("mismatch", "errors differ"):
            continue
        done += 1
        alone = []
        for mode in modes:
            rec, how = _solo(cases_file, work, mode, f.case_id, per_case_s)
            alone.append(rec)
        if None in alone:
            continue
        again = compare_case(by_id[f.case_id], alone[0], alone[1], work / modes[0] / f"{f.case_id}.npz",
                             work / modes[1] / f"{f.case_id}.npz", f"{modes[0]} vs {modes[1]}")
        if not again:
            before = batch[:batch.index(f.case_id)]
            f.kind += " (only after other cases in the same process)"
            f.details.insert(0, f"alone, both modes agree: the difference comes from memory damaged by a case run before it "
                                f"in the same child ({len(before)} cases: {', '.join(before[-5:])}{' ...' if len(before) > 5 else ''})")
    return done


def _died_kind(text: str) -> str:
    return text.split(" ", 1)[0] if text.startswith(("crash", "hang", "exit")) else "died"


def _compare_batch(by_id: dict, ids: list[str], outcomes: dict[str, Outcome], modes: tuple[str, str]) -> list[Failure]:
    tested, ref = outcomes[modes[0]], outcomes[modes[1]]
    failures = []
    for mode, outcome in ((modes[0], tested), (modes[1], ref)):
        for key, text in outcome.died.items():
            if key not in by_id:  # the batch died, no case alone
                failures.append(Failure(key, None, f"batch died ({mode})", [text]))
    for cid in ids:
        c = by_id[cid]
        if cid in tested.died:
            failures.append(Failure(cid, c["seed"], _died_kind(tested.died[cid]), [f"{modes[0]}: {tested.died[cid]}", describe(c)]))
            continue
        if cid in ref.died:
            failures.append(Failure(cid, c["seed"], f"reference {_died_kind(ref.died[cid])}", [f"{modes[1]}: {ref.died[cid]}", describe(c)]))
            continue
        if cid not in tested.records or cid not in ref.records:
            continue  # reported with its batch
        problems = compare_case(c, tested.records[cid], ref.records[cid], tested.out_dir / f"{cid}.npz", ref.out_dir / f"{cid}.npz",
                                f"{modes[0]} vs {modes[1]}")
        if problems:
            kind = "errors differ" if all("raise differently" in p for p in problems) else "mismatch"
            failures.append(Failure(cid, c["seed"], kind, problems + [describe(c)]))
    return failures


def main(argv: list[str]) -> int:
    if argv and argv[0] == "run":
        cases_file, out, mode, deadline, *ids = argv[1:]
        return child_main(cases_file, out, mode, ids, float(deadline) or None)
    if argv and argv[0] == "show":
        for key in argv[1:]:
            print(describe(case(key)))
        return 0
    if argv and argv[0] == "check":
        modes = ("kernels", "composite")
        keys = [a for a in argv[1:] if not a.startswith("--modes=")]
        for a in argv[1:]:
            if a.startswith("--modes="):
                modes = tuple(a.split("=", 1)[1].split(","))
        with tempfile.TemporaryDirectory(prefix="bnlab-fuzz-") as work:
            failures, stats = run_cases([case(k) for k in keys], Path(work), modes)
        for f in failures:
            print(f)
        print(f"{len(failures)} of {stats['cases']} cases differ ({modes[0]} vs {modes[1]}), {stats['seconds']:.1f} s")
        return 1 if failures else 0
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
