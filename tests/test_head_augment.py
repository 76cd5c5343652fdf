"""Augmentation (head paper §2.1): flips, 180-degree rotations, random erasing of a sub-region."""
import numpy as np
import pytest

from models.head.augment import AugmentConfig, augment, flip, random_erase, rotate180


def test_flip_and_rotate_hand_values():
    a = np.arange(8).reshape(2, 2, 2)  # a[i, j, k] = 4i + 2j + k
    assert flip(a, 0)[0, 0, 0] == 4 and flip(a, 2)[0, 0, 0] == 1
    r = rotate180(a, 2)               # about axis 2: (i, j) -> (1 - i, 1 - j)
    assert r[0, 0, 0] == a[1, 1, 0] and r[0, 0, 1] == a[1, 1, 1]
    # A 180-degree rotation about one axis is the flip of the other two.
    b = np.random.default_rng(0).random((3, 4, 5))
    for axis in range(3):
        others = [x for x in range(3) if x != axis]
        np.testing.assert_array_equal(rotate180(b, axis), flip(flip(b, others[0]), others[1]))


def test_channel_axis_is_left_alone():
    img = np.random.default_rng(1).random((2, 3, 4, 5))
    np.testing.assert_array_equal(flip(img, 0), img[:, ::-1])
    assert rotate180(img, 1).shape == img.shape


def test_geometric_transforms_move_image_and_mask_together():
    rng = np.random.default_rng(2)
    mask = (rng.random((6, 7, 8)) > 0.5).astype(np.int64)
    image = mask[None].astype(np.float32) * 2.0 + 1.0
    cfg = AugmentConfig(flip_prob=0.5, rotate_prob=1.0, erase_prob=0.0)
    seen = set()
    for seed in range(12):
        img2, mask2 = augment(np.random.default_rng(seed), image, mask, cfg)
        np.testing.assert_array_equal(img2[0], mask2 * 2.0 + 1.0)
        assert mask2.sum() == mask.sum()
        seen.add(mask2.tobytes())
    assert len(seen) > 3  # the transforms actually vary


def test_random_erase_blanks_a_box_around_the_head_and_keeps_the_mask():
    rng = np.random.default_rng(3)
    mask = np.zeros((20, 20, 20), dtype=np.int64)
    mask[12:16, 12:16, 12:16] = 1
    image = rng.random((1, 20, 20, 20)).astype(np.float32) + 1.0
    out = random_erase(np.random.default_rng(4), image, mask, (0.2, 0.2), fill=-5.0)   # 4-voxel sides
    erased = out[0] == -5.0
    idx = np.argwhere(erased)
    lo, hi = idx.min(0), idx.max(0)
    assert erased.sum() == 64 and tuple(hi - lo + 1) == (4, 4, 4)  # exactly one 4^3 box
    centre = lo + 2
    assert mask[tuple(centre)] == 1                              # centred on a head voxel
    np.testing.assert_array_equal(out[0][~erased], image[0][~erased])
    default_fill = random_erase(np.random.default_rng(4), image, mask, (0.2, 0.2))
    assert (default_fill[0][erased] == image.min()).all()   # same rng draws -> same box, darkest echo
    img2, mask2 = augment(rng, image, mask, AugmentConfig(flip_prob=0, rotate_prob=0, erase_prob=1))
    np.testing.assert_array_equal(mask2, mask)
    assert (img2 != image).any()


def test_config_validation():
    with pytest.raises(ValueError, match="erase_prob must be a probability in \\[0, 1\\], got 1.5"):
        AugmentConfig(erase_prob=1.5)
    with pytest.raises(ValueError, match=r"erase_fraction \(0.5, 0.2\)"):
        AugmentConfig(erase_fraction=(0.5, 0.2))
    with pytest.raises(ValueError, match="image spatial shape"):
        augment(np.random.default_rng(0), np.zeros((4, 4, 4)), np.zeros((4, 4, 5)))
