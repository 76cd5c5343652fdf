"""Femur training data: each case is cropped to its femur ROI (a box enlarged by a margin), resampled
to a fixed patch, and paired with its label map and Gaussian heatmaps of the two endpoints.

Cases follow models/data.py; a femur case needs a mask (label 1 = femur) and landmarks ``p1``, ``p2``.
Without a given box the ROI comes from the ground-truth mask (training); evaluation passes the
detector's box. A 2D slice dataset for the ROI detector is here too.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from models.data import Case, CaseDataset, DataError, list_cases, load_case, normalize_intensity, parse_shape, \
    resample_case
from models.femur.roi import ROI_MARGIN_VOX, Box3D, crop, enlarge_box, merge_boxes, slice_boxes

__all__ = ["LANDMARKS", "gaussian_heatmaps", "mask_box", "crop_case", "FemurDataset", "RoiSliceDataset"]

LANDMARKS = ("p1", "p2")   # proximal and distal femur endpoints


def gaussian_heatmaps(shape: Sequence[int], points: np.ndarray, sigma_vox: float) -> np.ndarray:
    """(K, *shape) float32 maps exp(-|v - p_k|^2 / (2 sigma^2)), peak 1 at each of the (K, 3) points.

    >>> h = gaussian_heatmaps((3, 1, 1), np.array([[1.0, 0, 0]]), 1.0)
    >>> [round(float(x), 4) for x in h.ravel()]
    [0.6065, 1.0, 0.6065]
    """
    if sigma_vox <= 0:
        raise ValueError(f"sigma_vox must be > 0, got {sigma_vox}")
    grid = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij")
    maps = [np.exp(-sum((g - p) ** 2 for g, p in zip(grid, point)) / (2.0 * sigma_vox ** 2))
            for point in np.asarray(points, dtype=np.float32)]
    return np.stack(maps).astype(np.float32)


def mask_box(mask: np.ndarray, margin_vox: int = ROI_MARGIN_VOX) -> Box3D:
    """The enlarged ROI of a ground-truth mask: merged per-slice boxes + ``margin_vox`` per side."""
    boxes = slice_boxes(np.asarray(mask) > 0)
    if not boxes:
        raise ValueError("mask is empty: a femur case needs a non-empty mask to define its ROI")
    return enlarge_box(merge_boxes(boxes), tuple(mask.shape), margin_vox)


def crop_case(case: Case, box: Box3D) -> Case:
    """``case`` restricted to ``box``: image, mask, landmarks and affine follow the crop."""
    start = np.asarray(box.start, dtype=np.float64)
    affine = case.world_affine().copy()
    affine[:3, 3] += affine[:3, :3] @ start
    return replace(case, volume=np.ascontiguousarray(crop(case.volume, box)),
                   mask=None if case.mask is None else np.ascontiguousarray(crop(case.mask, box)),
                   landmarks={n: np.asarray(v, dtype=np.float64) - start for n, v in case.landmarks.items()},
                   affine=affine)


def _check_femur_case(case: Case, directory: Path) -> None:
    if case.mask is None:
        raise DataError(f"{directory / (case.case_id + '_mask.nii.gz')}: missing; femur cases need a label map "
                        "(1 = femur)")
    case.landmark_array(LANDMARKS)


class FemurDataset(CaseDataset):
    """ROI-cropped femur cases at ``input_size``; samples add ``labels`` (X, Y, Z) int64,
    ``heatmaps`` (2, X, Y, Z) and ``landmarks`` (2, 3) voxel coordinates of the patch.

    ``boxes`` maps case IDs to ROI boxes (e.g. from the detector); others use :func:`mask_box`.
    ``flip=True`` mirrors axes 1 and 2 at random (torch RNG): augmentation that keeps the beam axis 0.
    """

    def __init__(self, directory: str | Path, input_size: Sequence[int], *, case_ids: Sequence[str] | None = None,
                 roi_margin_vox: int = ROI_MARGIN_VOX, sigma_vox: float = 2.0,
                 boxes: Mapping[str, Box3D] | None = None, flip: bool = False, cache: bool = True):
        super().__init__(directory, input_size, case_ids=case_ids, cache=cache)
        if roi_margin_vox < 0:
            raise ValueError(f"roi_margin_vox must be >= 0, got {roi_margin_vox}")
        if sigma_vox <= 0:
            raise ValueError(f"sigma_vox must be > 0, got {sigma_vox}")
        self.roi_margin_vox, self.sigma_vox, self.flip = roi_margin_vox, sigma_vox, flip
        self.boxes = dict(boxes or {})

    def roi(self, case: Case) -> Box3D:
        """The ROI box of a full-size case."""
        return self.boxes.get(case.case_id) or mask_box(case.mask, self.roi_margin_vox)

    def case(self, index: int) -> Case:
        if self._cache is not None and index in self._cache:
            return self._cache[index]
        full = load_case(self.directory, self.case_ids[index])
        _check_femur_case(full, self.directory)
        case = resample_case(crop_case(full, self.roi(full)), self.input_size)
        if self._cache is not None:
            self._cache[index] = case
        return case

    def make_sample(self, case: Case) -> dict[str, Any]:
        sample = super().make_sample(case)
        points = case.landmark_array(LANDMARKS)
        sample["labels"] = torch.from_numpy((case.mask > 0).astype(np.int64))
        sample["heatmaps"] = torch.from_numpy(gaussian_heatmaps(case.shape, points, self.sigma_vox))
        sample["landmarks"] = torch.from_numpy(points.astype(np.float32))
        if self.flip:
            sample = _random_flip(sample, case.shape)
        return sample


def _random_flip(sample: dict[str, Any], shape: tuple[int, int, int]) -> dict[str, Any]:
    """Mirror axes 1 and 2 each with probability 1/2 (image, labels, heatmaps, landmarks together)."""
    out = dict(sample)
    for axis in (1, 2):
        if torch.rand(()) < 0.5:
            out["image"] = out["image"].flip(axis + 1)
            out["labels"] = out["labels"].flip(axis)
            out["heatmaps"] = out["heatmaps"].flip(axis + 1)
            points = out["landmarks"].clone()
            points[:, axis] = shape[axis] - 1 - points[:, axis]
            out["landmarks"] = points
    return out


class RoiSliceDataset(Dataset):
    """2D slices along ``axis`` of whole cases resampled to ``volume_size``: (1, H, W) image, (H, W) label."""

    def __init__(self, directory: str | Path, volume_size: Sequence[int], *, case_ids: Sequence[str] | None = None,
                 axis: int = 2):
        if axis not in (0, 1, 2):
            raise ValueError(f"axis must be 0, 1 or 2, got {axis!r}")
        self.directory, self.volume_size, self.axis = Path(directory), parse_shape(volume_size), axis
        self.case_ids = list(case_ids) if case_ids is not None else list_cases(self.directory)
        images, labels = [], []
        for cid in self.case_ids:
            case = load_case(self.directory, cid)
            _check_femur_case(case, self.directory)
            case = resample_case(case, self.volume_size)
            images.append(np.moveaxis(normalize_intensity(case.volume), axis, 0))
            labels.append(np.moveaxis((case.mask > 0).astype(np.int64), axis, 0))
        self.images = torch.from_numpy(np.concatenate(images))[:, None]
        self.labels = torch.from_numpy(np.concatenate(labels))

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[index], self.labels[index]
