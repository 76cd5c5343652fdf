"""The face detector's network (paper 003, Fig. 2): 3D VGG-16-style backbone and a 3D RPN head.

::

    x ─ block1 ─ pool ─ block2 ─ pool ─ block3 ─ pool ─ block4          (blocks: 2 x Conv-BN-ReLU 3^3)
                                          │                │
                                          │         upsample x2 (trilinear)
                                          └──── cat ───────┘
                                                 │
                                   fuse: Conv-BN-ReLU 3^3        (stride 4 feature map)
                                                 │
                                   rpn:  Conv-BN-ReLU 3^3
                                          ├─ cls 1^3: A * (K + 1) scores
                                          └─ reg 1^3: A * 6 deltas (tx, ty, tz, tw, th, td)

The network returns the two raw maps; :func:`flatten_head` reshapes them to per-anchor rows in the
order of :func:`models.face.anchors.generate_anchors` (kept outside ``forward`` so the traced graph
is plain convolutions). Input sizes must be divisible by 8 (three poolings, then one upsampling).

Default widths (32, 64, 128, 256), fuse 128, RPN 128 channels: 5,383,136 parameters
(``FaceRPN()``); :func:`tiny_config` (4, 8, 8, 8) for tests has 22,284.

Recommended input for the paper-size benchmark: 160 x 160 x 160 voxels, batch 1, default widths. The
paper gives no input size; it resamples volumes to 1.3 mm voxels and sizes anchors and target boxes
in those voxels (13-28, 14^3 / 24^3), so the input must be a field of view in 1.3 mm voxels, not a
downscaled volume. 160 x 1.3 mm = 208 mm per axis holds a second/third-trimester fetal head
(occipito-frontal diameter up to ~110 mm) with the face anywhere in it, is divisible by 8, and gives
a 40^3 head grid (4.1 M anchors). memplan.simulate_step puts a plain Adam step at 3.51 GiB there
(1.84 GiB at 128^3, 6.01 GiB at 192^3), most of it block 1's full-resolution activations.

>>> import torch
>>> from models.blocks import count_parameters
>>> count_parameters(FaceRPN()), count_parameters(FaceRPN(**tiny_config()))
(5383136, 22284)
>>> cls, reg = FaceRPN(**tiny_config())(torch.zeros(1, 1, 16, 16, 16))
>>> cls.shape, reg.shape
(torch.Size([1, 384, 4, 4, 4]), torch.Size([1, 384, 4, 4, 4]))
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from models.blocks import ConvNormAct, DoubleConv, check_channels, conv_nd, pool_nd
from models.face.anchors import ANCHOR_SIZES_VOX, LANDMARKS

__all__ = ["FaceRPN", "tiny_config", "flatten_head", "FEATURE_STRIDE"]

#: input voxels per feature cell of the head (three poolings, one x2 upsampling)
FEATURE_STRIDE = 4


def tiny_config() -> dict[str, Any]:
    """Keyword arguments of a small FaceRPN for CPU tests."""
    return {"channels": (4, 8, 8, 8), "fuse_channels": 8, "rpn_channels": 8}


class FaceRPN(nn.Module):
    """3D VGG-style backbone + RPN head; ``num_landmarks`` K classes plus background per anchor."""

    def __init__(self, spatial_dims: int = 3, in_channels: int = 1, num_landmarks: int = len(LANDMARKS), *,
                 channels: Sequence[int] = (32, 64, 128, 256), fuse_channels: int = 128, rpn_channels: int = 128,
                 num_anchors: int = len(ANCHOR_SIZES_VOX) ** 3):
        super().__init__()
        if spatial_dims != 3:
            raise ValueError(f"FaceRPN detects 3D boxes: spatial_dims must be 3, got {spatial_dims!r}")
        if len(channels) != 4:
            raise ValueError(f"channels must give the 4 block widths (three poolings), got {tuple(channels)}")
        check_channels(in_channels=in_channels, num_landmarks=num_landmarks, fuse_channels=fuse_channels,
                       rpn_channels=rpn_channels, num_anchors=num_anchors,
                       **{f"channels[{i}]": c for i, c in enumerate(channels)})
        self.num_classes = num_landmarks + 1
        self.num_anchors = num_anchors
        c1, c2, c3, c4 = channels
        self.block1 = DoubleConv(3, in_channels, c1)
        self.block2 = DoubleConv(3, c1, c2)
        self.block3 = DoubleConv(3, c2, c3)
        self.block4 = DoubleConv(3, c3, c4)
        self.pool = pool_nd(3)(kernel_size=2, stride=2)
        self.up = nn.Upsample(scale_factor=2, mode="trilinear", align_corners=False)
        self.fuse = ConvNormAct(3, c3 + c4, fuse_channels)
        self.rpn = ConvNormAct(3, fuse_channels, rpn_channels)
        self.cls = conv_nd(3)(rpn_channels, num_anchors * self.num_classes, kernel_size=1)
        self.reg = conv_nd(3)(rpn_channels, num_anchors * 6, kernel_size=1)
        for head in (self.cls, self.reg):   # Faster R-CNN's RPN init: small weights, zero bias
            nn.init.normal_(head.weight, std=0.01)
            nn.init.zeros_(head.bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        e1 = self.block1(x)
        e2 = self.block2(self.pool(e1))
        e3 = self.block3(self.pool(e2))
        e4 = self.block4(self.pool(e3))
        features = self.fuse(torch.cat([e3, self.up(e4)], dim=1))
        hidden = self.rpn(features)
        return self.cls(hidden), self.reg(hidden)


def flatten_head(cls_map: torch.Tensor, reg_map: torch.Tensor, num_anchors: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw head maps -> (N, cells * A, K + 1) scores and (N, cells * A, 6) deltas, anchor order.

    >>> c, r = flatten_head(torch.arange(12.).reshape(1, 6, 1, 1, 2), torch.zeros(1, 12, 1, 1, 2), 2)
    >>> c[0].tolist()
    [[0.0, 2.0, 4.0], [6.0, 8.0, 10.0], [1.0, 3.0, 5.0], [7.0, 9.0, 11.0]]
    """
    n, channels = cls_map.shape[:2]
    if channels % num_anchors or reg_map.shape[1] != 6 * num_anchors:
        raise ValueError(f"head maps with {channels} and {reg_map.shape[1]} channels do not fit {num_anchors} "
                         f"anchors (need A * (K + 1) and A * 6)")
    grid = cls_map.shape[2:]
    scores = cls_map.reshape(n, num_anchors, channels // num_anchors, *grid).permute(0, 3, 4, 5, 1, 2)
    deltas = reg_map.reshape(n, num_anchors, 6, *grid).permute(0, 3, 4, 5, 1, 2)
    return scores.reshape(n, -1, channels // num_anchors), deltas.reshape(n, -1, 6)
