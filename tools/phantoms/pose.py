"""Synthetic fetal-pose volume: an articulated skeleton with the 22 FetusMapV2 landmarks.

The fetus is built in a body frame (u = cranial, v = anterior, w = u x v = the fetus's left; units
of crown-rump length), posed at random (trunk flexion, head flexion and turn, every limb joint),
scaled to a crown-rump length of 45-75 mm, rotated uniformly at random and placed in the volume.
The image has amniotic fluid, uterine wall, fetal soft tissue, bone (skull shell, spine, long
bones), multiplicative speckle and an acoustic shadow cast by bone along the beam. Label map:
0 background, 1 fetal soft tissue, 2 bone. A 64^3 case takes well under a second.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from models.pose.landmarks import V2_NAMES
from tools.phantoms.common import (PhantomCase, acoustic_shadow, check_shape, random_rotation,
                                   rasterize_capsule, rasterize_ellipsoid, speckle)

__all__ = ["generate", "sample_skeleton", "Skeleton"]

U, V, W = np.eye(3)
CRL_RANGE_MM = (45.0, 75.0)
FOV_MM = 1.3 * CRL_RANGE_MM[1]          # field of view along the shortest axis
HEAD_RADII = np.array([0.95, 1.05, 0.85])   # head ellipsoid semi-axes (u, v, w) in head radii
HEAD_RADIUS = 0.2                      # in crown-rump lengths
INTENSITY = {"fluid": 0.08, "wall": 0.45, "tissue": 0.5, "bone": 1.0}


@dataclass(frozen=True, eq=False)
class Skeleton:
    """A posed fetus in body coordinates: landmarks, head frame and the bone/tissue segments."""

    landmarks: dict[str, np.ndarray]
    head_center: np.ndarray
    head_frame: np.ndarray        # columns: the head's u, v, w
    spine: np.ndarray             # (n, 3) body-axis polyline from rump to neck
    params: dict[str, float]


def _rot(axis: np.ndarray, angle: float) -> np.ndarray:
    """Rotation matrix about unit ``axis`` by ``angle`` radians (Rodrigues)."""
    a = axis / np.linalg.norm(axis)
    k = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k


def _spine(flexion: float, length: float = 0.5, steps: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Body axis from rump (t=0) to neck (t=1) bent by ``flexion`` radians, convex posteriorly.

    The tangent turns from u toward v as phi(t) = flexion * (t - 1/2). Returns points and normals.
    """
    t = np.linspace(0.0, 1.0, steps)
    phi = flexion * (t - 0.5)
    tangent = np.cos(phi)[:, None] * U + np.sin(phi)[:, None] * V
    points = np.vstack([np.zeros(3), np.cumsum(tangent[:-1] + tangent[1:], axis=0) * length / (2 * (steps - 1))])
    normal = -np.sin(phi)[:, None] * U + np.cos(phi)[:, None] * V      # anterior direction along the spine
    return points, normal


def _at(points: np.ndarray, t: float) -> np.ndarray:
    """Linear interpolation of a polyline at fraction ``t``."""
    x = t * (len(points) - 1)
    i = min(int(x), len(points) - 2)
    return points[i] + (x - i) * (points[i + 1] - points[i])


def _limb(rng: np.random.Generator, root: np.ndarray, side: float, base: np.ndarray, lengths: tuple[float, float],
          flex_deg: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """Middle and end joints of a two-segment limb from ``root``: a random direction near ``base``, a flexed joint."""
    d1 = base * np.array([1.0, 1.0, side]) + rng.normal(0.0, 0.55, 3)
    if d1 @ V + side * (d1 @ W) < 0:               # never straight back into the trunk
        d1 = d1 - 2 * (d1 @ V) * V
    d1 /= np.linalg.norm(d1)
    perp = rng.normal(0.0, 1.0, 3) + 0.8 * V
    perp -= (perp @ d1) * d1
    d2 = _rot(np.cross(d1, perp), np.deg2rad(rng.uniform(*flex_deg))) @ d1
    middle = root + lengths[0] * d1
    return middle, middle + lengths[1] * d2


def sample_skeleton(rng: np.random.Generator) -> Skeleton:
    """A random fetal pose in body coordinates (units of crown-rump length before rescaling)."""
    flexion = np.deg2rad(rng.uniform(0, 50))
    spine, normal = _spine(flexion)
    head_flex, head_turn = np.deg2rad(rng.uniform(-15, 40)), np.deg2rad(rng.uniform(-25, 25))
    tangent = spine[-1] - spine[-2]
    frame = np.column_stack([tangent / np.linalg.norm(tangent), normal[-1], W])
    frame = _rot(frame[:, 0], head_turn) @ _rot(W, head_flex) @ frame
    head_center = spine[-1] + HEAD_RADIUS * (0.75 * frame[:, 0] + 0.25 * frame[:, 1])
    def head(a: float, b: float) -> np.ndarray:          # a head landmark, with anatomical variation
        a, b = a + rng.normal(0, 0.05), b + rng.normal(0, 0.05)
        return head_center + HEAD_RADIUS * (a * frame[:, 0] + b * frame[:, 1] + rng.normal(0, 0.03) * W)
    lm = {"crown": head(1.0, -0.1), "forehead": head(0.45, 0.9), "chin": head(-0.75, 0.8),
          "nasal_bone": head(-0.1, 1.05), "occiput": head(0.15, -1.0), "hind_neck": head(-0.8, -0.55)}
    def at(t: float, off: float) -> np.ndarray:         # a trunk landmark, with anatomical variation
        return _at(spine, t + rng.normal(0, 0.02)) + (off + rng.normal(0, 0.01)) * _at(normal, t)
    lm.update(sternum=at(0.75, 0.10), thoracic_spine=at(0.65, -0.07), umbilicus=at(0.3, 0.12), rump=at(0.0, -0.04))
    for prefix, side in (("l", 1.0), ("r", -1.0)):
        shoulder = at(0.92, -0.02) + side * rng.uniform(0.11, 0.15) * W
        hip = at(0.05, 0.0) + side * rng.uniform(0.07, 0.09) * W
        elbow, wrist = _limb(rng, shoulder, side, np.array([-0.3, 0.6, 0.4]), (0.16, 0.14), (20, 140))
        knee, ankle = _limb(rng, hip, side, np.array([-0.2, 0.8, 0.3]), (0.15, 0.13), (30, 150))
        lm.update({f"{prefix}_shoulder": shoulder, f"{prefix}_elbow": elbow, f"{prefix}_wrist": wrist,
                   f"{prefix}_hip": hip, f"{prefix}_knee": knee, f"{prefix}_ankle": ankle})
    assert set(lm) == set(V2_NAMES), f"skeleton landmarks {sorted(set(lm) ^ set(V2_NAMES))} mismatch"
    params = {"trunk_flexion_deg": float(np.rad2deg(flexion)), "head_flexion_deg": float(np.rad2deg(head_flex)),
              "head_turn_deg": float(np.rad2deg(head_turn))}
    return Skeleton({n: lm[n] for n in V2_NAMES}, head_center, frame, spine, params)


def _place(skeleton: Skeleton, rng: np.random.Generator, shape: tuple[int, int, int], spacing_mm: float
           ) -> tuple[np.ndarray, float, np.ndarray]:
    """(rotation, mm per body unit, voxel offset): a random orientation and size that fits the volume."""
    rotation = random_rotation(rng)
    crl = np.linalg.norm(skeleton.landmarks["crown"] - skeleton.landmarks["rump"])
    scale = rng.uniform(*CRL_RANGE_MM) / crl                                      # mm per body unit
    pts = np.vstack([*skeleton.landmarks.values(), skeleton.head_center + HEAD_RADIUS * np.eye(3),
                     skeleton.head_center - HEAD_RADIUS * np.eye(3)]) @ rotation.T
    extent = pts.max(0) - pts.min(0)
    room = (np.asarray(shape) - 6) * spacing_mm                                  # 3-voxel margin
    scale = min(scale, float(np.min(room / extent)))
    lo, hi = pts.min(0) * scale / spacing_mm, pts.max(0) * scale / spacing_mm
    slack = np.asarray(shape) - 6 - (hi - lo)
    offset = 3 - lo + rng.uniform(0.0, 1.0, 3) * np.maximum(slack, 0)
    return rotation, scale, offset


def _paint(shape: tuple[int, int, int], sk: Skeleton, to_vox, r_vox: float) -> tuple[np.ndarray, np.ndarray]:
    """(tissue, bone) boolean masks of the posed fetus; ``to_vox`` maps body points to voxels."""
    lm = {n: to_vox(p) for n, p in sk.landmarks.items()}
    spine = to_vox(sk.spine)
    head_c, head_rot = to_vox(sk.head_center), sk.head_frame
    tissue = rasterize_ellipsoid(shape, head_c, HEAD_RADII * HEAD_RADIUS * r_vox, head_rot)
    inner = rasterize_ellipsoid(shape, head_c, HEAD_RADII * HEAD_RADIUS * r_vox - 1.2, head_rot)
    bone = tissue & ~inner                                                        # skull shell
    face = to_vox(sk.head_center + HEAD_RADIUS * (-0.4 * head_rot[:, 0] + 0.55 * head_rot[:, 1]))
    tissue |= rasterize_ellipsoid(shape, face, np.array([0.45, 0.45, 0.55]) * HEAD_RADIUS * r_vox, head_rot)
    for a, b in zip(spine[:-1], spine[1:]):
        tissue |= rasterize_capsule(shape, a, b, 0.11 * r_vox)
        bone |= rasterize_capsule(shape, a, b, max(0.022 * r_vox, 0.75))
    limbs = [("shoulder", "elbow", "wrist"), ("hip", "knee", "ankle")]
    for side in ("l", "r"):
        for joints in limbs:
            p = [lm[f"{side}_{j}"] for j in joints]
            tissue |= rasterize_capsule(shape, p[0], p[1], 0.045 * r_vox)
            tissue |= rasterize_capsule(shape, p[1], p[2], 0.035 * r_vox)
            for a, b in ((p[0], p[1]), (p[1], p[2])):
                bone |= rasterize_capsule(shape, a, b, max(0.015 * r_vox, 0.75))
        tissue |= rasterize_capsule(shape, lm[f"{side}_shoulder"], lm["thoracic_spine"], 0.06 * r_vox)
    return tissue | bone, bone


def generate(rng: np.random.Generator, shape=(64, 64, 64)) -> PhantomCase:
    """One fetal-pose phantom of ``shape`` with the 22 V2 landmarks (voxel coordinates)."""
    shape = check_shape(shape, minimum=16)
    spacing = FOV_MM / min(shape) * rng.uniform(0.9, 1.1)
    sk = sample_skeleton(rng)
    rotation, scale, offset = _place(sk, rng, shape, spacing)
    to_vox = lambda p: np.asarray(p) @ rotation.T * (scale / spacing) + offset     # noqa: E731
    r_vox = scale / spacing                                                         # voxels per body unit
    tissue, bone = _paint(shape, sk, to_vox, r_vox)
    landmarks = {n: to_vox(p) for n, p in sk.landmarks.items()}
    pts = np.stack(list(landmarks.values()))
    sac_center = (pts.min(0) + pts.max(0)) / 2 + rng.normal(0, 1.5, 3)                # the fetus floats in its sac
    sac = rasterize_ellipsoid(shape, sac_center, (pts.max(0) - pts.min(0)) / 2 + 0.35 * HEAD_RADIUS * r_vox
                              + rng.uniform(0.1, 0.25, 3) * min(shape))
    volume = np.where(sac, INTENSITY["fluid"], INTENSITY["wall"]).astype(np.float32)
    volume[tissue] = INTENSITY["tissue"]
    volume = ndimage.gaussian_filter(volume, 0.6)
    volume[bone] = INTENSITY["bone"]                                               # thin bones stay sharp
    volume = speckle(volume, rng, strength=0.6)
    axis, reverse = int(rng.integers(3)), bool(rng.integers(2))                   # probe on one face
    volume = acoustic_shadow(volume, bone, axis=axis, reverse=reverse, attenuation=0.25)
    mask = np.where(bone, 2, np.where(tissue, 1, 0)).astype(np.uint8)
    crl_mm = float(np.linalg.norm(landmarks["crown"] - landmarks["rump"]) * spacing)
    extra = {"generator": "pose", "landmark_set": "FetusMapV2", "crl_mm": crl_mm,
             "beam": {"axis": axis, "from_end": reverse}, "pose": sk.params}
    return PhantomCase(np.clip(volume, 0, None), (spacing,) * 3, mask, landmarks, extra)
