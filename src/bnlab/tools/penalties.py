"""Regularizer penalties and constraints of a whole model (Keras' ``model.losses`` and constraints)."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["regularization_loss", "apply_constraints", "regularized_modules", "constrained_modules"]


def regularized_modules(model: nn.Module) -> list[nn.Module]:
    """The modules of ``model`` that carry at least one regularizer (collect once, reuse every step)."""
    return [m for m in model.modules() if getattr(m, "regularization_losses", None) is not None and m.regularization_losses()]


def constrained_modules(model: nn.Module) -> list[nn.Module]:
    """The modules of ``model`` that carry at least one constraint."""
    return [m for m in model.modules() if getattr(m, "apply_constraints_", None) is not None
            and (getattr(m, "gamma_constraint", None) is not None or getattr(m, "beta_constraint", None) is not None)]


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


