"""Segmentation metrics of the femur and head clients: overlap, surface distance in mm, volume in mL.

Definitions (E = prediction, G = ground truth, both binary masks on one voxel grid):

- DSC = 2|E ∩ G| / (|E| + |G|); Jaccard = |E ∩ G| / |E ∪ G|;
  Conformity = (3 DSC - 2) / DSC (Chang et al. 2009), in (-inf, 1].
- Surface e_M of a mask M: the voxels of M with at least one face (6-connected in 3D, 4 in 2D)
  neighbour outside M; the array border counts as outside.
- Directed distances d(a, e_B) = min over b in e_B of the Euclidean distance between voxel
  centres, with axes scaled by ``spacing_mm``.
- Average symmetric surface distance (Adb, head paper Eq. 7, with |.| read as the number of
  surface voxels): ASD = (mean_{a in e_G} d(a, e_E) + mean_{b in e_E} d(b, e_G)) / 2.
- Hausdorff (Hdb, Eq. 8): HD = max(max_{a in e_G} d(a, e_E), max_{b in e_E} d(b, e_G)).
- Volume in mL = voxel count x prod(spacing_mm) / 1000; volume error = |vol(E) - vol(G)|
  (``signed=True`` gives vol(E) - vol(G), the Bland-Altman difference).

Empty masks: when BOTH masks are empty every comparison raises ``EmptyMaskError`` (there is
nothing to compare). When exactly one is empty the values are the mathematical limits:
DSC = Jaccard = 0, Conformity = -inf, ASD = HD = +inf (a minimum over an empty set is +inf).
Volumes of empty masks are 0 mL.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import ndimage

__all__ = [
    "bland_altman", "EmptyMaskError", "SegMetrics", "dice", "jaccard", "conformity", "surface_voxels",
    "surface_distances_mm", "average_surface_distance_mm", "hausdorff_mm", "volume_ml",
    "volume_error_ml", "segmentation_metrics",
]


class EmptyMaskError(ValueError):
    """Both masks are empty, so an overlap or distance between them is undefined."""


@dataclass(frozen=True)
class SegMetrics:
    """Every metric of one prediction against its ground truth (units in the names)."""

    dsc: float
    jaccard: float
    conformity: float
    asd_mm: float
    hausdorff_mm: float
    volume_error_ml: float  # signed: vol(prediction) - vol(truth)

    def as_dict(self) -> dict[str, float]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


def _as_mask(mask, name: str) -> np.ndarray:
    """A boolean numpy copy of ``mask`` (numpy array or torch tensor holding only 0/1 values)."""
    if hasattr(mask, "detach"):
        mask = mask.detach().cpu().numpy()
    array = np.asarray(mask)
    if array.dtype == bool:
        return array
    if array.size and not np.isin(array, (0, 1)).all():
        bad = np.unique(array[~np.isin(array, (0, 1))])[:3].tolist()
        raise ValueError(f"{name} must be a binary mask (0/1 or bool), found values {bad}; "
                         "threshold probabilities or select one label first (e.g. labels == 1)")
    return array.astype(bool)


def _as_pair(pred, truth) -> tuple[np.ndarray, np.ndarray]:
    pred_b, truth_b = _as_mask(pred, "pred"), _as_mask(truth, "truth")
    if pred_b.shape != truth_b.shape:
        raise ValueError(f"pred shape {pred_b.shape} differs from truth shape {truth_b.shape}; "
                         "resample the prediction onto the ground-truth grid first")
    if pred_b.ndim == 0:
        raise ValueError("masks must have at least one axis, got 0-d arrays")
    return pred_b, truth_b


def _check_spacing(spacing_mm: Sequence[float], ndim: int) -> tuple[float, ...]:
    spacing = tuple(float(s) for s in spacing_mm)
    if len(spacing) != ndim or not all(math.isfinite(s) and s > 0 for s in spacing):
        raise ValueError(f"spacing_mm must hold {ndim} positive finite values (one per mask axis), "
                         f"got {tuple(spacing_mm)}")
    return spacing


def _counts(pred: np.ndarray, truth: np.ndarray) -> tuple[int, int, int]:
    """(|E|, |G|, |E ∩ G|); raises EmptyMaskError when both masks are empty."""
    n_pred, n_truth = int(pred.sum()), int(truth.sum())
    if n_pred == 0 and n_truth == 0:
        raise EmptyMaskError("pred and truth are both empty masks: overlap is undefined; "
                             "skip this case or report it separately")
    return n_pred, n_truth, int(np.logical_and(pred, truth).sum())


def dice(pred, truth) -> float:
    """Dice similarity coefficient 2|E ∩ G| / (|E| + |G|).

    >>> dice([1, 1, 0, 0], [0, 1, 1, 0])
    0.5
    """
    n_pred, n_truth, n_both = _counts(*_as_pair(pred, truth))
    return 2.0 * n_both / (n_pred + n_truth)


def jaccard(pred, truth) -> float:
    """Jaccard index |E ∩ G| / |E ∪ G|.

    >>> round(jaccard([1, 1, 0, 0], [0, 1, 1, 0]), 4)
    0.3333
    """
    n_pred, n_truth, n_both = _counts(*_as_pair(pred, truth))
    return n_both / (n_pred + n_truth - n_both)


def conformity(pred, truth) -> float:
    """Conformity (3 DSC - 2) / DSC; -inf when the masks do not overlap.

    >>> conformity([1, 1, 0, 0], [0, 1, 1, 0])
    -1.0
    """
    dsc = dice(pred, truth)
    return float("-inf") if dsc == 0.0 else (3.0 * dsc - 2.0) / dsc


def surface_voxels(mask) -> np.ndarray:
    """Boolean map of the mask voxels with a face neighbour outside the mask (border = outside).

    >>> surface_voxels([0, 1, 1, 1, 0]).astype(int).tolist()
    [0, 1, 0, 1, 0]
    """
    mask_b = _as_mask(mask, "mask")
    structure = ndimage.generate_binary_structure(mask_b.ndim, 1)
    interior = ndimage.binary_erosion(mask_b, structure=structure, border_value=0)
    return mask_b & ~interior


def surface_distances_mm(pred, truth, spacing_mm: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """(d(a, e_E) for a in e_G, d(b, e_G) for b in e_E) in mm; all +inf when the other mask is empty."""
    pred_b, truth_b = _as_pair(pred, truth)
    spacing = _check_spacing(spacing_mm, pred_b.ndim)
    _counts(pred_b, truth_b)
    surf_pred, surf_truth = surface_voxels(pred_b), surface_voxels(truth_b)
    if not surf_pred.any() or not surf_truth.any():
        return np.full(int(surf_truth.sum()), np.inf), np.full(int(surf_pred.sum()), np.inf)
    # The EDT of the complement of a surface gives, at every voxel, the distance to that surface.
    to_pred = ndimage.distance_transform_edt(~surf_pred, sampling=spacing)
    to_truth = ndimage.distance_transform_edt(~surf_truth, sampling=spacing)
    return to_pred[surf_truth], to_truth[surf_pred]


def average_surface_distance_mm(pred, truth, spacing_mm: Sequence[float]) -> float:
    """Average symmetric surface distance (mean of the two directed means), mm; inf if one is empty."""
    truth_to_pred, pred_to_truth = surface_distances_mm(pred, truth, spacing_mm)
    if truth_to_pred.size == 0 or pred_to_truth.size == 0:
        return float("inf")
    return 0.5 * (float(truth_to_pred.mean()) + float(pred_to_truth.mean()))


def hausdorff_mm(pred, truth, spacing_mm: Sequence[float]) -> float:
    """Hausdorff distance between the two surfaces (max of both directed maxima), mm."""
    truth_to_pred, pred_to_truth = surface_distances_mm(pred, truth, spacing_mm)
    if truth_to_pred.size == 0 or pred_to_truth.size == 0:
        return float("inf")
    return max(float(truth_to_pred.max()), float(pred_to_truth.max()))


def volume_ml(mask, spacing_mm: Sequence[float]) -> float:
    """Mask volume in mL (1 mL = 1000 mm^3).

    >>> volume_ml([[1, 1], [1, 0]], (10.0, 5.0))
    0.15
    """
    mask_b = _as_mask(mask, "mask")
    voxel_mm3 = math.prod(_check_spacing(spacing_mm, mask_b.ndim))
    return int(mask_b.sum()) * voxel_mm3 / 1000.0


def volume_error_ml(pred, truth, spacing_mm: Sequence[float], *, signed: bool = False) -> float:
    """|vol(E) - vol(G)| in mL, or vol(E) - vol(G) with ``signed=True``."""
    pred_b, truth_b = _as_pair(pred, truth)
    diff = volume_ml(pred_b, spacing_mm) - volume_ml(truth_b, spacing_mm)
    return diff if signed else abs(diff)


def bland_altman(measured: Sequence[float], reference: Sequence[float]) -> tuple[float, float, float]:
    """(Pearson r, bias, 1.96 SD) of ``measured`` vs ``reference`` over cases (head paper §4.3, Fig. 8:
    r = 0.990, -1.6 +- 19.5 mL). r is NaN when either side is constant or there are < 2 cases.

    >>> r, bias, loa = bland_altman([11.0, 19.0, 32.0], [10.0, 20.0, 30.0])
    >>> round(r, 4), round(bias, 4), round(loa, 4)
    (0.9907, 0.6667, 2.9939)
    """
    m, ref = np.asarray(measured, float), np.asarray(reference, float)
    if m.shape != ref.shape or m.ndim != 1:
        raise ValueError(f"need two equal-length 1D sequences of volumes, got shapes {m.shape} and {ref.shape}")
    diff = m - ref
    if len(m) < 2 or m.std() == 0 or ref.std() == 0:
        r = float("nan")
    else:
        r = float(np.corrcoef(m, ref)[0, 1])
    sd = float(diff.std(ddof=1)) if len(m) > 1 else float("nan")
    return r, float(diff.mean()), 1.96 * sd


def segmentation_metrics(pred, truth, spacing_mm: Sequence[float]) -> SegMetrics:
    """All metrics at once (surface distances computed once); see the module docstring."""
    pred_b, truth_b = _as_pair(pred, truth)
    dsc = dice(pred_b, truth_b)
    truth_to_pred, pred_to_truth = surface_distances_mm(pred_b, truth_b, spacing_mm)
    if truth_to_pred.size == 0 or pred_to_truth.size == 0:
        asd = hd = float("inf")
    else:
        asd = 0.5 * (float(truth_to_pred.mean()) + float(pred_to_truth.mean()))
        hd = max(float(truth_to_pred.max()), float(pred_to_truth.max()))
    return SegMetrics(dsc=dsc, jaccard=jaccard(pred_b, truth_b),
                      conformity=float("-inf") if dsc == 0.0 else (3.0 * dsc - 2.0) / dsc,
                      asd_mm=asd, hausdorff_mm=hd,
                      volume_error_ml=volume_error_ml(pred_b, truth_b, spacing_mm, signed=True))
