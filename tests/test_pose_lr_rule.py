"""V2 Eq. 7: sides of the limb groups from head landmarks 1, 4, 6."""
import numpy as np
import pytest

from models.pose.landmarks import V2_LANDMARKS, V2_NAMES
from models.pose.lr_rule import assign_sides, side_angle
from tools.phantoms.common import random_rotation
from tools.phantoms.pose import generate

L_ARM, R_ARM = list(range(10, 13)), list(range(13, 16))
L_LEG, R_LEG = list(range(16, 19)), list(range(19, 22))


def _constructed_pose():
    """Upright fetus facing +y: crown on top, nasal bone in front, hind neck behind; left is -x... computed."""
    p = np.zeros((22, 3))
    p[V2_LANDMARKS.channel("crown")] = [0, 0, 10]
    p[V2_LANDMARKS.channel("nasal_bone")] = [0, 4, 7]
    p[V2_LANDMARKS.channel("hind_neck")] = [0, -3, 5]
    # normal = (4, -3 ... ) : V14 = (0, 4, -3), V16 = (0, -3, -5); V14 x V16 = (4*-5 - (-3)(-3), 0, 0) = (-29, 0, 0)
    # so the fetus's left is -x here: Ang = -29 * (x_s2 - x_s1) <= 0 when s1 has the smaller x
    for group, x in ((L_ARM, -3.0), (R_ARM, 3.0), (L_LEG, -2.0), (R_LEG, 2.0)):
        for k, i in enumerate(group):
            p[i] = [x * (1 + 0.1 * k), 1.0 + k, 2.0 - 3 * k]
    return p


def test_ang_by_hand():
    p = _constructed_pose()
    # V_{11->14} = (3 - (-3), 0, 0): Ang = -29 * 6
    assert float(side_angle(p, 10, 13)) == pytest.approx(-29 * 6)
    assert float(side_angle(p, 13, 10)) == pytest.approx(29 * 6)


def test_correct_pose_is_kept_and_swapped_groups_are_restored():
    p = _constructed_pose()
    np.testing.assert_array_equal(assign_sides(p), p)
    swapped = p.copy()
    swapped[L_ARM], swapped[R_ARM] = p[R_ARM], p[L_ARM]
    np.testing.assert_array_equal(assign_sides(swapped), p)
    both = swapped.copy()
    both[L_LEG], both[R_LEG] = p[R_LEG], p[L_LEG]
    np.testing.assert_array_equal(assign_sides(both), p)


def test_rule_is_invariant_to_rotation_translation_and_positive_scaling():
    p = _constructed_pose()
    rng = np.random.default_rng(0)
    for _ in range(10):
        q = p @ random_rotation(rng).T * rng.uniform(0.5, 2, 3) + rng.normal(0, 20, 3)
        swapped = q.copy()
        swapped[L_ARM], swapped[R_ARM] = q[R_ARM], q[L_ARM]
        np.testing.assert_allclose(assign_sides(swapped), q)


def test_a_mirrored_pose_gets_its_sides_swapped():
    """A reflection flips handedness: the rule must then call the groups the other way (it can fail)."""
    p = _constructed_pose() * np.array([-1.0, 1.0, 1.0])
    out = assign_sides(p)
    np.testing.assert_array_equal(out[L_ARM], p[R_ARM])
    np.testing.assert_array_equal(out[L_LEG], p[R_LEG])


def test_batched_points_decided_per_case():
    p = _constructed_pose()
    swapped = p.copy()
    swapped[L_ARM], swapped[R_ARM] = p[R_ARM], p[L_ARM]
    np.testing.assert_array_equal(assign_sides(np.stack([p, swapped])), np.stack([p, p]))


def test_phantom_poses_obey_the_rule():
    for seed in range(40):
        case = generate(np.random.default_rng(seed), (24, 24, 24))
        p = np.stack([case.landmarks[n] for n in V2_NAMES])
        scrambled = p.copy()
        scrambled[L_ARM], scrambled[R_ARM] = p[R_ARM], p[L_ARM]
        np.testing.assert_array_equal(assign_sides(scrambled), p)


def test_eq7_in_world_coordinates_keeps_a_perfect_prediction_on_a_mirrored_grid(tmp_path):
    """A NIfTI whose affine mirrors (det < 0) stores a mirror-image fetus in voxel space: Eq. 7 read on
    voxels swaps the sides of a perfect prediction, read in world coordinates it keeps them."""
    import torch
    from models.pose.dataset import PoseDataset
    from models.pose.heatmaps import gaussian_heatmaps
    from models.pose.train import predict_landmarks
    from tools.phantom import generate_cases
    generate_cases("pose", tmp_path, count=2, seed=4, shape=(32, 32, 32), mirrored="odd")
    ds = PoseDataset(tmp_path, (32, 32, 32))
    for index, mirrored in ((0, False), (1, True)):
        s = ds[index]
        assert (np.linalg.det(s["affine"].numpy()[:3, :3]) < 0) == mirrored
        truth = s["landmarks_vox"].numpy().astype(float)
        perfect = lambda image: gaussian_heatmaps(torch.from_numpy(truth), (32, 32, 32))[None]   # noqa: E731
        world = predict_landmarks(perfect, s["image"][None], "v2", s["affine"].numpy())[0]
        voxel = predict_landmarks(perfect, s["image"][None], "v2")[0]
        np.testing.assert_allclose(world, np.round(truth))
        swapped = not np.allclose(voxel, np.round(truth))
        assert swapped == mirrored
        if mirrored:                                 # exactly the two limb pairs changed places
            np.testing.assert_allclose(voxel[L_ARM], np.round(truth)[R_ARM])
            np.testing.assert_allclose(voxel[L_LEG], np.round(truth)[R_LEG])


def test_assign_sides_with_one_affine_per_sample():
    p = _constructed_pose()
    mirror = np.diag([-1.0, 1.0, 1.0, 1.0])
    batch = np.stack([p, p])
    out = assign_sides(batch, frame=np.stack([np.eye(4), mirror]))
    np.testing.assert_array_equal(out[0], p)
    np.testing.assert_array_equal(out[1][L_ARM], p[R_ARM])       # read through a mirror, the sides swap
