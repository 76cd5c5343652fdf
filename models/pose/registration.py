"""Landmark registration and the pose library of the SSL refinement (FetusMap Eq. 1, V2 Eq. 9).

``fit_similarity`` is the closed-form least-squares rigid or similarity fit (Umeyama 1991); the pose
library holds the training poses in mm and retrieves the K atlases that register best to a prediction.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from models.data import list_cases, load_landmarks_mm

__all__ = ["SimilarityTransform", "fit_similarity", "registration_error", "PoseLibrary", "AlignedAtlases"]


@dataclass(frozen=True, eq=False)
class SimilarityTransform:
    """x -> scale * rotation @ x + translation (rotation proper, scale > 0)."""

    rotation: np.ndarray
    scale: float
    translation: np.ndarray

    def apply(self, points: np.ndarray) -> np.ndarray:
        """Transform (..., 3) points."""
        return self.scale * np.asarray(points, dtype=np.float64) @ self.rotation.T + self.translation


def fit_similarity(source: np.ndarray, target: np.ndarray, *, with_scale: bool = True) -> SimilarityTransform:
    """Least-squares transform taking (N, 3) ``source`` onto ``target`` (rigid unless ``with_scale``).

    Umeyama: with centred X, Y and the SVD of the cross-covariance Y^T X / N = U D V^T,
    R = U diag(1, 1, det(U V^T)) V^T, s = tr(D S) / var(X), t = mean(Y) - s R mean(X).

    >>> x = np.array([[0., 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]])
    >>> t = fit_similarity(x, 2 * x[:, [1, 0, 2]] * [1, 1, -1] + 5)    # a reflection cannot be fitted ...
    >>> bool(np.linalg.det(t.rotation) > 0)                             # ... the rotation stays proper
    True
    """
    x, y = np.asarray(source, dtype=np.float64), np.asarray(target, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 2 or x.shape[1] != 3 or x.shape[0] < 3:
        raise ValueError(f"registration needs two (N, 3) point sets with N >= 3, got {x.shape} and {y.shape}")
    mx, my = x.mean(0), y.mean(0)
    xc, yc = x - mx, y - my
    u, d, vt = np.linalg.svd(yc.T @ xc / len(x))
    sign = np.diag([1.0, 1.0, np.sign(np.linalg.det(u @ vt)) or 1.0])
    rotation = u @ sign @ vt
    var_x = float((xc ** 2).sum() / len(x))
    scale = float(np.trace(np.diag(d) @ sign) / var_x) if with_scale and var_x > 0 else 1.0
    return SimilarityTransform(rotation, scale, my - scale * rotation @ mx)


def registration_error(transform: SimilarityTransform, source: np.ndarray, target: np.ndarray) -> float:
    """Eq. 9's summand: sum_j ||T P_a^j - P_t^j||_2 (mm)."""
    return float(np.linalg.norm(transform.apply(source) - np.asarray(target, dtype=np.float64), axis=-1).sum())


@dataclass(frozen=True, eq=False)
class AlignedAtlases:
    """The K library poses closest to a prediction, aligned onto it: ``poses`` (K, L, 3) mm."""

    indices: np.ndarray
    errors_mm: np.ndarray
    poses: np.ndarray


@dataclass(frozen=True, eq=False)
class PoseLibrary:
    """Training poses S: ``poses`` (N, L, 3) in mm, channels ordered as ``names``."""

    names: tuple[str, ...]
    poses: np.ndarray

    def __post_init__(self):
        if self.poses.ndim != 3 or self.poses.shape[1:] != (len(self.names), 3):
            raise ValueError(f"library poses must be (N, {len(self.names)}, 3), got {self.poses.shape}")

    @classmethod
    def from_directory(cls, directory: str | Path, names: Sequence[str]) -> "PoseLibrary":
        """Every case's landmarks of ``directory`` in world mm (the affine's frame, where every pose is
        right-handed whatever the grid's orientation; predictions are mapped there too)."""
        ids = list_cases(directory)
        poses = []
        for case_id in ids:
            mm = load_landmarks_mm(directory, case_id)
            missing = [n for n in names if n not in mm]
            if missing:
                raise ValueError(f"{Path(directory) / (case_id + '.json')}: landmarks {missing} missing; a pose "
                                 f"library needs every landmark of every case")
            poses.append([mm[n] for n in names])
        return cls(tuple(names), np.asarray(poses, dtype=np.float64))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({"names": list(self.names), "poses_mm": self.poses.tolist()}))

    @classmethod
    def load(cls, path: str | Path) -> "PoseLibrary":
        raw = json.loads(Path(path).read_text())
        return cls(tuple(raw["names"]), np.asarray(raw["poses_mm"], dtype=np.float64))

    def align(self, pose_mm: np.ndarray, channels: Sequence[int], k: int, *, with_scale: bool = True) -> AlignedAtlases:
        """Eq. 9: register every atlas to ``pose_mm`` (L, 3) on ``channels``; keep the K lowest errors."""
        if not 1 <= k <= len(self.poses):
            raise ValueError(f"K = {k} atlases requested from a library of {len(self.poses)} poses; "
                             f"use 1 <= K <= {len(self.poses)} or add training poses")
        idx = list(channels)
        transforms = [fit_similarity(atlas[idx], pose_mm[idx], with_scale=with_scale) for atlas in self.poses]
        errors = np.array([registration_error(t, atlas[idx], pose_mm[idx]) for t, atlas in zip(transforms, self.poses)])
        best = np.argsort(errors, kind="stable")[:k]
        return AlignedAtlases(best, errors[best], np.stack([transforms[i].apply(self.poses[i]) for i in best]))
