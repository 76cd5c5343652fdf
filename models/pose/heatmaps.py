"""Landmark heatmaps: Gaussian targets (V2 Eq. 2, sigma = 2 voxels) and argmax decoding.

The normalised Gaussian of Eq. 2 sums to ~1 over the grid, so it is the target distribution of the
KL term (Eq. 5); FetusMap's L2 regression uses the same Gaussian with peak 1 (``normalized=False``).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

__all__ = ["gaussian_heatmaps", "decode_argmax", "voxel_to_mm", "mm_to_voxel", "SIGMA_VOX"]

SIGMA_VOX = 2.0


def gaussian_heatmaps(centers_vox: torch.Tensor | np.ndarray, shape: Sequence[int], *, sigma: float = SIGMA_VOX,
                      normalized: bool = True) -> torch.Tensor:
    """Heatmaps (..., L, X, Y, Z) of Gaussians at ``centers_vox`` (..., L, 3) (Eq. 2, separable).

    ``normalized``: the 1/((sqrt(2 pi) sigma)^3) factor of Eq. 2; else peak 1.

    >>> h = gaussian_heatmaps(torch.tensor([[8., 8., 8.]]), (17, 17, 17))
    >>> round(float(h.sum()), 3), tuple(int(i) for i in np.unravel_index(int(h.argmax()), h.shape[1:]))
    (1.0, (8, 8, 8))
    """
    if sigma <= 0:
        raise ValueError(f"sigma must be positive (voxels), got {sigma}")
    c = torch.as_tensor(centers_vox, dtype=torch.float32)
    if c.shape[-1] != 3:
        raise ValueError(f"centers must have shape (..., L, 3), got {tuple(c.shape)}")
    axes = []
    for k, size in enumerate(shape):                       # one 1D Gaussian per axis: g_x g_y g_z
        grid = torch.arange(int(size), dtype=torch.float32, device=c.device)
        axes.append(torch.exp(-(grid - c[..., k, None]) ** 2 / (2 * sigma ** 2)))
    heat = axes[0][..., :, None, None] * axes[1][..., None, :, None] * axes[2][..., None, None, :]
    if normalized:
        heat = heat / (math.sqrt(2 * math.pi) * sigma) ** 3
    return heat


def decode_argmax(heatmaps: torch.Tensor) -> torch.Tensor:
    """Voxel coordinates (..., L, 3) (float) of each channel's maximum of (..., L, X, Y, Z) heatmaps.

    >>> h = torch.zeros(1, 2, 3, 4, 5); h[0, 0, 1, 2, 3] = 1; h[0, 1, 2, 0, 4] = 1
    >>> decode_argmax(h).tolist()
    [[[1.0, 2.0, 3.0], [2.0, 0.0, 4.0]]]
    """
    spatial = heatmaps.shape[-3:]
    flat = heatmaps.detach().flatten(-3).argmax(-1)
    coords = []
    for size in reversed(spatial):                          # unravel, last axis fastest
        coords.append(flat % size)
        flat = torch.div(flat, size, rounding_mode="floor")
    return torch.stack(coords[::-1], dim=-1).to(torch.float32)


def voxel_to_mm(voxels: torch.Tensor | np.ndarray, spacing_mm: Sequence[float] | torch.Tensor) -> np.ndarray:
    """Voxel coordinates (..., 3) times spacing: mm in a frame with the grid origin at 0."""
    return np.asarray(voxels, dtype=np.float64) * np.asarray(spacing_mm, dtype=np.float64)


def mm_to_voxel(points_mm: np.ndarray, spacing_mm: Sequence[float] | torch.Tensor) -> np.ndarray:
    """Inverse of ``voxel_to_mm``."""
    return np.asarray(points_mm, dtype=np.float64) / np.asarray(spacing_mm, dtype=np.float64)
