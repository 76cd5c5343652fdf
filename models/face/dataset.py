"""Face cases for training and evaluation, plus the paper's augmentation (flips, rotation within ±25°).

Each case follows models/data.py's format; its sidecar must name the five landmarks of
:data:`models.face.anchors.LANDMARKS`. A sample adds ``"landmarks"``: (5, 3) float32 voxel coordinates of
the resampled input grid, in LANDMARKS order.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from scipy import ndimage
from scipy.spatial.transform import Rotation

from models.data import Case, CaseDataset
from models.face.anchors import LANDMARKS

__all__ = ["FaceDataset", "flip_sample", "rotate_sample", "augment"]

_MIRROR = [LANDMARKS.index(n) for n in ("eye_right", "eyebrow_middle", "eye_left", "nose_tip", "chin")]


class FaceDataset(CaseDataset):
    """Cases resampled to ``input_size`` with their five landmarks (voxels of the input grid)."""

    def make_sample(self, case: Case) -> dict[str, Any]:
        sample = super().make_sample(case)
        sample["landmarks"] = torch.from_numpy(case.landmark_array(LANDMARKS).astype(np.float32))
        return sample


def flip_sample(image: torch.Tensor, landmarks: torch.Tensor, axis: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mirror (C, X, Y, Z) ``image`` along spatial ``axis``; a mirror swaps the eyes' sides, so their
    labels swap too (a landmark's side is anatomical, and a mirrored face has the other chirality).

    >>> img, lm = flip_sample(torch.zeros(1, 4, 4, 4), torch.tensor([[0., 1, 2]] * 5), 0)
    >>> lm[0].tolist()
    [3.0, 1.0, 2.0]
    """
    if axis not in (0, 1, 2):
        raise ValueError(f"axis must be a spatial axis 0, 1 or 2, got {axis}")
    out = landmarks.clone()
    out[:, axis] = image.shape[axis + 1] - 1 - out[:, axis]
    return image.flip(axis + 1), out[_MIRROR]


def rotate_sample(image: torch.Tensor, landmarks: torch.Tensor, rotation: np.ndarray
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate (C, X, Y, Z) ``image`` by the 3x3 ``rotation`` about the volume centre (linear
    interpolation, edge padding); landmarks follow."""
    centre = (np.asarray(image.shape[1:]) - 1) / 2
    # output voxel o samples input at R^T (o - c) + c
    inverse = rotation.T
    offset = centre - inverse @ centre
    channels = [ndimage.affine_transform(ch.numpy(), inverse, offset=offset, order=1, mode="nearest")
                for ch in image]
    points = (landmarks.double().numpy() - centre) @ rotation.T + centre
    return torch.from_numpy(np.stack(channels).astype(np.float32)), torch.from_numpy(points.astype(np.float32))


def augment(image: torch.Tensor, landmarks: torch.Tensor, rng: np.random.Generator, *,
            max_angle_deg: float = 25.0, flip: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Random flip along one random axis (p = 0.5) and a rotation by up to ``max_angle_deg``."""
    if flip and rng.random() < 0.5:
        image, landmarks = flip_sample(image, landmarks, int(rng.integers(3)))
    if max_angle_deg > 0:
        axis = rng.normal(size=3)
        angle = np.deg2rad(rng.uniform(-max_angle_deg, max_angle_deg))
        image, landmarks = rotate_sample(image, landmarks,
                                         Rotation.from_rotvec(axis / np.linalg.norm(axis) * angle).as_matrix())
    return image, landmarks
