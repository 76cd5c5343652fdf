"""Phantom fetal head for the head client: skull shell, brain, face, neck, speckle and skull shadow.

The label is the *whole* head of the head paper (Fig. 1b): cranium (skull and everything inside)
plus the maxillo-facial region, but not the neck and trunk it is attached to. The head takes a
random pose and size (gestational age); a bright skull shell casts an acoustic shadow along the
beam (axis 0), and multiplicative speckle covers everything. The field of view is 150 mm on the
longest axis (the paper's 388 x 0.38 mm), so spacing scales with the requested shape.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import ndimage

from tools.phantoms.common import (PhantomCase, acoustic_shadow, check_shape, random_rotation, rasterize_ellipsoid,
                                   speckle)

__all__ = ["generate", "FIELD_OF_VIEW_MM", "INTENSITY"]

FIELD_OF_VIEW_MM = 150.0
# Echo levels before shadow and speckle: fluid is dark, bone is bright.
INTENSITY = {"fluid": 0.05, "wall": 0.45, "trunk": 0.4, "face": 0.5, "brain": 0.22, "ventricle": 0.08,
             "falx": 0.7, "skull": 1.0, "jaw": 0.9}
_CRANIUM_RADII_MM = np.array([45.0, 37.0, 38.0])   # half occipito-frontal, biparietal, vertical diameters
_SKULL_MM = 3.0


def _place(center: np.ndarray, rotation: np.ndarray, offset_mm: Sequence[float], spacing: float) -> np.ndarray:
    """Voxel position of a point ``offset_mm`` from ``center`` in the head's own (rotated) frame."""
    return center + rotation @ (np.asarray(offset_mm, float) / spacing)


def _head_parts(shape: tuple[int, int, int], rng: np.random.Generator, spacing: float) -> dict[str, np.ndarray]:
    """Boolean masks of the anatomical parts for one random head pose and size."""
    scale = rng.uniform(0.8, 1.15)
    rot = random_rotation(rng)
    center = np.asarray(shape, float) / 2 + rng.uniform(-0.08, 0.08, 3) * np.asarray(shape)
    outer = _CRANIUM_RADII_MM * scale * rng.uniform(0.93, 1.07, 3)
    a, b, c = outer
    ell = lambda offset, radii, r=rot: rasterize_ellipsoid(shape, _place(center, rot, offset, spacing),
                                                          np.asarray(radii) / spacing, r)
    cranium = ell((0, 0, 0), outer)
    inner = ell((0, 0, 0), outer - _SKULL_MM)
    face = ell((0.55 * a, 0, -0.5 * c), (0.5 * a, 0.6 * b, 0.5 * c))
    jaw = ell((0.7 * a, 0, -0.85 * c), (0.35 * a, 0.5 * b, 0.08 * c)) & ~ell((0.7 * a, 0, -0.85 * c),
                                                                            (0.3 * a, 0.42 * b, 0.06 * c))
    trunk = ell((-0.25 * a, 0, -1.9 * c), (0.55 * a, 0.7 * b, 1.0 * c))
    falx = inner & (np.abs(_signed_distance_to_plane(shape, center, rot[:, 1])) * spacing < 0.8)
    ventricles = ell((0.1 * a, 0.2 * b, 0.1 * c), (0.35 * a, 0.1 * b, 0.15 * c)) | \
        ell((0.1 * a, -0.2 * b, 0.1 * c), (0.35 * a, 0.1 * b, 0.15 * c))
    head = cranium | face
    return {"head": head, "trunk": trunk & ~head, "face": face & ~cranium, "jaw": jaw & head,
            "brain": inner, "ventricle": ventricles & inner, "falx": falx, "skull": cranium & ~inner,
            "scale": np.asarray(scale)}


def _signed_distance_to_plane(shape: Sequence[int], point: np.ndarray, normal: np.ndarray) -> np.ndarray:
    """Signed voxel distance of every voxel to the plane through ``point`` with unit ``normal``."""
    grid = np.ogrid[tuple(slice(0, s) for s in shape)]
    return sum((g - p) * n for g, p, n in zip(grid, point, normal))


def _uterine_wall(shape: tuple[int, int, int], rng: np.random.Generator) -> np.ndarray:
    """A thick bright band across the far field (axis 0), tilted at random: a distractor, not head."""
    normal = np.array([1.0, *rng.uniform(-0.3, 0.3, 2)])
    normal /= np.linalg.norm(normal)
    depth = _signed_distance_to_plane(shape, np.array([shape[0] * 0.92, 0.0, 0.0]), normal)
    return np.abs(depth) < shape[0] * 0.05


def generate(rng: np.random.Generator, shape: Sequence[int] = (64, 64, 64)) -> PhantomCase:
    """One phantom fetal-head volume with its whole-head mask (uint8, 1 = head).

    >>> case = generate(np.random.default_rng(0), (32, 32, 32))
    >>> case.volume.shape, case.mask.dtype.name, bool(0 < case.mask.mean() < 0.6)
    ((32, 32, 32), 'uint8', True)
    """
    shape = check_shape(shape, minimum=16)
    spacing = FIELD_OF_VIEW_MM / max(shape)
    parts = _head_parts(shape, rng, spacing)
    volume = np.full(shape, INTENSITY["fluid"], dtype=np.float32)
    for name in ("wall", "trunk", "face", "brain", "ventricle", "falx", "skull", "jaw"):
        region = _uterine_wall(shape, rng) if name == "wall" else parts[name]
        volume[region] = INTENSITY[name]
    volume = ndimage.gaussian_filter(volume, 0.6)                       # finite resolution
    volume = acoustic_shadow(volume, parts["skull"] | parts["jaw"], axis=0,
                             attenuation=float(rng.uniform(0.3, 0.6)) * spacing / 2.0)
    volume = speckle(volume, rng, strength=0.6)
    volume += rng.normal(0.0, 0.02, shape).astype(np.float32)
    mask = parts["head"].astype(np.uint8)
    head_ml = float(mask.sum()) * spacing ** 3 / 1000.0
    return PhantomCase(volume=volume.astype(np.float32), spacing_mm=(spacing,) * 3, mask=mask,
                       landmarks={"head_centre": np.argwhere(mask).mean(axis=0)},
                       extra={"kind": "head", "head_volume_ml": head_ml, "scale": float(parts["scale"])})
