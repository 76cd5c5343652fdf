"""The attention module (AM) of the hybrid attention scheme (head paper §2.4, Fig. 3).

Given features F::

    F ─ 1x1 conv ─ P (inner channels, 32 in the paper) ──────────────┬──────────────┐
                   └ kxk conv ─ ReLU ─ kxk conv ─ W ─ softmax_c ─ A ─ T = A * P ─ cat(P, T) ─ Conv-BN-ReLU ─ out (64)

``A`` sums to 1 over the channel axis at every voxel (Eq. 4). The ReLU between the two kxk convs is
our choice (two linear convs in a row collapse into one); the paper names only the convs.
The same module is a SAM on a skip connection and a UAM after a decoder concatenation.
"""
from __future__ import annotations

import torch
from torch import nn

from models.blocks import ConvNormAct, check_channels, conv_nd

__all__ = ["AttentionModule"]


def _check_kernel(name: str, kernel_size: int) -> None:
    if not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"{name} must be an odd positive int (same padding), got {kernel_size!r}")


class AttentionModule(nn.Module):
    """P = 1x1 conv(F); A = softmax over channels of two kxk convs on P; out = conv(cat(P, A * P)).

    >>> am = AttentionModule(3, 6, 8, inner_channels=4)
    >>> tuple(am(torch.zeros(1, 6, 4, 4, 4)).shape)
    (1, 8, 4, 4, 4)
    """

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int = 64, *, inner_channels: int = 32,
                 kernel_size: int = 3, fusion_kernel_size: int = 3):
        super().__init__()
        check_channels(in_channels=in_channels, out_channels=out_channels, inner_channels=inner_channels)
        _check_kernel("kernel_size", kernel_size)
        _check_kernel("fusion_kernel_size", fusion_kernel_size)
        conv = conv_nd(spatial_dims)
        self.project = conv(in_channels, inner_channels, kernel_size=1)
        self.weigh = nn.Sequential(
            conv(inner_channels, inner_channels, kernel_size, padding=kernel_size // 2),
            nn.ReLU(inplace=False),
            conv(inner_channels, inner_channels, kernel_size, padding=kernel_size // 2),
        )
        self.fuse = ConvNormAct(spatial_dims, 2 * inner_channels, out_channels, kernel_size=fusion_kernel_size)

    def attention_map(self, projected: torch.Tensor) -> torch.Tensor:
        """A(X): softmax of the un-normalised weights W(X) across channels (Eq. 4)."""
        return torch.softmax(self.weigh(projected), dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        projected = self.project(x)
        refined = self.attention_map(projected) * projected
        return self.fuse(torch.cat([projected, refined], dim=1))
