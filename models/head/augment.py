"""Training augmentation of the head paper (§2.1): flips, 180-degree rotations, random erasing.

Flips and 180-degree rotations about the three axes handle the free fetal pose; random erasing
(Zhong et al.) blanks a box centred at a random voxel of the head to mimic acoustic shadow. Every
transform keeps the grid shape, moves image and mask together, and erasing leaves the mask
untouched (the head is still there under the shadow).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from models.augment import Spatial, rot90
from models.augment import flip as shared_flip

__all__ = ["AugmentConfig", "flip", "rotate180", "random_erase", "augment"]


@dataclass(frozen=True)
class AugmentConfig:
    """Probabilities of each transform and the erased box size as a fraction of each axis."""

    flip_prob: float = 0.5              # per axis
    rotate_prob: float = 0.5            # one 180-degree rotation about a random axis
    erase_prob: float = 0.5
    erase_fraction: tuple[float, float] = (0.15, 0.4)

    def __post_init__(self) -> None:
        for name in ("flip_prob", "rotate_prob", "erase_prob"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {value}")
        lo, hi = self.erase_fraction
        if not 0.0 < lo <= hi <= 1.0:
            raise ValueError(f"erase_fraction {self.erase_fraction} must satisfy 0 < low <= high <= 1")


def _spatial(array: np.ndarray, transform) -> np.ndarray:
    """``transform`` (a models.augment function of a Spatial) applied to each 3D volume of ``array`` (..., X, Y, Z)."""
    flat = array.reshape(-1, *array.shape[-3:])
    out = [transform(Spatial(v, np.zeros((0, 3)))).volume for v in flat]
    return np.stack(out).reshape(*array.shape[:-3], *out[0].shape).astype(array.dtype, copy=False)


def flip(array: np.ndarray, axis: int) -> np.ndarray:
    """``array`` mirrored along spatial ``axis`` (0..2 of the last three axes; models.augment.flip)."""
    return _spatial(array, lambda s: shared_flip(s, axis))


def rotate180(array: np.ndarray, axis: int) -> np.ndarray:
    """``array`` rotated 180 degrees about spatial ``axis`` (two quarter turns in the plane of the other two
    axes, models.augment.rot90).

    >>> rotate180(np.arange(8).reshape(2, 2, 2), 0)[0].tolist()
    [[3, 2], [1, 0]]
    """
    plane = tuple(a for a in range(3) if a != axis)
    return _spatial(array, lambda s: rot90(s, 2, plane))


def random_erase(rng: np.random.Generator, image: np.ndarray, mask: np.ndarray,
                 fraction: tuple[float, float], fill: float | None = None) -> np.ndarray:
    """``image`` with a box (sides ``fraction`` of each axis) around a random head voxel set to ``fill``.

    ``fill`` defaults to the image minimum (the darkest echo, i.e. a shadow; the paper erases raw
    intensities with 0). The box is centred on a random mask voxel, or a random voxel if the mask is empty.
    """
    spatial = image.shape[-3:]
    inside = np.argwhere(mask.reshape(spatial) > 0)
    centre = inside[rng.integers(len(inside))] if len(inside) else np.array([rng.integers(s) for s in spatial])
    sides = [max(1, int(round(rng.uniform(*fraction) * s))) for s in spatial]
    starts = [max(0, c - side // 2) for c, side in zip(centre, sides)]
    box = tuple(slice(a, min(s, c - side // 2 + side)) for a, c, side, s in zip(starts, centre, sides, spatial))
    out = image.copy()
    out[(..., *box)] = float(image.min()) if fill is None else fill
    return out


def augment(rng: np.random.Generator, image: np.ndarray, mask: np.ndarray,
            config: AugmentConfig = AugmentConfig()) -> tuple[np.ndarray, np.ndarray]:
    """Random flips, then maybe a 180-degree rotation, then maybe an erased box; image (C?, X, Y, Z), mask (X, Y, Z)."""
    if image.shape[-3:] != mask.shape[-3:]:
        raise ValueError(f"image spatial shape {image.shape[-3:]} differs from mask shape {mask.shape[-3:]}")
    for axis in range(3):
        if rng.random() < config.flip_prob:
            image, mask = flip(image, axis), flip(mask, axis)
    if rng.random() < config.rotate_prob:
        axis = int(rng.integers(3))
        image, mask = rotate180(image, axis), rotate180(mask, axis)
    if rng.random() < config.erase_prob:
        image = random_erase(rng, image, mask, config.erase_fraction)
    return image, mask
