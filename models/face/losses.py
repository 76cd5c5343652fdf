"""RPN losses of the face detector: IoU-balanced classification (paper 003, Eq. 2-3) + box regression.

Eq. 2: L_cls = sum_pos w_i(IoU_i) CE_i + sum_neg CE_i, with Eq. 3 w_i = IoU_i^eta * sum CE / sum IoU^eta CE
over the n positives, so the positives' total loss is unchanged while high-IoU ones weigh more. IoU_i
is between the *regressed* box of anchor i and its ground truth; like Wu & Li (ref. [10]) the weights
carry no gradient. We divide L_cls by the number of sampled anchors and the regression loss (smooth
L1 on Eq. 1 deltas of positives) by the number of positives, as Faster R-CNN's RPN does.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from models.face.anchors import AnchorTargets, box_iou_aligned, decode_boxes

__all__ = ["ETA", "iou_balanced_weights", "RPNLoss", "rpn_loss"]

#: the paper's eta of Eq. 3
ETA = 1.75


def iou_balanced_weights(iou: torch.Tensor, ce: torch.Tensor, eta: float = ETA) -> torch.Tensor:
    """Eq. 3 for positives with IoUs ``iou`` and cross-entropies ``ce`` (both (n,)); no gradient.

    >>> w = iou_balanced_weights(torch.tensor([1.0, 0.5]), torch.tensor([2.0, 2.0]), eta=1.0)
    >>> [round(x, 4) for x in w.tolist()]
    [1.3333, 0.6667]
    """
    if eta < 0:
        raise ValueError(f"eta must be >= 0 (the paper uses {ETA}), got {eta}")
    iou, ce = iou.detach(), ce.detach()
    scaled = iou.clamp(min=0) ** eta
    denominator = (scaled * ce).sum()
    if denominator <= 0:   # every positive has IoU 0 or CE 0: nothing to rebalance
        return torch.ones_like(ce)
    return scaled * ce.sum() / denominator


@dataclass(frozen=True)
class RPNLoss:
    """The total training loss and its parts (scalar tensors)."""

    total: torch.Tensor
    cls: torch.Tensor
    reg: torch.Tensor
    num_positive: int


def rpn_loss(scores: torch.Tensor, deltas: torch.Tensor, anchors: torch.Tensor, targets: list[AnchorTargets],
             gt_boxes: list[torch.Tensor], *, eta: float = ETA, iou_balanced: bool = True,
             reg_weight: float = 1.0, smooth_l1_beta: float = 1.0 / 9.0) -> RPNLoss:
    """Loss of a batch: ``scores`` (N, A, K+1), ``deltas`` (N, A, 6), one AnchorTargets and (G, 6)
    ground-truth boxes per sample; anchors labelled -1 (ignored / not sampled) add nothing."""
    if scores.shape[:2] != deltas.shape[:2] or scores.shape[1] != anchors.shape[0] or len(targets) != scores.shape[0]:
        raise ValueError(f"scores {tuple(scores.shape)}, deltas {tuple(deltas.shape)}, anchors "
                         f"{tuple(anchors.shape)} and {len(targets)} targets do not match (N, A, ...)")
    device = scores.device   # targets may be built on the CPU for a model on an accelerator
    labels = torch.stack([t.labels for t in targets]).to(device)         # (N, A)
    anchors = anchors.to(device=device, dtype=deltas.dtype)
    used = labels >= 0
    positive = labels > 0
    ce = F.cross_entropy(scores[used], labels[used], reduction="none")   # (U,) in row-major order
    pos_in_used = positive[used]
    weights = torch.ones_like(ce)
    if iou_balanced and bool(pos_in_used.any()):
        with torch.no_grad():
            regressed = decode_boxes(deltas[positive], anchors.expand(scores.shape[0], -1, -1)[positive])
            truth = torch.cat([g[t.matched[t.labels > 0]] for g, t in zip(gt_boxes, targets)])
            iou = box_iou_aligned(regressed, truth.to(device=device, dtype=deltas.dtype))
        weights[pos_in_used] = iou_balanced_weights(iou, ce[pos_in_used], eta)
    cls = (weights * ce).sum() / max(int(used.sum()), 1)
    target_deltas = _positive_rows([t.deltas for t in targets], targets).to(device=device, dtype=deltas.dtype)
    num_pos = int(positive.sum())
    reg = F.smooth_l1_loss(deltas[positive], target_deltas, beta=smooth_l1_beta,
                           reduction="sum") / max(num_pos, 1)
    return RPNLoss(cls + reg_weight * reg, cls, reg, num_pos)


def _positive_rows(per_sample: list[torch.Tensor], targets: list[AnchorTargets]) -> torch.Tensor:
    """The rows of each sample's (A, ...) tensor at its positive anchors, in batch then anchor order (the
    order of ``x[labels > 0]`` on the stacked batch) without stacking whole (N, A, ...) copies."""
    return torch.cat([rows[t.labels > 0] for rows, t in zip(per_sample, targets)])
