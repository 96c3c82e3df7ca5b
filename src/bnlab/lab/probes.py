"""Probes: what happens inside a network during training, recorded with hooks, every ``N`` steps.

Ioffe & Szegedy (2015, arXiv:1502.03167, Figure 1 (b, c)) show "the evolution
of input distributions to a typical sigmoid, over the course of training, shown
as {15, 50, 85}th percentiles": without BN they drift, with BN they stay put.
:class:`Probes` records those figures for any ``nn.Module``, without touching
its code, and the train/inference drift of every BN layer beside them.

What is recorded, at the steps ``0, N, 2N, ...`` (``step`` = the number of
counted forward passes before this one, so step 0 is the first batch, before
any update):

* per activation module (``nn.Sigmoid``, ``nn.Tanh``, ``nn.ReLU``, ... and
  :class:`bnlab.nn.BatchNormAct`, whose pre-activation is its BN output),
  from its input ``x`` (the pre-activation), over the training batch:

  - ``p15``, ``p50``, ``p85``: percentiles of all values (batch x units; linear
    interpolation, NumPy's default);
  - ``unit_p15``, ``unit_p50``, ``unit_p85``: the same over the batch for one
    chosen unit (``unit``, the index along the feature dim; a channel of a
    convolution: its values over batch and positions);
  - ``mean``, ``std``: over all values (``std`` with divisor ``n``);
  - ``saturated`` (sigmoid and tanh only): the fraction of values with
    ``|x| > saturation`` (default 2.5, where sigmoid's slope 0.07 is under a
    third of its peak 0.25 and tanh's 0.03 under a thirtieth of its peak 1);

* per BN layer (bnlab's family, the lab's scratch layer, ``torch.nn.BatchNorm*d``),
  from its input before it runs, i.e. against the moving statistics that
  inference would use at that moment (before this batch's update), with
  ``mu_B`` and ``var_B`` the batch mean and the BIASED batch variance (divisor
  ``M``, the variance training normalizes with), ``mu``, ``var`` the moving
  statistics and ``eps`` the layer's epsilon, over the ``C`` features:

  - ``mean_diff = sqrt(mean_c (mu_B - mu)^2)``, in input units;
  - ``mean_shift = sqrt(mean_c (mu_B - mu)^2 / (var_B + eps))``: the same in
    units of the batch standard deviation, i.e. how far inference moves a
    normalized value;
  - ``var_ratio = exp(mean_c log((var + eps) / (var_B + eps)))``: the geometric
    mean over features of the ratio of the squared denominators inference and
    training divide by (1: no drift).
    Conventions: the moving variance is compared as the layer stores it.
    ``bnlab.BatchNorm`` (Keras) and the scratch layer store the biased
    variance; ``torch.nn.BatchNorm*d``, ``bnlab.nn.BatchNorm1d/2d/3d`` and
    ``moving_variance_estimator="unbiased"`` store the unbiased one, ``M/(M-1)``
    times larger, so for them ``var_ratio`` tends to ``M/(M-1)`` even without
    drift: that factor is a real difference between what training and
    inference divide by. ``probes.json`` says which convention each layer has;
  - ``gamma_norm``, ``beta_norm``: L2 norms of the affine parameters.

Cost: on other steps the only work is one hook on the root module that counts;
the per-layer hooks are attached for a recorded pass and removed after it, and
each recorded pass converts its figures to Python numbers in one go (one
device sync). Hooks read their inputs under ``torch.no_grad`` and draw no
random numbers, so training is bit for bit the same with and without probes.

Which passes count: a forward of the root module in training mode with
gradients enabled (``fit``'s batches). Evaluation (``eval()``), ``no_grad``
passes (e.g. re-estimating statistics) and passes inside :func:`suspended`
(e.g. :mod:`bnlab.lab.landscape`) neither count nor record, unless
``count="all"``. With ``count="manual"`` the hooks never count and
:meth:`Probes.step` advances the counter (record the step's first pass).

Records (``probes.csv``, long format, one row per figure)::

    step,layer,quantity,value
    0,3,p15,-0.8716...

written as the rows of one recorded pass in a single ``write`` (a run killed
mid-write leaves at most a partial last line, dropped on reading and
resuming), plus ``probes.json`` with the settings and the layers. A resumed run
(``Probes(..., step=s)`` or :meth:`Probes.load_state_dict`) drops the rows of
steps ``>= s`` (they were recorded after the checkpoint and will be again) and
appends. :func:`read_probes` validates and returns a tidy structure::

    with Probes(model, run_dir / "probes.csv", every=100) as probes:
        fit(model, x, y, ...)
    rec = read_probes(run_dir / "probes.csv")
    steps, p50 = rec.series("3", "p50")
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
from torch import nn

import bnlab

from . import records
from .inspect import _weights, bn_layers

__all__ = ["Probes", "ProbeRecords", "read_probes", "suspended", "AppendLog", "ACTIVATIONS", "PROBES_CSV", "PROBES_JSON"]

PROBES_CSV = "probes.csv"
PROBES_JSON = "probes.json"
FORMAT = "bnlab-probes/1"
HEADER = ("step", "layer", "quantity", "value")

#: Activation modules whose input is a pre-activation, by class.
ACTIVATIONS: tuple[type[nn.Module], ...] = (
    nn.Sigmoid, nn.Tanh, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
    nn.Mish, nn.Softplus, nn.Hardtanh, nn.Hardsigmoid, nn.Hardswish,
)
_SATURATING = ("sigmoid", "tanh")
_COUNTS = ("train", "all", "manual")

_suspended = 0  # > 0 while inside suspended(): no probe counts or records


@contextlib.contextmanager
def suspended():
    """Within this block no :class:`Probes` counts or records (for extra forward passes that are not training steps)."""
    global _suspended
    _suspended += 1
    try:
        yield
    finally:
        _suspended -= 1


# ----------------------------------------------------------------------------- append-only text logs


class AppendLog:
    """A text file of lines (under an optional header line), appended a block at a time, cut back on resume.

    ``key(line)`` gives a line's position in the run (a step or an epoch).
    :meth:`start` keeps the header and the complete lines with ``key < start``
    (rewriting the file atomically when anything goes), so a resumed run that
    records those positions again never duplicates them. :meth:`append` writes
    a block in one ``write`` and flushes it; a run killed mid-write leaves at
    most one partial last line, which :func:`read_lines` and :meth:`start` drop.
    """

    def __init__(self, path: Path, key: Callable[[str], int], header: str | None = None, fsync: bool = False):
        self.path, self.key, self.header, self.fsync = Path(path), key, header, fsync

    def start(self, start: int) -> None:
        lines, partial = read_lines(self.path, self.header) if self.path.exists() else (None, False)
        kept = [] if lines is None else [ln for ln in lines if self.key(ln) < start]
        if lines is None or partial or len(kept) != len(lines):
            text = "".join(f"{ln}\n" for ln in ([self.header] if self.header is not None else []) + kept)
            records.atomic_write_bytes(self.path, text.encode())

    def append(self, lines: Sequence[str]) -> None:
        if not lines:
            return
        with open(self.path, "a", encoding="utf-8", newline="") as f:
            f.write("".join(f"{ln}\n" for ln in lines))
            f.flush()
            if self.fsync:
                os.fsync(f.fileno())


def read_lines(path: Path, header: str | None = None) -> tuple[list[str], bool]:
    """The complete lines of an :class:`AppendLog` (header checked and removed) and whether a partial tail was dropped."""
    text = Path(path).read_text(encoding="utf-8")
    partial = bool(text) and not text.endswith("\n")
    lines = text.split("\n")[:-1]  # the last piece is "" or the partial line
    if header is not None:
        if not lines or lines[0] != header:
            got = lines[0] if lines else "(an empty file)"
            raise ValueError(f"{path}: expected the header line {header!r}, got {got!r}")
        lines = lines[1:]
    return lines, partial


# ----------------------------------------------------------------------------- the probes


def _activation_name(m: nn.Module) -> str | None:
    if isinstance(m, bnlab.nn.BatchNormAct):
        return m.activation
    if isinstance(m, ACTIVATIONS):
        return type(m).__name__.lower()
    return None


def _variance_convention(m: nn.Module) -> str:
    if isinstance(m, bnlab.nn.batchnorm._BatchNormBase):
        return m.moving_variance_estimator
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        return "unbiased"
    return "biased"  # the tutorial's scratch layer


def _bn_feature_axes(m: nn.Module, ndim: int) -> tuple[int, ...]:
    if isinstance(m, bnlab.nn.batchnorm._BatchNormBase):
        return bnlab.functional.normalize_axes(m.axis, ndim)
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        return (1,)
    return (ndim - 1,)  # the scratch layer: (N, C)


def _plain_bn(m: nn.Module) -> bool:
    """True where a BatchNormAct's pre-activation is ``gamma * x_hat + beta`` with the batch's statistics."""
    return not (m.renorm or m.virtual_batch_size or m.synchronized)


def _columns(x: torch.Tensor, feat: tuple[int, ...]) -> torch.Tensor:
    """``x`` as a ``(values per feature, features)`` matrix (feature axes moved last, flattened)."""
    rest = [d for d in range(x.ndim) if d not in feat]
    return x.permute(*rest, *feat).reshape(-1, math.prod(x.shape[d] for d in feat))


@dataclass
class _Layer:
    name: str
    module: nn.Module
    activation: str | None  # the activation whose input is recorded, None: none
    bn: bool  # a BN layer: drift and affine norms
    unit: int

    def meta(self, saturation: float) -> dict:
        d = {"type": type(self.module).__name__, "kinds": (["activation"] if self.activation else []) + (["bn"] if self.bn else [])}
        if self.activation:
            d.update(activation=self.activation, unit=self.unit, saturated_above=saturation if self.activation in _SATURATING else None)
        if self.bn:
            d["moving_variance"] = _variance_convention(self.module)
        return d


class Probes:
    """Record pre-activation percentiles, saturation and BN drift of ``model`` every ``every`` steps (see the module docstring).

    Args:
        model: the root module; its training-mode forward passes are the steps.
        path: the ``probes.csv`` to append to (``probes.json`` beside it), or
            ``None`` to keep the rows in memory only (``.rows``).
        every (int, default 100): record at steps ``0, every, 2 * every, ...``.
        percentiles (default ``(15, 50, 85)``, the paper's): in ``[0, 100]``.
        unit (int or ``{layer name: int}``, default 0): the unit whose
            percentiles ``unit_p*`` are recorded.
        saturation (float, default 2.5): ``|x|`` above which a sigmoid or tanh
            input counts as saturated.
        layers: ``None`` (every activation module and BN layer), a list of
            module names, or a predicate ``(name, module) -> bool``.
        count (``"train"``, ``"all"`` or ``"manual"``): which passes are steps
            (see the module docstring).
        step (int, default 0): the step of the next counted pass; a resumed run
            passes the steps already done (rows at or after it are dropped).
        feature_dim (int, default 1): the unit axis of activation inputs
            (channels-first; use -1 for channels-last).
        max_values (int, default 2**20): percentiles of all values use every
            k-th value when a layer has more (deterministic, no random draw).

    Example::

        >>> import torch, bnlab
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(4, 8), bnlab.BatchNorm(num_features=8), nn.Sigmoid())
        >>> with Probes(model, every=2) as probes:  # rows in memory; give a path to write probes.csv
        ...     for _ in range(5):
        ...         _ = model(torch.randn(16, 4))
        >>> sorted({step for step, *_ in probes.rows})
        [0, 2, 4]
        >>> [q for step, layer, q, _ in probes.rows if step == 0 and layer == "2"]
        ['p15', 'p50', 'p85', 'unit_p15', 'unit_p50', 'unit_p85', 'mean', 'std', 'saturated']
    """

    def __init__(self, model: nn.Module, path: Path | str | None = None, *, every: int = 100,
                 percentiles: Sequence[float] = (15, 50, 85), unit: int | dict = 0, saturation: float = 2.5,
                 layers: Iterable[str] | Callable[[str, nn.Module], bool] | None = None, count: str = "train",
                 step: int = 0, feature_dim: int = 1, max_values: int = 1 << 20):
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive int (steps between records), got {every!r}")
        if count not in _COUNTS:
            raise ValueError(f"count must be one of {_COUNTS}, got {count!r}")
        pct = [float(p) for p in percentiles]
        if not pct or any(not 0.0 <= p <= 100.0 for p in pct):
            raise ValueError(f"percentiles must be numbers in [0, 100], got {list(percentiles)!r}")
        if not saturation > 0:
            raise ValueError(f"saturation must be > 0, got {saturation!r}")
        self.model, self.every, self.count, self.saturation = model, every, count, float(saturation)
        self.feature_dim, self.max_values = feature_dim, int(max_values)
        self.percentiles = pct
        self._q = torch.tensor([p / 100.0 for p in pct])
        self._pnames = [f"p{p:g}" for p in pct]
        self.layers = self._select(model, layers, unit)
        self.path = None if path is None else Path(path)
        self.rows: list[tuple[int, str, str, float]] = []  # kept when path is None
        self._log = None if self.path is None else AppendLog(self.path, _csv_step, ",".join(HEADER))
        self._handles: list = []
        self._pending: list[tuple[str, str, torch.Tensor]] = []
        self._armed_step: int | None = None
        self.load_state_dict({"step": step})
        self._root = model.register_forward_pre_hook(self._on_root)

    # -- which layers
    @staticmethod
    def _select(model, layers, unit) -> list[_Layer]:
        bn_ids = {id(m) for _, m in bn_layers(model)}
        named = [(n, m) for n, m in model.named_modules() if n and (id(m) in bn_ids or _activation_name(m))]
        if layers is None:
            chosen = named
        elif callable(layers):
            chosen = [(n, m) for n, m in named if layers(n, m)]
        else:
            wanted = list(layers)
            known = dict(named)
            unknown = [n for n in wanted if n not in known]
            if unknown:
                raise ValueError(f"layers {unknown} are not activation or BN modules of the model; probe-able: {list(known)}")
            chosen = [(n, known[n]) for n in wanted]
        units = unit if isinstance(unit, dict) else {n: unit for n, _ in chosen}
        stray = sorted(set(units) - {n for n, _ in chosen})
        if stray:
            raise ValueError(f"unit names layers that are not probed: {stray}")
        out = []
        for n, m in chosen:
            act = _activation_name(m)
            out.append(_Layer(n, m, None if act == "identity" else act, id(m) in bn_ids, int(units.get(n, 0))))
        return out

    def meta(self) -> dict:
        """The settings and layers, as written to ``probes.json``."""
        return {"format": FORMAT, "every": self.every, "count": self.count, "percentiles": self.percentiles,
                "saturation": self.saturation, "feature_dim": self.feature_dim, "max_values": self.max_values,
                "layers": {layer.name: layer.meta(self.saturation) for layer in self.layers}}

    # -- state (resume)
    def state_dict(self) -> dict:
        """``{"step": the step of the next counted pass}``: what a checkpoint keeps to resume."""
        return {"step": self.counter}

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state["step"]``: rows of that step and later are dropped from the file (they come again).

        The file is cut back when the probes first write (or are removed), so
        ``Probes(model, path)`` followed by ``load_state_dict(checkpoint)``
        resumes too. A resumed run (step > 0) must have the settings and layers
        of the ``probes.json`` it finds; a run from step 0 starts afresh.
        """
        step = state["step"]
        if not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be an int >= 0, got {step!r}")
        self._disarm(record=False)
        self.counter = step
        self._recorded: int | None = None  # the last step recorded (each step is recorded once)
        self._started, self._start_step = False, step
        if self.path is None:
            self.rows = [r for r in self.rows if r[0] < step]
        elif step > 0 and self._meta_path().exists():
            meta = json.loads(json.dumps(self.meta()))  # as it reads back (tuples as lists)
            if records.read_json(self._meta_path()) != meta:
                raise ValueError(f"{self._meta_path()} was written with other probe settings or layers; resuming needs the same ones")

    def _meta_path(self) -> Path:
        return self.path.with_name(PROBES_JSON) if self.path.name == PROBES_CSV else self.path.with_suffix(".json")

    def _start(self) -> None:
        """Write ``probes.json`` and cut ``probes.csv`` back to the steps before the starting step (once per start)."""
        if self._started or self.path is None:
            return
        records.write_json(self._meta_path(), self.meta())
        self._log.start(self._start_step)
        self._started = True

    # -- counting
    def step(self, n: int = 1) -> None:
        """Count ``n`` training steps by hand (for ``count="manual"``: call it after each step)."""
        self.counter += n

    def _on_root(self, module, args) -> None:
        if self._armed_step is not None:
            self._disarm(record=False)  # a pass that raised before its end: its hooks go, its partial figures too
        if _suspended:
            return
        if self.count != "all" and not (module.training and torch.is_grad_enabled()):
            return
        s = self.counter
        if self.count != "manual":
            self.counter += 1
        if s % self.every == 0 and s != self._recorded:
            self._arm(s)

    def _arm(self, step: int) -> None:
        self._armed_step = step
        self._seen: set[str] = set()
        for layer in self.layers:
            self._handles.append(layer.module.register_forward_pre_hook(lambda m, args, layer=layer: self._on_layer(layer, args)))
        self._handles.append(self.model.register_forward_hook(lambda m, args, out: self._disarm()))

    def _disarm(self, record: bool = True) -> None:
        if self._armed_step is None:
            return
        for h in self._handles:
            h.remove()
        self._handles.clear()
        step, pending = self._armed_step, self._pending
        self._armed_step, self._pending = None, []
        self._recorded = step
        if not record or not pending:
            return
        device = pending[0][2].device
        values = torch.stack([v.detach().to(device, torch.float64) for _, _, v in pending]).tolist()  # one sync per pass
        rows = [(step, layer, q, v) for (layer, q, _), v in zip(pending, values, strict=True)]
        if self._log is None:
            self.rows.extend(rows)
        else:
            self._start()
            self._log.append([_csv_line(r) for r in rows])

    # -- the figures
    def _on_layer(self, layer: _Layer, args) -> None:
        if layer.name in self._seen or not args or not isinstance(args[0], torch.Tensor):
            return  # a module called twice in one pass (shared weights) is recorded at its first call
        self._seen.add(layer.name)
        with torch.no_grad():
            x = args[0].detach()
            x = x if x.dtype in (torch.float32, torch.float64) else x.float()
            m = layer.module
            pre = None
            if layer.bn:
                pre = self._bn_figures(layer, x)
            if layer.activation:
                if isinstance(m, bnlab.nn.BatchNormAct):
                    x, feat = pre if pre is not None else (None, None)
                else:
                    feat = (self.feature_dim % x.ndim,) if x.ndim >= 2 else None
                if x is not None and feat is not None:
                    self._activation_figures(layer, x, feat)

    def _put(self, layer: str, quantity: str, value: torch.Tensor) -> None:
        self._pending.append((layer, quantity, value))

    def _activation_figures(self, layer: _Layer, x: torch.Tensor, feat: tuple[int, ...]) -> None:
        name = layer.name
        flat = x.reshape(-1)
        if flat.numel() == 0:
            return
        sample = flat if flat.numel() <= self.max_values else flat[:: math.ceil(flat.numel() / self.max_values)]
        q = self._q.to(device=x.device, dtype=x.dtype)
        for pname, v in zip(self._pnames, torch.quantile(sample, q), strict=True):
            self._put(name, pname, v)
        cols = _columns(x, feat)
        if not 0 <= layer.unit < cols.shape[1]:
            raise ValueError(f"probe unit {layer.unit} is out of range for layer {name!r} with {cols.shape[1]} units")
        for pname, v in zip(self._pnames, torch.quantile(cols[:, layer.unit], q), strict=True):
            self._put(name, f"unit_{pname}", v)
        self._put(name, "mean", flat.mean())
        self._put(name, "std", flat.std(correction=0))
        if layer.activation in _SATURATING:
            self._put(name, "saturated", (flat.abs() > self.saturation).to(x.dtype).mean())

    def _bn_figures(self, layer: _Layer, x: torch.Tensor):
        """Drift and affine norms of a BN layer; returns ``(pre-activation, its feature axes)`` for a BatchNormAct."""
        m = layer.module
        g, b, mu, var, eps, _ = _weights(m)
        if g is not None:
            self._put(layer.name, "gamma_norm", torch.linalg.vector_norm(g.detach().to(x.dtype)))
        if b is not None:
            self._put(layer.name, "beta_norm", torch.linalg.vector_norm(b.detach().to(x.dtype)))
        if x.ndim < 2:
            return None
        feat = _bn_feature_axes(m, x.ndim)
        cols = _columns(x, feat)  # (M, C)
        mean_b, var_b = cols.mean(0), cols.var(0, correction=0)
        if mu is not None and var is not None and cols.shape[0] > 0:
            mu, var = mu.detach().reshape(-1).to(x.dtype), var.detach().reshape(-1).to(x.dtype)
            d2 = (mean_b - mu).square()
            self._put(layer.name, "mean_diff", d2.mean().sqrt())
            self._put(layer.name, "mean_shift", (d2 / (var_b + eps)).mean().sqrt())
            self._put(layer.name, "var_ratio", torch.log((var + eps) / (var_b + eps)).mean().exp())
        if not (layer.activation and isinstance(m, bnlab.nn.BatchNormAct)):
            return None
        training = m.training and m.trainable  # Keras: a layer with trainable=False runs in inference mode
        if training and not _plain_bn(m):
            return None  # renorm, ghost or synchronized statistics: not this batch's plain normalization
        if not training:
            if mu is None:
                return None
            mean_b, var_b = mu, var
        one = torch.ones((), dtype=x.dtype, device=x.device)
        gamma = one if g is None else g.detach().reshape(-1).to(x.dtype)
        beta = 0 * one if b is None else b.detach().reshape(-1).to(x.dtype)
        pre = (cols - mean_b) / torch.sqrt(var_b + eps) * gamma + beta
        return pre, (1,)

    # -- lifetime
    def flush(self) -> None:
        """Write what a pass in progress recorded (rows are otherwise written at the end of each recorded pass)."""
        self._disarm()

    def remove(self) -> None:
        """Detach every hook (the model is as before); records written so far stay."""
        self._disarm()
        self._root.remove()
        self._start()

    close = remove

    def __enter__(self) -> "Probes":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def callback(self):
        """A ``fit`` callback (``cb(epoch, logs, model, optimizer, state)``) that flushes at the end of each epoch."""
        return lambda epoch, logs, model, optimizer, state: self.flush()


def _csv_line(row) -> str:
    buf = io.StringIO()
    step, layer, q, v = row
    csv.writer(buf, lineterminator="").writerow([step, layer, q, repr(float(v))])
    return buf.getvalue()


def _csv_step(line: str) -> int:
    return int(line.split(",", 1)[0])


# ----------------------------------------------------------------------------- reading


@dataclass
class ProbeRecords:
    """What :class:`Probes` wrote, validated: ``data[(layer, quantity)] = (steps, values)`` as NumPy arrays.

    ``partial`` is True when the file ended in a partial line (a run killed
    mid-write), which was left out.
    """

    path: Path
    meta: dict
    data: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    partial: bool = False

    @property
    def layers(self) -> list[str]:
        return list(dict.fromkeys(layer for layer, _ in self.data))

    def quantities(self, layer: str) -> list[str]:
        return [q for name, q in self.data if name == layer]

    def series(self, layer: str, quantity: str) -> tuple[np.ndarray, np.ndarray]:
        """``(steps, values)`` of one figure of one layer."""
        try:
            return self.data[(layer, quantity)]
        except KeyError:
            have = self.quantities(layer)
            what = f"quantities {have}" if have else f"layers {self.layers}"
            raise KeyError(f"{self.path} has no {quantity!r} for layer {layer!r}; it has {what}") from None


def read_probes(path: Path | str) -> ProbeRecords:
    """Read and check a ``probes.csv`` (or the directory holding it) and its ``probes.json``.

    Checked: the header, four fields per row, an int step >= 0, a float value
    (``nan``/``inf`` allowed: a diverged run is a result), steps in
    non-decreasing order, no (step, layer, quantity) twice, and layers that
    ``probes.json`` lists. Errors name the file and line.
    """
    path = Path(path)
    if path.is_dir():
        path = path / PROBES_CSV
    if not path.exists():
        raise FileNotFoundError(f"no probe records at {path}")
    meta_path = path.with_name(PROBES_JSON) if path.name == PROBES_CSV else path.with_suffix(".json")
    meta = records.read_json(meta_path) if meta_path.exists() else {}
    if not isinstance(meta, dict) or not isinstance(meta.get("layers", {}), dict):
        raise ValueError(f"{meta_path}: expected a JSON object with a 'layers' object, as Probes writes it")
    if meta and meta.get("format") != FORMAT:
        raise ValueError(f"{meta_path}: expected format {FORMAT!r}, got {meta.get('format')!r}")
    known = set(meta.get("layers", {})) if meta else None
    lines, partial = read_lines(path, ",".join(HEADER))
    cols: dict[tuple[str, str], tuple[list[int], list[float]]] = {}
    last, seen_here = -1, set()
    for lineno, row in enumerate(csv.reader(lines), start=2):
        if len(row) != 4:
            raise ValueError(f"{path}:{lineno}: expected 4 fields (step, layer, quantity, value), got {len(row)}: {row!r}")
        text_step, layer, quantity, text_value = row
        try:
            step, value = int(text_step), float(text_value)
        except ValueError:
            raise ValueError(f"{path}:{lineno}: expected an int step and a float value, got {text_step!r} and {text_value!r}") from None
        if step < last or step < 0:
            raise ValueError(f"{path}:{lineno}: step {step} comes after step {last}; steps must not decrease")
        if step != last:
            last, seen_here = step, set()
        if (layer, quantity) in seen_here:
            raise ValueError(f"{path}:{lineno}: {quantity!r} of layer {layer!r} at step {step} is recorded twice")
        seen_here.add((layer, quantity))
        if known is not None and layer not in known:
            raise ValueError(f"{path}:{lineno}: layer {layer!r} is not in {meta_path.name} ({sorted(known)})")
        steps, values = cols.setdefault((layer, quantity), ([], []))
        steps.append(step)
        values.append(value)
    data = {k: (np.array(s, dtype=np.int64), np.array(v, dtype=float)) for k, (s, v) in cols.items()}
    return ProbeRecords(path, meta, data, partial)
