"""Phantom fetal-face volumes with the 5 landmarks of paper 003 (eyes, eyebrow middle, nose tip, chin).

A face is drawn in a local frame in mm (x toward the fetus's left, y up, z out of the face), then
scaled (gestational size), rotated by up to ``MAX_ANGLE_DEG`` about a random axis and placed at a
random spot; shapes are evaluated analytically on the voxel grid. Ultrasound look: dark amniotic
fluid, grey soft tissue, bright bone (skull, brow ridge, nasal bone, mandible), dark eyeballs with a
bright lens, a bone shadow along the beam (axis 0) and speckle. The field of view is the same for every
``shape`` (``FOV_MM`` on the shortest axis, isotropic voxels: 1.3 mm, the paper's, at 64 voxels).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import ndimage
from scipy.spatial.transform import Rotation

from tools.phantoms.common import PhantomCase, acoustic_shadow, check_shape, speckle

__all__ = ["generate", "TEMPLATE_MM", "FOV_MM", "MAX_ANGLE_DEG"]

#: landmark positions of the mean face in the local frame (mm); names follow models.face.anchors
TEMPLATE_MM = {
    "eye_left": (11.0, 4.0, -1.0),
    "eyebrow_middle": (0.0, 12.0, 4.0),
    "eye_right": (-11.0, 4.0, -1.0),
    "nose_tip": (0.0, -6.0, 9.0),
    "chin": (0.0, -24.0, 3.0),
}
FOV_MM = 83.2
MAX_ANGLE_DEG = 30.0
_JITTER_MM = 1.2               # anatomical variation of each landmark around the template
_SCALE_RANGE = (0.85, 1.15)    # face size variation (gestational age)
_FLUID, _TISSUE, _BONE, _EYE, _LENS = 0.06, 0.45, 1.0, 0.12, 0.8


def _capsule(p: np.ndarray, a: Sequence[float], b: Sequence[float], radius: float) -> np.ndarray:
    """Points ``p`` (..., 3) within ``radius`` of the segment a-b."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    ab = b - a
    t = np.clip(((p - a) @ ab) / float(ab @ ab), 0.0, 1.0)
    return np.sum((p - a - t[..., None] * ab) ** 2, axis=-1) <= radius ** 2


def _ellipsoid(p: np.ndarray, centre: Sequence[float], radii: Sequence[float]) -> np.ndarray:
    return np.sum(((p - np.asarray(centre, float)) / np.asarray(radii, float)) ** 2, axis=-1) <= 1.0


def _render(p: np.ndarray, marks: dict[str, np.ndarray]) -> np.ndarray:
    """Echo intensity at local points ``p`` (..., 3) mm of a face whose landmarks are ``marks``."""
    img = np.full(p.shape[:-1], _FLUID, dtype=np.float32)
    head = ((p[..., 0] / 30) ** 2 + ((p[..., 1] - 2) / 36) ** 2 + ((p[..., 2] + 26) / 30) ** 2)
    img[head <= 1.0] = _TISSUE
    cranium = (head <= 0.86) & (head >= 0.72) & ((p[..., 1] > 10) | (p[..., 2] < -14))
    img[cranium] = _BONE
    eyes = [marks["eye_left"], marks["eye_right"]]
    nose, brow, chin = marks["nose_tip"], marks["eyebrow_middle"], marks["chin"]
    img[_ellipsoid(p, (0, (nose[1] + chin[1]) / 2, -4), (19, 20, 11))] = _TISSUE   # lower face
    img[_capsule(p, (brow[0], brow[1] - 4, brow[2] - 2), nose, 3.5)] = _TISSUE + 0.1      # nose
    img[_capsule(p, (brow[0], brow[1] - 2, brow[2] - 1), (nose[0], nose[1] + 7, nose[2] - 3), 1.2)] = _BONE
    img[_capsule(p, brow - (7, 0, 3), brow + (7, 0, -3), 1.6)] = _BONE * 0.9                # brow ridge
    for side in (-1, 1):
        img[_capsule(p, (side * 15, chin[1] + 10, chin[2] - 16), chin - (0, 0, 1), 2.0)] = _BONE   # mandible
    for eye in eyes:
        img[_ellipsoid(p, eye, (5, 5, 5))] = _EYE
        img[_ellipsoid(p, eye + (0, 0, 4), (1.8, 1.8, 1.0))] = _LENS
    return img


def generate(rng: np.random.Generator, shape: Sequence[int] = (64, 64, 64)) -> PhantomCase:
    """One random face volume of ``shape`` with its 5 landmarks (voxel coordinates)."""
    shape = check_shape(shape, minimum=16)
    spacing = FOV_MM / min(shape)
    scale = float(rng.uniform(*_SCALE_RANGE))
    axis = rng.normal(size=3)
    angle = np.deg2rad(rng.uniform(0, MAX_ANGLE_DEG))
    rotation = Rotation.from_rotvec(axis / np.linalg.norm(axis) * angle).as_matrix()
    marks = {n: np.asarray(v) + rng.normal(scale=_JITTER_MM, size=3) for n, v in TEMPLATE_MM.items()}
    # the face centre (mean landmark) lands within 10% of the field of view of the volume centre
    face_centre = np.mean(list(marks.values()), axis=0)
    extent_mm = np.asarray(shape) * spacing
    centre_mm = extent_mm / 2 + rng.uniform(-0.1, 0.1, size=3) * min(extent_mm)
    grid = np.stack(np.meshgrid(*[np.arange(n) * spacing for n in shape], indexing="ij"), axis=-1)
    # local = R^T (world - centre) / scale + face_centre  (row vectors: (world - centre) @ R)
    local = ((grid - centre_mm) @ rotation) / scale + face_centre
    volume = _render(local, marks)
    bone = volume >= _BONE * 0.9
    volume = acoustic_shadow(volume, bone, axis=0, attenuation=0.08)
    volume = ndimage.gaussian_filter(volume, 0.6)
    volume = speckle(volume, rng, strength=0.6)
    to_voxel = {n: (rotation @ ((m - face_centre) * scale) + centre_mm) / spacing for n, m in marks.items()}
    return PhantomCase(volume.astype(np.float32), (spacing,) * 3, None, to_voxel,
                       {"kind": "face", "scale": scale, "angle_deg": float(np.rad2deg(angle))})
