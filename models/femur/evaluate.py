"""Evaluate the femur framework on full volumes: detect the ROI (or take it from the ground truth),
run the branched network on the resampled ROI, map the segmentation and the heatmap peaks back to
the original grid and score them there (models/femur/metrics.py, in mm and mL).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from scipy import ndimage
from tqdm import tqdm

from models.data import Case, list_cases, load_case, normalize_intensity, resample_case
from models.errors import ClientError
from models.femur.dataset import LANDMARKS, crop_case, mask_box, scaled_shape
from models.femur.metrics import FemurMetrics, femur_metrics, summarize
from models.femur.net import BranchedFemurNet
from models.femur.roi import Box3D, RoiUNet, detect_roi, enlarge_box
from models.femur.train import load_branch, load_roi

__all__ = ["CaseResult", "scale_box", "predict_roi", "detect_tight_box", "heatmap_peaks", "predict_case", "evaluate"]


@dataclass(frozen=True)
class CaseResult:
    """Metrics of one case and how well its ROI matched the ground-truth box: IoU of the detected box and
    the femur's tight box before either is enlarged by the margin (the paper's 78.1%)."""

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
    tight = detect_tight_box(roi_model, volume_size, case)
    return None if tight is None else enlarge_box(tight, case.shape, margin_vox)


def detect_tight_box(roi_model: RoiUNet, volume_size: Sequence[int], case: Case) -> Box3D | None:
    """The detector's merged box on the case grid before the margin (None: no femur found)."""
    small = resample_case(Case(case.case_id, case.volume, case.spacing_mm), volume_size)
    box = detect_roi(roi_model, normalize_intensity(small.volume), margin_vox=0)
    return None if box is None else scale_box(box, small.shape, case.shape)


def heatmap_peaks(heatmaps: torch.Tensor) -> np.ndarray:
    """(K, *S) heatmaps -> (K, 3) voxel indices of each map's highest value (the paper's M)."""
    flat = heatmaps.flatten(1).argmax(1)
    return np.stack(np.unravel_index(flat.numpy(), tuple(heatmaps.shape[1:])), axis=1).astype(np.float64)


@torch.no_grad()
def predict_case(model: BranchedFemurNet, case: Case, box: Box3D, patch_size: Sequence[int] | None = None, *,
                 roi_scale: float | None = None) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(binary mask on the case grid, (2, 3) endpoints in case voxels; None for what a one-branch baseline
    does not predict) from the network on ``box``: the ROI
    resampled to ``patch_size``, or rescaled by ``roi_scale`` and zero-padded to a multiple of 8."""
    roi = crop_case(Case(case.case_id, case.volume, case.spacing_mm), box)
    shape = patch_size if roi_scale is None else tuple(max(2, round(n * roi_scale)) for n in roi.shape)
    patch = resample_case(roi, shape)
    image = normalize_intensity(patch.volume)
    grid = scaled_shape(image.shape, 1.0)
    image = np.pad(image, [(0, g - n) for n, g in zip(image.shape, grid)])
    outputs = model.eval()(torch.from_numpy(image)[None, None])
    crop = tuple(slice(0, n) for n in patch.shape)
    outputs = [o[(slice(None), slice(None), *crop)] for o in outputs]
    branches = model.config.branches
    seg_probs = outputs[0] if branches != "loc" else None         # Unet-L segments nothing, Unet-S finds no point
    heatmaps = outputs[1:] if branches == "both" else outputs if branches == "loc" else []
    if seg_probs is None:
        mask = None
    else:
        fg = (1.0 - seg_probs[0, 0]).numpy()                      # P(any femur class)
        factors = np.array(roi.shape, dtype=np.float64) / np.array(patch.shape)
        fg_roi = ndimage.zoom(fg, factors, order=1, mode="nearest")   # corner-aligned, as resample_case
        mask = np.zeros(case.shape, dtype=bool)
        mask[box.slices] = fg_roi > 0.5
    if not heatmaps:
        return mask, None
    ratio = np.array([(r - 1) / (p - 1) for r, p in zip(roi.shape, patch.shape)])
    points = heatmap_peaks(torch.cat(heatmaps, dim=1)[0]) * ratio + np.asarray(box.start, dtype=np.float64)
    return mask, points


def _case_result(model, case: Case, config: dict, roi_model, roi_size) -> CaseResult:
    """Without a detector the ground-truth ROI is used; a detector that finds nothing gives the whole volume."""
    margin = int(config["roi_margin_vox"])
    truth_tight = mask_box(case.mask, 0)
    tight = truth_tight if roi_model is None else detect_tight_box(roi_model, roi_size, case)
    box = Box3D((0, 0, 0), case.shape) if tight is None else enlarge_box(tight, case.shape, margin)
    patch = tuple(config["patch_size"]) if config.get("patch_size") else None
    mask, points = predict_case(model, case, box, patch, roi_scale=config.get("roi_scale"))
    metrics = femur_metrics(mask, case.mask > 0, points, case.landmark_array(LANDMARKS), case.spacing_mm)
    iou = 0.0 if tight is None else tight.iou(truth_tight)
    return CaseResult(case.case_id, metrics, iou, roi_model is not None)


def evaluate(checkpoint: str | Path, data_dir: str | Path, *, case_ids: Sequence[str] | None = None,
             use_detector: bool = True, progress: bool = True) -> tuple[list[CaseResult], dict]:
    """Score every case of ``data_dir`` with the checkpoint (a last.pt or its run folder); (per case, mean/std)."""
    model, config = load_branch(checkpoint)
    detector = load_roi(checkpoint) if use_detector else None
    if use_detector and detector is None:
        raise ClientError(f"{checkpoint}: no ROI detector was trained (--roi-epochs 0); evaluate with --gt-roi")
    roi_model, roi_size = detector if detector is not None else (None, None)
    results = []
    for cid in tqdm(case_ids or list_cases(data_dir), desc="femur evaluate", disable=not progress, file=sys.stderr):
        case = load_case(data_dir, cid)
        results.append(_case_result(model, case, config, roi_model, roi_size))
    summary = summarize([r.metrics for r in results])
    summary["roi_iou"] = (float(np.mean([r.roi_iou for r in results])), float(np.std([r.roi_iou for r in results])))
    return results, summary
