"""Pose samples: resampled image, Gaussian heatmap targets, landmark coordinates and the grid's affine.

Two ways onto the network grid: a fixed ``input_size`` (FetusMapV2: every volume resampled to
176x112x112 or 208x128x144), or a ``scale_ratio`` (FetusMap: each volume downsampled 0.4x, 0.5x with
GCP), where each case keeps its aspect ratio and is zero-padded at the far end of every axis to one
common shape (the largest case, rounded up to the network's multiple) so that one memory plan fits
all. Padding at the far end leaves voxel coordinates and the affine unchanged.

Augmentation (models.augment, drawn from the dataset's numpy generator): V2 §4.1 "random 90 degree
rotation and scaling" (a quarter turn in any plane, resized back to the grid; zoom 0.9-1.1, the
range is ours); FetusMap §3 "flipping and rotation" (mirrors swap the l_/r_ labels, since a mirrored
left arm is a right arm; quarter turns).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import nibabel as nib
import numpy as np
import torch

from models.augment import ALL_PLANES, AugmentConfig, Spatial, augment
from models.data import IMAGE_SUFFIX, Case, CaseDataset, load_case, normalize_intensity, resample_case
from models.errors import ClientError
from models.pose.heatmaps import SIGMA_VOX, gaussian_heatmaps
from models.pose.landmarks import LandmarkSet, V2_LANDMARKS

__all__ = ["PoseDataset", "mirror_order", "v2_augmentation", "fetusmap_augmentation", "ratio_shape"]


def mirror_order(landmarks: LandmarkSet) -> tuple[int, ...]:
    """Channel order after a mirror: each ``l_x`` takes ``r_x``'s place and back.

    >>> from models.pose.landmarks import V2_LANDMARKS
    >>> order = mirror_order(V2_LANDMARKS); V2_LANDMARKS.names[order[10]]
    'r_shoulder'
    """
    names = landmarks.names
    swap = {n: ("r_" + n[2:] if n.startswith("l_") else "l_" + n[2:] if n.startswith("r_") else n) for n in names}
    return tuple(names.index(swap[n]) for n in names)


def v2_augmentation() -> AugmentConfig:
    """FetusMapV2: random quarter turn in any plane and scaling (0.9-1.1, our range)."""
    return AugmentConfig(rot90_planes=ALL_PLANES, scale_range=(0.9, 1.1))


def fetusmap_augmentation(landmarks: LandmarkSet) -> AugmentConfig:
    """FetusMap: flips (any axis, labels mirrored) and quarter-turn rotations."""
    return AugmentConfig(flip_axes=(0, 1, 2), mirror_order=mirror_order(landmarks), rot90_planes=ALL_PLANES)


def ratio_shape(shape: Sequence[int], ratio: float, multiple: int) -> tuple[int, int, int]:
    """The grid of a volume of ``shape`` downsampled by ``ratio``, rounded up to ``multiple`` per axis.

    >>> ratio_shape((220, 205, 260), 0.4, 16)
    (96, 96, 112)
    """
    return tuple(int(max(multiple, -(-round(n * ratio) // multiple) * multiple)) for n in shape)


class PoseDataset(CaseDataset):
    """Samples {"image", "heatmaps" (L, X, Y, Z), "landmarks_vox" (L, 3), "spacing_mm", "affine" (4, 4), "id"}.

    ``normalized_heatmaps``: Eq. 2 Gaussians summing to 1 (V2's KL losses) or peak 1 (FetusMap's L2).
    ``augment``: an AugmentConfig (None: none); ``seed`` seeds its generator.
    """

    def __init__(self, directory: str | Path, input_size: Sequence[int] | None = None, *,
                 landmarks: LandmarkSet = V2_LANDMARKS, sigma: float = SIGMA_VOX, normalized_heatmaps: bool = True,
                 augment: AugmentConfig | None = None, case_ids: Sequence[str] | None = None, cache: bool = True,
                 scale_ratio: float | None = None, multiple: int = 16, seed: int = 0):
        if (input_size is None) == (scale_ratio is None):
            raise ClientError("give the pose dataset either a fixed input_size or a scale_ratio (FetusMap's 0.4/0.5)")
        if scale_ratio is not None and not 0 < scale_ratio <= 1:
            raise ClientError(f"scale_ratio must be in (0, 1], got {scale_ratio}")
        super().__init__(directory, input_size or (2, 2, 2), case_ids=case_ids, cache=cache)
        self.landmarks, self.sigma = landmarks, sigma
        self.normalized_heatmaps, self.augmentation = normalized_heatmaps, augment
        self.scale_ratio, self.multiple = scale_ratio, multiple
        self.rng = np.random.default_rng(seed)
        if scale_ratio is not None:
            shapes = [ratio_shape(self._header_shape(c), scale_ratio, multiple) for c in self.case_ids]
            self.input_size = tuple(int(max(s[k] for s in shapes)) for k in range(3))

    def _header_shape(self, case_id: str) -> tuple[int, int, int]:
        """A case's shape from its NIfTI header alone (no voxel data read)."""
        return tuple(int(n) for n in nib.load(str(self.directory / f"{case_id}{IMAGE_SUFFIX}")).shape[:3])

    def case(self, index: int) -> Case:
        """The case on the network grid: resampled to ``input_size``, or by ``scale_ratio`` (unpadded)."""
        if self.scale_ratio is None:
            return super().case(index)
        if self._cache is not None and index in self._cache:
            return self._cache[index]
        raw = load_case(self.directory, self.case_ids[index])
        shape = tuple(max(2, round(n * self.scale_ratio)) for n in raw.shape)
        case = resample_case(raw, shape)
        if self._cache is not None:
            self._cache[index] = case
        return case

    def make_sample(self, case: Case) -> dict[str, Any]:
        s = Spatial(case.volume, case.landmark_array(self.landmarks.names), None, case.spacing_mm)
        if self.augmentation is not None and self.augmentation.enabled:
            s = augment(self.rng, s, self.augmentation)
        image = normalize_intensity(s.volume)
        if image.shape != tuple(self.input_size):           # scale_ratio: zero-pad at the far end of each axis
            pad = [(0, t - n) for n, t in zip(image.shape, self.input_size)]
            if min(p[1] for p in pad) < 0:
                raise ClientError(f"case {case.case_id!r} on the network grid is {image.shape}, larger than the "
                                  f"dataset's grid {tuple(self.input_size)}; build the dataset with this case in it")
            image = np.pad(image, pad)
        affine = case.world_affine()          # the un-augmented grid's (training never reads it; evaluation
        return {"image": torch.from_numpy(np.ascontiguousarray(image))[None],
                "heatmaps": gaussian_heatmaps(s.points, image.shape, sigma=self.sigma,
                                              normalized=self.normalized_heatmaps),
                "landmarks_vox": torch.as_tensor(s.points, dtype=torch.float32),
                "spacing_mm": torch.tensor(s.spacing_mm, dtype=torch.float32),
                "affine": torch.as_tensor(affine, dtype=torch.float64), "id": case.case_id}   # does not augment)
