"""Reusable layers shared by the clients (MONAI layering: blocks here, thin networks beside).

Every block takes ``spatial_dims`` (2 or 3), ``in_channels`` and ``out_channels`` and validates them
in ``__init__``; none writes state in ``forward`` (a checkpointed segment may run forward twice).
"""
from __future__ import annotations

import torch  # noqa: F401  (used by the doctests)
from torch import nn

__all__ = ["conv_nd", "norm_nd", "pool_nd", "transposed_conv_nd", "ConvNormAct", "DoubleConv", "UpConv", "UNet",
           "check_channels", "count_parameters"]


def check_channels(**channels: int) -> None:
    """Raise ValueError naming the first argument that is not a positive int."""
    for name, value in channels.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


def _check_dims(spatial_dims: int) -> None:
    if spatial_dims not in (1, 2, 3):
        raise ValueError(f"spatial_dims must be 1, 2 or 3, got {spatial_dims!r}")


def conv_nd(spatial_dims: int) -> type[nn.Module]:
    """The ConvNd class for ``spatial_dims``."""
    _check_dims(spatial_dims)
    return {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[spatial_dims]


def norm_nd(spatial_dims: int) -> type[nn.Module]:
    """The BatchNormNd class for ``spatial_dims``."""
    _check_dims(spatial_dims)
    return {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[spatial_dims]


def transposed_conv_nd(spatial_dims: int) -> type[nn.Module]:
    """The ConvTransposeNd class for ``spatial_dims``."""
    _check_dims(spatial_dims)
    return {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}[spatial_dims]


def pool_nd(spatial_dims: int) -> type[nn.Module]:
    """The MaxPoolNd class for ``spatial_dims``."""
    _check_dims(spatial_dims)
    return {1: nn.MaxPool1d, 2: nn.MaxPool2d, 3: nn.MaxPool3d}[spatial_dims]


class ConvNormAct(nn.Sequential):
    """Conv -> BatchNorm -> ReLU, "same" padding for odd kernels: the pass REV can replace.

    >>> ConvNormAct(3, 4, 8)(torch.zeros(1, 4, 6, 6, 6)).shape
    torch.Size([1, 8, 6, 6, 6])
    """

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, *, kernel_size: int = 3,
                 stride: int = 1, norm: bool = True, act: bool = True, track_running_stats: bool = True):
        check_channels(in_channels=in_channels, out_channels=out_channels)
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd and positive for same padding, got {kernel_size}")
        layers: list[nn.Module] = [conv_nd(spatial_dims)(in_channels, out_channels, kernel_size, stride=stride,
                                                         padding=kernel_size // 2, bias=not norm)]
        if norm:
            layers.append(norm_nd(spatial_dims)(out_channels, track_running_stats=track_running_stats))
        if act:
            layers.append(nn.ReLU(inplace=False))
        super().__init__(*layers)


class DoubleConv(nn.Sequential):
    """Two ConvNormAct passes (in -> out -> out): the U-Net block of every client.

    >>> sum(p.numel() for p in DoubleConv(3, 1, 4).parameters())
    556
    """

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, *, kernel_size: int = 3,
                 track_running_stats: bool = True, convs: int = 2):
        check_channels(in_channels=in_channels, out_channels=out_channels, convs=convs)
        layers = [ConvNormAct(spatial_dims, in_channels if i == 0 else out_channels, out_channels,
                              kernel_size=kernel_size, track_running_stats=track_running_stats)
                  for i in range(convs)]
        super().__init__(*layers)


class UpConv(nn.Sequential):
    """2x up-sampling by a stride-2 transposed convolution, optionally followed by BN and ReLU.

    ``kernel_size`` 2 tiles the output exactly; an odd kernel k uses padding k // 2 and output padding 1
    (the head client's 5x5x5 levels). Without ``norm`` the convolution has a bias.

    >>> UpConv(3, 8, 4)(torch.zeros(1, 8, 2, 2, 2)).shape
    torch.Size([1, 4, 4, 4, 4])
    >>> tuple(UpConv(3, 4, 2, kernel_size=5)(torch.zeros(1, 4, 3, 2, 5)).shape)
    (1, 2, 6, 4, 10)
    """

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, *, kernel_size: int = 2,
                 norm: bool = True, act: bool = True, track_running_stats: bool = True):
        check_channels(in_channels=in_channels, out_channels=out_channels)
        if kernel_size != 2 and (kernel_size < 1 or kernel_size % 2 == 0):
            raise ValueError(f"UpConv kernel_size must be 2 or odd, got {kernel_size}")
        padding, output_padding = (0, 0) if kernel_size == 2 else (kernel_size // 2, 1)
        layers: list[nn.Module] = [transposed_conv_nd(spatial_dims)(
            in_channels, out_channels, kernel_size, stride=2, padding=padding, output_padding=output_padding,
            bias=not norm)]
        if norm:
            layers.append(norm_nd(spatial_dims)(out_channels, track_running_stats=track_running_stats))
        if act:
            layers.append(nn.ReLU(inplace=False))
        super().__init__(*layers)


class UNet(nn.Module):
    """The clients' U-Net: ``convs`` x Conv-BN-ReLU per level, max-pool down, UpConv up, skips concatenated
    as cat(skip, up), a 1x1 head. ``channels[i]`` is the width at level i (len(channels) - 1 poolings)::

        x ─ enc0 ───────────────────────── cat ─ dec0 ─ 1x1 head
             └ pool ─ enc1 ───────── cat ─ dec1 ─ up ┘
                       └ pool ─ ... ─ encD ─ up ┘

    >>> net = UNet(2, 1, 3, channels=(2, 4, 8))
    >>> net(torch.zeros(1, 1, 8, 12)).shape, net.size_multiple
    (torch.Size([1, 3, 8, 12]), 4)
    """

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, *, channels: tuple[int, ...],
                 convs: int = 2, up_norm: bool = True, track_running_stats: bool = True):
        super().__init__()
        channels = tuple(channels)
        if len(channels) < 2:
            raise ValueError(f"channels needs at least 2 levels (one pooling), got {channels!r}")
        check_channels(in_channels=in_channels, out_channels=out_channels, convs=convs,
                       **{f"channels[{i}]": c for i, c in enumerate(channels)})
        self.spatial_dims, self.channels, self.depth = spatial_dims, channels, len(channels) - 1
        block = dict(convs=convs, track_running_stats=track_running_stats)
        self.encoders = nn.ModuleList(
            [DoubleConv(spatial_dims, in_channels, channels[0], **block)]
            + [nn.Sequential(pool_nd(spatial_dims)(2), DoubleConv(spatial_dims, channels[i - 1], channels[i], **block))
               for i in range(1, len(channels))])
        self.ups = nn.ModuleList(UpConv(spatial_dims, channels[i + 1], channels[i], norm=up_norm, act=up_norm,
                                        track_running_stats=track_running_stats) for i in range(self.depth))
        self.decoders = nn.ModuleList(DoubleConv(spatial_dims, 2 * channels[i], channels[i], **block)
                                      for i in range(self.depth))
        self.head = conv_nd(spatial_dims)(channels[0], out_channels, kernel_size=1)

    @property
    def size_multiple(self) -> int:
        """Every spatial side of the input must be a multiple of this (2 ** poolings)."""
        return 2 ** self.depth

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for encoder in self.encoders:
            x = encoder(x)
            skips.append(x)
        x = skips.pop()                                         # the bottleneck
        for level in reversed(range(self.depth)):               # a Python int loop: unrolled by fx
            x = self.decoders[level](torch.cat([skips[level], self.ups[level](x)], dim=1))
        return self.head(x)


def count_parameters(module: nn.Module) -> int:
    """Number of trainable parameter elements."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)

