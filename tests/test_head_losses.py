"""Deep-supervision loss (head paper Eq. 2) against a hand-written cross entropy."""
import math

import pytest
import torch

from models.head.losses import PAPER_AUX_WEIGHTS, DeepSupervisionLoss, downscale_labels


def _cross_entropy(logits, labels):
    """Mean over voxels of -log softmax(logits)[label], written out."""
    log_z = torch.log(torch.exp(logits).sum(dim=1))
    picked = torch.gather(logits, 1, labels[:, None]).squeeze(1)
    return (log_z - picked).mean()


def test_downscale_picks_every_other_voxel():
    labels = torch.zeros(1, 4, 4, 4, dtype=torch.long)
    labels[0, 1:3, 1:3, 1:3] = 1
    labels[0, 2, 2, 2] = 2
    small = downscale_labels(labels, (2, 2, 2))
    torch.testing.assert_close(small, labels[:, ::2, ::2, ::2])
    assert small.dtype == torch.long


def test_loss_is_weighted_sum_of_main_and_downscaled_aux_terms():
    torch.manual_seed(0)
    labels = (torch.rand(2, 8, 8, 8) > 0.5).long()
    outs = (torch.randn(2, 2, 8, 8, 8), torch.randn(2, 2, 4, 4, 4), torch.randn(2, 2, 2, 2, 2))
    loss_fn = DeepSupervisionLoss((0.5, 0.25), main_weight=2.0)
    expected = (2.0 * _cross_entropy(outs[0], labels)
                + 0.5 * _cross_entropy(outs[1], labels[:, ::2, ::2, ::2])
                + 0.25 * _cross_entropy(outs[2], labels[:, ::4, ::4, ::4]))
    torch.testing.assert_close(loss_fn(outs, labels), expected)


def test_paper_weights_and_uniform_logits_give_three_log2():
    assert PAPER_AUX_WEIGHTS == (1.0, 1.0)
    labels = torch.ones(1, 4, 4, 4, dtype=torch.long)
    outs = (torch.zeros(1, 2, 4, 4, 4), torch.zeros(1, 2, 2, 2, 2), torch.zeros(1, 2, 1, 1, 1))
    assert float(DeepSupervisionLoss()(outs, labels)) == pytest.approx(3 * math.log(2))


def test_gradient_reaches_every_output():
    outs = tuple(torch.zeros(1, 2, s, s, s, requires_grad=True) for s in (4, 2, 1))
    DeepSupervisionLoss((1.0, 0.0))(outs, torch.ones(1, 4, 4, 4, dtype=torch.long)).backward()
    assert outs[0].grad.abs().sum() > 0 and outs[1].grad.abs().sum() > 0
    assert outs[2].grad.abs().sum() == 0  # weight 0


def test_errors_name_the_mismatch():
    outs = (torch.zeros(1, 2, 4, 4, 4), torch.zeros(1, 2, 2, 2, 2))
    with pytest.raises(ValueError, match="got 2 network outputs but 3 loss weights"):
        DeepSupervisionLoss()(outs, torch.ones(1, 4, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"labels shape \(1, 4, 4, 2\) must be \(B, \*S\) with S = \(4, 4, 4\)"):
        DeepSupervisionLoss((1.0,))(outs, torch.ones(1, 4, 4, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"loss weights must be >= 0.*aux=\(-1.0,\)"):
        DeepSupervisionLoss((-1.0,))
