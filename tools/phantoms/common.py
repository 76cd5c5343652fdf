"""Shared phantom primitives: the PhantomCase record, writing it to disk, shapes, noise, transforms.

Coordinates are continuous voxel indices (axis 0 = i) unless a name says ``_mm``; shape rasterisers
work on the bounding box only, so many small parts on a large grid stay cheap.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from scipy import ndimage
from scipy.spatial.transform import Rotation

from models.data import Case, parse_shape, save_case

__all__ = ["PhantomCase", "mirror_grid", "to_case", "write_case", "check_shape", "rasterize_ellipsoid", "rasterize_capsule",
           "speckle", "acoustic_shadow", "random_rotation", "random_similarity", "transform_points"]


@dataclass(frozen=True, eq=False)
class PhantomCase:
    """A generated volume, its spacing, optional label map and landmarks (name -> voxel), extras for the JSON."""

    volume: np.ndarray
    spacing_mm: tuple[float, float, float]
    mask: np.ndarray | None = None
    landmarks: Mapping[str, np.ndarray] | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)
    affine: np.ndarray | None = None        # voxel -> mm; None: diag(spacing_mm)


def mirror_grid(phantom: PhantomCase, axis: int = 0) -> PhantomCase:
    """The same anatomy stored on a mirrored voxel grid: the arrays are flipped along ``axis`` and the
    affine gets a negative determinant, so every world (mm) coordinate is unchanged. Real NIfTI often
    comes this way; code that reads sides in voxel space gets them wrong.

    >>> p = mirror_grid(PhantomCase(np.zeros((4, 2, 2)), (2.0, 1.0, 1.0), landmarks={"a": np.array([1.0, 0, 0])}))
    >>> p.landmarks["a"].tolist(), (p.affine[:3, :3] @ p.landmarks["a"] + p.affine[:3, 3]).tolist()
    ([2.0, 0.0, 0.0], [2.0, 0.0, 0.0])
    """
    n = phantom.volume.shape[axis]
    base = np.diag([*phantom.spacing_mm, 1.0]) if phantom.affine is None else np.asarray(phantom.affine, float)
    flip = np.eye(4)
    flip[axis, axis], flip[axis, 3] = -1.0, n - 1                   # voxel' = flip @ voxel (an involution)
    landmarks = {k: flip[:3, :3] @ np.asarray(v, float) + flip[:3, 3] for k, v in (phantom.landmarks or {}).items()}
    mask = None if phantom.mask is None else np.ascontiguousarray(np.flip(phantom.mask, axis))
    return PhantomCase(np.ascontiguousarray(np.flip(phantom.volume, axis)), phantom.spacing_mm, mask, landmarks,
                       {**phantom.extra, "mirrored_axis": axis}, base @ flip)


def to_case(case_id: str, phantom: PhantomCase) -> Case:
    """The phantom as a models.data.Case (float32 image, uint8 mask)."""
    mask = None if phantom.mask is None else np.asarray(phantom.mask, dtype=np.uint8)
    landmarks = {n: np.asarray(v, dtype=np.float64) for n, v in (phantom.landmarks or {}).items()}
    return Case(case_id, np.asarray(phantom.volume, dtype=np.float32), tuple(float(s) for s in phantom.spacing_mm),
                mask, landmarks, dict(phantom.extra), None if phantom.affine is None else np.asarray(phantom.affine))


def write_case(out_dir: str | Path, case_id: str, phantom: PhantomCase) -> Path:
    """Write ``phantom`` as ``case_id``.nii.gz (+ _mask.nii.gz, + .json) in ``out_dir``; returns the image path."""
    return save_case(out_dir, to_case(case_id, phantom))


def check_shape(shape: Sequence[int] | str, *, minimum: int = 8) -> tuple[int, int, int]:
    """A validated 3-tuple shape with every axis >= ``minimum``."""
    out = parse_shape(shape)
    if min(out) < minimum:
        raise ValueError(f"phantom shape {out} is too small; every axis needs >= {minimum} voxels")
    return out


def _box(shape: Sequence[int], lo: np.ndarray, hi: np.ndarray) -> tuple[tuple[slice, ...], list[np.ndarray]] | None:
    """Slices of the voxel box [lo, hi] clipped to ``shape`` and its open-grid coordinates; None if empty."""
    start = np.maximum(np.floor(lo).astype(int), 0)
    stop = np.minimum(np.ceil(hi).astype(int) + 1, np.asarray(shape))
    if np.any(stop <= start):
        return None
    slices = tuple(slice(a, b) for a, b in zip(start, stop))
    return slices, list(np.ogrid[slices])


def rasterize_ellipsoid(shape: Sequence[int], center: Sequence[float], radii: Sequence[float],
                        rotation: np.ndarray | None = None) -> np.ndarray:
    """Boolean mask of the ellipsoid with semi-axes ``radii`` (voxels) along the columns of ``rotation``.

    >>> int(rasterize_ellipsoid((9, 9, 9), (4, 4, 4), (2, 1, 1)).sum())   # 5 along i, 2 along j, 2 along k
    9
    """
    c, r = np.asarray(center, float), np.asarray(radii, float)
    rot = np.eye(3) if rotation is None else np.asarray(rotation, float)
    mask = np.zeros(tuple(shape), dtype=bool)
    reach = np.abs(rot) @ r                     # half-extent of the rotated ellipsoid's bounding box
    box = _box(shape, c - reach, c + reach)
    if box is None:
        return mask
    slices, grid = box
    d = [g - ci for g, ci in zip(grid, c)]
    total = 0.0
    for k in range(3):                          # coordinate along the k-th semi-axis, over its radius
        u = d[0] * rot[0, k] + d[1] * rot[1, k] + d[2] * rot[2, k]
        total = total + (u / r[k]) ** 2
    mask[slices] = total <= 1.0
    return mask


def rasterize_capsule(shape: Sequence[int], start: Sequence[float], end: Sequence[float], radius: float) -> np.ndarray:
    """Boolean mask of voxels within ``radius`` of the segment start-end (a capsule: a bone or a limb).

    >>> int(rasterize_capsule((9, 9, 9), (2, 4, 4), (6, 4, 4), 0.5).sum())
    5
    """
    a, b = np.asarray(start, float), np.asarray(end, float)
    mask = np.zeros(tuple(shape), dtype=bool)
    box = _box(shape, np.minimum(a, b) - radius, np.maximum(a, b) + radius)
    if box is None:
        return mask
    slices, grid = box
    ab = b - a
    length2 = float(ab @ ab)
    d = [g - ai for g, ai in zip(grid, a)]
    # t = clamp(<p - a, b - a> / |b - a|^2, 0, 1): the nearest point on the segment is a + t (b - a)
    t = (d[0] * ab[0] + d[1] * ab[1] + d[2] * ab[2]) / length2 if length2 > 0 else 0.0 * d[0]
    t = np.clip(t, 0.0, 1.0)
    dist2 = sum((d[k] - t * ab[k]) ** 2 for k in range(3))
    mask[slices] = dist2 <= radius ** 2
    return mask


def speckle(volume: np.ndarray, rng: np.random.Generator, *, strength: float = 0.5,
            correlation_vox: float = 0.7) -> np.ndarray:
    """Multiplicative ultrasound speckle: Rayleigh noise (mean 1), smoothed to ``correlation_vox``, mixed by strength."""
    noise = rng.rayleigh(scale=np.sqrt(2.0 / np.pi), size=volume.shape).astype(np.float32)   # mean 1
    if correlation_vox > 0:
        noise = ndimage.gaussian_filter(noise, correlation_vox)
        noise = noise / max(float(noise.mean()), 1e-6)
    return (volume * ((1.0 - strength) + strength * noise)).astype(np.float32)


def acoustic_shadow(volume: np.ndarray, occluder: np.ndarray, *, axis: int = 0, reverse: bool = False,
                    attenuation: float = 0.15) -> np.ndarray:
    """Darken voxels behind ``occluder`` along the beam (``axis``, from index 0 unless ``reverse``).

    Each occluding voxel passed multiplies the echo by exp(-attenuation): bone casts a shadow.

    >>> v = acoustic_shadow(np.ones((4, 1, 1)), np.array([0, 1, 0, 0]).reshape(4, 1, 1) > 0, attenuation=1.0)
    >>> [round(float(x), 3) for x in v.ravel()]
    [1.0, 1.0, 0.368, 0.368]
    """
    occ = np.flip(occluder, axis) if reverse else occluder
    passed = np.cumsum(occ, axis=axis) - occ             # occluders strictly before each voxel
    gain = np.exp(-attenuation * passed)
    if reverse:
        gain = np.flip(gain, axis)
    return (volume * gain).astype(np.float32)


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    """A uniformly random 3x3 rotation matrix."""
    return Rotation.random(random_state=rng).as_matrix()


def random_similarity(rng: np.random.Generator, *, scale_range: tuple[float, float] = (0.8, 1.2)
                      ) -> tuple[np.ndarray, float]:
    """(rotation, isotropic scale) drawn uniformly: a random orientation and size."""
    lo, hi = scale_range
    if not 0 < lo <= hi:
        raise ValueError(f"scale_range {scale_range} must satisfy 0 < low <= high")
    return random_rotation(rng), float(rng.uniform(lo, hi))


def transform_points(points: np.ndarray, rotation: np.ndarray, scale: float, pivot: Sequence[float],
                     target: Sequence[float]) -> np.ndarray:
    """Rotate and scale (N, 3) ``points`` about ``pivot`` and move the pivot to ``target``."""
    p = np.asarray(points, float) - np.asarray(pivot, float)
    return scale * p @ np.asarray(rotation, float).T + np.asarray(target, float)
