"""Pose metrics: distance error in mm, PCK and its AUC, and V2 Table 8's clinical measures.

PCK(t) is the fraction of landmarks within t mm of the truth; its AUC is the mean of PCK over
t in [0, T] mm, which equals 1 - mean(min(e, T)) / T exactly. The papers state no T. V2:
``PCK_MAX_MM`` = 20 mm reproduces its numbers (mean errors 3.46 / 4.14 mm give 82.7 / 79.3 % against
the reported 83.23 / 80.44 %). FetusMap: ``FETUSMAP_PCK_MAX_MM`` = 10 mm, since its SSLGCP row (mean
error 4.92 mm, AUC 62.9 %) needs mean(min(e, T)) = 0.371 T <= 4.92 mm, so T <= 13.3 mm. All functions take coordinates in mm unless named ``_vox``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from models.pose.landmarks import V2_LANDMARKS, LandmarkSet

__all__ = ["PCK_MAX_MM", "FETUSMAP_PCK_MAX_MM", "pck_table", "distance_errors_mm", "pck_curve", "pck_auc", "Plane", "fit_plane", "plane_errors",
           "crown_rump_length", "long_bone_lengths", "clinical_measures", "MIDSAGITTAL_LANDMARKS", "summarize"]

PCK_MAX_MM = 20.0
FETUSMAP_PCK_MAX_MM = 10.0
MIDSAGITTAL_LANDMARKS = ("crown", "forehead", "chin", "nasal_bone", "occiput", "hind_neck")


def distance_errors_mm(pred_vox: np.ndarray, true_vox: np.ndarray, spacing_mm: Sequence[float] | np.ndarray) -> np.ndarray:
    """Euclidean errors (...) in mm of voxel coordinates (..., 3); ``spacing_mm`` broadcasts (3,) or (..., 3).

    >>> distance_errors_mm(np.array([[3., 4, 0]]), np.zeros((1, 3)), [1, 1, 2]).tolist()
    [5.0]
    """
    diff = (np.asarray(pred_vox, float) - np.asarray(true_vox, float)) * np.asarray(spacing_mm, float)
    return np.linalg.norm(diff, axis=-1)


def pck_curve(errors_mm: np.ndarray, thresholds_mm: Sequence[float]) -> np.ndarray:
    """PCK: fraction of ``errors_mm`` (cases, ...) <= each threshold, shape (T, ...)."""
    e = np.asarray(errors_mm, float)
    return np.stack([(e <= t).mean(axis=0) for t in thresholds_mm])


def pck_auc(errors_mm: np.ndarray, max_mm: float = PCK_MAX_MM) -> np.ndarray:
    """Area under PCK over [0, max_mm] normalised to [0, 1], over axis 0 (cases): 1 - mean(min(e, max)) / max.

    >>> float(pck_auc(np.array([0.0, 10.0, 30.0])))      # PCK 1/3 up to 10 mm, 2/3 after: (1/3 + 2/3) / 2
    0.5
    """
    if max_mm <= 0:
        raise ValueError(f"PCK threshold range must be positive, got {max_mm} mm")
    return 1.0 - np.minimum(np.asarray(errors_mm, float), max_mm).mean(axis=0) / max_mm


@dataclass(frozen=True, eq=False)
class Plane:
    """Plane through ``point`` with unit ``normal`` (mm)."""

    point: np.ndarray
    normal: np.ndarray

    def distance(self, x: np.ndarray) -> np.ndarray:
        """Unsigned distance of (..., 3) points to the plane."""
        return np.abs((np.asarray(x, float) - self.point) @ self.normal)


def fit_plane(points_mm: np.ndarray) -> Plane:
    """Least-squares plane of >= 3 non-collinear points: centroid and smallest singular vector."""
    p = np.asarray(points_mm, float)
    if p.ndim != 2 or p.shape[0] < 3:
        raise ValueError(f"a plane needs >= 3 points of shape (N, 3), got {p.shape}")
    centroid = p.mean(0)
    _, s, vt = np.linalg.svd(p - centroid)
    if s[1] <= 1e-9 * max(s[0], 1e-12):
        raise ValueError("plane landmarks are collinear; the plane is undefined")
    return Plane(centroid, vt[2] / np.linalg.norm(vt[2]))


def plane_errors(pred: Plane, true: Plane) -> tuple[float, float]:
    """(distance mm, angle deg) of a predicted plane: the true centroid's distance to it, and the angle
    between normals in [0, 90] (a plane has no orientation)."""
    cos = min(1.0, abs(float(pred.normal @ true.normal)))
    return float(pred.distance(true.point)), float(np.degrees(np.arccos(cos)))


def _get(points_mm: np.ndarray, landmarks: LandmarkSet, name: str) -> np.ndarray:
    return np.asarray(points_mm, float)[..., landmarks.channel(name), :]


def crown_rump_length(points_mm: np.ndarray, landmarks: LandmarkSet = V2_LANDMARKS) -> np.ndarray:
    """Crown-rump length (mm): crown to rump."""
    return np.linalg.norm(_get(points_mm, landmarks, "crown") - _get(points_mm, landmarks, "rump"), axis=-1)


def long_bone_lengths(points_mm: np.ndarray, landmarks: LandmarkSet = V2_LANDMARKS) -> dict[str, np.ndarray]:
    """Humerus (shoulder-elbow) and femur (hip-knee) lengths in mm, per side."""
    out = {}
    for side in ("l", "r"):
        for bone, (a, b) in (("humerus", ("shoulder", "elbow")), ("femur", ("hip", "knee"))):
            out[f"{side}_{bone}"] = np.linalg.norm(_get(points_mm, landmarks, f"{side}_{a}")
                                                   - _get(points_mm, landmarks, f"{side}_{b}"), axis=-1)
    return out


def clinical_measures(pred_mm: np.ndarray, true_mm: np.ndarray, landmarks: LandmarkSet = V2_LANDMARKS,
                      plane_names: Sequence[str] = MIDSAGITTAL_LANDMARKS) -> dict[str, float]:
    """Absolute errors of one case's Table 8 measures: plane distance/angle, CRL, humerus and femur lengths.

    The plane errors are NaN when the predicted plane landmarks are collinear (``summarize`` skips them).
    """
    idx = [landmarks.channel(n) for n in plane_names]
    true_plane = fit_plane(np.asarray(true_mm)[idx])
    try:
        dist, angle = plane_errors(fit_plane(np.asarray(pred_mm)[idx]), true_plane)
    except ValueError:                          # predicted plane landmarks collinear: no plane, no error value
        dist, angle = float("nan"), float("nan")
    out = {"midsagittal_distance_mm": dist, "midsagittal_angle_deg": angle,
           "crl_mm": float(abs(crown_rump_length(pred_mm, landmarks) - crown_rump_length(true_mm, landmarks)))}
    pred_bones, true_bones = long_bone_lengths(pred_mm, landmarks), long_bone_lengths(true_mm, landmarks)
    out.update({f"{k}_mm": float(abs(pred_bones[k] - true_bones[k])) for k in pred_bones})
    return out


def pck_table(errors_mm: np.ndarray, names: Sequence[str], max_mm: float = PCK_MAX_MM, step_mm: float = 0.5) -> str:
    """PCK curves as CSV text: one row per threshold 0, step, ..., max_mm; a column per landmark and the mean.

    >>> print(pck_table(np.array([[1.0], [3.0]]), ["a"], max_mm=2, step_mm=1))
    threshold_mm,a,mean
    0,0,0
    1,0.5,0.5
    2,0.5,0.5
    """
    e = np.asarray(errors_mm, float)
    thresholds = np.round(np.arange(0.0, max_mm + step_mm / 2, step_mm), 6)
    curve = pck_curve(e, thresholds)
    lines = ["threshold_mm," + ",".join(names) + ",mean"]
    for t, row in zip(thresholds, curve):
        lines.append(",".join(f"{x:g}" for x in (t, *row, (e <= t).mean())))
    return "\n".join(lines)


def summarize(errors_mm: np.ndarray, names: Sequence[str], measures: Sequence[Mapping[str, float]] = (),
              pck_max_mm: float = PCK_MAX_MM) -> str:
    """A plain-text table: per landmark mean ED (mm) and AUC (%, PCK over 0..``pck_max_mm``), their means,
    then mean clinical errors."""
    e = np.asarray(errors_mm, float)
    auc = pck_auc(e, pck_max_mm) * 100
    lines = [f"{'landmark':<16}{'ED mm':>9}{'AUC %':>9}   (AUC of PCK over 0-{pck_max_mm:g} mm)"]
    lines += [f"{n:<16}{e[:, i].mean():>9.2f}{auc[i]:>9.2f}" for i, n in enumerate(names)]
    lines.append(f"{'mean':<16}{e.mean():>9.2f}{auc.mean():>9.2f}")
    if measures:
        lines.append(f"{'measure (MAE)':<30}{'value':>9}")
        for k in measures[0]:
            values = np.array([m[k] for m in measures], dtype=float)
            undefined = int(np.isnan(values).sum())
            mean = np.nanmean(values) if undefined < len(values) else float("nan")
            lines.append(f"{k:<30}{mean:>9.2f}" + (f"  ({undefined} undefined)" if undefined else ""))
    return "\n".join(lines)
