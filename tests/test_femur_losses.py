"""Femur losses against hand-computed values and independent torch implementations."""
import math

import pytest
import torch
import torch.nn.functional as F

from models.femur.adversarial import discriminator_loss, generator_adversarial_loss
from models.femur.losses import (BranchLossConfig, branch_loss, center_distance_loss, dice_loss, frequency_weights,
                                 heatmap_l2_loss, hybrid_loss, soft_argmax, weighted_cross_entropy)


def _probs(fg):
    """(1, 2, 1, 1, N) probabilities from foreground values."""
    fg = torch.tensor(fg, dtype=torch.float64)
    return torch.stack([1 - fg, fg]).reshape(1, 2, 1, 1, -1)


def test_frequency_weights_by_hand():
    assert frequency_weights(torch.tensor([[0, 0, 0, 1]]), 3).tolist() == [0.25, 0.75, 1.0]


def test_weighted_cross_entropy_by_hand():
    probs, labels = _probs([0.8, 0.2, 0.6, 0.1]), torch.tensor([[[[1, 0, 1, 0]]]])
    # weights: half the voxels in each class -> w = [0.5, 0.5]; -log p of the true class per voxel
    expected = 0.5 * (-math.log(0.8) - math.log(0.8) - math.log(0.6) - math.log(0.9)) / 4
    assert weighted_cross_entropy(probs, labels).item() == pytest.approx(expected, rel=1e-12)


def test_weighted_cross_entropy_matches_nll_with_weights():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4, 4, 4, dtype=torch.float64)
    labels = torch.randint(0, 3, (2, 4, 4, 4))
    w = torch.tensor([0.2, 1.0, 3.0], dtype=torch.float64)
    ours = weighted_cross_entropy(torch.softmax(logits, 1), labels, w)
    ref = F.nll_loss(F.log_softmax(logits, 1), labels, weight=w, reduction="none").mean()
    assert ours.item() == pytest.approx(ref.item(), rel=1e-9)


def test_dice_loss_by_hand():
    probs, labels = _probs([0.8, 0.2, 0.6]), torch.tensor([[[[1, 0, 1]]]])
    # foreground only: intersection 1.4, sum p 1.6, sum g 2 -> DSC = 2.8 / 3.6
    assert dice_loss(probs, labels, smooth=0.0).item() == pytest.approx(1 - 2.8 / 3.6, rel=1e-12)
    # batch Dice pools samples: (2 * 1.4) / (1.6 + 2) again for one sample; for two, sums add up
    two = torch.cat([probs, _probs([0.0, 0.0, 0.0])]), torch.cat([labels, torch.tensor([[[[0, 0, 0]]]])])
    assert dice_loss(*two, smooth=0.0, batch_dice=True).item() == pytest.approx(1 - 2.8 / 3.6, rel=1e-12)
    assert dice_loss(*two, smooth=1e-5).item() == pytest.approx(1 - (2.8 / 3.6 + 1.0) / 2, rel=1e-5)
    # with background: bg DSC = 2 * 0.8 / (1.4 + 1) ; mean of the two
    both = (2.8 / 3.6 + 1.6 / 2.4) / 2
    assert dice_loss(probs, labels, include_background=True, smooth=0.0).item() == pytest.approx(1 - both)


def test_hybrid_is_wce_plus_100_dice():
    probs, labels = _probs([0.8, 0.2, 0.6]), torch.tensor([[[[1, 0, 1]]]])
    # class counts 1 (bg) and 2 (fg): w = [2/3, 1/3]
    wce = (2 / 3 * -math.log(0.8) + 1 / 3 * (-math.log(0.8) - math.log(0.6))) / 3
    expected = wce + 100 * (1 - (2.8 + 1e-5) / (3.6 + 1e-5))
    assert hybrid_loss(probs, labels).item() == pytest.approx(expected, rel=1e-9)


def test_heatmap_l2_sums_voxels_and_averages_batch():
    pred = torch.tensor([[[1.0, 2.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 3.0]]])   # (B=2, K=2, 2)
    target = torch.zeros_like(pred)
    assert heatmap_l2_loss(pred, target).item() == pytest.approx((1 + 4 + 9) / 2)
    with pytest.raises(ValueError, match=r"differ in shape"):
        heatmap_l2_loss(pred, target[:1])


def test_soft_argmax_by_hand():
    h = torch.zeros(1, 1, 1, 1, 2)
    h[..., 1] = math.log(3.0)            # softmax weights 1/4, 3/4 at temperature 1
    assert soft_argmax(h, temperature=1.0)[0, 0].tolist() == pytest.approx([0.0, 0.0, 0.75])
    g = torch.zeros(1, 1, 2, 3, 1)
    g[0, 0, 1, 2, 0] = 1.0               # sharp peak at (1, 2, 0)
    assert soft_argmax(g, temperature=200.0)[0, 0].tolist() == pytest.approx([1.0, 2.0, 0.0], abs=1e-6)


def test_center_distance_by_hand_and_gradient_pushes_apart():
    h1, h2 = torch.zeros(1, 1, 1, 1, 5), torch.zeros(1, 1, 1, 1, 5)
    h1[..., 0] = h2[..., 3] = 1.0
    # peaks 3 voxels apart: 1 / (9 + eps)
    assert center_distance_loss(h1, h2, temperature=100.0, eps=1.0).item() == pytest.approx(0.1, rel=1e-6)
    assert center_distance_loss(h1, h2, temperature=100.0, eps=0.0).item() == pytest.approx(1 / 9, rel=1e-6)
    # soft peaks 1 voxel apart: a gradient step on L_CD moves the soft-argmax peaks apart
    a = torch.tensor([[[[[0.0, 1.0, 0.5, 0.0, 0.0]]]]], requires_grad=True)
    b = torch.tensor([[[[[0.0, 0.5, 1.0, 0.0, 0.0]]]]], requires_grad=True)
    loss = center_distance_loss(a, b, temperature=3.0)
    loss.backward()
    with torch.no_grad():
        before = (soft_argmax(a, 3.0) - soft_argmax(b, 3.0)).norm()
        after = (soft_argmax(a - 0.5 * a.grad, 3.0) - soft_argmax(b - 0.5 * b.grad, 3.0)).norm()
    assert after > before
    with pytest.raises(ValueError, match=r"\(B, 1, \*S\)"):
        center_distance_loss(torch.zeros(1, 2, 3, 3, 3), torch.zeros(1, 2, 3, 3, 3))


def test_branch_loss_weights_alpha_beta_gamma():
    torch.manual_seed(0)
    probs = torch.softmax(torch.randn(1, 2, 4, 4, 4), 1)
    h1, h2 = torch.randn(1, 1, 4, 4, 4), torch.randn(1, 1, 4, 4, 4)
    labels = torch.randint(0, 2, (1, 4, 4, 4))
    targets = torch.rand(1, 2, 4, 4, 4)
    terms = branch_loss((probs, h1, h2), labels, targets)
    hyb = hybrid_loss(probs, labels)
    reg = ((torch.cat([h1, h2], 1) - targets) ** 2).sum()
    cd = center_distance_loss(h1, h2, temperature=50.0, eps=1.0)
    assert terms.total.item() == pytest.approx((1.0 * hyb + 0.2 * (reg + 0.5 * cd)).item(), rel=1e-6)
    assert terms.reg.item() == pytest.approx(reg.item(), rel=1e-6)
    cfg = BranchLossConfig(alpha=0.0, beta=1.0, gamma=0.0)
    assert branch_loss((probs, h1, h2), labels, targets, cfg).total.item() == pytest.approx(reg.item(), rel=1e-6)


def test_loss_config_rejects_bad_values():
    with pytest.raises(ValueError, match=r"gamma must be >= 0, got -1"):
        BranchLossConfig(gamma=-1)
    with pytest.raises(ValueError, match=r"temperature must be > 0"):
        BranchLossConfig(temperature=0)
    with pytest.raises(ValueError, match=r"labels of shape"):
        dice_loss(torch.zeros(1, 2, 3, 3, 3), torch.zeros(1, 3, 3, 2, dtype=torch.long))


def test_adversarial_losses_by_hand():
    real, fake = torch.tensor([[2.0]]), torch.tensor([[-1.0]])
    d_real, d_fake = torch.sigmoid(real).item(), torch.sigmoid(fake).item()
    # Eq. 3 for D: maximise log D(real) + log(1 - D(fake))
    assert discriminator_loss(real, fake).item() == pytest.approx(-(math.log(d_real) + math.log(1 - d_fake)))
    assert generator_adversarial_loss(fake).item() == pytest.approx(-math.log(d_fake))
