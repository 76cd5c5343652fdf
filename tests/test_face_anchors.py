"""Face RPN anchors: generation, 3D IoU, Eq. 1 coding and labelling against hand and brute-force values."""
import itertools
import math

import pytest
import torch

from models.face.anchors import (ANCHOR_SIZES_VOX, LANDMARKS, anchor_shapes, box_iou, box_iou_aligned, decode_boxes,
                                 encode_boxes, generate_anchors, label_anchors, sample_anchors, target_boxes)


def test_anchor_count_and_geometry_match_brute_force():
    grid, stride = (2, 3, 4), 4
    anchors = generate_anchors(grid, stride)
    assert anchors.shape == (2 * 3 * 4 * 64, 6)
    expected = [(i * 4 + 1.5, j * 4 + 1.5, k * 4 + 1.5, w, h, d)
                for i, j, k in itertools.product(range(2), range(3), range(4))
                for w, h, d in itertools.product(ANCHOR_SIZES_VOX, repeat=3)]
    assert torch.equal(anchors, torch.tensor(expected))


def test_64_distinct_shapes_per_cell_from_four_base_sizes():
    shapes = anchor_shapes()
    assert len({tuple(s) for s in shapes.tolist()}) == 64
    assert set(shapes.flatten().tolist()) == {13.0, 16.0, 20.0, 28.0}


def test_anchor_centre_is_centre_of_pooled_voxels():
    # cell c of a stride-4 grid pools input voxels 4c..4c+3, whose mean index is 4c + 1.5
    anchors = generate_anchors((3, 1, 1), 4)
    assert anchors[::64, 0].tolist() == [sum(range(4 * c, 4 * c + 4)) / 4 for c in range(3)]


@pytest.mark.parametrize("a, b, expected", [
    ((0, 0, 0, 2, 2, 2), (0, 0, 0, 2, 2, 2), 1.0),
    ((0, 0, 0, 2, 2, 2), (1, 0, 0, 2, 2, 2), 4 / 12),            # overlap 1x2x2 of two 8s
    ((0, 0, 0, 2, 2, 2), (2, 0, 0, 2, 2, 2), 0.0),               # touching faces
    ((0, 0, 0, 2, 2, 2), (0.5, 0.5, 0.5, 1, 1, 1), 1 / 8),       # contained
    ((0, 0, 0, 4, 2, 2), (1, 1, 0, 2, 2, 2), 4 / 20),            # 2x1x2 overlap, union 16 + 8 - 4
    ((0, 0, 0, 2, 2, 2), (1, 1, 1, 2, 2, 2), 1 / 15),            # one unit cube of 8 + 8 - 1
])
def test_iou_by_hand(a, b, expected):
    ta, tb = torch.tensor([a], dtype=torch.float64), torch.tensor([b], dtype=torch.float64)
    assert box_iou(ta, tb).item() == pytest.approx(expected)
    assert box_iou(tb, ta).item() == pytest.approx(expected)
    assert box_iou_aligned(ta, tb).item() == pytest.approx(expected)


def test_iou_matches_cell_counting_on_random_lattice_boxes():
    gen = torch.Generator().manual_seed(0)
    # corners on a 0.5 lattice: count lattice cells inside both boxes exactly
    lo = torch.randint(0, 8, (20, 3), generator=gen).double() / 2
    size = torch.randint(1, 8, (20, 3), generator=gen).double() / 2
    boxes = torch.cat([lo + size / 2, size], dim=1)
    cells = torch.stack(torch.meshgrid(*[torch.arange(0, 8, 0.5) + 0.25] * 3, indexing="ij"), -1).reshape(-1, 3)
    inside = ((cells[None] > lo[:, None]) & (cells[None] < (lo + size)[:, None])).all(-1).double()   # (20, cells)
    inter = inside @ inside.T
    union = inside.sum(1)[:, None] + inside.sum(1)[None] - inter
    assert torch.allclose(box_iou(boxes, boxes), inter / union)


def test_decode_follows_eq1_by_hand():
    anchor = torch.tensor([10.0, 20.0, 30.0, 16.0, 16.0, 16.0])
    deltas = torch.tensor([0.5, -0.25, 0.0, math.log(2.0), 0.0, math.log(0.5)])
    assert decode_boxes(deltas, anchor).tolist() == pytest.approx([18.0, 16.0, 30.0, 32.0, 16.0, 8.0])


def test_encode_decode_round_trip():
    gen = torch.Generator().manual_seed(1)
    anchors = generate_anchors((2, 2, 2), 4)
    boxes = torch.cat([torch.rand(anchors.shape[0], 3, generator=gen) * 20,
                       torch.rand(anchors.shape[0], 3, generator=gen) * 30 + 2], dim=1).double()
    deltas = encode_boxes(boxes, anchors.double())
    assert torch.allclose(decode_boxes(deltas, anchors.double()), boxes)
    t = torch.randn(anchors.shape[0], 6, generator=gen).double()
    assert torch.allclose(encode_boxes(decode_boxes(t, anchors.double()), anchors.double()), t)


def test_target_boxes_are_14_for_eyes_and_24_for_others():
    boxes = target_boxes(torch.arange(15.0).reshape(5, 3))
    assert boxes[:, 3].tolist() == [14.0, 24.0, 14.0, 24.0, 24.0]
    assert LANDMARKS.index("eye_left") == 0 and LANDMARKS.index("eye_right") == 2
    assert torch.equal(boxes[:, :3], torch.arange(15.0).reshape(5, 3))
    assert target_boxes(torch.zeros(5, 3), 0.5)[:, 3].tolist() == [7.0, 12.0, 7.0, 12.0, 12.0]
    with pytest.raises(ValueError, match=r"\(5, 3\)"):
        target_boxes(torch.zeros(4, 3))


def test_labelling_thresholds_and_best_anchor():
    gt = torch.tensor([[0.0, 0, 0, 10, 10, 10], [100.0, 0, 0, 10, 10, 10]])
    # shifts along x giving IoU (10 - s) / (10 + s): s=0 -> 1, s=2 -> 0.667, s=4 -> 0.4286, s=7 -> 0.176
    anchors = torch.tensor([[0.0, 0, 0, 10, 10, 10], [2.0, 0, 0, 10, 10, 10], [4.0, 0, 0, 10, 10, 10],
                            [7.0, 0, 0, 10, 10, 10], [104.0, 0, 0, 10, 10, 10], [50.0, 0, 0, 10, 10, 10]])
    t = label_anchors(anchors, gt, torch.tensor([2, 5]))
    # anchor 4 has IoU 0.43 < 0.5 with GT 1 but is its best anchor -> positive class 5
    assert t.labels.tolist() == [2, 2, -1, 0, 5, 0]
    assert t.matched[4].item() == 1
    assert torch.allclose(t.max_iou[:4], torch.tensor([1.0, 8 / 12, 6 / 14, 3 / 17]))
    assert torch.allclose(decode_boxes(t.deltas[1], anchors[1]), gt[0])


def test_labelling_rejects_bad_thresholds():
    with pytest.raises(ValueError, match="negative_iou <= positive_iou"):
        label_anchors(torch.zeros(1, 6) + 1, torch.zeros(1, 6) + 1, torch.tensor([1]), positive_iou=0.2,
                      negative_iou=0.4)


def test_sampler_keeps_at_most_half_positives_and_fills_with_negatives():
    labels = torch.tensor([1] * 10 + [0] * 100 + [-1] * 5)
    out = sample_anchors(labels, batch_size=16, generator=torch.Generator().manual_seed(0))
    assert int((out > 0).sum()) == 8 and int((out == 0).sum()) == 8
    assert torch.all(out[out >= 0] == labels[out >= 0])
    few = sample_anchors(torch.tensor([3, 0, 0, 0]), batch_size=16)
    assert few.tolist() == [3, 0, 0, 0]


@pytest.mark.parametrize("kwargs, match", [({"feature_shape": (2, 2)}, "3 positive ints"),
                                           ({"feature_shape": (2, 2, 2), "stride_vox": 0}, "stride_vox"),
                                           ({"feature_shape": (2, 2, 2), "sizes_vox": (13, -1)}, "positive")])
def test_generate_anchors_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        generate_anchors(**{"stride_vox": 4, **kwargs})
