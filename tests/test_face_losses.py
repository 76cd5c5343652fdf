"""IoU-balanced classification loss (Eq. 2-3) and box regression, against hand computation."""
import math

import pytest
import torch

from models.face.anchors import AnchorTargets, encode_boxes
from models.face.losses import iou_balanced_weights, rpn_loss


def test_iou_balanced_weights_by_hand_eta_175():
    iou = torch.tensor([0.8, 0.4, 1.0], dtype=torch.float64)
    ce = torch.tensor([0.5, 1.2, 0.1], dtype=torch.float64)
    # by hand: IoU^1.75 = 0.676718, 0.201189, 1; sum CE = 1.8; sum IoU^1.75 CE = 0.338359 + 0.241427 + 0.1
    expected = [0.676718 * 1.8 / 0.679786, 0.201189 * 1.8 / 0.679786, 1.0 * 1.8 / 0.679786]
    w = iou_balanced_weights(iou, ce, eta=1.75)
    assert w.tolist() == pytest.approx(expected, rel=1e-4)
    # Eq. 3 keeps the positives' total loss and orders weights by IoU
    assert float((w * ce).sum()) == pytest.approx(float(ce.sum()))
    assert float(w[0] / w[1]) == pytest.approx(2.0 ** 1.75)


def test_weights_carry_no_gradient_and_degenerate_case():
    iou = torch.tensor([0.5, 0.7], requires_grad=True)
    ce = torch.tensor([1.0, 2.0], requires_grad=True)
    assert not iou_balanced_weights(iou, ce).requires_grad
    assert iou_balanced_weights(torch.zeros(2), torch.ones(2)).tolist() == [1.0, 1.0]
    with pytest.raises(ValueError, match="eta must be >= 0"):
        iou_balanced_weights(iou, ce, eta=-1.0)


def _setup():
    anchors = torch.tensor([[10.0, 10, 10, 16, 16, 16], [30.0, 10, 10, 16, 16, 16], [50.0, 50, 50, 16, 16, 16],
                            [70.0, 70, 70, 16, 16, 16]], dtype=torch.float64)
    gt = torch.tensor([[12.0, 10, 10, 16, 16, 16], [30.0, 14, 10, 14, 14, 14]], dtype=torch.float64)
    labels = torch.tensor([1, 2, 0, -1])
    matched = torch.tensor([0, 1, 0, 0])
    targets = AnchorTargets(labels, matched, encode_boxes(gt[matched], anchors), torch.zeros(4))
    scores = torch.tensor([[[0.2, 1.0, -0.5], [0.1, 0.3, 0.9], [2.0, 0.0, 0.0], [5.0, -5.0, 0.0]]],
                          dtype=torch.float64, requires_grad=True)
    deltas = torch.zeros(1, 4, 6, dtype=torch.float64, requires_grad=True)   # regressed box = anchor
    return anchors, gt, targets, scores, deltas


def _ce(logits, label):
    return math.log(sum(math.exp(v) for v in logits)) - logits[label]


def test_rpn_loss_by_hand():
    anchors, gt, targets, scores, deltas = _setup()
    loss = rpn_loss(scores, deltas, anchors, [targets], [gt])
    ce = [_ce([0.2, 1.0, -0.5], 1), _ce([0.1, 0.3, 0.9], 2), _ce([2.0, 0.0, 0.0], 0)]
    # IoUs of the (unregressed) anchors with their GT: 14/18 along x; 16x(16-4... computed by corners:
    # anchor 0 [2,18]^3 vs GT [4,20]x[2,18]^2: 14*16*16 / (2*4096 - 3584) = 3584 / 4608
    # anchor 1 [22,38]x[2,18]x[2,18] vs GT [23,37]x[7,21]x[3,17]: 14*11*14 / (4096 + 2744 - 2156)
    iou = [3584 / 4608, 2156 / (4096 + 2744 - 2156)]
    s = [v ** 1.75 for v in iou]
    w = [si * (ce[0] + ce[1]) / (s[0] * ce[0] + s[1] * ce[1]) for si in s]
    assert loss.cls.item() == pytest.approx((w[0] * ce[0] + w[1] * ce[1] + ce[2]) / 3)
    # smooth L1 (beta 1/9) on the positives' target deltas, divided by the 2 positives
    t = targets.deltas[:2].flatten().abs()
    beta = 1 / 9
    expected_reg = sum(float(0.5 * v * v / beta if v < beta else v - 0.5 * beta) for v in t) / 2
    assert loss.reg.item() == pytest.approx(expected_reg)
    assert loss.total.item() == pytest.approx(loss.cls.item() + expected_reg)
    assert loss.num_positive == 2


def test_plain_loss_and_gradient_through_fixed_weights():
    anchors, gt, targets, scores, deltas = _setup()
    plain = rpn_loss(scores, deltas, anchors, [targets], [gt], iou_balanced=False)
    ce = [_ce([0.2, 1.0, -0.5], 1), _ce([0.1, 0.3, 0.9], 2), _ce([2.0, 0.0, 0.0], 0)]
    assert plain.cls.item() == pytest.approx(sum(ce) / 3)
    balanced = rpn_loss(scores, deltas, anchors, [targets], [gt])
    balanced.cls.backward()
    # d/dlogits of w * CE / 3 with w constant: w * (softmax - onehot) / 3; the ignored anchor gets none
    logits = torch.tensor([0.2, 1.0, -0.5], dtype=torch.float64)
    iou = [3584 / 4608, 2156 / (4096 + 2744 - 2156)]
    s = [v ** 1.75 for v in iou]
    w0 = s[0] * (ce[0] + ce[1]) / (s[0] * ce[0] + s[1] * ce[1])
    expected = w0 * (logits.softmax(0) - torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64)) / 3
    assert torch.allclose(scores.grad[0, 0], expected)
    assert torch.equal(scores.grad[0, 3], torch.zeros(3, dtype=torch.float64))


def test_rpn_loss_shape_mismatch():
    anchors, gt, targets, scores, deltas = _setup()
    with pytest.raises(ValueError, match="do not match"):
        rpn_loss(scores, deltas, anchors[:3], [targets], [gt])
