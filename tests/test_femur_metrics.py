"""Femur metrics against known shapes (two offset spheres) and hand-computed endpoint errors."""
import math

import numpy as np
import pytest

from models.femur.metrics import (FemurMetrics, endpoint_error_mm, femur_length_mm, femur_metrics, length_error_mm,
                                  summarize)


def _sphere(shape, center, radius):
    grid = np.ogrid[tuple(slice(0, n) for n in shape)]
    return sum((g - c) ** 2 for g, c in zip(grid, center)) <= radius ** 2


def test_two_offset_spheres():
    r, d = 8, 4
    a = _sphere((40, 40, 40), (18, 20, 20), r)
    b = _sphere((40, 40, 40), (18 + d, 20, 20), r)      # the same sphere shifted by d voxels
    spacing = (0.5, 1.0, 1.0)
    points = np.array([[18.0, 20, 12], [18.0, 20, 28]])
    m = femur_metrics(a, b, points, points, spacing)
    # continuous truth: lens volume pi (4r + d)(2r - d)^2 / 12 over the sphere volume; voxelised within 3 %
    lens = math.pi * (4 * r + d) * (2 * r - d) ** 2 / 12
    assert m.dsc == pytest.approx(lens / (4 / 3 * math.pi * r ** 3), abs=0.03)
    n_both = int((a & b).sum())                                     # brute-force counts
    assert m.dsc == pytest.approx(2 * n_both / (a.sum() + b.sum()), rel=1e-12)
    assert m.jaccard == pytest.approx(n_both / (a | b).sum(), rel=1e-12)
    # a pure shift by d voxels along axis 0 (0.5 mm): the Hausdorff distance is the shift, 2 mm
    assert m.hausdorff_mm == pytest.approx(d * spacing[0], abs=0.25)
    assert 0 < m.asd_mm < m.hausdorff_mm
    assert m.volume_error_ml == 0.0                                 # same voxel count
    assert (m.p1_error_mm, m.p2_error_mm, m.length_error_mm) == (0.0, 0.0, 0.0)


def test_volume_error_in_ml():
    a = np.zeros((10, 10, 10), bool)
    b = a.copy()
    a[:5, :4, :2] = True       # 40 voxels
    b[:5, :4, :3] = True       # 60 voxels
    pts = np.zeros((2, 3))
    m = femur_metrics(a, b, pts, pts, (2.0, 2.0, 2.5))             # 10 mm^3 per voxel
    assert m.volume_error_ml == pytest.approx(20 * 10 / 1000)


def test_endpoint_and_length_errors_by_hand():
    spacing = (0.5, 1.0, 2.0)
    assert endpoint_error_mm([0, 0, 0], [6, 8, 0], (0.5, 0.75, 1.0)) == pytest.approx(math.hypot(3, 6))
    true = np.array([[0.0, 0, 0], [0, 0, 10]])                      # length 20 mm
    pred = np.array([[2.0, 0, 0], [0, 0, 12]])                      # p1 off 1 mm, p2 off 4 mm, length sqrt(1+576)
    assert femur_length_mm(*true, spacing) == pytest.approx(20.0)
    assert length_error_mm(pred, true, spacing) == pytest.approx(math.sqrt(1 + 24 ** 2) - 20)
    m = femur_metrics(np.ones((3, 3, 3)), np.ones((3, 3, 3)), pred, true, spacing)
    assert (m.p1_error_mm, m.p2_error_mm) == pytest.approx((1.0, 4.0))
    assert m.dsc == 1.0 and m.hausdorff_mm == 0.0


def test_metric_input_errors_and_summary():
    with pytest.raises(ValueError, match=r"spacing_mm must be 3 positive values"):
        endpoint_error_mm([0, 0, 0], [1, 1, 1], (1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match=r"\(2, 3\) arrays"):
        length_error_mm(np.zeros((3, 3)), np.zeros((2, 3)), (1, 1, 1))
    with pytest.raises(ValueError, match=r"no cases"):
        summarize([])
    rows = [FemurMetrics(0.8, 0.7, 1.0, 3.0, 0.5, 1.0, 2.0, 0.5), FemurMetrics(0.9, 0.8, 2.0, 5.0, 1.5, 3.0, 4.0, 1.5)]
    s = summarize(rows)
    assert s["dsc"] == pytest.approx((0.85, 0.05)) and s["hausdorff_mm"] == pytest.approx((4.0, 1.0))
