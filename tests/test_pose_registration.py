"""Landmark registration (Umeyama) and the pose library's top-K retrieval."""
import numpy as np
import pytest

from models.data import save_case, Case
from models.pose.registration import PoseLibrary, fit_similarity, registration_error
from tools.phantoms.common import random_rotation


@pytest.mark.parametrize("seed", range(5))
def test_recovers_a_known_similarity(seed):
    rng = np.random.default_rng(seed)
    src = rng.normal(0, 10, (5, 3))
    rot, scale, shift = random_rotation(rng), rng.uniform(0.5, 2.0), rng.normal(0, 30, 3)
    dst = scale * src @ rot.T + shift
    t = fit_similarity(src, dst)
    np.testing.assert_allclose(t.rotation, rot, atol=1e-9)
    assert t.scale == pytest.approx(scale)
    np.testing.assert_allclose(t.translation, shift, atol=1e-8)
    assert registration_error(t, src, dst) == pytest.approx(0.0, abs=1e-8)


def test_rigid_fit_keeps_scale_one_and_recovers_rotation():
    rng = np.random.default_rng(9)
    src = rng.normal(0, 10, (10, 3))
    rot, shift = random_rotation(rng), rng.normal(0, 5, 3)
    t = fit_similarity(src, src @ rot.T + shift, with_scale=False)
    assert t.scale == 1.0
    np.testing.assert_allclose(t.rotation, rot, atol=1e-9)


def test_least_squares_under_noise_beats_the_truth_on_its_own_points():
    rng = np.random.default_rng(1)
    src = rng.normal(0, 10, (6, 3))
    rot, shift = random_rotation(rng), rng.normal(0, 5, 3)
    dst = src @ rot.T + shift + rng.normal(0, 0.5, (6, 3))
    t = fit_similarity(src, dst)
    ss = lambda r, s, tr: ((s * src @ r.T + tr - dst) ** 2).sum()      # noqa: E731
    assert ss(t.rotation, t.scale, t.translation) <= ss(rot, 1.0, shift) + 1e-9
    np.testing.assert_allclose(t.rotation, rot, atol=0.05)


def test_bad_point_sets():
    with pytest.raises(ValueError, match=r"N >= 3"):
        fit_similarity(np.zeros((2, 3)), np.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"\(4, 3\) and \(5, 3\)"):
        fit_similarity(np.zeros((4, 3)), np.zeros((5, 3)))


def test_library_retrieves_the_matching_atlases_aligned():
    rng = np.random.default_rng(2)
    base = rng.normal(0, 20, (6, 3))
    others = [base + rng.normal(0, 6, (6, 3)) for _ in range(5)]
    poses = np.stack([*others[:2], base, *others[2:]])                      # the true shape is atlas 2
    lib = PoseLibrary(tuple("abcdef"), poses)
    rot, shift = random_rotation(rng), rng.normal(0, 50, 3)
    target = 1.3 * base @ rot.T + shift
    aligned = lib.align(target, [0, 1, 2, 3], k=2)
    assert aligned.indices[0] == 2 and aligned.errors_mm[0] == pytest.approx(0.0, abs=1e-7)
    assert aligned.errors_mm[1] > 1.0
    np.testing.assert_allclose(aligned.poses[0], target, atol=1e-7)      # all channels mapped, not just 0..3
    with pytest.raises(ValueError, match="K = 7 atlases requested from a library of 6"):
        lib.align(target, [0, 1, 2], k=7)


def test_library_from_directory_and_json_round_trip(tmp_path):
    for i in range(3):
        lm = {"p": np.array([i, 0.0, 0.0]), "q": np.array([0.0, 2.0, 0.0])}
        save_case(tmp_path, Case(f"c{i}", np.zeros((4, 4, 4), np.float32), (2.0, 1.0, 1.0), landmarks=lm))
    lib = PoseLibrary.from_directory(tmp_path, ["q", "p"])
    assert lib.poses.shape == (3, 2, 3)
    np.testing.assert_allclose(lib.poses[2], [[0, 2, 0], [4, 0, 0]])             # mm = voxel * spacing
    lib.save(tmp_path / "lib.json")
    np.testing.assert_allclose(PoseLibrary.load(tmp_path / "lib.json").poses, lib.poses)
    with pytest.raises(ValueError, match=r"landmarks \['zz'\] missing"):
        PoseLibrary.from_directory(tmp_path, ["p", "zz"])
