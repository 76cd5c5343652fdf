"""Face cases for training and evaluation at the paper's 1.3 mm voxels, plus its augmentation (flips,
rotation within ±25°).

Each case follows models/data.py's format; its sidecar must name the five landmarks of
:data:`models.face.anchors.LANDMARKS`. A sample adds ``"landmarks"``: (5, 3) float32 voxel coordinates of
the resampled input grid, in LANDMARKS order.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from models.augment import AugmentConfig, Spatial, rotate
from models.augment import augment as apply
from models.augment import flip as flip_spatial
from models.data import Case, CaseDataset, crop_or_pad, isotropic_shape, load_case, resample_case
from models.face.anchors import LANDMARKS

__all__ = ["FaceDataset", "flip_sample", "rotate_sample", "augment", "box_scale_for", "PAPER_SPACING_MM"]

#: the paper resamples every volume to 1.3 mm voxels; its anchor and box sizes are in those voxels
PAPER_SPACING_MM = 1.3

_MIRROR = [LANDMARKS.index(n) for n in ("eye_right", "eyebrow_middle", "eye_left", "nose_tip", "chin")]


class FaceDataset(CaseDataset):
    """Cases on the network grid with their five landmarks (voxels of that grid).

    ``spacing_mm`` (the paper: 1.3 mm): each volume is resampled to isotropic voxels of that size, so the
    paper's anchor and target sizes (in 1.3 mm voxels) are right in millimetres, then cropped or
    zero-padded about its centre to ``input_size`` (the field of view; the paper states none). Without
    it the volume is resampled to ``input_size`` whatever its spacing (the boxes then need a scale).
    """

    def __init__(self, directory, input_size, *, spacing_mm: float | None = PAPER_SPACING_MM, case_ids=None,
                 cache: bool = True):
        super().__init__(directory, input_size, case_ids=case_ids, cache=cache)
        self.spacing_mm = spacing_mm

    def case(self, index: int) -> Case:
        if self.spacing_mm is None:
            return super().case(index)
        if self._cache is not None and index in self._cache:
            return self._cache[index]
        raw = load_case(self.directory, self.case_ids[index])
        case = crop_or_pad(resample_case(raw, isotropic_shape(raw, self.spacing_mm)), self.input_size)
        if self._cache is not None:
            self._cache[index] = case
        return case

    def make_sample(self, case: Case) -> dict[str, Any]:
        sample = super().make_sample(case)
        sample["landmarks"] = torch.from_numpy(case.landmark_array(LANDMARKS).astype(np.float32))
        return sample


def box_scale_for(spacing_mm: float | None) -> float:
    """Factor from the paper's box sizes (1.3 mm voxels) to voxels of ``spacing_mm`` (None: 1).

    >>> box_scale_for(2.6)
    0.5
    """
    return 1.0 if spacing_mm is None else PAPER_SPACING_MM / spacing_mm


def flip_sample(image: torch.Tensor, landmarks: torch.Tensor, axis: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mirror (C, X, Y, Z) ``image`` along spatial ``axis``; a mirror swaps the eyes' sides, so their
    labels swap too (a landmark's side is anatomical, and a mirrored face has the other chirality).

    >>> img, lm = flip_sample(torch.zeros(1, 4, 4, 4), torch.tensor([[0., 1, 2]] * 5), 0)
    >>> lm[0].tolist()
    [3.0, 1.0, 2.0]
    """
    out = flip_spatial(Spatial(image[0].numpy(), landmarks.double().numpy()), axis, _MIRROR)
    return (torch.from_numpy(np.stack([np.flip(ch, axis) for ch in image.numpy()]).copy()),
            torch.from_numpy(out.points.astype(np.float32)))


def rotate_sample(image: torch.Tensor, landmarks: torch.Tensor, rotation: np.ndarray
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate (C, X, Y, Z) ``image`` by the 3x3 ``rotation`` about the volume centre (linear
    interpolation, edge padding); landmarks follow (models.augment.rotate per channel)."""
    moved = [rotate(Spatial(ch, landmarks.double().numpy()), rotation) for ch in image.numpy()]
    return (torch.from_numpy(np.stack([m.volume for m in moved]).astype(np.float32)),
            torch.from_numpy(moved[0].points.astype(np.float32)))


def augment(image: torch.Tensor, landmarks: torch.Tensor, rng: np.random.Generator, *,
            max_angle_deg: float = 25.0, flip: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's augmentation (models.augment): a flip along one random axis (p = 0.5, eye labels
    swapped) and a rotation by up to ``max_angle_deg`` about a random axis."""
    s = Spatial(image[0].numpy(), landmarks.double().numpy())
    if flip and rng.random() < 0.5:
        s = flip_spatial(s, int(rng.integers(3)), _MIRROR)
    s = apply(rng, s, AugmentConfig(max_angle_deg=max_angle_deg))
    return torch.from_numpy(s.volume.astype(np.float32))[None], torch.from_numpy(s.points.astype(np.float32))
