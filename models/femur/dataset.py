"""Femur training data: each case is cropped to its femur ROI (a box enlarged by a margin), resampled
to a fixed patch, and paired with its label map and Gaussian heatmaps of the two endpoints.

Cases follow models/data.py; a femur case needs a mask (label 1 = femur) and landmarks ``p1``, ``p2``.
As in the paper the ROI is rescaled by 0.65 (``roi_scale``) rather than resampled to a fixed cube.
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

from models.augment import AugmentConfig, Spatial, augment
from models.data import Case, CaseDataset, DataError, list_cases, load_case, normalize_intensity, parse_shape, \
    resample_case
from models.femur.net import DOWNSAMPLE_FACTOR
from models.femur.roi import ROI_MARGIN_VOX, Box3D, crop, enlarge_box, merge_boxes, slice_boxes

__all__ = ["LANDMARKS", "gaussian_heatmaps", "mask_box", "crop_case", "FemurDataset", "RoiSliceDataset",
           "PAPER_ROI_SCALE", "femur_augmentation", "scaled_shape"]

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


#: the paper rescales every ROI by 0.65 ("limited by GPU memory"), keeping its aspect ratio
PAPER_ROI_SCALE = 0.65


def femur_augmentation() -> AugmentConfig:
    """§3: "scaling, rotation and flipping"; the ranges are ours (mirrors of axes 1 and 2, keeping the beam
    axis 0; rotations up to 15 degrees; zoom 0.9-1.1). Endpoints p1/p2 have no side: no label swap."""
    return AugmentConfig(flip_axes=(1, 2), max_angle_deg=15.0, scale_range=(0.9, 1.1))


def scaled_shape(shape: Sequence[int], scale: float, multiple: int = DOWNSAMPLE_FACTOR) -> tuple[int, int, int]:
    """The grid of an ROI of ``shape`` rescaled by ``scale``, rounded up to ``multiple`` (the net's).

    >>> scaled_shape((228, 124, 190), 0.65)
    (152, 88, 128)
    """
    return tuple(int(max(multiple, -(-round(n * scale) // multiple) * multiple)) for n in shape)


class FemurDataset(CaseDataset):
    """ROI-cropped femur cases; samples add ``labels`` (X, Y, Z) int64, ``heatmaps`` (2, X, Y, Z) and
    ``landmarks`` (2, 3) voxel coordinates of the patch.

    ``roi_scale`` (the paper's 0.65): each ROI is rescaled by it, keeping its aspect ratio, and
    zero-padded (label 0) at the far end of each axis to one grid, the largest ROI's rounded up to a
    multiple of 8; ``input_size`` is then that grid. Without it every ROI is resampled to ``input_size``.
    ``boxes`` maps case IDs to ROI boxes (e.g. from the detector); others use :func:`mask_box`.
    ``augment``: an AugmentConfig (e.g. :func:`femur_augmentation`), drawn from a generator seeded by ``seed``.
    """

    def __init__(self, directory: str | Path, input_size: Sequence[int] | None = None, *,
                 case_ids: Sequence[str] | None = None, roi_margin_vox: int = ROI_MARGIN_VOX, sigma_vox: float = 2.0,
                 boxes: Mapping[str, Box3D] | None = None, augment: AugmentConfig | None = None, cache: bool = True,
                 roi_scale: float | None = None, seed: int = 0):
        if (input_size is None) == (roi_scale is None):
            raise ValueError("give the femur dataset either a fixed input_size or a roi_scale (the paper's 0.65)")
        super().__init__(directory, input_size or (8, 8, 8), case_ids=case_ids, cache=cache)
        if roi_margin_vox < 0:
            raise ValueError(f"roi_margin_vox must be >= 0, got {roi_margin_vox}")
        if sigma_vox <= 0:
            raise ValueError(f"sigma_vox must be > 0, got {sigma_vox}")
        self.roi_margin_vox, self.sigma_vox, self.augmentation = roi_margin_vox, sigma_vox, augment
        self.boxes = dict(boxes or {})
        self.roi_scale = roi_scale
        self.rng = np.random.default_rng(seed)
        if roi_scale is not None:
            shapes = [scaled_shape(self.case(i).shape, 1.0) for i in range(len(self))]
            self.input_size = tuple(max(s[k] for s in shapes) for k in range(3))

    def roi(self, case: Case) -> Box3D:
        """The ROI box of a full-size case."""
        return self.boxes.get(case.case_id) or mask_box(case.mask, self.roi_margin_vox)

    def case(self, index: int) -> Case:
        """The ROI of case ``index`` on the network's scale (unpadded when ``roi_scale`` is set)."""
        if self._cache is not None and index in self._cache:
            return self._cache[index]
        full = load_case(self.directory, self.case_ids[index])
        _check_femur_case(full, self.directory)
        roi = crop_case(full, self.roi(full))
        shape = self.input_size if self.roi_scale is None else \
            tuple(max(2, round(n * self.roi_scale)) for n in roi.shape)
        case = resample_case(roi, shape)
        if self._cache is not None:
            self._cache[index] = case
        return case

    def make_sample(self, case: Case) -> dict[str, Any]:
        s = Spatial(case.volume, case.landmark_array(LANDMARKS), (case.mask > 0).astype(np.uint8), case.spacing_mm)
        if self.augmentation is not None and self.augmentation.enabled:
            s = augment(self.rng, s, self.augmentation)
        image, labels = normalize_intensity(s.volume), s.mask.astype(np.int64)
        if image.shape != tuple(self.input_size):           # roi_scale: pad at the far end to the common grid
            pad = [(0, t - n) for n, t in zip(image.shape, self.input_size)]
            image, labels = np.pad(image, pad), np.pad(labels, pad)
        return {"image": torch.from_numpy(np.ascontiguousarray(image))[None],
                "labels": torch.from_numpy(np.ascontiguousarray(labels)),
                "heatmaps": torch.from_numpy(gaussian_heatmaps(image.shape, s.points, self.sigma_vox)),
                "landmarks": torch.from_numpy(s.points.astype(np.float32)),
                "spacing_mm": torch.tensor(s.spacing_mm, dtype=torch.float32), "id": case.case_id}


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
