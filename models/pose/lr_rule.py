"""V2 Eq. 7: give the two predicted limb groups their sides from head landmarks 1, 4 and 6.

Pair Loss trains the arm (and leg) groups without telling which is left, so at inference
Ang = (V_{1->4} x V_{1->6}) . V_{s1->s2} decides: Ang <= 0 means the group of s1 is the left one.
V_{1->4} x V_{1->6} (crown to nasal bone, crown to hind neck) is the mid-sagittal normal pointing to
the fetus's left, so this holds for a true pose in a right-handed frame. A linear map M of the points
multiplies Ang by det(M): a positive scaling (voxels vs mm) keeps the decision, but a voxel grid whose
affine mirrors (negative determinant, common in real NIfTI) flips it. ``assign_sides(..., frame=A)``
therefore decides in world coordinates A[:3, :3] @ voxel and swaps the voxel coordinates accordingly.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from models.pose.landmarks import V2_LANDMARKS, V2_LIMB_PAIRS

__all__ = ["side_angle", "assign_sides"]

_CROWN, _NASAL, _HIND_NECK = V2_LANDMARKS.channels(1, 4, 6)


def side_angle(points: np.ndarray, a: int, b: int) -> np.ndarray:
    """Eq. 7's Ang for joints ``a`` -> ``b`` of (..., L, 3) ``points`` (V2 order), shape (...).

    >>> p = np.zeros((22, 3)); p[3] = [-1, 1, 0]; p[5] = [-1, -1, 0]    # crown at 0, face +y, neck -y
    >>> p[10], p[13] = [0, 0, 1], [0, 0, -1]                           # shoulders at +z (left), -z
    >>> float(side_angle(p, 10, 13))
    -4.0
    """
    p = np.asarray(points, dtype=np.float64)
    normal = np.cross(p[..., _NASAL, :] - p[..., _CROWN, :], p[..., _HIND_NECK, :] - p[..., _CROWN, :])
    return np.einsum("...k,...k->...", normal, p[..., b, :] - p[..., a, :])


def assign_sides(points: np.ndarray,
                 limb_pairs: Sequence[tuple[Sequence[int], Sequence[int]]] = V2_LIMB_PAIRS, *,
                 frame: np.ndarray | None = None) -> np.ndarray:
    """``points`` (..., L, 3) with each (left, right) group pair swapped where Eq. 7 says so.

    The first channel of each group is its root joint (shoulder, hip), the landmark Eq. 7 uses.
    ``frame``: the voxel -> world affine (4x4 or its 3x3 part, or (..., 4, 4) per sample); Eq. 7 is
    evaluated on the world coordinates, the swap applied to ``points`` as given.
    """
    out = np.array(points, dtype=np.float64, copy=True)
    linear = np.eye(3) if frame is None else np.asarray(frame, dtype=np.float64)[..., :3, :3]
    for left, right in limb_pairs:
        left, right = list(left), list(right)
        world = out @ np.swapaxes(linear, -1, -2)                  # (..., L, 3) world coordinates
        swap = side_angle(world, left[0], right[0]) > 0          # Ang > 0: s1 is the right one
        a, b = out[..., left, :].copy(), out[..., right, :].copy()
        out[..., left, :] = np.where(swap[..., None, None], b, a)
        out[..., right, :] = np.where(swap[..., None, None], a, b)
    return out
