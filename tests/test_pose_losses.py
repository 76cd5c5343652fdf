"""Pair Loss (V2 Eq. 3-6), the overall loss (Eq. 8) and FetusMap's L2 against hand computation."""
import math

import numpy as np
import pytest
import torch

from models.pose.landmarks import V2_HEAD_TRUNK, V2_LIMB_PAIRS
from models.pose.losses import FetusMapV2Loss, HeatmapL2Loss, kl_term, pair_l1, pair_l2, pair_loss


def _t(values):
    """(1, 1, 1, 1, n) tensor: one landmark on a 1x1xn grid."""
    return torch.tensor(values, dtype=torch.float64).view(1, 1, 1, 1, -1)


# softmax(pl) = [1/2, 1/2], softmax(pr) = [3/4, 1/4]; left target on voxel 0, right target on voxel 1
PL, PR, GL, GR = _t([0.0, 0.0]), _t([math.log(3.0), 0.0]), _t([1.0, 0.0]), _t([0.0, 1.0])


def test_kl_term_by_hand():
    assert float(kl_term(PL, GL)) == pytest.approx(math.log(2))
    assert float(kl_term(PR, GR)) == pytest.approx(math.log(4))
    assert float(kl_term(PR, _t([0.5, 0.5]))) == pytest.approx(-(0.5 * math.log(0.75) + 0.5 * math.log(0.25)))


def test_l1_takes_the_cheaper_assignment_by_hand():
    same = math.log(2) + math.log(4)                  # K(Pl,Gl) + K(Pr,Gr)
    crossed = math.log(2) - math.log(0.75)            # K(Pl,Gr) + K(Pr,Gl)
    assert float(pair_l1(PL, PR, GL, GR)) == pytest.approx(min(same, crossed))
    assert crossed < same


def test_l2_by_hand():
    # -[log(1/2 + 3/4) * (1 + 0) + log(1/2 + 1/4) * (0 + 1)]
    assert float(pair_l2(PL, PR, GL, GR)) == pytest.approx(-(math.log(1.25) + math.log(0.75)))
    assert float(pair_loss(PL, PR, GL, GR)) == pytest.approx(-math.log(0.375) - math.log(0.9375))


def test_l2_penalises_both_predictions_on_one_side():
    apart = pair_l2(_t([5.0, 0.0]), _t([0.0, 5.0]), GL, GR)
    together = pair_l2(_t([5.0, 0.0]), _t([5.0, 0.0]), GL, GR)
    assert float(together) > float(apart) + 1.0


def test_swapping_sides_leaves_pair_terms_unchanged():
    torch.manual_seed(0)
    pl, pr = torch.randn(2, 3, 4, 3, 5, dtype=torch.float64), torch.randn(2, 3, 4, 3, 5, dtype=torch.float64)
    gl = torch.softmax(torch.randn(2, 3, 60, dtype=torch.float64), -1).view(2, 3, 4, 3, 5)
    gr = torch.softmax(torch.randn(2, 3, 60, dtype=torch.float64), -1).view(2, 3, 4, 3, 5)
    torch.testing.assert_close(pair_l1(pl, pr, gl, gr), pair_l1(pr, pl, gl, gr))
    torch.testing.assert_close(pair_l2(pl, pr, gl, gr), pair_l2(pr, pl, gl, gr))
    # ... whereas the side-aware sum of K terms does change: the invariance is not vacuous
    fixed = kl_term(pl, gl) + kl_term(pr, gr)
    swapped = kl_term(pr, gl) + kl_term(pl, gr)
    assert not torch.allclose(fixed, swapped)


def _np_log_softmax(x):
    x = x.reshape(-1)
    return x - x.max() - np.log(np.exp(x - x.max()).sum())


def test_v2_loss_is_eq8_over_the_paper_groups():
    """Eq. 8 from numpy softmaxes, loops over the groups of §3.2, batch mean."""
    torch.manual_seed(1)
    pred = torch.randn(2, 22, 2, 3, 2, dtype=torch.float64)
    target = torch.softmax(torch.randn(2, 22, 12, dtype=torch.float64), -1).view(2, 22, 2, 3, 2)
    p, g = pred.numpy(), target.numpy()
    total = 0.0
    for b in range(2):
        k = lambda i, j: -(_np_log_softmax(p[b, i]) * g[b, j].reshape(-1)).sum()       # noqa: E731
        total += sum(k(i, i) for i in range(10))                                        # ht = 1..10
        for left, right in (((10, 11, 12), (13, 14, 15)), ((16, 17, 18), (19, 20, 21))):
            same = sum(k(i, i) + k(j, j) for i, j in zip(left, right))
            crossed = sum(k(i, j) + k(j, i) for i, j in zip(left, right))
            joint = sum(-(np.logaddexp(_np_log_softmax(p[b, i]), _np_log_softmax(p[b, j]))
                          * (g[b, i] + g[b, j]).reshape(-1)).sum() for i, j in zip(left, right))
            total += min(same, crossed) + joint
    assert V2_HEAD_TRUNK == tuple(range(10)) and V2_LIMB_PAIRS[1][1] == (19, 20, 21)
    assert float(FetusMapV2Loss()(pred, target)) == pytest.approx(total / 2)


def test_v2_loss_gradients_flow_to_every_channel():
    pred = torch.randn(1, 22, 3, 3, 3, requires_grad=True)
    target = torch.softmax(torch.randn(1, 22, 27), -1).view(1, 22, 3, 3, 3)
    FetusMapV2Loss()(pred, target).backward()
    assert torch.all(pred.grad.flatten(2).abs().sum(-1) > 0)


def test_mismatched_limb_groups_rejected():
    with pytest.raises(ValueError, match="as many left as right"):
        FetusMapV2Loss(limb_pairs=[((0, 1), (2,))])


def test_heatmap_l2_by_hand():
    pred = torch.zeros(2, 2, 1, 1, 2)
    target = torch.zeros(2, 2, 1, 1, 2)
    target[0, 0, 0, 0, 0] = 1.0     # one squared error of 1 ...
    target[1, 1, 0, 0, 1] = 2.0     # ... and one of 4, over 2 samples x 2 landmarks
    assert float(HeatmapL2Loss()(pred, target)) == pytest.approx(5 / 4)
