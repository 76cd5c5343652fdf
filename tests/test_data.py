"""models.data: the on-disk case format, its errors, resampling and the Dataset base."""
import gzip
import json

import nibabel as nib
import numpy as np
import pytest
import torch

from models.data import (Case, CaseDataset, DataError, list_cases, load_case, load_landmarks_mm, normalize_intensity,
                         parse_shape, resample_case, save_case)


def _case(case_id="c0", shape=(10, 12, 8), spacing=(0.5, 0.75, 1.0), mask=True):
    rng = np.random.default_rng(0)
    volume = rng.random(shape, dtype=np.float32)
    m = (volume > 0.5).astype(np.uint8) if mask else None
    lm = {"a": np.array([1.0, 2.5, 3.0]), "b": np.array([9.0, 11.0, 7.0])}
    return Case(case_id, volume, spacing, m, lm, {"note": "x"})


def test_round_trip_keeps_everything(tmp_path):
    save_case(tmp_path, _case())
    got = load_case(tmp_path, "c0")
    ref = _case()
    np.testing.assert_array_equal(got.volume, ref.volume)
    np.testing.assert_array_equal(got.mask, ref.mask)
    assert got.volume.dtype == np.float32 and got.mask.dtype == np.uint8
    assert got.spacing_mm == pytest.approx(ref.spacing_mm)
    assert set(got.landmarks) == {"a", "b"}
    np.testing.assert_allclose(got.landmarks["a"], [1.0, 2.5, 3.0])
    assert got.meta["note"] == "x" and got.meta["shape"] == [10, 12, 8]
    # the sidecar's mm are voxel * spacing (diagonal affine, origin 0)
    sidecar = json.loads((tmp_path / "c0.json").read_text())
    assert sidecar["landmarks"]["b"]["mm"] == pytest.approx([4.5, 8.25, 7.0])
    assert load_landmarks_mm(tmp_path, "c0")["b"] == pytest.approx([4.5, 8.25, 7.0])
    assert nib.load(str(tmp_path / "c0.nii.gz")).header.get_zooms()[:3] == pytest.approx((0.5, 0.75, 1.0))


def test_landmarks_mm_world_versus_grid_frame(tmp_path):
    affine = np.diag([-2.0, 1.0, 1.0, 1.0])                      # a flipped axis (radiological order)
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), affine), str(tmp_path / "f.nii.gz"))
    (tmp_path / "f.json").write_text(json.dumps({"spacing_mm": [2, 1, 1],
                                                 "landmarks": {"p": {"voxel": [1, 2, 3], "mm": [-2, 2, 3]}}}))
    assert load_landmarks_mm(tmp_path, "f")["p"].tolist() == [-2, 2, 3]
    assert load_landmarks_mm(tmp_path, "f", grid=True)["p"].tolist() == [2, 2, 3]
    (tmp_path / "g.json").write_text(json.dumps({"landmarks": {"p": {"mm": [1, 2, 3]}}}))
    with pytest.raises(DataError, match=r"g\.json: landmark 'p' lacks \"voxel\" and \"spacing_mm\""):
        load_landmarks_mm(tmp_path, "g", grid=True)


def test_list_cases_skips_masks_and_sorts(tmp_path):
    for cid in ("b", "a"):
        save_case(tmp_path, _case(cid))
    assert list_cases(tmp_path) == ["a", "b"]


def test_landmark_given_in_mm_only_uses_inverse_affine(tmp_path):
    affine = np.diag([2.0, 3.0, 4.0, 1.0])
    affine[:3, 3] = [10.0, 0.0, -4.0]
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), affine), str(tmp_path / "x.nii.gz"))
    (tmp_path / "x.json").write_text(json.dumps({"landmarks": {"p": {"mm": [14.0, 6.0, 4.0]}}}))
    np.testing.assert_allclose(load_case(tmp_path, "x").landmarks["p"], [2.0, 2.0, 2.0])


@pytest.mark.parametrize("ratio_shape", [(19, 23, 15), (6, 7, 5)])
def test_resample_tracks_landmarks_and_spacing(ratio_shape):
    vol = np.zeros((10, 12, 8), np.float32)
    vol[3, 5, 2] = 1.0                                 # a bright voxel at landmark "p"
    case = Case("r", vol, (0.5, 0.75, 1.0), landmarks={"p": np.array([3.0, 5.0, 2.0]), "q": np.array([9.0, 0, 7])})
    out = resample_case(case, ratio_shape)
    assert out.volume.shape == ratio_shape
    # physical distance between landmarks is preserved
    d_in = np.linalg.norm((case.landmarks["p"] - case.landmarks["q"]) * case.spacing_mm)
    d_out = np.linalg.norm((out.landmarks["p"] - out.landmarks["q"]) * out.spacing_mm)
    assert d_out == pytest.approx(d_in)
    # the image follows: linear interpolation of the bright voxel peaks within a voxel of the landmark
    peak = np.array(np.unravel_index(out.volume.argmax(), out.volume.shape))
    assert np.all(np.abs(peak - out.landmarks["p"]) <= 0.5 + 1e-9)


def test_resample_upsampling_hits_landmark_exactly():
    vol = np.zeros((11, 13, 7), np.float32)
    vol[3, 5, 2] = 1
    out = resample_case(Case("u", vol, (1.0, 1.0, 1.0), landmarks={"p": np.array([3.0, 5.0, 2.0])}), (21, 25, 13))
    assert out.landmarks["p"].tolist() == [6.0, 10.0, 4.0]
    assert tuple(np.unravel_index(out.volume.argmax(), out.volume.shape)) == (6, 10, 4)
    assert out.spacing_mm == pytest.approx((0.5, 0.5, 0.5))


def test_missing_directory_and_empty_directory(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        list_cases(tmp_path / "nope")
    with pytest.raises(DataError, match="holds no ID.nii.gz"):
        list_cases(tmp_path)


def test_missing_image_names_file(tmp_path):
    with pytest.raises(DataError, match=r"ghost\.nii\.gz: no such file"):
        load_case(tmp_path, "ghost")


def test_truncated_image_names_file_and_fix(tmp_path):
    save_case(tmp_path, _case())
    path = tmp_path / "c0.nii.gz"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(DataError, match=r"c0\.nii\.gz: cannot read NIfTI.*re-export"):
        load_case(tmp_path, "c0")


def test_garbage_image(tmp_path):
    (tmp_path / "g.nii.gz").write_bytes(gzip.compress(b"not a nifti at all" * 10))
    with pytest.raises(DataError, match=r"g\.nii\.gz: cannot read NIfTI"):
        load_case(tmp_path, "g")


def test_bad_sidecar_json(tmp_path):
    save_case(tmp_path, _case())
    (tmp_path / "c0.json").write_text("{not json")
    with pytest.raises(DataError, match=r"c0\.json: invalid JSON"):
        load_case(tmp_path, "c0")


def test_sidecar_shape_mismatch(tmp_path):
    save_case(tmp_path, _case())
    meta = json.loads((tmp_path / "c0.json").read_text())
    meta["shape"] = [1, 2, 3]
    (tmp_path / "c0.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match=r"\"shape\" \[1, 2, 3\] differs"):
        load_case(tmp_path, "c0")


def test_bad_landmark_entry(tmp_path):
    save_case(tmp_path, _case())
    meta = json.loads((tmp_path / "c0.json").read_text())
    meta["landmarks"]["a"] = [1, 2, 3]
    (tmp_path / "c0.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match=r"landmark 'a' is \[1, 2, 3\]"):
        load_case(tmp_path, "c0")


def test_mask_shape_mismatch(tmp_path):
    save_case(tmp_path, _case())
    nib.save(nib.Nifti1Image(np.zeros((3, 3, 3), np.uint8), np.eye(4)), str(tmp_path / "c0_mask.nii.gz"))
    with pytest.raises(DataError, match=r"c0_mask\.nii\.gz: mask shape \(3, 3, 3\) differs"):
        load_case(tmp_path, "c0")


def test_non_3d_image(tmp_path):
    nib.save(nib.Nifti1Image(np.zeros((3, 3, 3, 2), np.float32), np.eye(4)), str(tmp_path / "t.nii.gz"))
    with pytest.raises(DataError, match=r"expected a 3D volume, got shape \(3, 3, 3, 2\)"):
        load_case(tmp_path, "t")


def test_missing_landmark_named():
    with pytest.raises(DataError, match=r"no landmark\(s\) \['zz'\]"):
        _case().landmark_array(["a", "zz"])


def test_parse_shape():
    assert parse_shape("176,112,112") == (176, 112, 112)
    with pytest.raises(ValueError, match="not three integers"):
        parse_shape("1,x,3")
    with pytest.raises(ValueError, match="three integers >= 2"):
        parse_shape("16,16")


def test_normalize_intensity():
    v = normalize_intensity(np.array([1.0, 3.0], np.float32))
    np.testing.assert_allclose(v, [-1.0, 1.0])
    assert normalize_intensity(np.full(4, 7.0)).tolist() == [0.0] * 4


def test_case_dataset_resamples_and_rejects_unknown_ids(tmp_path):
    save_case(tmp_path, _case("k"))
    ds = CaseDataset(tmp_path, (8, 8, 8))
    sample = ds[0]
    assert sample["image"].shape == (1, 8, 8, 8) and sample["id"] == "k"
    assert float(sample["image"].mean()) == pytest.approx(0.0, abs=1e-5)
    assert sample["spacing_mm"].tolist() == pytest.approx([0.5 * 9 / 7, 0.75 * 11 / 7, 1.0])
    assert ds.case(0) is ds.case(0)                       # cached
    with pytest.raises(DataError, match=r"\['nope'\] not found"):
        CaseDataset(tmp_path, (8, 8, 8), case_ids=["nope"])
    assert isinstance(sample["image"], torch.Tensor)
