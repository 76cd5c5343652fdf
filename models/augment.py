"""The one augmentation module of the clients: flips, quarter turns, rotations and scaling of a 3D
volume with its landmarks (voxel coordinates) and label map moving together.

All transforms are pure functions of numpy arrays; :func:`augment` draws them from a
``numpy.random.Generator`` as an :class:`AugmentConfig` says. Geometry (voxel index space, axis 0 = i):

- ``flip(axis)``: i -> n - 1 - i. A mirror changes handedness, so left/right landmark labels swap
  (``mirror_order``): a mirrored left hand looks like a right hand.
- ``rot90(turns, axes)``: ``np.rot90``; one turn maps (a, b) -> (n_b - 1 - b, a). When the two sides differ
  the shape changes; :func:`augment` resizes back to the input shape (corner-aligned, as resampling).
- ``rotate(R)`` / ``scale(f)``: about the volume centre c, p -> c + R (p - c) / p -> c + f (p - c), same shape,
  linear interpolation for images, nearest for masks, edge values outside.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np
from scipy import ndimage
from scipy.spatial.transform import Rotation

from models.errors import ClientError

__all__ = ["Spatial", "AugmentConfig", "flip", "rot90", "resize", "rotate", "scale", "augment"]


@dataclass(frozen=True, eq=False)
class Spatial:
    """A volume (X, Y, Z), its landmarks (N, 3) voxel, optional label map and the voxel spacing."""

    volume: np.ndarray
    points: np.ndarray
    mask: np.ndarray | None = None
    spacing_mm: tuple[float, float, float] = (1.0, 1.0, 1.0)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.volume.shape)


def _axis(axis: int) -> int:
    if axis not in (0, 1, 2):
        raise ClientError(f"axis must be a spatial axis 0, 1 or 2, got {axis!r}")
    return axis


def flip(s: Spatial, axis: int, mirror_order: Sequence[int] | None = None) -> Spatial:
    """Mirror along ``axis``; landmarks are reordered by ``mirror_order`` (left/right swap) when given.

    >>> t = flip(Spatial(np.arange(4.0).reshape(4, 1, 1), np.array([[1.0, 0, 0], [3, 0, 0]])), 0, [1, 0])
    >>> t.volume.ravel().tolist(), t.points.tolist()
    ([3.0, 2.0, 1.0, 0.0], [[0.0, 0.0, 0.0], [2.0, 0.0, 0.0]])
    """
    a = _axis(axis)
    p = np.array(s.points, dtype=np.float64, copy=True)
    p[:, a] = s.shape[a] - 1 - p[:, a]
    if mirror_order is not None:
        p = p[list(mirror_order)]
    mask = None if s.mask is None else np.ascontiguousarray(np.flip(s.mask, a))
    return replace(s, volume=np.ascontiguousarray(np.flip(s.volume, a)), points=p, mask=mask)


def rot90(s: Spatial, turns: int, axes: tuple[int, int]) -> Spatial:
    """``np.rot90(volume, turns, axes)`` with the landmarks, mask and spacing following.

    >>> v = np.zeros((3, 2, 1)); v[0, 1, 0] = 1
    >>> t = rot90(Spatial(v, np.array([[0.0, 1, 0]])), 1, (0, 1))
    >>> t.shape, t.points.tolist(), float(t.volume[tuple(t.points[0].astype(int))])
    ((2, 3, 1), [[0.0, 0.0, 0.0]], 1.0)
    """
    a, b = _axis(axes[0]), _axis(axes[1])
    if a == b:
        raise ClientError(f"rot90 needs two different axes, got {axes}")
    p = np.array(s.points, dtype=np.float64, copy=True)
    shape, spacing = list(s.shape), list(s.spacing_mm)
    for _ in range(turns % 4):
        pa, pb = p[:, a].copy(), p[:, b].copy()
        p[:, a], p[:, b] = shape[b] - 1 - pb, pa
        shape[a], shape[b] = shape[b], shape[a]
        spacing[a], spacing[b] = spacing[b], spacing[a]
    mask = None if s.mask is None else np.ascontiguousarray(np.rot90(s.mask, turns, (a, b)))
    return Spatial(np.ascontiguousarray(np.rot90(s.volume, turns, (a, b))), p, mask, tuple(spacing))


def resize(s: Spatial, shape: Sequence[int]) -> Spatial:
    """Resample onto ``shape`` with a corner-aligned grid: voxel v -> v (out - 1) / (in - 1) per axis.

    >>> t = resize(Spatial(np.zeros((5, 3, 3), np.float32), np.array([[4.0, 2, 1]])), (9, 5, 3))
    >>> t.points.tolist(), t.spacing_mm
    ([[8.0, 4.0, 1.0]], (0.5, 0.5, 1.0))
    """
    out = tuple(int(n) for n in shape)
    if out == s.shape:
        return s
    ratio = np.array([(o - 1) / (i - 1) for o, i in zip(out, s.shape)])
    factors = np.array(out, dtype=np.float64) / np.array(s.shape)
    volume = ndimage.zoom(s.volume, factors, output=np.float32, order=1, mode="nearest")
    mask = None if s.mask is None else ndimage.zoom(s.mask, factors, output=s.mask.dtype, order=0, mode="nearest")
    assert volume.shape == out, f"zoom produced {volume.shape}, wanted {out}"
    return Spatial(volume, np.asarray(s.points, dtype=np.float64) * ratio, mask,
                   tuple(float(x / r) for x, r in zip(s.spacing_mm, ratio)))


def _about_centre(s: Spatial, matrix: np.ndarray, spacing_mm: tuple[float, float, float]) -> Spatial:
    """Apply p -> c + M (p - c) to content and landmarks (output voxel o samples c + M^-1 (o - c))."""
    centre = (np.asarray(s.shape, dtype=np.float64) - 1) / 2
    inverse = np.linalg.inv(matrix)
    offset = centre - inverse @ centre
    volume = ndimage.affine_transform(s.volume, inverse, offset=offset, order=1, mode="nearest",
                                      output=np.float32)
    mask = None if s.mask is None else ndimage.affine_transform(s.mask, inverse, offset=offset, order=0,
                                                                mode="nearest", output=s.mask.dtype)
    points = (np.asarray(s.points, dtype=np.float64) - centre) @ matrix.T + centre
    return Spatial(volume, points, mask, spacing_mm)


def rotate(s: Spatial, rotation: np.ndarray) -> Spatial:
    """Rotate content and landmarks by the 3x3 ``rotation`` about the volume centre (same shape)."""
    r = np.asarray(rotation, dtype=np.float64)
    if r.shape != (3, 3) or not np.allclose(r @ r.T, np.eye(3), atol=1e-6) or np.linalg.det(r) < 0:
        raise ClientError(f"rotation must be a proper 3x3 rotation matrix, got {r.tolist()}")
    return _about_centre(s, r, s.spacing_mm)


def scale(s: Spatial, factor: float) -> Spatial:
    """Zoom content and landmarks by ``factor`` about the centre (> 1 enlarges), same shape; a structure of
    L voxels becomes ``factor * L`` voxels, so the spacing shrinks by ``factor``.

    >>> t = scale(Spatial(np.zeros((5, 5, 5), np.float32), np.array([[3.0, 2, 2]])), 2.0)
    >>> t.points.tolist(), t.spacing_mm
    ([[4.0, 2.0, 2.0]], (0.5, 0.5, 0.5))
    """
    if not factor > 0:
        raise ClientError(f"scale factor must be positive, got {factor}")
    return _about_centre(s, np.eye(3) * factor, tuple(float(x / factor) for x in s.spacing_mm))


@dataclass(frozen=True)
class AugmentConfig:
    """What :func:`augment` draws, each independently.

    ``flip_axes``: each mirrored with probability ``flip_p`` (a net odd mirror applies ``mirror_order``);
    ``rot90_planes``: a random plane of these and 0-3 quarter turns, resized back to the input shape;
    ``max_angle_deg``: a rotation about a random axis by up to this angle; ``scale_range``: a zoom
    factor drawn uniformly from (low, high).
    """

    flip_axes: tuple[int, ...] = ()
    flip_p: float = 0.5
    mirror_order: tuple[int, ...] | None = None
    rot90_planes: tuple[tuple[int, int], ...] = ()
    max_angle_deg: float = 0.0
    scale_range: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        for a in self.flip_axes:
            _axis(a)
        if not 0 <= self.flip_p <= 1:
            raise ClientError(f"flip_p must be a probability in [0, 1], got {self.flip_p}")
        if self.scale_range is not None and not 0 < self.scale_range[0] <= self.scale_range[1]:
            raise ClientError(f"scale_range must be (low, high) with 0 < low <= high, got {self.scale_range}")
        if self.max_angle_deg < 0:
            raise ClientError(f"max_angle_deg must be >= 0, got {self.max_angle_deg}")

    @property
    def enabled(self) -> bool:
        return bool(self.flip_axes or self.rot90_planes or self.max_angle_deg or self.scale_range)


ALL_PLANES = ((0, 1), (0, 2), (1, 2))
__all__.append("ALL_PLANES")


def augment(rng: np.random.Generator, s: Spatial, config: AugmentConfig) -> Spatial:
    """One random draw of ``config``'s transforms applied to ``s``; the output has ``s``'s shape."""
    shape = s.shape
    mirrored = False
    for axis in config.flip_axes:
        if rng.random() < config.flip_p:
            s = flip(s, axis)
            mirrored = not mirrored
    if mirrored and config.mirror_order is not None:
        s = replace(s, points=s.points[list(config.mirror_order)])
    if config.rot90_planes:
        plane = config.rot90_planes[int(rng.integers(len(config.rot90_planes)))]
        s = resize(rot90(s, int(rng.integers(4)), plane), shape)
    if config.max_angle_deg > 0:
        axis = rng.normal(size=3)
        angle = np.deg2rad(rng.uniform(-config.max_angle_deg, config.max_angle_deg))
        s = rotate(s, Rotation.from_rotvec(axis / np.linalg.norm(axis) * angle).as_matrix())
    if config.scale_range is not None:
        s = scale(s, float(rng.uniform(*config.scale_range)))
    return s
