"""Batch norm across processes: turn synchronization on, and align moving statistics on demand."""

from __future__ import annotations

import torch
from torch import nn

from ..nn.batchnorm import _BatchNormBase
from .surgery import convert

__all__ = ["convert_sync", "sync_running_stats", "rank_and_world"]


def rank_and_world(group=None) -> tuple[int, int]:
    """``(rank, world_size)`` of this process in ``torch.distributed``, ``(0, 1)`` when not distributed."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group), dist.get_world_size(group)
    return 0, 1


def convert_sync(model: nn.Module, process_group=None) -> nn.Module:
    """Make every batch norm of ``model`` synchronized (statistics over all processes in training).

    PyTorch's ``BatchNorm*d``/``SyncBatchNorm`` are first converted to bnlab's
    drop-ins (:func:`bnlab.convert`), then each bnlab layer gets
    ``synchronized=True``. Outside a multi-process group this changes nothing.
    """
    model = convert(model, to="bnlab")
    for m in model.modules():
        if isinstance(m, _BatchNormBase):
            m.synchronized = True
            m.process_group = process_group
    return model


@torch.no_grad()
def sync_running_stats(model: nn.Module, mode: str = "average", src: int = 0, group=None) -> int:
    """Make every BN's moving statistics equal across processes; returns the number of layers touched.

    ``mode="average"``: the mean over processes (what evaluation after
    unsynchronized data-parallel training wants); ``mode="broadcast"``: copy
    rank ``src``'s. A no-op without an initialized process group.
    """
    import torch.distributed as dist

    if mode not in ("average", "broadcast"):
        raise ValueError(f"mode must be 'average' or 'broadcast', got {mode!r}")
    if not (dist.is_available() and dist.is_initialized()):
        return 0
    world = dist.get_world_size(group)
    touched = 0
    for m in model.modules():
        for name in ("running_mean", "running_var"):
            t = getattr(m, name, None)
            if isinstance(t, torch.Tensor) and isinstance(m, (_BatchNormBase, nn.modules.batchnorm._BatchNorm)):
                if mode == "average":
                    dist.all_reduce(t, group=group)
                    t.div_(world)
                else:
                    dist.broadcast(t, src=src, group=group)
        if isinstance(m, (_BatchNormBase, nn.modules.batchnorm._BatchNorm)) and getattr(m, "running_mean", None) is not None:
            touched += 1
    return touched
