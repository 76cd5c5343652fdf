"""Femur phantoms and the ROI-cropped dataset: geometry, determinism, targets that match landmarks."""
import numpy as np
import pytest
import torch
from scipy import ndimage

from models.data import Case, load_case
from models.augment import AugmentConfig
from models.femur.dataset import (PAPER_ROI_SCALE, FemurDataset, RoiSliceDataset, crop_case, femur_augmentation,
                                  gaussian_heatmaps, mask_box)
from models.femur.roi import Box3D
from tools.phantom import generate_cases
from tools.phantoms import femur


def test_phantom_geometry():
    rng = np.random.default_rng(3)
    case = femur.generate(rng, (48, 40, 44))
    mask = case.mask.astype(bool)
    assert case.volume.shape == mask.shape == (48, 40, 44) and case.volume.dtype == np.float32
    assert ndimage.label(mask)[1] == 1                                  # one connected bone
    p1, p2 = case.landmarks["p1"], case.landmarks["p2"]
    length_mm = np.linalg.norm((p2 - p1) * case.spacing_mm)
    assert length_mm == pytest.approx(case.extra["femur_length_mm"]) and 40 <= length_mm <= 60
    # each endpoint is the tip: it lies on the mask and (almost) no bone voxel is farther out along the shaft
    axis = (p2 - p1) / np.linalg.norm(p2 - p1)
    proj = (np.argwhere(mask) - p1) @ axis
    assert proj.min() > -1.0 and proj.max() < np.linalg.norm(p2 - p1) + 1.0
    assert mask[tuple(np.round(p1).astype(int))] and mask[tuple(np.round(p2).astype(int))]
    # p1 has the bigger bulb: more bone within 2.5 radii of p1 than of p2
    grid = np.argwhere(mask)
    near = [int((np.linalg.norm(grid - p, axis=1) < 2.5 * case.extra["radius_vox"]).sum()) for p in (p1, p2)]
    assert near[0] > near[1]
    # the bone surface facing the probe (first bone voxel along the beam, axis 0) is brighter than tissue
    facing = mask & (np.cumsum(mask, axis=0) == 1)
    assert case.volume[facing].mean() > case.volume[~mask].mean() + 0.1


def test_phantom_shadow_darkens_below_bone():
    shape = (40, 40, 40)
    darker = []
    for seed in range(4):
        case = femur.generate(np.random.default_rng(seed), shape)
        mask = case.mask.astype(bool)
        behind = (np.cumsum(mask, axis=0) > 0) & ~mask                 # beyond the bone along the beam (axis 0)
        before = ~(np.cumsum(mask, axis=0) > 0)
        darker.append(case.volume[behind].mean() < case.volume[before].mean())
    assert all(darker)


def test_phantom_is_deterministic_per_seed():
    a = femur.generate(np.random.default_rng(7), (32, 32, 32))
    b = femur.generate(np.random.default_rng(7), (32, 32, 32))
    c = femur.generate(np.random.default_rng(8), (32, 32, 32))
    assert np.array_equal(a.volume, b.volume) and np.array_equal(a.landmarks["p1"], b.landmarks["p1"])
    assert not np.array_equal(a.mask, c.mask)
    with pytest.raises(ValueError, match=r"too small"):
        femur.generate(np.random.default_rng(0), (8, 32, 32))


def test_gaussian_heatmaps_peak_and_width():
    h = gaussian_heatmaps((9, 8, 7), np.array([[4.0, 3.0, 2.0], [0.0, 7.0, 6.0]]), sigma_vox=1.5)
    assert h.shape == (2, 9, 8, 7)
    assert np.unravel_index(h[0].argmax(), h[0].shape) == (4, 3, 2) and h[0, 4, 3, 2] == 1.0
    assert h[0, 6, 3, 2] == pytest.approx(np.exp(-4 / (2 * 1.5 ** 2)))
    assert np.unravel_index(h[1].argmax(), h[1].shape) == (0, 7, 6)


def test_crop_case_moves_landmarks_and_affine():
    v = np.random.default_rng(0).random((10, 12, 14)).astype(np.float32)
    case = Case("c", v, (0.5, 1.0, 2.0), (v > 0.5).astype(np.uint8), {"p1": np.array([5.0, 6.0, 7.0])})
    box = Box3D((2, 3, 4), (8, 10, 12))
    out = crop_case(case, box)
    assert np.array_equal(out.volume, v[2:8, 3:10, 4:12]) and out.mask.shape == (6, 7, 8)
    assert out.landmarks["p1"].tolist() == [3.0, 3.0, 3.0]
    # the landmark keeps its world position
    assert np.allclose(out.landmarks_mm()["p1"], case.landmarks_mm()["p1"])
    with pytest.raises(ValueError, match=r"mask is empty"):
        mask_box(np.zeros((4, 4, 4)))


def test_dataset_samples_match_their_landmarks(tmp_path):
    generate_cases("femur", tmp_path, count=2, seed=0, shape=(32, 32, 32))
    data = FemurDataset(tmp_path, (16, 16, 24), roi_margin_vox=3, sigma_vox=1.5)
    s = data[1]
    assert s["image"].shape == (1, 16, 16, 24) and s["labels"].shape == (16, 16, 24)
    assert s["heatmaps"].shape == (2, 16, 16, 24) and s["landmarks"].shape == (2, 3)
    assert abs(float(s["image"].mean())) < 1e-4 and 0 < int(s["labels"].sum()) < s["labels"].numel()
    for k in range(2):   # heatmap peak within half a voxel of the landmark
        peak = np.unravel_index(int(s["heatmaps"][k].argmax()), (16, 16, 24))
        assert np.abs(np.array(peak) - s["landmarks"][k].numpy()).max() <= 0.5
    # the ROI patch keeps physical length: femur length in mm equals the full case's
    full = load_case(tmp_path, data.case_ids[1])
    length_full = np.linalg.norm((full.landmarks["p2"] - full.landmarks["p1"]) * full.spacing_mm)
    length_patch = float(torch.linalg.norm((s["landmarks"][1] - s["landmarks"][0]) * s["spacing_mm"]))
    assert length_patch == pytest.approx(length_full, rel=1e-5)
    # flips keep image, labels, heatmaps and landmarks consistent
    flipped = FemurDataset(tmp_path, (16, 16, 24), roi_margin_vox=3, sigma_vox=1.5,
                           augment=AugmentConfig(flip_axes=(1, 2)), seed=1)
    for _ in range(3):
        f = flipped[1]
        for k in range(2):
            peak = np.unravel_index(int(f["heatmaps"][k].argmax()), (16, 16, 24))
            assert np.abs(np.array(peak) - f["landmarks"][k].numpy()).max() <= 0.5
        assert int(f["labels"].sum()) == int(s["labels"].sum())
    # the paper's scaling and rotation: targets still sit on the moved landmarks, the mask moves along
    moved = FemurDataset(tmp_path, (16, 16, 24), roi_margin_vox=3, sigma_vox=1.5, augment=femur_augmentation(), seed=2)
    for _ in range(3):
        f = moved[1]
        for k in range(2):
            p = f["landmarks"][k].numpy()
            if np.all(p >= 0) and np.all(p <= np.array([15, 15, 23])):
                peak = np.unravel_index(int(f["heatmaps"][k].argmax()), (16, 16, 24))
                assert np.abs(np.array(peak) - p).max() <= 0.5
        assert 0.6 < int(f["labels"].sum()) / int(s["labels"].sum()) < 1.6
    slices = RoiSliceDataset(tmp_path, (16, 16, 16))
    assert len(slices) == 32 and slices[5][0].shape == (1, 16, 16)


def test_rois_are_rescaled_by_0_65_keeping_their_aspect_and_smaller_than_the_volume(tmp_path):
    """§3: "the femur ROI is rescaled as 0.65 times"; the phantoms' ROIs are a part of their volume."""
    generate_cases("femur", tmp_path, count=3, seed=4, shape=(64, 64, 48))
    data = FemurDataset(tmp_path, roi_scale=PAPER_ROI_SCALE, roi_margin_vox=4)
    shapes = []
    for i, cid in enumerate(data.case_ids):
        full = load_case(tmp_path, cid)
        box = mask_box(full.mask, 4)
        roi_shape = tuple(b - a for a, b in zip(box.start, box.stop))
        assert np.prod(roi_shape) < 0.75 * np.prod(full.shape)                 # smaller than the volume
        case = data.case(i)
        assert case.shape == tuple(max(2, round(n * 0.65)) for n in roi_shape)  # uniform 0.65, not a fixed cube
        shapes.append(case.shape)
    assert data.input_size == tuple(-(-max(s[k] for s in shapes) // 8) * 8 for k in range(3))
    s = data[0]
    assert s["image"].shape[1:] == data.input_size and s["labels"][shapes[0][0]:].sum() == 0    # zero padding


def test_dataset_errors_name_the_file(tmp_path):
    generate_cases("femur", tmp_path, count=1, seed=0, shape=(16, 16, 16))
    (tmp_path / "femur_0000_mask.nii.gz").unlink()
    with pytest.raises(ValueError, match=r"femur_0000_mask\.nii\.gz: missing"):
        FemurDataset(tmp_path, (16, 16, 16))[0]
