"""Losses: the KL term K (V2 Eq. 5), Pair Loss (Eq. 3, 4, 6), the overall V2 loss (Eq. 8) and
FetusMap's L2 heatmap regression.

Predictions are logits (B, L, X, Y, Z); the network's distribution for landmark i is the spatial
softmax of channel i, written S(P_i) below. Targets are Eq. 2 Gaussians (each sums to ~1).
Per-sample terms have shape (B,); losses return their batch mean.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from models.pose.landmarks import V2_HEAD_TRUNK, V2_LIMB_PAIRS

__all__ = ["spatial_log_softmax", "kl_term", "pair_l1", "pair_l2", "pair_loss", "FetusMapV2Loss",
           "HeatmapL2Loss"]


def spatial_log_softmax(logits: torch.Tensor) -> torch.Tensor:
    """log S(P): log-softmax over the spatial axes of (B, L, *spatial), same shape."""
    flat = logits.flatten(2)
    return torch.log_softmax(flat, dim=-1).view_as(logits)


def _k(log_probs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return -(log_probs * target).flatten(1).sum(-1)


def _pair(lp_l: torch.Tensor, lp_r: torch.Tensor, target_l: torch.Tensor, target_r: torch.Tensor
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """(L1, L2) per sample from log-probabilities, so each channel's softmax is computed once."""
    l1 = torch.minimum(_k(lp_l, target_l) + _k(lp_r, target_r), _k(lp_l, target_r) + _k(lp_r, target_l))
    l2 = -(torch.logaddexp(lp_l, lp_r) * (target_l + target_r)).flatten(1).sum(-1)
    return l1, l2


def kl_term(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Eq. 5 per sample: K(P, G) = -sum_i sum_voxels log S(P_i) * G_i, shape (B,).

    Its minimum over P is the entropy of G, reached at log S(P_i) = log G_i (hence "KL").
    """
    return _k(spatial_log_softmax(pred), target)


def pair_l1(pred_l: torch.Tensor, pred_r: torch.Tensor, target_l: torch.Tensor, target_r: torch.Tensor) -> torch.Tensor:
    """Eq. 4 per sample: min(K(P_l, G_l) + K(P_r, G_r), K(P_l, G_r) + K(P_r, G_l)), shape (B,)."""
    return _pair(spatial_log_softmax(pred_l), spatial_log_softmax(pred_r), target_l, target_r)[0]


def pair_l2(pred_l: torch.Tensor, pred_r: torch.Tensor, target_l: torch.Tensor, target_r: torch.Tensor) -> torch.Tensor:
    """Eq. 6 per sample: -sum_i sum_voxels log(S(P_l^i) + S(P_r^i)) * (G_l^i + G_r^i), shape (B,).

    The joint distribution of the i-th landmark of both sides must cover both targets: two
    predictions on the same side leave one target uncovered.
    """
    return _pair(spatial_log_softmax(pred_l), spatial_log_softmax(pred_r), target_l, target_r)[1]


def pair_loss(pred_l: torch.Tensor, pred_r: torch.Tensor, target_l: torch.Tensor, target_r: torch.Tensor) -> torch.Tensor:
    """Eq. 3 per sample: L_pair = L1 + L2, shape (B,)."""
    return sum(_pair(spatial_log_softmax(pred_l), spatial_log_softmax(pred_r), target_l, target_r))


class FetusMapV2Loss(nn.Module):
    """Eq. 8: L_pair(arms) + L_pair(legs) + K(head and trunk), averaged over the batch.

    ``head_trunk`` and ``limb_pairs`` are channel indices (defaults: V2's groups ht, la/ra, ll/rl).
    """

    def __init__(self, head_trunk: Sequence[int] = V2_HEAD_TRUNK,
                 limb_pairs: Sequence[tuple[Sequence[int], Sequence[int]]] = V2_LIMB_PAIRS):
        super().__init__()
        for left, right in limb_pairs:
            if len(left) != len(right):
                raise ValueError(f"limb pair {left} / {right} must have as many left as right channels")
        self.head_trunk = list(head_trunk)
        self.limb_pairs = [(list(left), list(right)) for left, right in limb_pairs]

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        log_probs = spatial_log_softmax(pred)
        total = _k(log_probs[:, self.head_trunk], target[:, self.head_trunk])
        for left, right in self.limb_pairs:
            l1, l2 = _pair(log_probs[:, left], log_probs[:, right], target[:, left], target[:, right])
            total = total + l1 + l2
        return total.mean()


class HeatmapL2Loss(nn.Module):
    """FetusMap §2.1: L2 regression of the heatmaps, sum over voxels, mean over batch and landmarks."""

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return ((pred - target) ** 2).flatten(2).sum(-1).mean()
