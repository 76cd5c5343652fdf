"""Branched 3D network of the femur paper (Fig. 2): one shared encoder, a segmentation branch and a
deeper landmark-localization branch, joined by bidirectional cross connections.

Layout (``channels = (c0, c1, c2, c3)``; levels are full, 1/2, 1/4 and 1/8 resolution)::

    x ─ stem(c0) ─ e0 ──────────────────────────────────────────────────┐ skip 2
                   └ pool ─ enc(c1) ─ e1 ───────────────────────┐ skip 1 │
                                      ├ pool ─ seg_bottom(c2) ─ s2 ──────┼──┼────┐ cross A (seg→loc)
                                      └ pool ─ loc_enc2(c2) ─ l2 ─ cat(l2,s2) ─ pool ─ loc_bottom(c3) ─ l3
    loc decoder:  up(l3) ⊕ l2 (its one skip) ─ loc_dec2(c2) ─ d2 ───────────┐ cross B (loc→seg)
    seg decoder:  up(s2 ⊕ d2) ⊕ e1 ─ seg_dec1(c1) ─ s1 ─ up ⊕ e0 ─ seg_dec0(c0) ─ s0 ─ 1x1 ─ softmax
    loc decoder:  up(d2) ⊕ s1 (cross C, seg→loc) ─ loc_dec1(c1) ─ d1 ─ up ─ loc_dec0(c0) ─ d0 ─ 1x1 ─ H1, H2

``⊕`` is channel concatenation. Every convolution is 3x3x3 (Conv-BN-ReLU); up-sampling is a 2x2x2
transposed convolution, so each spatial size must be divisible by 8 (:meth:`check_input_shape`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from models.blocks import DoubleConv, UpConv, check_channels, conv_nd, pool_nd

__all__ = ["BranchConfig", "BranchedFemurNet", "PAPER_CONFIG", "TINY_CONFIG"]

DOWNSAMPLE_FACTOR = 8  # three poolings on the localization path
BRANCHES = ("both", "seg", "loc")


@dataclass(frozen=True)
class BranchConfig:
    """Widths of the branched network: ``channels[i]`` feature maps at level ``i`` (full .. 1/8 res)."""

    channels: tuple[int, int, int, int] = (16, 32, 64, 128)
    in_channels: int = 1
    out_channels: int = 2  # segmentation classes, background included
    num_landmarks: int = 2
    cross: bool = True     # the cross connections A, B, C (BRNDC); False: the basic branched network (BRN, BRND)
    branches: str = "both"  # "seg": Unet-S, "loc": Unet-L (the paper's one-branch baselines, no cross connections)

    def __post_init__(self) -> None:
        if len(self.channels) != 4:
            raise ValueError(f"channels must have 4 widths (full, 1/2, 1/4, 1/8 resolution), got {self.channels!r}")
        check_channels(**{f"channels[{i}]": c for i, c in enumerate(self.channels)})
        check_channels(in_channels=self.in_channels, num_landmarks=self.num_landmarks)
        if self.branches not in BRANCHES:
            raise ValueError(f"branches must be one of {BRANCHES}, got {self.branches!r}")
        if self.branches != "both" and self.cross:
            raise ValueError(f"a one-branch network ({self.branches!r}: Unet-S or Unet-L) has no cross connections; "
                             "pass cross=False")
        if not isinstance(self.out_channels, int) or self.out_channels < 2:
            raise ValueError(f"out_channels counts classes with background and must be >= 2, got {self.out_channels!r}")


PAPER_CONFIG = BranchConfig(channels=(16, 32, 64, 128))
TINY_CONFIG = BranchConfig(channels=(2, 4, 4, 8))


def _up(in_channels: int, out_channels: int) -> nn.Module:
    """Learned 2x up-sampling (transposed conv, kernel 2, stride 2, with bias; no BN)."""
    return UpConv(3, in_channels, out_channels, norm=False, act=False)


class BranchedFemurNet(nn.Module):
    """Joint femur segmentation and endpoint localization (BRNDC of the paper, Fig. 2; ``cross=False``:
    the basic branched network BRN, two branches sharing only the encoder).

    ``forward(x)`` returns ``(seg_probs, heatmap_1, heatmap_2, ...)``: softmax class probabilities of
    shape ``(B, out_channels, *S)`` and one ``(B, 1, *S)`` heatmap per landmark.

    >>> net = BranchedFemurNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(2, 4, 4, 8))
    >>> seg, h1, h2 = net(torch.zeros(1, 1, 8, 8, 16))
    >>> tuple(seg.shape), tuple(h1.shape), round(seg.sum(1).mean().item(), 4)
    ((1, 2, 8, 8, 16), (1, 1, 8, 8, 16), 1.0)
    """

    def __init__(self, spatial_dims: int = 3, in_channels: int = 1, out_channels: int = 2, *,
                 channels: tuple[int, int, int, int] = (16, 32, 64, 128), num_landmarks: int = 2, cross: bool = True,
                 branches: str = "both"):
        super().__init__()
        if spatial_dims != 3:
            raise ValueError(f"BranchedFemurNet is a 3D network: spatial_dims must be 3, got {spatial_dims!r}")
        self.config = BranchConfig(tuple(channels), in_channels, out_channels, num_landmarks, cross, branches)
        c0, c1, c2, c3 = self.config.channels
        x = 2 if cross else 1                      # a cross connection doubles its consumer's input
        self.pool = pool_nd(3)(kernel_size=2, stride=2)
        # shared encoder
        self.stem = DoubleConv(3, in_channels, c0)
        self.enc1 = DoubleConv(3, c0, c1)
        if branches != "loc":
            self._build_segmentation(c0, c1, c2, x)
        if branches != "seg":
            self._build_localization(c0, c1, c2, c3, x, num_landmarks)

    def _build_segmentation(self, c0: int, c1: int, c2: int, x: int) -> None:
        """Segmentation branch: bottom at 1/4, two long concatenating skips (e1, e0)."""
        out_channels = self.config.out_channels
        self.seg_bottom = DoubleConv(3, c1, c2)
        self.seg_up1 = _up(x * c2, c1)            # input s2 ⊕ d2 (cross B)
        self.seg_dec1 = DoubleConv(3, 2 * c1, c1)  # up ⊕ e1 (skip 1)
        self.seg_up0 = _up(c1, c0)
        self.seg_dec0 = DoubleConv(3, 2 * c0, c0)  # up ⊕ e0 (skip 2)
        self.seg_head = conv_nd(3)(c0, out_channels, kernel_size=1)

    def _build_localization(self, c0: int, c1: int, c2: int, c3: int, x: int, num_landmarks: int) -> None:
        """Localization branch: one level deeper (bottom at 1/8), one skip at 1/4."""
        self.loc_enc2 = DoubleConv(3, c1, c2)
        self.loc_bottom = DoubleConv(3, x * c2, c3)  # pool(l2 ⊕ s2): cross A
        self.loc_up2 = _up(c3, c2)
        self.loc_dec2 = DoubleConv(3, 2 * c2, c2)   # up ⊕ l2 (the skip)
        self.loc_up1 = _up(c2, c1)
        self.loc_dec1 = DoubleConv(3, x * c1, c1)   # up ⊕ s1 (cross C)
        self.loc_up0 = _up(c1, c0)
        self.loc_dec0 = DoubleConv(3, c0, c0)
        self.loc_head = conv_nd(3)(c0, num_landmarks, kernel_size=1)

    @staticmethod
    def check_input_shape(spatial_shape: tuple[int, ...]) -> None:
        """Raise ValueError unless every spatial size is a positive multiple of 8 (three 2x poolings)."""
        if len(spatial_shape) != 3 or any(int(s) < 1 or int(s) % DOWNSAMPLE_FACTOR for s in spatial_shape):
            raise ValueError(f"input spatial shape {tuple(spatial_shape)} must be 3 sizes divisible by "
                             f"{DOWNSAMPLE_FACTOR}; crop or pad the ROI (e.g. --patch 32,32,32)")

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Shared encoder: full- and half-resolution features."""
        e0 = self.stem(x)
        return e0, self.enc1(self.pool(e0))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.config.branches == "seg":
            return self._segment_only(x)
        if self.config.branches == "loc":
            return self._localize_only(x)
        e0, e1 = self.encode(x)
        e1_down = self.pool(e1)
        s2 = self.seg_bottom(e1_down)
        l2 = self.loc_enc2(e1_down)
        cross = self.config.cross                                            # a Python bool: fx specialises it
        l3 = self.loc_bottom(self.pool(torch.cat([l2, s2], dim=1) if cross else l2))        # cross A: seg -> loc
        d2 = self.loc_dec2(torch.cat([self.loc_up2(l3), l2], dim=1))                     # loc skip
        s1 = self.seg_dec1(torch.cat([self.seg_up1(torch.cat([s2, d2], dim=1) if cross else s2), e1], dim=1))  # B
        s0 = self.seg_dec0(torch.cat([self.seg_up0(s1), e0], dim=1))                     # skip 2
        d1 = self.loc_dec1(torch.cat([self.loc_up1(d2), s1], dim=1) if cross else self.loc_up1(d2))  # cross C
        d0 = self.loc_dec0(self.loc_up0(d1))
        seg_probs = torch.softmax(self.seg_head(s0), dim=1)
        heatmaps = self.loc_head(d0)
        landmarks = tuple(heatmaps[:, i:i + 1] for i in range(self.config.num_landmarks))  # fx-traceable split
        return (seg_probs, *landmarks)

    def _segment_only(self, x: torch.Tensor) -> tuple[torch.Tensor]:
        """Unet-S: the encoder, decoder and skips of BRN's segmentation branch; returns (seg_probs,)."""
        e0, e1 = self.encode(x)
        s2 = self.seg_bottom(self.pool(e1))
        s1 = self.seg_dec1(torch.cat([self.seg_up1(s2), e1], dim=1))
        s0 = self.seg_dec0(torch.cat([self.seg_up0(s1), e0], dim=1))
        return (torch.softmax(self.seg_head(s0), dim=1),)

    def _localize_only(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Unet-L: the encoder, decoder and skip of BRN's localization branch; returns (H1, H2, ...)."""
        _, e1 = self.encode(x)
        l2 = self.loc_enc2(self.pool(e1))
        l3 = self.loc_bottom(self.pool(l2))
        d2 = self.loc_dec2(torch.cat([self.loc_up2(l3), l2], dim=1))
        d0 = self.loc_dec0(self.loc_up0(self.loc_dec1(self.loc_up1(d2))))
        heatmaps = self.loc_head(d0)
        return tuple(heatmaps[:, i:i + 1] for i in range(self.config.num_landmarks))
