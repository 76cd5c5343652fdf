"""Phantom fetal heads: deterministic, labelled whole head, readable through the shared data layer."""
import numpy as np
import pytest

from models.head.dataset import HeadDataset
from tools.phantom import available_kinds, generate_cases
from tools.phantoms.head import FIELD_OF_VIEW_MM, INTENSITY, generate


def test_same_seed_same_case_and_different_seeds_differ():
    a = generate(np.random.default_rng([0, 1]), (32, 32, 32))
    b = generate(np.random.default_rng([0, 1]), (32, 32, 32))
    c = generate(np.random.default_rng([0, 2]), (32, 32, 32))
    np.testing.assert_array_equal(a.volume, b.volume)
    np.testing.assert_array_equal(a.mask, b.mask)
    assert not np.array_equal(a.mask, c.mask)


def test_head_mask_volume_spacing_and_skull_inside_head():
    case = generate(np.random.default_rng(5), (48, 40, 32))
    spacing = FIELD_OF_VIEW_MM / 48
    assert case.spacing_mm == (spacing,) * 3
    head_ml = case.mask.sum() * spacing ** 3 / 1000
    assert case.extra["head_volume_ml"] == pytest.approx(head_ml)
    # Cranium alone at scale 0.8..1.15: 4/3 pi 45*37*38 mm^3 * scale^3 ~ 135..410 mL; the face adds some.
    assert 100 < head_ml < 700
    bright = case.volume > 0.8 * INTENSITY["skull"]
    assert case.mask[bright].mean() > 0.7   # bright echoes are mostly skull and jaw, i.e. head
    assert set(np.unique(case.mask)) == {0, 1}


def test_registered_kind_round_trips_through_head_dataset(tmp_path):
    assert "head" in available_kinds()
    generate_cases("head", tmp_path, count=2, seed=0, shape=(24, 24, 24))
    ds = HeadDataset(tmp_path, (16, 16, 16))
    sample = ds[0]
    assert sample["image"].shape == (1, 16, 16, 16) and sample["mask"].shape == (16, 16, 16)
    assert set(sample["mask"].unique().tolist()) == {0, 1}
    assert abs(float(sample["image"].mean())) < 1e-4  # normalised


def test_missing_mask_is_named(tmp_path):
    generate_cases("head", tmp_path, count=1, seed=0, shape=(16, 16, 16))
    (tmp_path / "head_0000_mask.nii.gz").unlink()
    with pytest.raises(ValueError, match="has no head_0000_mask.nii.gz"):
        HeadDataset(tmp_path, (16, 16, 16))[0]


def test_too_small_shape_is_rejected():
    with pytest.raises(ValueError, match="too small"):
        generate(np.random.default_rng(0), (8, 16, 16))
