"""3D U-Net landmark detector of FetusMap (Fig. 3) and FetusMapV2 (§3.1, Fig. 4).

::

    x ─ enc0 ──────────────────────────────────────── cat ─ dec0 ─ 1x1x1 head ─> heatmaps
         └ pool ─ enc1 ─────────────────────── cat ─ dec1 ─ up ┘
                   └ pool ─ ... ─ encD (bottleneck) ─ up ┘

enc/dec blocks are ``convs`` x (Conv-BN-ReLU) (models.blocks.DoubleConv), "up" is a stride-2 transposed
convolution with BN and ReLU (FetusMap §2.1: every Conv and Deconv is followed by BN and ReLU);
channels double per level from ``channels``. BatchNorm keeps no running statistics (V2 §4.1), so
train and eval compute the same thing and forward writes no state. Each input side must be divisible
by 2**depth (176,112,112 and 208,128,144 are).
"""
from __future__ import annotations

import torch
from torch import nn

from models.blocks import DoubleConv, check_channels, conv_nd, norm_nd, pool_nd

__all__ = ["UpConv", "PoseUNet", "fetusmap_v2", "fetusmap", "check_input_size"]


class UpConv(nn.Sequential):
    """Stride-2 transposed convolution -> BN -> ReLU: doubles each spatial side.

    >>> UpConv(3, 8, 4)(torch.zeros(1, 8, 2, 2, 2)).shape
    torch.Size([1, 4, 4, 4, 4])
    """

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, *, track_running_stats: bool = False):
        check_channels(in_channels=in_channels, out_channels=out_channels)
        transpose = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}[spatial_dims]
        super().__init__(transpose(in_channels, out_channels, 2, stride=2, bias=False),
                         norm_nd(spatial_dims)(out_channels, track_running_stats=track_running_stats),
                         nn.ReLU(inplace=False))


class PoseUNet(nn.Module):
    """U-Net mapping an image to one heatmap (logits) per landmark, at input resolution.

    >>> net = PoseUNet(3, 1, 5, channels=4, depth=2)
    >>> net(torch.zeros(1, 1, 8, 8, 8)).shape
    torch.Size([1, 5, 8, 8, 8])
    """

    def __init__(self, spatial_dims: int = 3, in_channels: int = 1, out_channels: int = 22, *, channels: int = 32,
                 depth: int = 4, convs: int = 2, track_running_stats: bool = False):
        super().__init__()
        check_channels(in_channels=in_channels, out_channels=out_channels, channels=channels, convs=convs)
        if not isinstance(depth, int) or depth < 1:
            raise ValueError(f"depth (number of poolings) must be a positive int, got {depth!r}")
        self.spatial_dims, self.depth = spatial_dims, depth
        widths = [channels * 2 ** level for level in range(depth + 1)]
        block = dict(convs=convs, track_running_stats=track_running_stats)
        self.encoders = nn.ModuleList(
            [DoubleConv(spatial_dims, in_channels, widths[0], **block)]
            + [nn.Sequential(pool_nd(spatial_dims)(2), DoubleConv(spatial_dims, widths[i - 1], widths[i], **block))
               for i in range(1, depth + 1)])
        self.ups = nn.ModuleList([UpConv(spatial_dims, widths[i + 1], widths[i], track_running_stats=track_running_stats)
                                  for i in range(depth)])
        self.decoders = nn.ModuleList([DoubleConv(spatial_dims, 2 * widths[i], widths[i], **block) for i in range(depth)])
        self.head = conv_nd(spatial_dims)(widths[0], out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for encoder in self.encoders:
            x = encoder(x)
            skips.append(x)
        x = skips.pop()                                         # the bottleneck
        for level in reversed(range(self.depth)):               # a Python int loop: unrolled by fx
            x = self.decoders[level](torch.cat([skips[level], self.ups[level](x)], dim=1))
        return self.head(x)


def check_input_size(input_size: tuple[int, ...], depth: int) -> None:
    """Raise ValueError unless every side of ``input_size`` is divisible by 2**depth."""
    step = 2 ** depth
    bad = [s for s in input_size if s % step]
    if bad:
        fixed = ",".join(str(max(step, round(s / step) * step)) for s in input_size)
        raise ValueError(f"input size {tuple(input_size)} has sides {bad} not divisible by 2**depth = {step}; "
                         f"use e.g. {fixed}")


def fetusmap_v2(**overrides) -> PoseUNet:
    """FetusMapV2 detector: 22 landmarks, base 32, 4 poolings, 2 convs per block: 22,579,446 parameters.

    V2 Table 4 lists 147.98 MB of parameters (about 37.0 M float32); the text gives no widths for Fig. 4,
    so ours are 3D U-Net's (Cicek et al. 2016). ``convs=3`` gives 34,360,438.
    """
    return PoseUNet(**{"spatial_dims": 3, "in_channels": 1, "out_channels": 22, "channels": 32, "depth": 4,
                       "convs": 2, "track_running_stats": False, **overrides})


def fetusmap(**overrides) -> PoseUNet:
    """FetusMap detector: 16 landmarks, base 32, 4 poolings, 3 convs per block ("consecutive Conv layers"
    deepen each block, §2.1): 34,360,240 parameters."""
    return PoseUNet(**{"spatial_dims": 3, "in_channels": 1, "out_channels": 16, "channels": 32, "depth": 4,
                       "convs": 3, "track_running_stats": False, **overrides})
