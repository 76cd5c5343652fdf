"""ROI detector: per-slice boxes, merging, enlarging, cropping, detection end to end, box scaling."""
import numpy as np
import pytest
import torch
from torch import nn

from models.femur.evaluate import scale_box
from models.femur.roi import (Box3D, RoiUNet, crop, detect_roi, enlarge_box, merge_boxes, predict_slices,
                              slice_boxes)


def test_slice_boxes_and_merge_by_hand():
    m = np.zeros((10, 12, 6), bool)
    m[2:4, 5:7, 1] = True         # slice 1: rows 2..3, cols 5..6
    m[6, 1, 3] = True             # slice 3: one voxel
    boxes = slice_boxes(m, axis=2)
    assert boxes == {1: (2, 4, 5, 7), 3: (6, 7, 1, 2)}
    assert merge_boxes(boxes, axis=2) == Box3D((2, 1, 1), (7, 7, 4))


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_merged_box_is_the_mask_bounding_box_on_every_axis(axis):
    rng = np.random.default_rng(axis)
    m = np.zeros((9, 11, 13), bool)
    idx = tuple(rng.integers(1, n - 1, size=7) for n in m.shape)
    m[idx] = True
    # brute force: bounding box from all foreground coordinates
    nz = np.nonzero(m)
    truth = Box3D(tuple(int(a.min()) for a in nz), tuple(int(a.max()) + 1 for a in nz))
    assert merge_boxes(slice_boxes(m, axis), axis) == truth


def test_enlarge_by_30_clipped_to_volume():
    box = Box3D((40, 5, 100), (60, 20, 150))
    assert enlarge_box(box, (416, 416, 160)) == Box3D((10, 0, 70), (90, 50, 160))
    assert enlarge_box(box, (416, 416, 160), margin_vox=0) == box
    with pytest.raises(ValueError, match=r"margin_vox must be >= 0, got -1"):
        enlarge_box(box, (416, 416, 160), margin_vox=-1)


def test_box_errors_crop_and_iou():
    with pytest.raises(ValueError, match=r"start < stop"):
        Box3D((0, 0, 5), (1, 1, 5))
    with pytest.raises(ValueError, match=r"no slice has foreground"):
        merge_boxes({})
    v = np.arange(4 * 5 * 6).reshape(4, 5, 6)
    box = Box3D((1, 2, 3), (3, 5, 4))
    assert np.array_equal(crop(v, box), v[1:3, 2:5, 3:4])
    assert crop(v[None], box).shape == (1, 2, 3, 1)
    assert Box3D((0, 0, 0), (2, 2, 2)).iou(Box3D((1, 0, 0), (3, 2, 2))) == pytest.approx(4 / 12)


class _Threshold(nn.Module):
    """Stand-in detector: class 1 wherever the slice is above 0.5 (exercises padding and axes)."""
    size_multiple = 4

    def forward(self, x):
        assert x.shape[-1] % 4 == 0 and x.shape[-2] % 4 == 0
        return torch.cat([0.5 - x, x - 0.5], dim=1)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_detect_roi_end_to_end(axis):
    v = np.zeros((30, 21, 17), np.float32)
    v[10:14, 3:9, 5:6] = 1.0
    assert np.array_equal(predict_slices(_Threshold(), v, axis), v > 0.5)
    assert detect_roi(_Threshold(), v, axis=axis, margin_vox=4) == Box3D((6, 0, 1), (18, 13, 10))
    assert detect_roi(_Threshold(), np.zeros_like(v), axis=axis) is None
    v[25, 18, 15] = 1.0                    # a stray false positive far away
    assert detect_roi(_Threshold(), v, axis=axis, margin_vox=4) == Box3D((6, 0, 1), (18, 13, 10))
    assert detect_roi(_Threshold(), v, axis=axis, margin_vox=4, keep_largest=False) == Box3D((6, 0, 1), (30, 21, 17))


def test_roi_unet_shapes_and_validation():
    torch.manual_seed(0)
    net = RoiUNet(2, 1, 2, channels=(2, 4, 8))
    assert net(torch.randn(2, 1, 16, 12)).shape == (2, 2, 16, 12)
    assert net.size_multiple == 4
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1)]
    assert {m.kernel_size for m in convs} == {(3, 3)}
    assert sum(isinstance(m, nn.BatchNorm2d) for m in net.modules()) == len(convs)
    with pytest.raises(ValueError, match=r"spatial_dims must be 2, got 3"):
        RoiUNet(3, 1, 2)
    with pytest.raises(ValueError, match=r"channels\[1\] must be a positive int, got 0"):
        RoiUNet(2, 1, 2, channels=(4, 0))


def test_scale_box_covers_the_same_physical_region():
    # corner-aligned grids: voxel i of 5 sits at i * 8/4 = 2i on the 9-voxel grid
    assert scale_box(Box3D((1, 0, 2), (3, 5, 4)), (5, 5, 5), (9, 9, 9)) == Box3D((2, 0, 4), (5, 9, 7))
    assert scale_box(Box3D((0, 0, 0), (4, 4, 4)), (4, 4, 4), (10, 7, 4)) == Box3D((0, 0, 0), (10, 7, 4))
