"""Auto-context refinement (head paper §2.5, Eq. 5): Y^k = G^k(X + Y^{k-1}), Y^0 = 0, k = 1..K (K = 2).

Level k sees the volume plus the foreground probability map of level k-1 (element-wise sum, one
channel). Levels are trained one after the other (train.py): while level k trains, levels < k are
frozen and in eval mode and only supply its input.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

__all__ = ["PAPER_LEVELS", "context_input", "foreground_probability", "AutoContext"]

PAPER_LEVELS = 2


def context_input(volume: torch.Tensor, previous_probability: torch.Tensor | None) -> torch.Tensor:
    """J(X, Y^{k-1}) = X + Y^{k-1}; ``None`` stands for the level-0 map, all zeros.

    >>> context_input(torch.ones(1, 1, 2), torch.tensor([[[0.25, 0.5]]])).tolist()
    [[[1.25, 1.5]]]
    """
    if previous_probability is None:
        return volume.clone()
    if previous_probability.shape != volume.shape:
        raise ValueError(f"probability map shape {tuple(previous_probability.shape)} must equal the volume shape "
                         f"{tuple(volume.shape)}; pass the foreground channel only, shape (B, 1, *S)")
    return volume + previous_probability


def foreground_probability(logits: torch.Tensor) -> torch.Tensor:
    """P(head) per voxel, ``(B, 1, *S)``: channel 1 of the softmax over classes."""
    return torch.softmax(logits, dim=1)[:, 1:2]


class AutoContext(nn.Module):
    """The cascade at inference: each level's main output feeds the next; returns every level's main logits.

    Each level is a network whose ``forward`` returns a tuple with the main logits first.
    """

    def __init__(self, levels: Sequence[nn.Module]):
        super().__init__()
        if len(levels) < 1:
            raise ValueError("AutoContext needs at least one level (the paper uses 2)")
        self.levels = nn.ModuleList(levels)

    def forward(self, volume: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # Level 1 sees X + 0 = X; the sum below is context_input without its shape check, which
        # would be Python control flow on traced shapes.
        logits = [self.levels[0](volume)[0]]
        for level in self.levels[1:]:
            logits.append(level(volume + foreground_probability(logits[-1]))[0])
        return tuple(logits)
