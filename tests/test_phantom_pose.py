"""tools.phantom CLI, tools.phantoms.common primitives and the fetal-pose phantom."""
import itertools
import time

import numpy as np
import pytest

from models.data import list_cases, load_case
from models.pose.landmarks import V2_NAMES
from tools import phantom
from tools.phantoms import common
from tools.phantoms.pose import generate


def _brute_capsule(shape, a, b, r):
    a, b = np.asarray(a, float), np.asarray(b, float)
    out = np.zeros(shape, bool)
    for idx in itertools.product(*map(range, shape)):
        p = np.asarray(idx, float)
        t = np.clip((p - a) @ (b - a) / ((b - a) @ (b - a)), 0, 1)
        out[idx] = np.linalg.norm(p - a - t * (b - a)) <= r
    return out


def test_capsule_matches_brute_force():
    shape = (12, 10, 9)
    a, b, r = (2.3, 1.5, 4.0), (9.1, 7.7, 3.2), 2.2
    np.testing.assert_array_equal(common.rasterize_capsule(shape, a, b, r), _brute_capsule(shape, a, b, r))


def test_rotated_ellipsoid_matches_brute_force():
    rot = common.random_rotation(np.random.default_rng(3))
    shape, c, radii = (13, 11, 12), np.array([6.2, 5.1, 5.9]), np.array([5.0, 2.0, 3.0])
    grid = np.stack(np.meshgrid(*map(np.arange, shape), indexing="ij"), -1) - c
    brute = (((grid @ rot) / radii) ** 2).sum(-1) <= 1
    np.testing.assert_array_equal(common.rasterize_ellipsoid(shape, c, radii, rot), brute)


def test_shapes_outside_volume_are_empty():
    assert not common.rasterize_capsule((5, 5, 5), (20, 20, 20), (30, 30, 30), 1).any()
    assert not common.rasterize_ellipsoid((5, 5, 5), (-9, -9, -9), (1, 1, 1)).any()


def test_acoustic_shadow_darkens_only_behind_occluder():
    vol = np.ones((6, 2, 2), np.float32)
    occ = np.zeros_like(vol, bool)
    occ[2, 0, 0] = True
    out = common.acoustic_shadow(vol, occ, axis=0, attenuation=0.5)
    np.testing.assert_allclose(out[:, 0, 0], [1, 1, 1, np.exp(-0.5), np.exp(-0.5), np.exp(-0.5)], rtol=1e-6)
    np.testing.assert_array_equal(out[:, 1, 1], 1.0)
    back = common.acoustic_shadow(vol, occ, axis=0, reverse=True, attenuation=0.5)
    np.testing.assert_allclose(back[:, 0, 0], [np.exp(-0.5), np.exp(-0.5), 1, 1, 1, 1], rtol=1e-6)


def test_speckle_is_multiplicative_with_unit_mean():
    rng = np.random.default_rng(0)
    out = common.speckle(np.full((24, 24, 24), 2.0, np.float32), rng, strength=1.0)
    assert out.mean() == pytest.approx(2.0, rel=0.02) and out.std() > 0.1
    assert not common.speckle(np.zeros((8, 8, 8), np.float32), rng).any()


def test_random_rotation_is_proper():
    r = common.random_rotation(np.random.default_rng(1))
    np.testing.assert_allclose(r @ r.T, np.eye(3), atol=1e-12)
    assert np.linalg.det(r) == pytest.approx(1.0)


def test_generate_is_seeded_and_varied():
    a = generate(np.random.default_rng(7), (32, 32, 32))
    b = generate(np.random.default_rng(7), (32, 32, 32))
    c = generate(np.random.default_rng(8), (32, 32, 32))
    np.testing.assert_array_equal(a.volume, b.volume)
    assert not np.array_equal(a.volume, c.volume)
    assert not np.allclose(a.landmarks["l_wrist"], c.landmarks["l_wrist"])


def test_generate_anatomy_and_speed():
    start = time.perf_counter()
    case = generate(np.random.default_rng(0), (64, 64, 64))
    assert time.perf_counter() - start < 1.0
    assert list(case.landmarks) == list(V2_NAMES)
    pts = np.stack(list(case.landmarks.values()))
    assert np.all(pts >= 0) and np.all(pts <= 63)
    # joints lie in the fetus (on the long bones' ends), bone is brighter than soft tissue
    for name in ("l_elbow", "r_knee", "l_shoulder", "r_hip", "thoracic_spine"):
        i, j, k = np.round(case.landmarks[name]).astype(int)
        assert case.mask[i - 1:i + 2, j - 1:j + 2, k - 1:k + 2].max() >= 1, name
    assert case.volume[case.mask == 2].mean() > 1.5 * case.volume[case.mask == 1].mean()
    # crown-rump length in mm is in the stated range
    crl = np.linalg.norm(case.landmarks["crown"] - case.landmarks["rump"]) * case.spacing_mm[0]
    assert 30 <= crl <= 75 and crl == pytest.approx(case.extra["crl_mm"])


def test_anisotropic_shape():
    case = generate(np.random.default_rng(2), (48, 32, 32))
    assert case.volume.shape == (48, 32, 32) and case.mask.shape == (48, 32, 32)
    pts = np.stack(list(case.landmarks.values()))
    assert np.all(pts >= 0) and np.all(pts <= np.array([47, 31, 31]))


def test_cli_writes_readable_cases(tmp_path):
    assert "pose" in phantom.available_kinds() and "common" not in phantom.available_kinds()
    assert phantom.main(["pose", "--out", str(tmp_path), "--count", "2", "--seed", "3", "--shape", "24,24,32"]) == 0
    assert list_cases(tmp_path) == ["pose_0000", "pose_0001"]
    case = load_case(tmp_path, "pose_0001")
    direct = generate(np.random.default_rng([3, 1]), (24, 24, 32))
    np.testing.assert_allclose(case.volume, direct.volume)
    assert case.spacing_mm == pytest.approx(direct.spacing_mm)
    np.testing.assert_allclose(case.landmarks["crown"], direct.landmarks["crown"])
    assert set(np.unique(case.mask)) <= {0, 1, 2}


def test_cli_rejects_unknown_kind_and_bad_shape(tmp_path, capsys):
    assert phantom.main(["nosuch", "--out", str(tmp_path)]) == 2
    assert "unknown phantom kind 'nosuch'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="too small"):
        phantom.generate_cases("pose", tmp_path, count=1, seed=0, shape=(4, 4, 4))
    with pytest.raises(ValueError, match="count must be >= 1"):
        phantom.generate_cases("pose", tmp_path, count=0, seed=0)
