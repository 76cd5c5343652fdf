"""Segmentation metrics against hand-computed values and a brute-force surface distance."""
import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from models import segmetrics as sm


def _box(shape, lo, hi):
    mask = np.zeros(shape, dtype=bool)
    mask[tuple(slice(a, b) for a, b in zip(lo, hi))] = True
    return mask


def _ball(shape, centre, radius):
    grid = np.indices(shape).astype(float)
    dist2 = sum((g - c) ** 2 for g, c in zip(grid, centre))
    return dist2 <= radius ** 2


# 4^3 box and the same box shifted by 2 voxels along axis 0, inside a 10^3 grid.
BOX_A = _box((10, 10, 10), (1, 1, 1), (5, 5, 5))
BOX_B = _box((10, 10, 10), (3, 1, 1), (7, 5, 5))


def test_overlap_of_offset_boxes_matches_hand_values():
    # |A| = |B| = 64, |A ∩ B| = 2*4*4 = 32, |A ∪ B| = 96.
    assert sm.dice(BOX_A, BOX_B) == pytest.approx(0.5)
    assert sm.jaccard(BOX_A, BOX_B) == pytest.approx(1 / 3)
    assert sm.conformity(BOX_A, BOX_B) == pytest.approx(-1.0)  # (1.5 - 2) / 0.5


def test_surface_distances_of_offset_boxes_match_hand_values():
    # Per x-layer of A's 56 surface voxels, distance to B's surface: layer x0 (16 voxels) 2,
    # x1 ring (12) 1, x2 ring (12) 0, x3 ring (12) 0, x3 centre (4) 1 -> sum 48, mean 6/7.
    # By mirror symmetry B -> A is the same; Hausdorff is the shift, 2 voxels.
    for spacing in [(1.0, 1.0, 1.0), (0.5, 3.0, 7.0)]:
        assert sm.average_surface_distance_mm(BOX_A, BOX_B, spacing) == pytest.approx(6 / 7 * spacing[0])
        assert sm.hausdorff_mm(BOX_A, BOX_B, spacing) == pytest.approx(2 * spacing[0])


def test_identical_masks_are_perfect():
    ball = _ball((16, 16, 16), (8, 8, 8), 5)
    m = sm.segmentation_metrics(ball, ball, (0.4, 0.4, 0.4))
    assert (m.dsc, m.jaccard, m.conformity, m.asd_mm, m.hausdorff_mm, m.volume_error_ml) == (1, 1, 1, 0, 0, 0)


def test_concentric_balls_hausdorff_is_radius_gap():
    inner, outer = _ball((32,) * 3, (16, 16, 16), 6), _ball((32,) * 3, (16, 16, 16), 10)
    # On-axis surface voxels sit exactly at radius 6 and 10, so the gap 4 is attained;
    # voxelisation can only add up to about one voxel diagonal.
    hd = sm.hausdorff_mm(inner, outer, (0.5, 0.5, 0.5))
    assert 4 * 0.5 <= hd <= (4 + math.sqrt(3)) * 0.5
    dsc = sm.dice(inner, outer)
    assert dsc == pytest.approx(2 * inner.sum() / (inner.sum() + outer.sum()))
    assert dsc == pytest.approx(2 * 6 ** 3 / (6 ** 3 + 10 ** 3), rel=0.05)  # continuum value


def test_volume_uses_spacing():
    # 64 voxels of 0.5 * 1 * 2 = 1 mm^3 -> 0.064 mL; B - A is 0 here.
    assert sm.volume_ml(BOX_A, (0.5, 1.0, 2.0)) == pytest.approx(0.064)
    small = _box((10, 10, 10), (1, 1, 1), (3, 5, 5))  # 32 voxels
    assert sm.volume_error_ml(small, BOX_A, (0.5, 1.0, 2.0)) == pytest.approx(0.032)
    assert sm.volume_error_ml(small, BOX_A, (0.5, 1.0, 2.0), signed=True) == pytest.approx(-0.032)
    ball = _ball((40,) * 3, (20, 20, 20), 15)
    assert sm.volume_ml(ball, (0.38,) * 3) == pytest.approx(4 / 3 * math.pi * (15 * 0.38) ** 3 / 1000, rel=0.02)


def _brute_surface(mask):
    out = np.zeros_like(mask)
    for idx in zip(*np.nonzero(mask)):
        for axis, step in itertools.product(range(mask.ndim), (-1, 1)):
            nb = list(idx)
            nb[axis] += step
            if not 0 <= nb[axis] < mask.shape[axis] or not mask[tuple(nb)]:
                out[idx] = True
                break
    return out


def _brute_distances(src, dst, spacing):
    a = np.argwhere(src) * spacing
    b = np.argwhere(dst) * spacing
    return np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)).min(axis=1)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), spacing=st.tuples(*[st.floats(0.2, 3.0)] * 3))
def test_surface_distances_match_brute_force(seed, spacing):
    rng = np.random.default_rng(seed)
    pred = rng.random((6, 7, 5)) < 0.4
    truth = rng.random((6, 7, 5)) < 0.4
    pred[0, 0, 0] = truth[1, 1, 1] = True
    surf_p, surf_t = _brute_surface(pred), _brute_surface(truth)
    np.testing.assert_array_equal(sm.surface_voxels(pred), surf_p)
    t2p, p2t = sm.surface_distances_mm(pred, truth, spacing)
    np.testing.assert_allclose(t2p, _brute_distances(surf_t, surf_p, np.array(spacing)), rtol=1e-9)
    np.testing.assert_allclose(p2t, _brute_distances(surf_p, surf_t, np.array(spacing)), rtol=1e-9)
    expected_hd = max(t2p.max(), p2t.max())
    assert sm.hausdorff_mm(pred, truth, spacing) == pytest.approx(expected_hd)


def test_accepts_torch_and_2d_masks():
    a = torch.zeros(8, 8, dtype=torch.uint8)
    b = torch.zeros(8, 8, dtype=torch.uint8)
    a[2:6, 2:6] = 1
    b[2:6, 3:7] = 1
    assert sm.dice(a, b) == pytest.approx(0.75)  # 2*12 / 32
    assert sm.hausdorff_mm(a, b, (1.0, 2.0)) == pytest.approx(2.0)


def test_one_empty_mask_gives_limits():
    empty = np.zeros_like(BOX_A)
    m = sm.segmentation_metrics(empty, BOX_A, (1.0, 1.0, 1.0))
    assert (m.dsc, m.jaccard) == (0.0, 0.0)
    assert m.conformity == float("-inf")
    assert m.asd_mm == m.hausdorff_mm == float("inf")
    assert m.volume_error_ml == pytest.approx(-0.064)


def test_both_empty_raises():
    empty = np.zeros((4, 4, 4), dtype=bool)
    with pytest.raises(sm.EmptyMaskError, match="both empty"):
        sm.dice(empty, empty)
    with pytest.raises(ValueError, match="both empty"):
        sm.hausdorff_mm(empty, empty, (1, 1, 1))


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match=r"pred shape \(4, 4\) differs from truth shape \(4, 5\)"):
        sm.dice(np.ones((4, 4)), np.ones((4, 5)))
    with pytest.raises(ValueError, match=r"pred must be a binary mask.*0\.7"):
        sm.dice(np.full((3, 3), 0.7), np.ones((3, 3)))
    with pytest.raises(ValueError, match=r"spacing_mm must hold 3 positive.*\(1, -1, 1\)"):
        sm.hausdorff_mm(BOX_A, BOX_B, (1, -1, 1))
    with pytest.raises(ValueError, match=r"spacing_mm must hold 3.*\(1, 1\)"):
        sm.volume_ml(BOX_A, (1, 1))
