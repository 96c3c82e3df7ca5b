"""Operations over a whole model (any ``torch.nn.Module`` tree) that contains bnlab layers."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["regularization_loss", "apply_constraints"]


def regularization_loss(model: nn.Module) -> torch.Tensor:
    """Sum of the penalties of every regularizer in ``model`` (Keras' ``model.losses``).

    Add it to the loss before ``backward()``; it is a 0-d tensor (0.0 when the
    model has no regularizers)::

        loss = criterion(model(x), y) + bnlab.regularization_loss(model)
        loss.backward()
    """
    total = None
    for module in model.modules():
        losses = getattr(module, "regularization_losses", None)
        if losses is None:
            continue
        for penalty in losses():
            total = penalty if total is None else total + penalty
    if total is None:
        p = next(model.parameters(), None)
        return torch.zeros((), device=None if p is None else p.device)
    return total


def apply_constraints(model: nn.Module) -> None:
    """Apply every constraint in ``model`` in place; call it right after ``optimizer.step()``.

    This is Keras' behaviour (constraints project the variables after each
    update)::

        optimizer.step()
        bnlab.apply_constraints(model)
    """
    for module in model.modules():
        apply = getattr(module, "apply_constraints_", None)
        if apply is not None:
            apply()
