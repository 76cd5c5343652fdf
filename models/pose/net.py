"""3D U-Net landmark detector of FetusMap (Fig. 3) and FetusMapV2 (§3.1, Fig. 4).

::

    x ─ enc0 ──────────────────────────────────────── cat ─ dec0 ─ 1x1x1 head ─> heatmaps
         └ pool ─ enc1 ─────────────────────── cat ─ dec1 ─ up ┘
                   └ pool ─ ... ─ encD (bottleneck) ─ up ┘

The network is models.blocks.UNet: enc/dec blocks are ``convs`` x (Conv-BN-ReLU), "up" is a stride-2
transposed convolution with BN and ReLU (FetusMap §2.1: every Conv and Deconv is followed by BN and ReLU);
channels double per level from ``channels``. BatchNorm keeps no running statistics (V2 §4.1), so
train and eval compute the same thing and forward writes no state. Each input side must be divisible
by 2**depth (176,112,112 and 208,128,144 are).
"""
from __future__ import annotations

import torch  # noqa: F401  (used by the doctests)

from models.blocks import UNet, check_channels

__all__ = ["PoseUNet", "fetusmap_v2", "fetusmap", "check_input_size"]


class PoseUNet(UNet):
    """U-Net mapping an image to one heatmap (logits) per landmark, at input resolution.

    >>> net = PoseUNet(3, 1, 5, channels=4, depth=2)
    >>> net(torch.zeros(1, 1, 8, 8, 8)).shape
    torch.Size([1, 5, 8, 8, 8])
    """

    def __init__(self, spatial_dims: int = 3, in_channels: int = 1, out_channels: int = 22, *, channels: int = 32,
                 depth: int = 4, convs: int = 2, track_running_stats: bool = False):
        check_channels(channels=channels)
        if not isinstance(depth, int) or isinstance(depth, bool) or depth < 1:
            raise ValueError(f"depth (number of poolings) must be a positive int, got {depth!r}")
        super().__init__(spatial_dims, in_channels, out_channels, channels=tuple(channels * 2 ** i for i in range(depth + 1)),
                         convs=convs, track_running_stats=track_running_stats)


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
