"""Face phantoms (NIfTI + JSON round trip, landmarks on image features) and augmentation geometry."""
import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from models.face.anchors import LANDMARKS
from models.face.dataset import FaceDataset, augment, flip_sample, rotate_sample
from tools.phantom import generate_cases
from tools.phantoms.face import FOV_MM, generate


def _mean_around(volume, point, radius=1):
    i, j, k = np.round(point).astype(int)
    return float(volume[i - radius:i + radius + 1, j - radius:j + radius + 1, k - radius:k + radius + 1].mean())


def test_phantom_shape_spacing_landmarks_and_determinism():
    a = generate(np.random.default_rng(7), (48, 40, 40))
    b = generate(np.random.default_rng(7), (48, 40, 40))
    c = generate(np.random.default_rng(8), (48, 40, 40))
    assert a.volume.shape == (48, 40, 40) and a.volume.dtype == np.float32
    assert a.spacing_mm == pytest.approx((FOV_MM / 40,) * 3)
    assert set(a.landmarks) == set(LANDMARKS)
    points = np.stack([a.landmarks[n] for n in LANDMARKS])
    assert np.all(points >= 0) and np.all(points <= np.array([47, 39, 39]))
    assert np.array_equal(a.volume, b.volume) and not np.array_equal(a.volume, c.volume)
    # eye centres ~22 mm apart at scale 0.85-1.15 (template 22 mm +- jitter)
    eyes_mm = np.linalg.norm(points[0] - points[2]) * a.spacing_mm[0]
    assert 14 < eyes_mm < 32


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_landmarks_sit_on_their_image_features(seed):
    ph = generate(np.random.default_rng(seed), (64, 64, 64))
    v, lm = ph.volume, ph.landmarks
    between_eyes = (lm["eye_left"] + lm["eye_right"]) / 2   # head tissue behind the nasal bridge
    tissue = _mean_around(v, between_eyes)
    for eye in ("eye_left", "eye_right"):
        assert _mean_around(v, lm[eye]) < 0.6 * tissue       # dark eyeball
    assert _mean_around(v, lm["chin"], 0) > 1.3 * tissue    # bright mandible tip


def test_written_cases_read_back_with_their_landmarks(tmp_path):
    generate_cases("face", tmp_path, count=2, seed=3, shape=(32, 32, 32))
    ds = FaceDataset(tmp_path, (32, 32, 32), spacing_mm=None)
    sample = ds[1]
    expected = generate(np.random.default_rng([3, 1]), (32, 32, 32))
    assert sample["image"].shape == (1, 32, 32, 32)
    assert torch.allclose(sample["landmarks"].double(),
                          torch.tensor(np.stack([expected.landmarks[n] for n in LANDMARKS])), atol=1e-5)
    assert sample["spacing_mm"].tolist() == pytest.approx([FOV_MM / 32] * 3)


def test_volumes_are_resampled_to_the_papers_1_3_mm_so_boxes_have_its_size(tmp_path):
    """A 32^3 phantom has 2.6 mm voxels: at 1.3 mm it is a 63^3 grid (31 * 2.6 / 1.3 + 1), padded to 64^3,
    landmarks doubled; the paper's 14-voxel eye box is then 18.2 mm, not 36.4 mm."""
    from models.face.anchors import target_boxes
    from models.face.dataset import box_scale_for
    generate_cases("face", tmp_path, count=1, seed=3, shape=(32, 32, 32))
    expected = generate(np.random.default_rng([3, 0]), (32, 32, 32))
    assert expected.spacing_mm[0] == pytest.approx(2.6)
    ds = FaceDataset(tmp_path, (64, 64, 64))
    sample = ds[0]
    assert sample["spacing_mm"].tolist() == pytest.approx([1.3] * 3)
    assert ds.case(0).shape == (64, 64, 64) and float(np.abs(ds.case(0).volume[63]).max()) == 0.0   # padded row
    truth = np.stack([expected.landmarks[n] for n in LANDMARKS]) * 2
    np.testing.assert_allclose(sample["landmarks"].numpy(), truth, atol=1e-4)
    eye = target_boxes(sample["landmarks"], box_scale_for(1.3))[0]
    assert float(eye[3]) * 1.3 == pytest.approx(18.2)
    cropped = FaceDataset(tmp_path, (48, 48, 48))[0]                # centred crop: origin moves by 8 voxels
    np.testing.assert_allclose(cropped["landmarks"].numpy(), truth - 8, atol=1e-4)


def test_flip_moves_image_and_swaps_eye_labels():
    image = torch.zeros(1, 10, 10, 10)
    lm = torch.tensor([[2.0, 3, 4], [5, 5, 5], [7, 3, 4], [5, 6, 7], [5, 8, 5]])
    image[0, 2, 3, 4] = 1.0                              # a mark at the left eye
    out, moved = flip_sample(image, lm, 0)
    # the mark is now at x = 9 - 2 = 7; after the mirror that point is labelled the right eye
    assert out[0, 7, 3, 4] == 1.0
    assert moved[2].tolist() == [7.0, 3.0, 4.0] and moved[0].tolist() == [2.0, 3.0, 4.0]
    assert moved[3].tolist() == [4.0, 6.0, 7.0]
    with pytest.raises(ValueError, match="axis must be"):
        flip_sample(image, lm, 3)


def test_rotation_moves_blob_with_its_landmark():
    grid = torch.stack(torch.meshgrid(*[torch.arange(24.0)] * 3, indexing="ij"), -1)
    point = torch.tensor([5.0, 17.0, 9.0])
    image = torch.exp(-((grid - point) ** 2).sum(-1) / (2 * 1.5 ** 2))[None]
    rotation = Rotation.from_rotvec([0.3, -0.4, 0.35]).as_matrix()
    out, lm = rotate_sample(image, point[None].repeat(5, 1), rotation)
    w = out[0].double()
    centroid = (w[..., None] * grid.double()).sum((0, 1, 2)) / w.sum()
    assert torch.allclose(centroid, lm[0].double(), atol=0.15)
    assert not torch.allclose(lm[0], point, atol=1.0)


def test_augment_is_seeded():
    image, lm = torch.randn(1, 16, 16, 16), torch.rand(5, 3) * 15
    a = augment(image, lm, np.random.default_rng(0))
    b = augment(image, lm, np.random.default_rng(0))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
