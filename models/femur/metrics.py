"""Femur evaluation metrics (paper Tables 1-2): segmentation overlap and boundary distances (from
models/segmetrics.py), absolute volume error (mL), endpoint displacements and femur-length error (mm).

Femur length is the Euclidean distance between the two endpoints p1 and p2 in mm.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from models import segmetrics

__all__ = ["FemurMetrics", "endpoint_error_mm", "femur_length_mm", "length_error_mm", "femur_metrics",
           "summarize"]


@dataclass(frozen=True)
class FemurMetrics:
    """All metrics of one case (DSC and Jaccard as fractions in [0, 1])."""

    dsc: float
    jaccard: float
    asd_mm: float
    hausdorff_mm: float
    volume_error_ml: float      # absolute
    p1_error_mm: float
    p2_error_mm: float
    length_error_mm: float      # absolute

    def as_dict(self) -> dict[str, float]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


def _points(points: Sequence[float] | np.ndarray, name: str) -> np.ndarray:
    p = np.asarray(points, dtype=np.float64)
    if p.shape[-1:] != (3,) or not np.all(np.isfinite(p)):
        raise ValueError(f"{name} must be finite voxel coordinates with 3 values per point, got shape {p.shape}")
    return p


def _spacing(spacing_mm: Sequence[float]) -> np.ndarray:
    s = np.asarray(spacing_mm, dtype=np.float64)
    if s.shape != (3,) or not np.all(s > 0):
        raise ValueError(f"spacing_mm must be 3 positive values, got {tuple(np.atleast_1d(s))}")
    return s


def endpoint_error_mm(pred: Sequence[float], truth: Sequence[float], spacing_mm: Sequence[float]) -> float:
    """Euclidean distance in mm between a predicted and a true point (voxel coordinates).

    >>> endpoint_error_mm([0, 0, 0], [3, 4, 0], (1.0, 1.0, 2.0)), endpoint_error_mm([0, 0, 0], [0, 0, 1], (1, 1, 2))
    (5.0, 2.0)
    """
    diff = _points(pred, "pred") - _points(truth, "truth")
    return float(np.linalg.norm(diff * _spacing(spacing_mm)))


def femur_length_mm(p1: Sequence[float], p2: Sequence[float], spacing_mm: Sequence[float]) -> float:
    """Femur length: distance between its two endpoints, mm."""
    return endpoint_error_mm(p1, p2, spacing_mm)


def length_error_mm(pred: np.ndarray, truth: np.ndarray, spacing_mm: Sequence[float]) -> float:
    """|length(pred p1, p2) - length(true p1, p2)| in mm; ``pred`` and ``truth`` are (2, 3) endpoints.

    >>> length_error_mm(np.array([[0, 0, 0], [0, 0, 5]]), np.array([[1, 0, 0], [1, 0, 3]]), (1, 1, 1))
    2.0
    """
    pred, truth = _points(pred, "pred"), _points(truth, "truth")
    if pred.shape != (2, 3) or truth.shape != (2, 3):
        raise ValueError(f"endpoints must be (2, 3) arrays (p1, p2), got {pred.shape} and {truth.shape}")
    return abs(femur_length_mm(*pred, spacing_mm) - femur_length_mm(*truth, spacing_mm))


def femur_metrics(pred_mask: np.ndarray | None, true_mask: np.ndarray, pred_points: np.ndarray | None,
                  true_points: np.ndarray, spacing_mm: Sequence[float]) -> FemurMetrics:
    """Every metric of one case: binary masks on one grid, (2, 3) endpoints in voxels of that grid.

    A one-branch baseline passes None for what it does not predict; those metrics are NaN.
    """
    nan = float("nan")
    if pred_mask is None:
        seg = segmetrics.SegMetrics(nan, nan, nan, nan, nan, nan)
    else:
        seg = segmetrics.segmentation_metrics(pred_mask, true_mask, spacing_mm)
    true_points = _points(true_points, "true_points")
    if pred_points is None:
        p1 = p2 = length = nan
    else:
        pred_points = _points(pred_points, "pred_points")
        p1 = endpoint_error_mm(pred_points[0], true_points[0], spacing_mm)
        p2 = endpoint_error_mm(pred_points[1], true_points[1], spacing_mm)
        length = length_error_mm(pred_points, true_points, spacing_mm)
    return FemurMetrics(dsc=seg.dsc, jaccard=seg.jaccard, asd_mm=seg.asd_mm, hausdorff_mm=seg.hausdorff_mm,
                        volume_error_ml=abs(seg.volume_error_ml), p1_error_mm=p1, p2_error_mm=p2,
                        length_error_mm=length)


def summarize(results: Sequence[FemurMetrics]) -> dict[str, tuple[float, float]]:
    """(mean, std) of every metric over cases, as the paper's tables report them (std nan if any is inf)."""
    if not results:
        raise ValueError("no cases to summarize: evaluate at least one case")
    table = {k: np.array([r.as_dict()[k] for r in results], dtype=np.float64) for k in results[0].as_dict()}
    with np.errstate(invalid="ignore"):   # an empty prediction has infinite distances: mean inf, std nan
        return {k: (float(v.mean()), float(v.std())) for k, v in table.items()}
