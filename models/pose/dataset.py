"""Pose samples: resampled image, Gaussian heatmap targets and landmark coordinates of one case.

Augmentation (V2 §4.1 "random 90 degree rotation"): a quarter turn in a plane of two equal sides,
drawn with torch's RNG so ``torch.manual_seed`` fixes it. A rotation (never a flip) keeps the fetus's
handedness, which Eq. 7 relies on.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from models.data import Case, CaseDataset, normalize_intensity
from models.pose.heatmaps import SIGMA_VOX, gaussian_heatmaps
from models.pose.landmarks import LandmarkSet, V2_LANDMARKS

__all__ = ["PoseDataset", "rot90_case_arrays"]


def rot90_case_arrays(volume: np.ndarray, points_vox: np.ndarray, turns: int, axes: tuple[int, int]
                      ) -> tuple[np.ndarray, np.ndarray]:
    """``np.rot90(volume, turns, axes)`` and the matching voxel coordinates (N, 3).

    One turn maps index (a, b) of the two axes to (n_b - 1 - b, a).

    >>> v = np.zeros((3, 3, 2)); v[0, 2, 1] = 1
    >>> r, p = rot90_case_arrays(v, np.array([[0., 2, 1]]), 1, (0, 1))
    >>> p.tolist(), float(r[tuple(p[0].astype(int))])
    ([[0.0, 0.0, 1.0]], 1.0)
    """
    a, b = axes
    p = np.array(points_vox, dtype=np.float64, copy=True)
    shape = list(volume.shape)
    for _ in range(turns % 4):
        pa, pb = p[:, a].copy(), p[:, b].copy()
        p[:, a], p[:, b] = shape[b] - 1 - pb, pa
        shape[a], shape[b] = shape[b], shape[a]
    return np.ascontiguousarray(np.rot90(volume, turns, axes)), p


class PoseDataset(CaseDataset):
    """Samples {"image", "heatmaps" (L, X, Y, Z), "landmarks_vox" (L, 3), "spacing_mm", "id"}.

    ``normalized_heatmaps``: Eq. 2 Gaussians summing to 1 (V2's KL losses) or peak 1 (FetusMap's L2).
    """

    def __init__(self, directory: str | Path, input_size: Sequence[int], *, landmarks: LandmarkSet = V2_LANDMARKS,
                 sigma: float = SIGMA_VOX, normalized_heatmaps: bool = True, augment: bool = False,
                 case_ids: Sequence[str] | None = None, cache: bool = True):
        super().__init__(directory, input_size, case_ids=case_ids, cache=cache)
        self.landmarks, self.sigma = landmarks, sigma
        self.normalized_heatmaps, self.augment = normalized_heatmaps, augment

    def _augment(self, volume: np.ndarray, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        planes = [(a, b) for a, b in ((0, 1), (0, 2), (1, 2)) if volume.shape[a] == volume.shape[b]]
        if not planes:
            return volume, points
        plane = planes[int(torch.randint(len(planes), ()).item())]
        return rot90_case_arrays(volume, points, int(torch.randint(4, ()).item()), plane)

    def make_sample(self, case: Case) -> dict[str, Any]:
        points = case.landmark_array(self.landmarks.names)
        volume = case.volume
        if self.augment:
            volume, points = self._augment(volume, points)
        return {"image": torch.from_numpy(normalize_intensity(volume))[None],
                "heatmaps": gaussian_heatmaps(points, volume.shape, sigma=self.sigma,
                                              normalized=self.normalized_heatmaps),
                "landmarks_vox": torch.as_tensor(points, dtype=torch.float32),
                "spacing_mm": torch.tensor(case.spacing_mm, dtype=torch.float32), "id": case.case_id}
