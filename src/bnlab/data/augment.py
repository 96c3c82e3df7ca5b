"""Tutorial 001's image augmentation (Keras ``ImageDataGenerator(shear_range=0.2, zoom_range=0.2,
horizontal_flip=True)``) as batched tensor math.

Per image, as Keras draws them: a shear angle uniform in ``[-shear, shear]``
**degrees** (Keras' unit: 0.2 degrees is a very small shear), zoom factors
``zx, zy`` uniform in ``[1 - zoom, 1 + zoom]`` drawn independently, and a
horizontal flip with probability 1/2. The affine map is applied to the whole
batch at once with ``affine_grid`` + ``grid_sample``; points that fall outside
the image take the nearest edge pixel (Keras' ``fill_mode="nearest"``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["random_affine"]


def random_affine(
    x: torch.Tensor,
    *,
    shear: float = 0.2,
    zoom: float = 0.2,
    horizontal_flip: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Augment a batch ``(N, C, H, W)``; returns a new tensor of the same shape."""
    if x.dim() != 4:
        raise ValueError(f"random_affine expects (N, C, H, W) images, got shape {tuple(x.shape)}")
    n = x.shape[0]
    opts = {"generator": generator, "device": "cpu", "dtype": torch.float64}
    angle = (torch.rand(n, **opts) * 2 - 1) * math.radians(shear)
    zx = 1 - zoom + torch.rand(n, **opts) * 2 * zoom
    zy = 1 - zoom + torch.rand(n, **opts) * 2 * zoom
    flip = torch.rand(n, **opts) < 0.5 if horizontal_flip else torch.zeros(n, dtype=torch.bool)
    # Keras composes shear [[1, -sin a], [0, cos a]] with zoom diag(zx, zy), mapping output
    # coordinates to input coordinates around the image centre; affine_grid does the same
    # in normalized coordinates.
    theta = torch.zeros(n, 2, 3, dtype=torch.float64)
    theta[:, 0, 0] = zx
    theta[:, 0, 1] = -torch.sin(angle) * zy
    theta[:, 1, 1] = torch.cos(angle) * zy
    theta[:, 0, 0] = torch.where(flip, -theta[:, 0, 0], theta[:, 0, 0])
    theta[:, 0, 1] = torch.where(flip, -theta[:, 0, 1], theta[:, 0, 1])
    grid = F.affine_grid(theta.to(x.dtype).to(x.device), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
