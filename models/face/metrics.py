"""Detection metrics of paper 003, Table 1: AP (IoU 0.5:0.95), AP35, AP50, AP75, mIoU, d-mean (mm), time.

AP at a threshold t is per landmark class the area under the precision-recall curve (all-point
interpolation, as PASCAL VOC 2010+) of the detections ranked by score, a detection counting as true
when its IoU with the not-yet-matched ground truth of its case and class is >= t; the reported AP is the
mean over classes. "AP" averages AP over t = 0.50, 0.55, ..., 0.95 (COCO). mIoU is the mean IoU of each
ground truth with the detection of its class in its case (0 when none); d-mean is the mean centre
distance in mm over ground truths that have a detection.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch

from models.face.anchors import box_iou

__all__ = ["Detection", "average_precision", "mean_average_precision", "FaceMetrics", "summarize",
           "COCO_THRESHOLDS"]

COCO_THRESHOLDS = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))


@dataclass(frozen=True)
class Detection:
    """One predicted box (x, y, z, w, h, d in voxels) of landmark class ``label`` (1..K) in a case."""

    case_id: str
    label: int
    score: float
    box: tuple[float, ...]


def _iou(a: Sequence[float], b: Sequence[float]) -> float:
    return float(box_iou(torch.tensor([a], dtype=torch.float64), torch.tensor([b], dtype=torch.float64))[0, 0])


def average_precision(detections: Sequence[Detection], truths: Mapping[str, Sequence[float]],
                      iou_threshold: float) -> float:
    """AP of one class: ``detections`` of that class, ``truths`` case id -> ground-truth box.

    >>> gt = {"a": (0, 0, 0, 2, 2, 2), "b": (0, 0, 0, 2, 2, 2)}
    >>> dets = [Detection("a", 1, 0.9, (0, 0, 0, 2, 2, 2)), Detection("b", 1, 0.8, (5, 5, 5, 2, 2, 2))]
    >>> average_precision(dets, gt, 0.5)
    0.5
    """
    if not 0 < iou_threshold <= 1:
        raise ValueError(f"iou_threshold must be in (0, 1], got {iou_threshold}")
    if not truths:
        raise ValueError("average_precision needs at least one ground truth of the class")
    ranked = sorted(detections, key=lambda d: -d.score)
    matched: set[str] = set()
    hits = np.zeros(len(ranked))
    for i, det in enumerate(ranked):
        gt = truths.get(det.case_id)
        if gt is not None and det.case_id not in matched and _iou(det.box, gt) >= iou_threshold:
            matched.add(det.case_id)
            hits[i] = 1
    tp = np.cumsum(hits)
    recall = np.concatenate([[0.0], tp / len(truths)])
    precision = np.concatenate([[1.0], tp / np.arange(1, len(ranked) + 1)])
    # all-point interpolation: precision envelope (max to the right), summed over recall steps
    envelope = np.maximum.accumulate(precision[::-1])[::-1]
    return float(np.sum((recall[1:] - recall[:-1]) * envelope[1:]))


def mean_average_precision(detections: Sequence[Detection], truths: Mapping[tuple[str, int], Sequence[float]],
                           iou_threshold: float) -> float:
    """AP averaged over the classes of ``truths`` ((case id, label) -> box)."""
    labels = sorted({label for _, label in truths})
    aps = [average_precision([d for d in detections if d.label == label],
                             {case: box for (case, lab), box in truths.items() if lab == label}, iou_threshold)
           for label in labels]
    return float(np.mean(aps))


@dataclass(frozen=True)
class FaceMetrics:
    """Table 1's columns (AP values as fractions in [0, 1], not percent)."""

    ap: float
    ap35: float
    ap50: float
    ap75: float
    miou: float
    mean_distance_mm: float
    inference_ms: float


def summarize(detections: Sequence[Detection], truths: Mapping[tuple[str, int], Sequence[float]],
              spacing_mm: Mapping[str, Sequence[float]], inference_ms: float) -> FaceMetrics:
    """All Table 1 metrics; ``spacing_mm`` maps case id -> voxel spacing of the boxes' grid."""
    best: dict[tuple[str, int], Detection] = {}
    for det in detections:
        key = (det.case_id, det.label)
        if key not in best or det.score > best[key].score:
            best[key] = det
    ious, dists = [], []
    for key, gt in truths.items():
        det = best.get(key)
        ious.append(0.0 if det is None else _iou(det.box, gt))
        if det is not None:
            delta = (np.asarray(det.box[:3]) - np.asarray(gt[:3])) * np.asarray(spacing_mm[key[0]])
            dists.append(float(np.linalg.norm(delta)))
    coco = [mean_average_precision(detections, truths, t) for t in COCO_THRESHOLDS]
    return FaceMetrics(ap=float(np.mean(coco)), ap35=mean_average_precision(detections, truths, 0.35),
                       ap50=coco[0], ap75=coco[5], miou=float(np.mean(ious)),
                       mean_distance_mm=float(np.mean(dists)) if dists else float("nan"),
                       inference_ms=inference_ms)
