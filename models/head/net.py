"""USegNet-DS-HAS (head paper §2.3-2.4, Fig. 2a): a 3D U-Net with deep supervision and hybrid attention.

Layout for the paper widths ``channels = (32, 64, 64, 64)``, ``kernel_sizes = (3, 3, 5, 5)``::

    x ─ enc0 (2x Conv-BN-ReLU k3) ─ e0 ───────────────────────── SAM0 ─┐
        └ pool ─ enc1 (k3) ─ e1 ─────────────────────── SAM1 ─┐        │
                 └ pool ─ enc2 (k5) ─ e2 ───── SAM2 ─┐        │        │
                          └ pool ─ enc3 (k5) ─ up2 ─ cat ─ UAM2 ─ up1 ─ cat ─ UAM1 ─ up0 ─ cat ─ UAM0 ─ 1x1 ─ main
                                                          └ 1x1 ─ aux 1/4      └ 1x1 ─ aux 1/2

Three max-poolings; SAM on every skip, UAM after every concatenation, auxiliary 1x1 heads behind the
deeper UAMs (no deconvolution in side branches: the loss downscales the labels instead).
Up-sampling is a stride-2 transposed conv with the kernel of the level it comes from, then BN-ReLU.
Each spatial size must be divisible by 2 ** pools (:meth:`USegNetHAS.check_input_shape`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from models.blocks import ConvNormAct, DoubleConv, UpConv, check_channels, conv_nd, pool_nd
from models.head.attention import AttentionModule

__all__ = ["HeadNetConfig", "USegNetHAS", "truncated_normal_init", "PAPER_CONFIG", "TINY_CONFIG", "PAPER_INPUT_SIZE"]

# 0.4 x the paper's 388 x 258 x 440 volumes, rounded to multiples of 8 (three poolings).
PAPER_INPUT_SIZE = (152, 104, 176)


@dataclass(frozen=True)
class HeadNetConfig:
    """Widths and kernels per level (full .. 1/2**pools resolution) and the attention module sizes."""

    channels: tuple[int, ...] = (32, 64, 64, 64)
    kernel_sizes: tuple[int, ...] = (3, 3, 5, 5)
    attention_channels: int = 32        # P(X): the 1x1x1 projection width
    attention_out_channels: int = 64    # channels every SAM/UAM emits
    attention_kernel_size: int = 3      # the two convs that make W(X)
    in_channels: int = 1
    out_channels: int = 2               # classes, background included (softmax + cross entropy)
    deep_supervision: bool = True       # auxiliary heads behind the deeper UAMs (USegNet-DS)
    sam: bool = True                    # attention on every skip (HAS, §2.4)
    uam: bool = True                    # attention after every concatenation; off: a plain Conv-BN-ReLU fuses

    def __post_init__(self) -> None:
        if len(self.channels) < 2 or len(self.channels) != len(self.kernel_sizes):
            raise ValueError(f"channels {self.channels} and kernel_sizes {self.kernel_sizes} need one entry per "
                             "level and at least 2 levels (the paper uses 4: three max-poolings)")
        check_channels(**{f"channels[{i}]": c for i, c in enumerate(self.channels)})
        check_channels(attention_channels=self.attention_channels, in_channels=self.in_channels,
                       attention_out_channels=self.attention_out_channels)
        for i, k in enumerate((*self.kernel_sizes, self.attention_kernel_size)):
            if not isinstance(k, int) or k < 1 or k % 2 == 0:
                raise ValueError(f"kernel sizes must be odd positive ints, got {k!r} (entry {i}); use 3 or 5")
        if not isinstance(self.out_channels, int) or self.out_channels < 2:
            raise ValueError(f"out_channels counts classes with background and must be >= 2, "
                             f"got {self.out_channels!r}")

    @property
    def pools(self) -> int:
        return len(self.channels) - 1


PAPER_CONFIG = HeadNetConfig()
TINY_CONFIG = HeadNetConfig(channels=(4, 8, 8, 8), attention_channels=4, attention_out_channels=8)


def truncated_normal_init(module: nn.Module) -> None:
    """Conv weights from a normal truncated at 2 std (paper §3: "initialized from truncated normal
    distributions"; the std is ours: He's sqrt(2 / fan_in)), biases 0.

    >>> c = nn.Conv3d(4, 8, 3); truncated_normal_init(c)
    >>> bool(c.weight.detach().abs().max() <= 2 * (2 / (4 * 27)) ** 0.5), float(c.bias.detach().abs().max())
    (True, 0.0)
    """
    transposed = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, *transposed)):
        w = module.weight                              # (out, in, k...) or, transposed, (in, out, k...)
        fan_in = w.shape[0] * w[0, 0].numel() if isinstance(module, transposed) else w[0].numel()
        std = (2.0 / fan_in) ** 0.5
        nn.init.trunc_normal_(module.weight, std=std, a=-2 * std, b=2 * std)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class USegNetHAS(nn.Module):
    """USegNet with deep supervision and hybrid attention; ``forward`` returns ``(main, aux_1/2, aux_1/4, ...)``.

    Each output holds class logits ``(B, out_channels, *S / 2**i)``: the main head at full
    resolution, then one auxiliary head per deeper UAM (pools - 1 of them: 2 for the paper).

    >>> net = USegNetHAS(3, 1, 2, channels=(2, 4, 4, 4), attention_channels=2, attention_out_channels=4)
    >>> [tuple(o.shape) for o in net(torch.zeros(1, 1, 8, 8, 16))]
    [(1, 2, 8, 8, 16), (1, 2, 4, 4, 8), (1, 2, 2, 2, 4)]
    """

    def __init__(self, spatial_dims: int = 3, in_channels: int = 1, out_channels: int = 2, *,
                 channels: Sequence[int] = PAPER_CONFIG.channels, kernel_sizes: Sequence[int] | None = None,
                 attention_channels: int = 32, attention_out_channels: int = 64, attention_kernel_size: int = 3,
                 deep_supervision: bool = True, sam: bool = True, uam: bool = True):
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
        channels = tuple(channels)
        if kernel_sizes is None:  # paper: 3x3x3 in the shallow half, 5x5x5 in the deep half
            kernel_sizes = tuple(3 if i < (len(channels) + 1) // 2 else 5 for i in range(len(channels)))
        self.spatial_dims = spatial_dims
        self.config = HeadNetConfig(channels, tuple(kernel_sizes), attention_channels, attention_out_channels,
                                    attention_kernel_size, in_channels, out_channels, deep_supervision, sam, uam)
        cfg = self.config
        levels = len(channels)
        self.pool = pool_nd(spatial_dims)(kernel_size=2, stride=2)
        self.encoders = nn.ModuleList(
            DoubleConv(spatial_dims, in_channels if i == 0 else channels[i - 1], channels[i], kernel_size=k)
            for i, k in enumerate(cfg.kernel_sizes))
        attention = dict(inner_channels=attention_channels, kernel_size=attention_kernel_size)
        # Decoder modules are indexed by the level they produce: 0 (full res) .. levels - 2.
        skip_width = [attention_out_channels if sam else channels[i] for i in range(levels - 1)]
        self.sams = nn.ModuleList(AttentionModule(spatial_dims, channels[i], attention_out_channels, **attention)
                                  if sam else nn.Identity() for i in range(levels - 1))
        self.ups = nn.ModuleList(
            UpConv(spatial_dims, channels[-1] if i == levels - 2 else attention_out_channels, channels[i],
                   kernel_size=cfg.kernel_sizes[i + 1])
            for i in range(levels - 1))
        self.uams = nn.ModuleList(
            AttentionModule(spatial_dims, channels[i] + skip_width[i], attention_out_channels, **attention) if uam
            else ConvNormAct(spatial_dims, channels[i] + skip_width[i], attention_out_channels,
                             kernel_size=cfg.kernel_sizes[i])
            for i in range(levels - 1))
        conv = conv_nd(spatial_dims)
        self.heads = nn.ModuleList(conv(attention_out_channels, out_channels, kernel_size=1)
                                   for _ in range(levels - 1 if deep_supervision else 1))
        self.apply(truncated_normal_init)

    @classmethod
    def from_config(cls, config: HeadNetConfig, spatial_dims: int = 3) -> "USegNetHAS":
        """The network of ``config`` (e.g. PAPER_CONFIG or TINY_CONFIG)."""
        return cls(spatial_dims, config.in_channels, config.out_channels, channels=config.channels,
                   kernel_sizes=config.kernel_sizes, attention_channels=config.attention_channels,
                   attention_out_channels=config.attention_out_channels,
                   attention_kernel_size=config.attention_kernel_size, deep_supervision=config.deep_supervision,
                   sam=config.sam, uam=config.uam)

    def check_input_shape(self, spatial_shape: Sequence[int]) -> None:
        """Raise ValueError unless every spatial size is a positive multiple of 2 ** pools."""
        factor = 2 ** self.config.pools
        if len(spatial_shape) != self.spatial_dims or any(s < factor or s % factor for s in spatial_shape):
            raise ValueError(f"input spatial shape {tuple(spatial_shape)} must have {self.spatial_dims} sizes, each a "
                             f"multiple of {factor} (the net pools {self.config.pools} times); resample the volume "
                             f"to e.g. {tuple(max(factor, round(s / factor) * factor) for s in spatial_shape)}")

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Encoder features per level, full resolution first (the last is the bottleneck)."""
        features = []
        for i, encoder in enumerate(self.encoders):
            x = encoder(x if i == 0 else self.pool(x))
            features.append(x)
        return features

    def decode(self, features: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """Up path from the bottleneck: up-sample, concat with SAM(skip), UAM, 1x1 head; finest output first."""
        x = features[-1]
        outputs = []
        for i in reversed(range(len(self.uams))):
            x = self.uams[i](torch.cat([self.ups[i](x), self.sams[i](features[i])], dim=1))
            if i < len(self.heads):                     # without deep supervision only the main head exists
                outputs.append(self.heads[i](x))
        return tuple(reversed(outputs))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.decode(self.encode(x))
