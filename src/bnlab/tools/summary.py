"""Keras' ``model.summary()`` for PyTorch models."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["summary", "ModelSummary"]


_STAT_BUFFERS = ("running_mean", "running_var", "mean_ema", "var_ema")


class ModelSummary:
    """A Keras-style model summary: rows of (layer, type, output shape, parameters) and totals.

    Counting follows Keras: trainable = parameters that receive gradients;
    non-trainable = frozen parameters plus the moving mean and variance of
    batch-norm layers (PyTorch's ``num_batches_tracked`` counter is not a
    weight and is not counted).
    """

    def __init__(self, name, rows, total, trainable, non_trainable):
        self.name, self.rows = name, rows
        self.total, self.trainable, self.non_trainable = total, trainable, non_trainable

    def __str__(self) -> str:
        w0 = max([len("Layer (type)")] + [len(f"{r[0]} ({r[1]})") for r in self.rows])
        w1 = max([len("Output Shape")] + [len(r[2]) for r in self.rows])
        w2 = max([len("Param #")] + [len(f"{r[3]:,}") for r in self.rows])
        line = "-" * (w0 + w1 + w2 + 6)
        out = [f'Model: "{self.name}"', line, f"{'Layer (type)':<{w0}}   {'Output Shape':<{w1}}   {'Param #':>{w2}}", "=" * len(line)]
        out += [f"{f'{n} ({t})':<{w0}}   {s:<{w1}}   {p:>{w2},}" for n, t, s, p in self.rows]
        out += ["=" * len(line), f"Total params: {self.total:,}", f"Trainable params: {self.trainable:,}", f"Non-trainable params: {self.non_trainable:,}", line]
        return "\n".join(out)

    def __repr__(self) -> str:
        return f"ModelSummary(total={self.total}, trainable={self.trainable}, non_trainable={self.non_trainable})"


def _counts(module: nn.Module, recurse: bool) -> tuple[int, int]:
    trainable = sum(p.numel() for p in module.parameters(recurse=recurse) if p.requires_grad)
    frozen = sum(p.numel() for p in module.parameters(recurse=recurse) if not p.requires_grad)
    for name, b in module.named_buffers(recurse=recurse):
        # statistics, and gamma/beta kept as buffers (FrozenBatchNorm): Keras counts them non-trainable
        if b is not None and name.rsplit(".", 1)[-1] in _STAT_BUFFERS + ("weight", "bias"):
            frozen += b.numel()
    return trainable, frozen


def summary(model: nn.Module, input_shape, *, dtype=torch.float32, name: str | None = None, print_fn=print) -> ModelSummary:
    """Keras' ``model.summary()`` for a PyTorch model: per-layer output shapes and parameter counts.

    ``input_shape`` excludes the batch dimension (Keras' ``input_shape``). The
    model runs once on a batch of two zeros in eval mode without gradients,
    so nothing it holds changes; lazily built layers get built. Prints the
    table (unless ``print_fn=None``) and returns a :class:`ModelSummary`.
    """
    rows: list[tuple[str, str, str, int]] = []
    hooks = []
    leaves = [(n, m) for n, m in model.named_modules() if not list(m.children())] or [("", model)]

    def hook_for(layer_name):
        def hook(module, inputs, output):
            shape = tuple(output.shape) if isinstance(output, torch.Tensor) else "?"
            shape_str = "(None, " + ", ".join(str(s) for s in shape[1:]) + ")" if shape != "?" else "?"
            rows.append((layer_name or type(module).__name__.lower(), type(module).__name__, shape_str, sum(_counts(module, recurse=False))))

        return hook

    for n, m in leaves:
        hooks.append(m.register_forward_hook(hook_for(n)))
    was_training = model.training
    param = next(model.parameters(), None)
    device = param.device if param is not None else None
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros((2, *tuple(input_shape)), dtype=dtype, device=device))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    trainable, frozen = _counts(model, recurse=True)
    result = ModelSummary(name or type(model).__name__.lower(), rows, trainable + frozen, trainable, frozen)
    if print_fn is not None:
        print_fn(str(result))
    return result
