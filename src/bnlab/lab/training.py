"""Keras-style training for PyTorch models: ``fit``, ``evaluate``, ``predict`` and ``History``.

The semantics that matter for reproducing the tutorials follow Keras:

* ``validation_split`` takes the LAST fraction of the data, before any
  shuffling (``split_at = int(n * (1 - validation_split))``);
* the reported training loss and metrics are the mean over the epoch's
  batches, each batch weighted by its size (Keras 3), and include the
  regularization penalties (``model.losses``);
* losses and metrics by name: ``mse``, ``mae``, ``binary_crossentropy``,
  ``categorical_crossentropy``, ``sparse_categorical_crossentropy`` act on
  probabilities (the models end in sigmoid/softmax, as in the tutorials) with
  Keras' clipping to ``[1e-7, 1 - 1e-7]``; ``accuracy`` picks the binary,
  categorical or sparse variant from the loss as Keras does;
* optimizers by name use Keras' defaults: Adam (lr 1e-3, beta 0.9/0.999,
  epsilon 1e-7), RMSprop (lr 1e-3, rho 0.9, epsilon 1e-7), SGD (lr 1e-2).
  PyTorch's Adam adds epsilon after the bias correction of the second moment,
  Keras' before: the difference is in the 7th decimal of the step size.
* constraints of bnlab layers are applied after every optimizer step;
* an epoch whose figures are not finite (a NaN or infinite loss) ends
  training, as Keras' ``TerminateOnNaN`` does: the epoch is logged as it came
  and ``History.diverged_epoch`` says where it happened (1-based).

Thread policy: small models run one thread. On this kind of machine (2 cores)
a tiny MLP ran 50-100x slower with two threads when another process held a
core, because every small op then waits for the busy core. ``threads="auto"``
uses 1 thread when a step is small (parameters x batch size < 2e8) and leaves
PyTorch's setting otherwise; pass an int to choose. The bound covers every
offline recipe; measured on the 2-core machine shared with other work, best
and median of 5 interleaved runs, 1 thread vs 2: blobs-deep (5e7) 2.04/2.44 s
vs 1.56/21.2 s for 100 epochs (two threads 24% faster at best, 9x slower as
a rule), digits28-cnn (1.1e8) 3.32/3.41 s vs 6.79/14.6 s for 5 epochs.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

import bnlab
from bnlab.tools.distributed import rank_and_world

__all__ = ["History", "OPTIMIZERS", "fit", "evaluate", "predict", "get_loss", "get_optimizer", "resolve_metrics", "thread_policy"]

_EPS = 1e-7  # keras.config.epsilon()


# ----------------------------------------------------------------------------- losses and metrics


def _clip(p):
    return p.clamp(_EPS, 1.0 - _EPS)


def mse(y_true, y_pred):
    return (y_pred - y_true).square().mean(dim=-1)


def mae(y_true, y_pred):
    return (y_pred - y_true).abs().mean(dim=-1)


def binary_crossentropy(y_true, y_pred):
    p = _clip(y_pred)
    return -(y_true * torch.log(p) + (1 - y_true) * torch.log(1 - p)).mean(dim=-1)


def categorical_crossentropy(y_true, y_pred):
    p = _clip(y_pred / y_pred.sum(dim=-1, keepdim=True))
    return -(y_true * torch.log(p)).sum(dim=-1)


def sparse_categorical_crossentropy(y_true, y_pred):
    p = _clip(y_pred / y_pred.sum(dim=-1, keepdim=True))
    return -torch.log(p.gather(-1, y_true.long().view(-1, 1)).squeeze(-1))


def binary_accuracy(y_true, y_pred):
    return ((y_pred > 0.5).to(y_true.dtype) == y_true).float().mean(dim=-1)


def categorical_accuracy(y_true, y_pred):
    return (y_pred.argmax(-1) == y_true.argmax(-1)).float()


def sparse_categorical_accuracy(y_true, y_pred):
    return (y_pred.argmax(-1) == y_true.long().view(-1)).float()


def _mean_loss(loss_fn: Callable) -> Callable:
    """The batch mean of ``loss_fn`` with PyTorch's fused kernels where one computes the same formula.

    ``fit`` only needs the mean; the per-sample functions above stay the
    definition (and serve ``evaluate``).
    """
    if loss_fn is mse:
        return lambda y, p: F.mse_loss(p, y)
    if loss_fn is mae:
        return lambda y, p: F.l1_loss(p, y)
    if loss_fn is sparse_categorical_crossentropy:
        return lambda y, p: F.nll_loss(torch.log(_clip(p / p.sum(dim=-1, keepdim=True))), y.long().view(-1))
    return lambda y, p: loss_fn(y, p).mean()


LOSSES: dict[str, Callable] = {
    "mse": mse, "mean_squared_error": mse,
    "mae": mae, "mean_absolute_error": mae,
    "binary_crossentropy": binary_crossentropy,
    "categorical_crossentropy": categorical_crossentropy,
    "sparse_categorical_crossentropy": sparse_categorical_crossentropy,
}
_ACCURACY_FOR = {
    binary_crossentropy: binary_accuracy,
    categorical_crossentropy: categorical_accuracy,
    sparse_categorical_crossentropy: sparse_categorical_accuracy,
}


def get_loss(loss) -> Callable:
    if callable(loss):
        return loss
    try:
        return LOSSES[loss]
    except KeyError:
        raise ValueError(f"unknown loss {loss!r}; expected one of {sorted(LOSSES)} or a callable") from None


def resolve_metrics(metrics: Sequence, loss_fn: Callable) -> dict[str, Callable]:
    """Metric names -> functions, with Keras' meaning of ``"accuracy"`` for the given loss."""
    out = {}
    for m in metrics or ():
        if callable(m):
            out[getattr(m, "__name__", "metric")] = m
        elif m in ("accuracy", "acc"):
            fn = _ACCURACY_FOR.get(loss_fn)
            if fn is None:
                raise ValueError("'accuracy' needs a cross-entropy loss to tell binary, categorical and sparse apart")
            out["accuracy"] = fn
        elif m in ("mae", "mse"):
            out[m] = LOSSES[m]
        else:
            raise ValueError(f"unknown metric {m!r}; expected 'accuracy', 'mae', 'mse' or a callable")
    return out


OPTIMIZERS = ("adam", "rmsprop", "sgd")  # by name, with Keras' defaults


def get_optimizer(spec, params) -> torch.optim.Optimizer:
    """An optimizer from a name (Keras' defaults), ``{"name": ..., "lr": ...}``, a factory or an instance."""
    if isinstance(spec, torch.optim.Optimizer):
        return spec
    if callable(spec) and not isinstance(spec, (str, dict)):
        return spec(params)
    kw = dict(spec) if isinstance(spec, dict) else {"name": spec}
    name = str(kw.pop("name")).lower()
    lr = kw.pop("lr", kw.pop("learning_rate", None))
    if name == "adam":
        return torch.optim.Adam(params, lr=1e-3 if lr is None else lr, betas=(kw.pop("beta_1", 0.9), kw.pop("beta_2", 0.999)), eps=kw.pop("epsilon", 1e-7), **kw)
    if name == "rmsprop":
        return torch.optim.RMSprop(params, lr=1e-3 if lr is None else lr, alpha=kw.pop("rho", 0.9), eps=kw.pop("epsilon", 1e-7), **kw)
    if name == "sgd":
        return torch.optim.SGD(params, lr=1e-2 if lr is None else lr, **kw)
    raise ValueError(f"unknown optimizer {name!r}; expected one of {', '.join(OPTIMIZERS)}, a torch optimizer or a factory")


# ----------------------------------------------------------------------------- history


@dataclass
class History:
    """What ``fit`` returns: ``history`` maps Keras' keys (``loss``, ``val_loss``, ...) to per-epoch values.

    ``diverged_epoch`` is the 1-based epoch whose figures were not finite
    (training stopped there), or None.
    """

    history: dict[str, list[float]] = field(default_factory=dict)
    epoch: list[int] = field(default_factory=list)
    params: dict = field(default_factory=dict)
    diverged_epoch: int | None = None

    def append(self, epoch: int, logs: dict[str, float]) -> None:
        self.epoch.append(epoch)
        for k, v in logs.items():
            self.history.setdefault(k, []).append(float(v))

    def last(self) -> dict[str, float]:
        return {k: v[-1] for k, v in self.history.items() if v}


# ----------------------------------------------------------------------------- helpers


def thread_policy(model: nn.Module, batch_size: int, threads="auto") -> int | None:
    """The thread count to use for training ``model`` (None = leave PyTorch's)."""
    if threads is None:
        return None
    if threads != "auto":
        return int(threads)
    n_params = sum(p.numel() for p in model.parameters())
    return 1 if n_params * batch_size < 2e8 else None


@contextlib.contextmanager
def _threads(n: int | None):
    if n is None:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _batches(n: int, batch_size: int, order: torch.Tensor | None):
    idx = order if order is not None else torch.arange(n)
    for i in range(0, n, batch_size):
        yield idx[i : i + batch_size]


def _format_logs(logs: dict[str, float]) -> str:
    return " - ".join(f"{k}: {v:.4f}" for k, v in logs.items())


# ----------------------------------------------------------------------------- fit / evaluate / predict


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 32, device=None) -> torch.Tensor:
    """Inference-mode outputs for ``x`` in batches (the model is left in the mode it was in)."""
    was = model.training
    model.eval()
    try:
        outs = [model(x[i : i + batch_size].to(device) if device else x[i : i + batch_size]) for i in range(0, len(x), batch_size)]
    finally:
        model.train(was)
    return torch.cat(outs).cpu() if outs else torch.empty(0)


@torch.no_grad()
def evaluate(model: nn.Module, x, y, *, loss="mse", metrics=(), batch_size: int = 32, device=None) -> dict[str, float]:
    """Loss (with regularization, as Keras reports it) and metrics in inference mode, over all of ``x``."""
    loss_fn = get_loss(loss)
    metric_fns = resolve_metrics(metrics, loss_fn)
    was = model.training
    model.eval()
    sums = {"loss": 0.0, **{k: 0.0 for k in metric_fns}}
    n = len(x)
    try:
        for i in range(0, n, batch_size):
            xb, yb = x[i : i + batch_size], y[i : i + batch_size]
            if device is not None:
                xb, yb = xb.to(device), yb.to(device)
            pred = model(xb)
            sums["loss"] += float(loss_fn(yb, pred).sum())
            for k, fn in metric_fns.items():
                sums[k] += float(fn(yb, pred).sum())
        reg = float(bnlab.regularization_loss(model))
    finally:
        model.train(was)
    out = {k: v / max(n, 1) for k, v in sums.items()}
    out["loss"] += reg
    return out


def fit(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    loss="mse",
    optimizer="adam",
    metrics: Sequence = (),
    epochs: int = 1,
    batch_size: int = 32,
    validation_split: float = 0.0,
    validation_data: tuple | None = None,
    shuffle: bool = True,
    seed: int | None = None,
    verbose: int = 1,
    steps_per_epoch: int | None = None,
    augment: Callable | None = None,
    device=None,
    threads="auto",
    initial_epoch: int = 0,
    history: History | None = None,
    callbacks: Sequence[Callable] = (),
    state: dict | None = None,
) -> History:
    """Train ``model`` the way ``keras.Model.fit`` does; returns a :class:`History`.

    ``steps_per_epoch`` draws batches from an endless reshuffled stream (a
    Keras generator): an epoch then covers that many batches, not the whole
    data. ``augment(x_batch, generator)`` transforms each training batch.
    ``callbacks`` are called as ``cb(epoch, logs, model, optimizer, state)``
    after each epoch (the lab uses this to checkpoint). ``state`` carries the
    optimizer and data-order generator across a resumed run.
    """
    if not 0.0 <= validation_split < 1.0:
        raise ValueError(f"validation_split must be in [0, 1), got {validation_split}")
    if len(x) != len(y):
        raise ValueError(f"x and y have different lengths: {len(x)} and {len(y)}")
    if batch_size < 1 or epochs < 0:
        raise ValueError(f"batch_size must be >= 1 and epochs >= 0, got {batch_size} and {epochs}")
    if validation_split and validation_data is None and not 1 <= int(len(x) * (1.0 - validation_split)) < len(x):
        raise ValueError(f"validation_split={validation_split} of {len(x)} rows leaves "
                         f"{int(len(x) * (1.0 - validation_split))} to train on and the rest to validate on; both need at least one")
    loss_fn = get_loss(loss)
    batch_mean_loss = _mean_loss(loss_fn)
    metric_fns = resolve_metrics(metrics, loss_fn)
    if validation_split and validation_data is None:
        split_at = int(len(x) * (1.0 - validation_split))  # Keras: the LAST fraction, before shuffling
        x, y, validation_data = x[:split_at], y[:split_at], (x[split_at:], y[split_at:])
    state = {} if state is None else state
    if seed is not None and "generator" not in state:
        torch.manual_seed(seed)  # dropout and other layers draw from the global generator
    gen = state.setdefault("generator", torch.Generator().manual_seed(0 if seed is None else seed))
    opt = state.get("optimizer") or get_optimizer(optimizer, [p for p in model.parameters() if p.requires_grad])
    state["optimizer"] = opt
    if device is not None:
        model.to(device)
    hist = history or History(params={"epochs": epochs, "batch_size": batch_size, "samples": len(x)})
    rank, world = rank_and_world()
    forward = model
    if world > 1:
        # Data parallel: every process draws the same global batch (same generator) and takes
        # every world-th sample of it; DDP averages parameter gradients; synchronized BN layers
        # (bnlab.convert_sync) see the whole global batch.
        from torch.nn.parallel import DistributedDataParallel

        forward = DistributedDataParallel(model, broadcast_buffers=False)
        verbose = verbose if rank == 0 else 0
    n = len(x)
    steps = steps_per_epoch or math.ceil(n / batch_size)
    # Collected once: walking the module tree every step costs more than a small model's step.
    regularized = bnlab.tools.regularized_modules(model)
    constrained = bnlab.tools.constrained_modules(model)

    with _threads(thread_policy(model, batch_size, threads)):
        for epoch in range(initial_epoch, epochs):
            if hist.diverged_epoch is not None:  # a resumed run that had already diverged
                break
            t0 = time.perf_counter()
            model.train()
            sums = {"loss": 0.0, **{k: 0.0 for k in metric_fns}}
            seen = 0
            if steps_per_epoch is None:
                order = torch.randperm(n, generator=gen) if shuffle else None
                batch_iter = _batches(n, batch_size, order)
            else:
                batch_iter = (_stream_next(state, n, batch_size, shuffle, gen) for _ in range(steps))
            for idx in batch_iter:
                if world > 1:
                    idx = idx[rank::world]
                xb, yb = x[idx], y[idx]
                if augment is not None:
                    xb = augment(xb, gen)
                if device is not None:
                    xb, yb = xb.to(device), yb.to(device)
                pred = forward(xb)
                batch_loss = batch_mean_loss(yb, pred)
                for m in regularized:
                    for penalty in m.regularization_losses():
                        batch_loss = batch_loss + penalty
                opt.zero_grad(set_to_none=True)
                batch_loss.backward()
                opt.step()
                for m in constrained:
                    m.apply_constraints_()
                with torch.no_grad():
                    b = len(idx)
                    seen += b
                    sums["loss"] += float(batch_loss) * b
                    for k, fn in metric_fns.items():
                        sums[k] += float(fn(yb, pred).sum())
            if world > 1:  # epoch figures over all processes' samples
                import torch.distributed as dist

                packed = torch.tensor([seen, *sums.values()], dtype=torch.float64)
                dist.all_reduce(packed)
                seen, sums = int(packed[0]), dict(zip(sums, packed[1:].tolist(), strict=True))
            logs = {k: v / max(seen, 1) for k, v in sums.items()}
            if validation_data is not None and len(validation_data[0]):
                val = evaluate(model, validation_data[0], validation_data[1], loss=loss_fn, metrics=metrics, batch_size=batch_size, device=device)
                logs.update({f"val_{k}": v for k, v in val.items()})
            hist.append(epoch, logs)
            if not all(math.isfinite(v) for v in logs.values()):
                hist.diverged_epoch = epoch + 1  # every process sees the same reduced figures, so all stop here
            if verbose:
                dt = time.perf_counter() - t0
                print(f"Epoch {epoch + 1}/{epochs}\n{steps}/{steps} - {dt:.0f}s - {_format_logs(logs)}", file=sys.stdout, flush=True)
                if hist.diverged_epoch is not None:
                    print(f"Epoch {epoch + 1}: non-finite figures, training stopped (diverged)", file=sys.stdout, flush=True)
            for cb in callbacks:
                cb(epoch, logs, model, opt, state)
            if hist.diverged_epoch is not None:
                break
    return hist


def _stream_next(state: dict, n: int, batch_size: int, shuffle: bool, gen: torch.Generator) -> torch.Tensor:
    # An endless pass over the data in batches, reshuffled at every pass, that carries on
    # across epochs (Keras' NumpyArrayIterator behind ImageDataGenerator.flow).
    order, pos = state.get("stream_order"), state.get("stream_pos", 0)
    if order is None or pos >= n:
        order, pos = (torch.randperm(n, generator=gen) if shuffle else torch.arange(n)), 0
    idx = order[pos : pos + batch_size]
    state["stream_order"], state["stream_pos"] = order, pos + batch_size
    return idx
