"""Evaluate the femur framework on full volumes: detect the ROI (or take it from the ground truth),
run the branched network on the resampled ROI, map the segmentation and the heatmap peaks back to
the original grid and score them there (models/femur/metrics.py, in mm and mL).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from scipy import ndimage
from tqdm import tqdm

from models.data import Case, list_cases, load_case, normalize_intensity, resample_case
from models.femur.dataset import LANDMARKS, crop_case, mask_box
from models.femur.metrics import FemurMetrics, femur_metrics, summarize
from models.femur.net import BranchedFemurNet
from models.femur.roi import Box3D, RoiUNet, detect_roi, enlarge_box
from models.femur.train import BRANCH_CHECKPOINT, ROI_CHECKPOINT, load_branch, load_roi

__all__ = ["CaseResult", "scale_box", "predict_roi", "heatmap_peaks", "predict_case", "evaluate"]


@dataclass(frozen=True)
class CaseResult:
    """Metrics of one case and how well its ROI matched the ground-truth box (IoU)."""

    case_id: str
    metrics: FemurMetrics
    roi_iou: float
    roi_from_detector: bool


def scale_box(box: Box3D, from_shape: Sequence[int], to_shape: Sequence[int]) -> Box3D:
    """A box on a grid of ``from_shape`` mapped onto a corner-aligned grid of ``to_shape`` (covering it).

    >>> scale_box(Box3D((1, 0, 2), (3, 5, 4)), (5, 5, 5), (9, 9, 9))
    Box3D(start=(2, 0, 4), stop=(5, 9, 7))
    """
    ratio = [(t - 1) / (f - 1) for f, t in zip(from_shape, to_shape)]
    start = tuple(max(0, int(np.floor(a * r))) for a, r in zip(box.start, ratio))
    stop = tuple(min(n, int(np.ceil((b - 1) * r)) + 1) for b, r, n in zip(box.stop, ratio, to_shape))
    return Box3D(start, stop)


def predict_roi(roi_model: RoiUNet, volume_size: Sequence[int], case: Case, margin_vox: int) -> Box3D | None:
    """Detector ROI of a full case: slices of the volume resampled to ``volume_size``, box mapped back
    to the case grid and enlarged there by ``margin_vox``; None when the detector finds no femur."""
    small = resample_case(Case(case.case_id, case.volume, case.spacing_mm), volume_size)
    box = detect_roi(roi_model, normalize_intensity(small.volume), margin_vox=0)
    if box is None:
        return None
    return enlarge_box(scale_box(box, small.shape, case.shape), case.shape, margin_vox)


def heatmap_peaks(heatmaps: torch.Tensor) -> np.ndarray:
    """(K, *S) heatmaps -> (K, 3) voxel indices of each map's highest value (the paper's M)."""
    flat = heatmaps.flatten(1).argmax(1)
    return np.stack(np.unravel_index(flat.numpy(), tuple(heatmaps.shape[1:])), axis=1).astype(np.float64)


@torch.no_grad()
def predict_case(model: BranchedFemurNet, case: Case, box: Box3D, patch_size: Sequence[int]
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(binary mask on the case grid, (2, 3) endpoints in case voxels) from the network on ``box``."""
    roi = crop_case(Case(case.case_id, case.volume, case.spacing_mm), box)
    patch = resample_case(roi, patch_size)
    image = torch.from_numpy(normalize_intensity(patch.volume))[None, None]
    seg_probs, *heatmaps = model.eval()(image)
    fg = (1.0 - seg_probs[0, 0]).numpy()                          # P(any femur class)
    factors = np.array(roi.shape, dtype=np.float64) / np.array(patch.shape)
    fg_roi = ndimage.zoom(fg, factors, order=1, mode="nearest")   # corner-aligned, as resample_case
    mask = np.zeros(case.shape, dtype=bool)
    mask[box.slices] = fg_roi > 0.5
    ratio = np.array([(r - 1) / (p - 1) for r, p in zip(roi.shape, patch.shape)])
    points = heatmap_peaks(torch.cat(heatmaps, dim=1)[0]) * ratio + np.asarray(box.start, dtype=np.float64)
    return mask, points


def _case_result(model, case: Case, patch_size, roi_model, roi_size, margin_vox: int) -> CaseResult:
    """Without a detector the ground-truth ROI is used; a detector that finds nothing gives the whole volume."""
    truth_box = mask_box(case.mask, margin_vox)
    if roi_model is None:
        box = truth_box
    else:
        box = predict_roi(roi_model, roi_size, case, margin_vox) or Box3D((0, 0, 0), case.shape)
    mask, points = predict_case(model, case, box, patch_size)
    metrics = femur_metrics(mask, case.mask > 0, points, case.landmark_array(LANDMARKS), case.spacing_mm)
    return CaseResult(case.case_id, metrics, box.iou(truth_box), roi_model is not None)


def evaluate(data_dir: str | Path, checkpoint_dir: str | Path, *, case_ids: Sequence[str] | None = None,
             use_detector: bool = True, progress: bool = True) -> tuple[list[CaseResult], dict]:
    """Score every case of ``data_dir`` with the checkpoints in ``checkpoint_dir``; (per case, mean/std)."""
    ckpt = Path(checkpoint_dir)
    model, config = load_branch(ckpt / BRANCH_CHECKPOINT)
    roi_model, roi_size = load_roi(ckpt / ROI_CHECKPOINT) if use_detector else (None, None)
    results = []
    for cid in tqdm(case_ids or list_cases(data_dir), desc="evaluate", disable=not progress):
        case = load_case(data_dir, cid)
        results.append(_case_result(model, case, tuple(config["patch_size"]), roi_model, roi_size,
                                    int(config["roi_margin_vox"])))
    summary = summarize([r.metrics for r in results])
    summary["roi_iou"] = (float(np.mean([r.roi_iou for r in results])), float(np.std([r.roi_iou for r in results])))
    return results, summary
