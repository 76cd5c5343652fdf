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
    ds = FaceDataset(tmp_path, (32, 32, 32))
    sample = ds[1]
    expected = generate(np.random.default_rng([3, 1]), (32, 32, 32))
    assert sample["image"].shape == (1, 32, 32, 32)
    assert torch.allclose(sample["landmarks"].double(),
                          torch.tensor(np.stack([expected.landmarks[n] for n in LANDMARKS])), atol=1e-5)
    assert sample["spacing_mm"].tolist() == pytest.approx([FOV_MM / 32] * 3)


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
