"""PoseDataset: targets sit on the landmarks after resampling and after the 90 degree augmentation."""
import numpy as np
import pytest

from models.augment import AugmentConfig
from models.pose.dataset import PoseDataset, mirror_order, v2_augmentation
from models.pose.heatmaps import decode_argmax
from models.pose.landmarks import FETUSMAP_LANDMARKS, V2_NAMES
from models.pose.lr_rule import side_angle
from tools.phantom import generate_cases


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("pose")
    generate_cases("pose", d, count=3, seed=11, shape=(40, 32, 32))
    return d


def test_sample_targets_match_landmarks(data_dir):
    ds = PoseDataset(data_dir, (32, 24, 24))
    s = ds[1]
    assert s["image"].shape == (1, 32, 24, 24) and s["heatmaps"].shape == (22, 32, 24, 24)
    np.testing.assert_allclose(decode_argmax(s["heatmaps"]).numpy(), s["landmarks_vox"].round().numpy())
    case = ds.case(1)
    assert s["landmarks_vox"][0].tolist() == pytest.approx(case.landmarks[V2_NAMES[0]].tolist(), abs=1e-5)
    pts, size = s["landmarks_vox"].numpy(), np.array([32, 24, 24])
    inside = [i for i, p in enumerate(pts) if np.all(p >= 6) and np.all(p <= size - 7)]     # 3 sigma from faces
    assert inside
    for i in inside:
        assert float(s["heatmaps"][i].sum()) == pytest.approx(1.0, abs=1e-3)


def test_fetusmap_targets_are_peak_one_in_its_order(data_dir):
    ds = PoseDataset(data_dir, (32, 24, 24), landmarks=FETUSMAP_LANDMARKS, normalized_heatmaps=False)
    s = ds[0]
    assert s["heatmaps"].shape[0] == 16 and float(s["heatmaps"].amax()) <= 1.0 + 1e-6
    assert s["landmarks_vox"][3].tolist() == pytest.approx(ds.case(0).landmarks["l_shoulder"].tolist(), abs=1e-5)


def test_v2_augmentation_turns_every_plane_of_a_non_cubic_grid_and_scales(data_dir):
    """V2: quarter turns in any plane (resized back when the sides differ) and scaling; targets follow."""
    plain = PoseDataset(data_dir, (32, 24, 16))
    aug = PoseDataset(data_dir, (32, 24, 16), augment=v2_augmentation(), seed=3)
    ref = plain[2]
    moved = 0
    for _ in range(8):
        s = aug[2]
        assert s["image"].shape == (1, 32, 24, 16) and s["heatmaps"].shape == (22, 32, 24, 16)
        pts = s["landmarks_vox"].numpy()
        np.testing.assert_allclose(decode_argmax(s["heatmaps"]).numpy(), np.clip(np.round(pts), 0, [31, 23, 15]))
        moved += not np.allclose(pts, ref["landmarks_vox"].numpy(), atol=1e-3)
        assert float(side_angle(pts.astype(float), 10, 13)) <= 0      # turns and zooms keep handedness
    assert moved >= 6


def test_fetusmap_flips_swap_left_and_right_labels(data_dir):
    """A mirror makes the left arm look like a right one: FetusMap's flips swap the l_/r_ channels."""
    config = AugmentConfig(flip_axes=(0,), flip_p=1.0, mirror_order=mirror_order(FETUSMAP_LANDMARKS))
    plain = PoseDataset(data_dir, (32, 24, 24), landmarks=FETUSMAP_LANDMARKS, normalized_heatmaps=False)
    flipped = PoseDataset(data_dir, (32, 24, 24), landmarks=FETUSMAP_LANDMARKS, normalized_heatmaps=False,
                          augment=config)
    a, b = plain[0]["landmarks_vox"].numpy(), flipped[0]["landmarks_vox"].numpy()
    ls, rs = FETUSMAP_LANDMARKS.channel("l_shoulder"), FETUSMAP_LANDMARKS.channel("r_shoulder")
    crown = FETUSMAP_LANDMARKS.channel("crown")
    np.testing.assert_allclose(b[ls], [31 - a[rs][0], a[rs][1], a[rs][2]], atol=1e-5)
    np.testing.assert_allclose(b[crown], [31 - a[crown][0], a[crown][1], a[crown][2]], atol=1e-5)
    assert np.isclose(flipped[0]["image"][0, 31 - 5, 7, 9], plain[0]["image"][0, 5, 7, 9])


def test_scale_ratio_keeps_aspect_and_pads_to_one_grid(tmp_path):
    """FetusMap: each volume downsampled by the ratio, zero-padded at the far end to the largest case."""
    generate_cases("pose", tmp_path, count=1, seed=1, shape=(40, 32, 24))
    generate_cases("pose", tmp_path / "b", count=1, seed=2, shape=(24, 48, 32))
    for f in (tmp_path / "b").iterdir():
        f.rename(tmp_path / f.name.replace("pose_0000", "pose_0001"))
    ds = PoseDataset(tmp_path, None, scale_ratio=0.5, multiple=8)
    assert ds.input_size == (24, 24, 16)                  # max of (20,16,12)->(24,16,16) and (12,24,16)->(16,24,16)
    s = ds[1]
    assert s["image"].shape == (1, 24, 24, 16)
    case = ds.case(1)
    assert case.shape == (12, 24, 16)
    assert float(s["image"][0, 12:].abs().sum()) == 0.0   # the padding
    full = ds.case(0)
    np.testing.assert_allclose(s["landmarks_vox"].numpy(), case.landmark_array(V2_NAMES), atol=1e-5)
    assert full.spacing_mm[0] == pytest.approx(2 * 39 / 38 * load_spacing(tmp_path, "pose_0000"), rel=1e-6)


def load_spacing(directory, case_id):
    from models.data import load_case
    return load_case(directory, case_id).spacing_mm[0]
