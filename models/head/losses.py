"""Deeply supervised cross entropy (head paper Eq. 2): main loss plus weighted auxiliary losses.

    L = w_main * CE(main, Y) + sum_m w_m * CE(aux_m, S_m(Y))

S_m downsamples the label map to the auxiliary output's grid by nearest-neighbour sampling (the
paper "downscales the ground truth" instead of deconvolving the side branches). Weights default to
the paper's Eq. 2: every term 1.0. The L2 term lambda * ||W||^2 of Eq. 2 is the optimizer's
weight decay (see train.py), not part of this loss.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["downscale_labels", "DeepSupervisionLoss", "PAPER_AUX_WEIGHTS"]

PAPER_AUX_WEIGHTS = (1.0, 1.0)  # aux at 1/2 and 1/4 resolution, Eq. 2 sums them unweighted


def downscale_labels(labels: torch.Tensor, spatial_shape: Sequence[int]) -> torch.Tensor:
    """Nearest-neighbour resampling of an integer label map ``(B, *S)`` onto ``spatial_shape``.

    >>> downscale_labels(torch.arange(8).reshape(1, 8), (4,)).tolist()
    [[0, 2, 4, 6]]
    """
    resized = F.interpolate(labels[:, None].float(), size=tuple(spatial_shape), mode="nearest")
    return resized[:, 0].round().long()


class DeepSupervisionLoss(nn.Module):
    """Cross entropy of the main output plus ``aux_weights[m]`` x cross entropy of auxiliary output m.

    ``forward(outputs, labels)`` takes the network's tuple ``(main, aux_1, ...)`` of logits and an integer
    label map ``(B, *S)`` on the main output's grid.
    """

    def __init__(self, aux_weights: Sequence[float] = PAPER_AUX_WEIGHTS, *, main_weight: float = 1.0):
        super().__init__()
        weights = (float(main_weight), *(float(w) for w in aux_weights))
        if any(w < 0 for w in weights) or weights[0] == 0:
            raise ValueError(f"loss weights must be >= 0 with a positive main weight, got main={main_weight}, "
                             f"aux={tuple(aux_weights)}")
        self.weights = weights

    def terms(self, outputs: Sequence[torch.Tensor], labels: torch.Tensor) -> list[torch.Tensor]:
        """Unweighted cross entropy of every output against the (downscaled) labels, main first."""
        if len(outputs) != len(self.weights):
            raise ValueError(f"got {len(outputs)} network outputs but {len(self.weights)} loss weights "
                             f"(1 main + {len(self.weights) - 1} aux); pass aux_weights with one entry per "
                             "auxiliary output")
        if labels.shape[1:] != outputs[0].shape[2:]:
            raise ValueError(f"labels shape {tuple(labels.shape)} must be (B, *S) with "
                             f"S = {tuple(outputs[0].shape[2:])}, the main output's spatial shape")
        return [F.cross_entropy(out, labels if i == 0 else downscale_labels(labels, out.shape[2:]))
                for i, out in enumerate(outputs)]

    def forward(self, outputs: Sequence[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        terms = self.terms(outputs, labels)
        return sum((w * t for w, t in zip(self.weights, terms)), torch.zeros((), device=labels.device))
