"""Phantom fetal femur volumes: a bright, slightly bowed bone shaft with two distinguishable ends in
textured soft tissue, with acoustic shadow behind the bone and multiplicative speckle.

Landmarks: ``p1`` is the tip of the proximal end (the larger, femoral-head bulb), ``p2`` the tip of the
distal end (a smaller bulb), beyond which a tibia (bright bone, not in the mask) continues across a
joint gap at a knee angle: context that tells the two endpoints apart, as the leg does in real scans. The spacing
is isotropic and chosen so that the femur is 40-60 mm long (23-31 gestational weeks). The beam runs
along axis 0 from index 0 (the probe side), so the shadow falls towards higher axis-0 indices.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import ndimage

from tools.phantoms.common import PhantomCase, acoustic_shadow, check_shape, rasterize_capsule, speckle

__all__ = ["generate", "LANDMARKS", "shaft_points"]

LANDMARKS = ("p1", "p2")
_SEGMENTS = 8          # polyline pieces approximating the bowed shaft
_HEAD_RATIO = 1.8      # proximal bulb radius / shaft radius
_DISTAL_RATIO = 1.2    # distal bulb radius / shaft radius
_KNEE_GAP = 1.5        # joint space between femur and tibia, in shaft radii


def shaft_points(p1: np.ndarray, p2: np.ndarray, bow: np.ndarray, n: int = _SEGMENTS + 1) -> np.ndarray:
    """``n`` points of the quadratic Bezier from ``p1`` to ``p2`` whose middle is displaced by ``bow``.

    >>> shaft_points(np.zeros(3), np.array([4., 0, 0]), np.array([0, 2., 0]), 3).tolist()
    [[0.0, 0.0, 0.0], [2.0, 2.0, 0.0], [4.0, 0.0, 0.0]]
    """
    control = (p1 + p2) / 2 + 2 * bow            # B(1/2) = (p1 + 2c + p2) / 4 = midpoint + bow
    t = np.linspace(0.0, 1.0, n)[:, None]
    return (1 - t) ** 2 * p1 + 2 * t * (1 - t) * control + t ** 2 * p2


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def _geometry(rng: np.random.Generator, shape: tuple[int, int, int]) -> dict[str, np.ndarray | float]:
    """Endpoints, bow and radius (voxels) of a femur that fits inside ``shape`` with its bulbs."""
    size = float(min(shape))
    length = rng.uniform(0.45, 0.65) * size
    direction = _unit(rng.normal(size=3))
    center = np.asarray(shape, float) / 2 - 0.5 + rng.uniform(-0.06, 0.06, size=3) * size
    normal = _unit(np.cross(direction, _unit(rng.normal(size=3))))
    radius = max(1.5, rng.uniform(0.05, 0.07) * length)
    return {"p1": center - direction * length / 2, "p2": center + direction * length / 2,
            "bow": normal * rng.uniform(0.03, 0.08) * length, "radius": radius, "length": length}


def _bone_mask(shape: tuple[int, int, int], g: dict) -> np.ndarray:
    """Shaft (capsules along the bowed curve) plus a bulb inside each tip, touching the tip."""
    pts = shaft_points(g["p1"], g["p2"], g["bow"])
    r = g["radius"]
    mask = np.zeros(shape, dtype=bool)
    for a, b in zip(pts[:-1], pts[1:]):
        mask |= rasterize_capsule(shape, a, b, r)
    # a bulb of radius R centred R inside the tip along the curve, so its outermost point is the tip
    for tip, inner, ratio in ((pts[0], pts[1], _HEAD_RATIO), (pts[-1], pts[-2], _DISTAL_RATIO)):
        big = ratio * r
        c = tip + _unit(inner - tip) * big
        mask |= rasterize_capsule(shape, c, c, big)
    return mask


def _tibia_mask(shape: tuple[int, int, int], g: dict, rng: np.random.Generator) -> np.ndarray:
    """A thinner bone starting a joint gap beyond ``p2``, bent away from the femur axis by 20-60 degrees."""
    axis = _unit(g["p2"] - g["p1"])
    side = _unit(np.cross(axis, _unit(rng.normal(size=3))))
    angle = np.deg2rad(rng.uniform(20.0, 60.0))
    direction = np.cos(angle) * axis + np.sin(angle) * side
    start = g["p2"] + direction * _KNEE_GAP * g["radius"]
    end = start + direction * rng.uniform(0.5, 0.7) * g["length"]
    return rasterize_capsule(shape, start, end, 0.8 * g["radius"])


def _tissue(rng: np.random.Generator, shape: tuple[int, int, int]) -> np.ndarray:
    """Soft-tissue background: a smooth random texture around 0.3 with a few brighter layers."""
    texture = ndimage.gaussian_filter(rng.normal(size=shape).astype(np.float32), 3.0)
    texture = texture / max(float(texture.std()), 1e-6)
    layers = 0.05 * np.sin(np.arange(shape[0], dtype=np.float32) * rng.uniform(0.15, 0.4)
                           + rng.uniform(0, 2 * np.pi))[:, None, None]
    return (0.3 + 0.06 * texture + layers).astype(np.float32)


def generate(rng: np.random.Generator, shape: Sequence[int] = (64, 64, 64)) -> PhantomCase:
    """One femur phantom: image, bone mask (label 1) and endpoints ``p1`` (proximal), ``p2`` (distal)."""
    shape = check_shape(shape, minimum=16)
    g = _geometry(rng, shape)
    mask = _bone_mask(shape, g)
    bones = mask | (_tibia_mask(shape, g, rng) & ~ndimage.binary_dilation(mask))
    edge = bones & ~ndimage.binary_erosion(bones)
    volume = _tissue(rng, shape)
    volume[bones] = rng.uniform(0.75, 0.9)
    volume[edge] = 1.0                                   # bright cortical surface
    volume = acoustic_shadow(volume, bones, axis=0, attenuation=rng.uniform(0.2, 0.4))
    volume = ndimage.gaussian_filter(volume, 0.6)
    volume = speckle(volume, rng, strength=0.6)
    length_mm = rng.uniform(40.0, 60.0)
    spacing = length_mm / float(np.linalg.norm(g["p2"] - g["p1"]))
    return PhantomCase(volume=volume.astype(np.float32), spacing_mm=(spacing, spacing, spacing),
                       mask=mask.astype(np.uint8), landmarks={"p1": g["p1"], "p2": g["p2"]},
                       extra={"kind": "femur", "femur_length_mm": length_mm,
                              "radius_vox": float(g["radius"])})
