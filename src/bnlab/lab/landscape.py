"""The loss landscape along the gradient, after Santurkar et al. (2018), "How Does Batch Normalization Help Optimization?".

Santurkar, Tsipras, Ilyas & Madry (arXiv:1805.11604, section 3.1, Figure 4)
argue that BN helps because it makes the loss and its gradient smoother, and
measure it at points of training: take the gradient ``g = grad L(w)`` on a
batch, move along ``-g`` by several step sizes ``eta`` and look at

* the loss ``L(w - eta g)`` for each ``eta``: its range
  ``max_eta L - min_eta L`` ("variation in loss", Figure 4 (a));
* the gradient there: ``||grad L(w - eta g) - grad L(w)||`` ("gradient
  predictiveness", Figure 4 (b));
* the effective beta-smoothness ``max_eta ||grad L(w - eta g) - grad L(w)|| / ||eta g||``
  (Figure 4 (c)): the largest change of the gradient per unit distance moved.

:func:`measure` does this for a model, a batch and a list of ``eta``. The loss
is the training objective: the batch mean of ``loss`` (a name or per-sample
function, as ``fit`` takes it) plus the layers' regularization penalties.

Measuring disturbs nothing. The model runs in training mode, so BN normalizes
with the batch's statistics as the paper's measurement does (``train=False``
uses inference mode instead). Before every evaluation the buffers (moving
statistics, counters, renorm state) are put back to their values at the start,
so no evaluation sees another's updates (batch renormalization reads its
moving statistics in training mode); and the global RNG state is put back, so
every evaluation draws the same dropout masks (the landscape of one function,
not of dropout noise). At the end parameters, buffers, RNG states (CPU and the
CUDA devices of the parameters) and the mode are exactly as they were; the
gradients are taken with ``torch.autograd.grad`` so ``.grad`` is untouched.
Probes (:mod:`bnlab.lab.probes`) are suspended meanwhile.

:func:`landscape_callback` measures during ``fit`` (after chosen epochs) and
appends one JSON line per measurement to ``landscape.jsonl``;
:func:`read_landscape` reads them back.
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Collection, Sequence

import numpy as np
import torch
from torch import nn

import bnlab

from .probes import AppendLog, read_lines, suspended
from .training import get_loss

__all__ = ["Landscape", "measure", "etas_for", "landscape_callback", "read_landscape", "LandscapeRecords", "LANDSCAPE_JSONL", "DEFAULT_FACTORS"]

LANDSCAPE_JSONL = "landscape.jsonl"
#: Step sizes as multiples of the learning rate (our choice: half a step to four steps).
DEFAULT_FACTORS = (0.5, 1.0, 2.0, 4.0)


@dataclass
class Landscape:
    """One measurement: the loss and gradient norm at ``w``, and per ``eta`` the loss and gradient change."""

    loss: float  # L(w)
    grad_norm: float  # ||g||
    etas: list[float]
    losses: list[float]  # L(w - eta g)
    grad_diffs: list[float]  # ||grad L(w - eta g) - g||

    @property
    def loss_range(self) -> float:
        """``max - min`` of the losses over the step sizes (Figure 4 (a))."""
        return max(self.losses) - min(self.losses)

    @property
    def beta(self) -> float:
        """Effective beta-smoothness: ``max ||grad L(w - eta g) - g|| / (eta ||g||)`` over ``eta > 0`` (Figure 4 (c)); NaN if ``g = 0``."""
        ratios = [d / (e * self.grad_norm) for e, d in zip(self.etas, self.grad_diffs, strict=True) if e > 0 and self.grad_norm > 0]
        return max(ratios) if ratios else math.nan

    def to_dict(self) -> dict:
        return {"loss": self.loss, "grad_norm": self.grad_norm, "etas": self.etas, "losses": self.losses,
                "grad_diffs": self.grad_diffs, "loss_range": self.loss_range, "beta": self.beta}


def etas_for(lr: float, factors: Sequence[float] = DEFAULT_FACTORS) -> list[float]:
    """Step sizes ``factor * lr``: around the step the optimizer takes (for SGD, ``lr * g`` exactly)."""
    return [float(f) * float(lr) for f in factors]


def _objective(loss):
    per_sample = get_loss(loss)
    return lambda model, x, y: per_sample(y, model(x)).mean() + bnlab.regularization_loss(model)


@contextlib.contextmanager
def _kept(model: nn.Module, params: list[torch.Tensor]):
    """Puts parameters, buffers, RNG states and the mode back on exit; yields ``reset()`` for the buffers and RNG."""
    weights = [p.detach().clone() for p in params]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    cuda = sorted({p.device.index or 0 for p in params if p.device.type == "cuda"})
    was = model.training
    with torch.random.fork_rng(devices=cuda):  # restores the CPU and these devices' RNG states on exit
        cpu_state = torch.get_rng_state()
        cuda_states = [torch.cuda.get_rng_state(d) for d in cuda]

        def reset():
            with torch.no_grad():
                for b, saved in buffers:
                    b.copy_(saved)
            torch.set_rng_state(cpu_state)
            for d, s in zip(cuda, cuda_states, strict=True):
                torch.cuda.set_rng_state(s, d)

        try:
            with suspended():
                yield reset
        finally:
            with torch.no_grad():
                for p, w in zip(params, weights, strict=True):
                    p.copy_(w)
            reset()
            model.train(was)


def measure(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, loss="mse", etas: Sequence[float], train: bool = True) -> Landscape:
    """Loss and gradient change along ``-grad L(w)`` for each step size in ``etas`` (see the module docstring).

    ``loss``: a loss name or per-sample function ``fn(y_true, y_pred)``, as
    ``fit`` takes it. Norms are over all parameters that require gradients,
    computed in float64.

    Example (least squares: the gradient is linear in ``w``, so the gradient
    change per unit distance is the same at every step size)::

        >>> import torch
        >>> model = torch.nn.Linear(3, 1)
        >>> point = measure(model, torch.randn(32, 3), torch.randn(32, 1), loss="mse", etas=[0.01, 0.1])
        >>> [round(d / (e * point.grad_norm) / point.beta, 4) for e, d in zip(point.etas, point.grad_diffs)]
        [1.0, 1.0]
    """
    etas = [float(e) for e in etas]
    if not etas or any(not math.isfinite(e) or e < 0 for e in etas):
        raise ValueError(f"etas must be a non-empty list of finite step sizes >= 0, got {etas!r}")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no parameters that require gradients")
    objective = _objective(loss)

    with _kept(model, params) as reset:
        model.train(train)

        def at_current_weights():
            reset()  # same buffers and dropout masks for every evaluation
            with torch.enable_grad():
                value = objective(model, x, y)
                grads = torch.autograd.grad(value, params, allow_unused=True)
            flat = torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1).double() for p, g in zip(params, grads, strict=True)])
            return value.detach().double(), flat, [torch.zeros_like(p) if g is None else g.detach() for p, g in zip(params, grads, strict=True)]

        loss0, g0, g_params = at_current_weights()
        start = [p.detach().clone() for p in params]
        losses, diffs = [], []
        for eta in etas:
            with torch.no_grad():
                for p, w, g in zip(params, start, g_params, strict=True):
                    p.copy_(w - eta * g)
            value, g, _ = at_current_weights()
            losses.append(value)
            diffs.append(torch.linalg.vector_norm(g - g0))
        figures = torch.stack([loss0, torch.linalg.vector_norm(g0), *losses, *diffs]).cpu().tolist()  # one sync
    k = len(etas)
    return Landscape(figures[0], figures[1], etas, figures[2 : 2 + k], figures[2 + k :])


# ----------------------------------------------------------------------------- during training, and the records


def _finite(v):
    return v if math.isfinite(v) else str(v)  # as the lab's JSON records write nan/inf


def landscape_callback(path: Path | str, x: torch.Tensor, y: torch.Tensor, *, loss, etas: Sequence[float],
                       batch_size: int, every: int = 1, at: Collection[int] | None = None, seed: int = 0,
                       steps_per_epoch: int | None = None, initial_epoch: int = 0, train: bool = True):
    """A ``fit`` callback that measures the landscape after chosen epochs and appends it to ``path`` (JSON lines).

    Measures after epoch ``e`` (1-based, as ``history.csv`` counts) when
    ``e`` is in ``at``, or when ``at`` is None and ``e % every == 0``. The
    batch: ``batch_size`` rows of ``x, y`` (the data ``fit`` trains on), drawn
    by a private generator seeded from ``(seed, e)``, so the global RNG is not
    touched and a resumed run measures the same batch. ``steps_per_epoch``
    (optional) gives each line its step. ``initial_epoch`` (a resumed run's
    epochs done) drops the lines of later epochs from the file first.

    Each line: ``{"epoch", "step", "batch_size", "loss", "grad_norm", "etas",
    "losses", "grad_diffs", "loss_range", "beta"}``.
    """
    if at is None and (not isinstance(every, int) or every < 1):
        raise ValueError(f"every must be a positive int (epochs between measurements), got {every!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    log = AppendLog(Path(path), key=lambda line: json.loads(line)["epoch"])
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    log.start(initial_epoch + 1)  # keep the measurements after epochs 1..initial_epoch
    wanted = None if at is None else {int(e) for e in at}

    def callback(epoch, logs, model, optimizer, state):
        done = epoch + 1
        if (done not in wanted) if wanted is not None else (done % every):
            return
        gen = torch.Generator().manual_seed(seed * 1_000_003 + done)
        idx = torch.randperm(len(x), generator=gen)[:batch_size]
        device = next(model.parameters()).device
        point = measure(model, x[idx].to(device), y[idx].to(device), loss=loss, etas=etas, train=train)
        line = {"epoch": done, "step": None if steps_per_epoch is None else done * steps_per_epoch,
                "batch_size": len(idx), **point.to_dict()}
        line = {k: [_finite(v) for v in val] if isinstance(val, list) else (_finite(val) if isinstance(val, float) else val)
                for k, val in line.items()}
        log.append([json.dumps(line)])

    return callback


@dataclass
class LandscapeRecords:
    """``landscape.jsonl`` as arrays: one entry per measurement, ``losses``/``grad_diffs`` of shape (measurements, etas)."""

    path: Path
    epochs: np.ndarray
    steps: np.ndarray  # float, NaN where no step was recorded
    etas: np.ndarray
    losses: np.ndarray
    grad_diffs: np.ndarray
    loss: np.ndarray
    grad_norm: np.ndarray
    loss_range: np.ndarray
    beta: np.ndarray
    partial: bool = False


_KEYS = ("epoch", "step", "batch_size", "loss", "grad_norm", "etas", "losses", "grad_diffs", "loss_range", "beta")


def read_landscape(path: Path | str) -> LandscapeRecords:
    """Read and check a ``landscape.jsonl`` (or the directory holding it).

    Checked: every line a JSON object with the keys the callback writes,
    increasing epochs, the same step sizes on every line, lists as long as
    the step sizes. ``"nan"``/``"inf"`` strings become floats.
    """
    path = Path(path)
    if path.is_dir():
        path = path / LANDSCAPE_JSONL
    if not path.exists():
        raise FileNotFoundError(f"no landscape records at {path}")
    lines, partial = read_lines(path)
    rows = []
    for lineno, text in enumerate(lines, start=1):
        try:
            row = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{lineno}: not a JSON line ({exc.msg})") from None
        if not isinstance(row, dict) or set(row) != set(_KEYS):
            got = sorted(row) if isinstance(row, dict) else type(row).__name__
            raise ValueError(f"{path}:{lineno}: expected the keys {sorted(_KEYS)}, got {got}")
        if rows and row["epoch"] <= rows[-1]["epoch"]:
            raise ValueError(f"{path}:{lineno}: epoch {row['epoch']} after epoch {rows[-1]['epoch']}; epochs must increase")
        if rows and row["etas"] != rows[0]["etas"]:
            raise ValueError(f"{path}:{lineno}: step sizes {row['etas']} differ from the first line's {rows[0]['etas']}")
        for key in ("losses", "grad_diffs"):
            if len(row[key]) != len(row["etas"]):
                raise ValueError(f"{path}:{lineno}: {len(row[key])} {key} for {len(row['etas'])} step sizes")
        rows.append(row)

    def arr(key):
        return np.array([[float(v) for v in r[key]] if isinstance(r[key], list) else float(r[key]) for r in rows], dtype=float)

    k = len(rows[0]["etas"]) if rows else 0
    return LandscapeRecords(
        path, np.array([r["epoch"] for r in rows], dtype=np.int64),
        np.array([math.nan if r["step"] is None else r["step"] for r in rows], dtype=float),
        np.array([float(e) for e in rows[0]["etas"]]) if rows else np.empty(0),
        arr("losses").reshape(len(rows), k), arr("grad_diffs").reshape(len(rows), k),
        arr("loss"), arr("grad_norm"), arr("loss_range"), arr("beta"), partial,
    )
