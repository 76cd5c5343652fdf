"""Distance error, PCK/AUC and Table 8 measures on hand-computed examples."""
import re

import numpy as np
import pytest

from models.pose.landmarks import V2_LANDMARKS
from models.pose.metrics import (Plane, clinical_measures, crown_rump_length, distance_errors_mm, fit_plane,
                                 long_bone_lengths, pck_auc, pck_curve, plane_errors, summarize)


def test_distance_error_uses_spacing():
    pred = np.array([[[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]]])
    true = np.array([[[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]])
    # (0, 2, 3) voxels at spacing (1, 2, 0.5) mm -> (0, 4, 1.5) mm
    np.testing.assert_allclose(distance_errors_mm(pred, true, [1.0, 2.0, 0.5]), [[np.hypot(4, 1.5), 0.0]])


def test_pck_curve_by_hand():
    errors = np.array([[1.0, 5.0], [3.0, 25.0], [10.0, 0.0], [2.0, 4.0]])       # 4 cases x 2 landmarks
    np.testing.assert_allclose(pck_curve(errors, [0.0, 2.0, 5.0, 20.0]),
                               [[0.0, 0.25], [0.5, 0.25], [0.75, 0.75], [1.0, 0.75]])


def test_auc_equals_the_numerical_area_under_pck():
    rng = np.random.default_rng(0)
    errors = rng.gamma(2.0, 3.0, (50, 4))
    t = np.linspace(0, 20, 200001)
    curve = pck_curve(errors, t)
    numeric = ((curve[1:] + curve[:-1]) / 2 * np.diff(t)[:, None]).sum(0) / 20
    np.testing.assert_allclose(pck_auc(errors), numeric, atol=1e-4)
    assert pck_auc(np.zeros((3, 1)))[0] == 1.0 and pck_auc(np.full((3, 1), 50.0))[0] == 0.0
    with pytest.raises(ValueError, match="must be positive"):
        pck_auc(errors, max_mm=0)


def _pose():
    p = np.zeros((22, 3))
    ch = V2_LANDMARKS.channel
    p[ch("crown")], p[ch("rump")] = [0, 0, 50], [0, 30, 10]                   # CRL 50
    p[ch("l_shoulder")], p[ch("l_elbow")] = [5, 5, 5], [5, 8, 9]              # humerus 5
    p[ch("r_shoulder")], p[ch("r_elbow")] = [0, 0, 0], [0, 0, 7]
    p[ch("l_hip")], p[ch("l_knee")] = [1, 1, 1], [1, 7, 9]                    # femur 10
    p[ch("r_hip")], p[ch("r_knee")] = [0, 0, 0], [12, 0, 0]
    for k, n in enumerate(("forehead", "chin", "nasal_bone", "occiput", "hind_neck")):
        p[ch(n)] = [0, 3 * k - 4, 40 + k * (k % 2)]                           # head on the plane x = 0
    return p


def test_crl_and_long_bones_by_hand():
    p = _pose()
    assert float(crown_rump_length(p)) == pytest.approx(50.0)
    assert {k: float(v) for k, v in long_bone_lengths(p).items()} == pytest.approx(
        {"l_humerus": 5.0, "r_humerus": 7.0, "l_femur": 10.0, "r_femur": 12.0})


def test_plane_fit_and_errors_by_hand():
    plane = fit_plane(np.array([[0, 0, 2.0], [1, 0, 2], [0, 1, 2], [3, 5, 2]]))
    assert abs(plane.normal[2]) == pytest.approx(1.0) and plane.point[2] == pytest.approx(2.0)
    tilted = Plane(np.array([0.0, 0, 0]), np.array([0.0, 1.0, 1.0]) / np.sqrt(2))
    dist, angle = plane_errors(tilted, plane)
    # the true centroid (1, 1.5, 2) lies (1.5 + 2) / sqrt(2) from the tilted plane, normals 45 degrees apart
    assert dist == pytest.approx(3.5 / np.sqrt(2)) and angle == pytest.approx(45.0)
    flipped = Plane(plane.point, -plane.normal)
    assert plane_errors(flipped, plane) == pytest.approx((0.0, 0.0))
    with pytest.raises(ValueError, match="collinear"):
        fit_plane(np.array([[0, 0, 0], [1, 1, 1], [2, 2, 2.0]]))


def test_clinical_measures_of_a_shifted_and_stretched_prediction():
    true = _pose()
    pred = true.copy()
    ch = V2_LANDMARKS.channel
    pred[ch("rump")] += [0, 0, -3]            # CRL 50 -> |(0, 30, -43)| ... computed below
    pred[ch("l_elbow")] = [5, 5, 5 + 7]       # humerus 5 -> 7
    pred[:6] += [4, 0, 0]                     # the head plane moves 4 mm along its normal
    m = clinical_measures(pred, true)
    crl_pred = np.linalg.norm(pred[ch("crown")] - pred[ch("rump")])
    assert m["crl_mm"] == pytest.approx(abs(crl_pred - 50.0))
    assert m["l_humerus_mm"] == pytest.approx(2.0) and m["r_femur_mm"] == pytest.approx(0.0)
    assert m["midsagittal_distance_mm"] == pytest.approx(4.0) and m["midsagittal_angle_deg"] == pytest.approx(0.0)
    table = summarize(np.ones((2, 22)), V2_LANDMARKS.names, [m, m])
    assert "crl_mm" in table and "mean" in table


def test_collinear_predicted_plane_gives_nan_and_the_table_skips_it():
    true = _pose()
    pred = true.copy()
    pred[:6] = [[0, 0, k] for k in range(6)]                  # head landmarks on a line
    m = clinical_measures(pred, true)
    assert np.isnan(m["midsagittal_angle_deg"]) and m["crl_mm"] >= 0
    good = clinical_measures(true, true)
    table = summarize(np.ones((2, 22)), V2_LANDMARKS.names, [m, good])
    assert re.search(r"midsagittal_angle_deg\s+0\.00  \(1 undefined\)", table)
