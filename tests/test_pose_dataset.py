"""PoseDataset: targets sit on the landmarks after resampling and after the 90 degree augmentation."""
import numpy as np
import pytest
import torch

from models.pose.dataset import PoseDataset
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


def test_augmentation_rotates_image_and_targets_together(data_dir):
    torch.manual_seed(0)
    plain = PoseDataset(data_dir, (24, 24, 24))
    aug = PoseDataset(data_dir, (24, 24, 24), augment=True)
    rotated = 0
    for _ in range(6):
        s, ref = aug[2], plain[2]
        img, pts = s["image"][0].numpy(), s["landmarks_vox"].numpy()
        # the moved image holds the original's value at each moved landmark
        ref_img, ref_pts = ref["image"][0].numpy(), ref["landmarks_vox"].numpy()
        for p, q in zip(np.round(pts).astype(int), np.round(ref_pts).astype(int)):
            assert img[tuple(p)] == pytest.approx(ref_img[tuple(q)], rel=1e-4, abs=1e-5)
        np.testing.assert_allclose(decode_argmax(s["heatmaps"]).numpy(), np.round(pts))
        rotated += not np.allclose(pts, ref_pts)
        assert float(side_angle(pts.astype(float), 10, 13)) <= 0      # a rotation keeps handedness
    assert rotated > 0
