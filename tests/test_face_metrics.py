"""Detection metrics on hand-made detection lists with hand-computed AP, mIoU and distances."""
import pytest

from models.face.metrics import COCO_THRESHOLDS, Detection, average_precision, mean_average_precision, summarize

BOX = (10.0, 10.0, 10.0, 10.0, 10.0, 10.0)


def _shifted(dx):
    """BOX moved dx along x: IoU (10 - dx) / (10 + dx)."""
    return (10.0 + dx, 10.0, 10.0, 10.0, 10.0, 10.0)


def test_ap_on_hand_made_list():
    truths = {"a": BOX, "b": BOX, "c": BOX}
    dets = [Detection("a", 1, 0.9, BOX),            # TP  -> precision 1, recall 1/3
            Detection("b", 1, 0.8, _shifted(9)),    # FP (IoU 1/19)
            Detection("c", 1, 0.7, _shifted(1)),    # TP (IoU 9/11) -> precision 2/3, recall 2/3
            Detection("a", 1, 0.6, BOX)]            # FP: case a already matched
    # all-point AP: 1/3 * 1 + 1/3 * 2/3 = 5/9
    assert average_precision(dets, truths, 0.5) == pytest.approx(5 / 9)
    # at 0.85 the c detection (IoU 0.818) is a miss: AP = 1/3
    assert average_precision(dets, truths, 0.85) == pytest.approx(1 / 3)
    # order, not list position, decides: a TP ranked below an FP has its precision interpolated down
    swapped = [Detection("a", 1, 0.5, BOX), Detection("b", 1, 0.9, _shifted(9))]
    assert average_precision(swapped, {"a": BOX, "b": BOX}, 0.5) == pytest.approx(0.5 * 0.5)


def test_precision_envelope_takes_later_higher_precision():
    truths = {k: BOX for k in "abcd"}
    dets = [Detection("a", 1, 0.9, BOX), Detection("x", 1, 0.8, BOX), Detection("y", 1, 0.7, BOX),
            Detection("b", 1, 0.6, BOX), Detection("c", 1, 0.5, BOX)]
    # recall 1/4 @ p 1; recall 2/4 @ p 2/4 and 3/4 @ p 3/5 -> the envelope lifts recall 2/4 to 3/5
    assert average_precision(dets, truths, 0.5) == pytest.approx(0.25 * 1 + 0.25 * 0.6 + 0.25 * 0.6)


def test_map_averages_classes_and_summary_by_hand():
    truths = {("a", 1): BOX, ("b", 1): BOX, ("a", 2): BOX, ("b", 2): BOX}
    dets = [Detection("a", 1, 0.9, BOX), Detection("b", 1, 0.8, _shifted(2)),     # IoU 8/12 = 0.667
            Detection("a", 2, 0.7, _shifted(9)), Detection("b", 2, 0.6, BOX)]     # IoU 1/19; 1
    assert mean_average_precision(dets, truths, 0.5) == pytest.approx((1.0 + 0.5 * 0.5) / 2)
    m = summarize(dets, truths, {"a": (1.0, 1.0, 1.0), "b": (2.0, 1.0, 1.0)}, inference_ms=12.5)
    assert m.ap50 == pytest.approx(0.625)
    assert m.ap75 == pytest.approx((0.5 + 0.5 * 0.5) / 2)        # class 1 loses its 0.667 box
    assert m.ap35 == pytest.approx(0.625)
    per_threshold = [(1.0 if t <= 8 / 12 else 0.5) / 2 + 0.25 / 2 for t in COCO_THRESHOLDS]
    assert m.ap == pytest.approx(sum(per_threshold) / 10)
    assert m.miou == pytest.approx((1 + 8 / 12 + 1 / 19 + 1) / 4)
    # centre distances in mm: 0, 2 vox x 2 mm, 9 vox x 1 mm, 0
    assert m.mean_distance_mm == pytest.approx((0 + 4 + 9 + 0) / 4)
    assert m.inference_ms == 12.5


def test_missing_detection_counts_as_zero_iou():
    m = summarize([Detection("a", 1, 0.9, BOX)], {("a", 1): BOX, ("a", 2): BOX}, {"a": (1, 1, 1)}, 0.0)
    assert m.miou == pytest.approx(0.5) and m.ap50 == pytest.approx(0.5)


def test_bad_threshold_and_empty_truths():
    with pytest.raises(ValueError, match="iou_threshold"):
        average_precision([], {"a": BOX}, 1.5)
    with pytest.raises(ValueError, match="at least one ground truth"):
        average_precision([], {}, 0.5)
