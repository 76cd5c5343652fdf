"""Reusable layers shared by the clients (MONAI layering: blocks here, thin networks beside).

Every block takes ``spatial_dims`` (2 or 3), ``in_channels`` and ``out_channels`` and validates them
in ``__init__``; none writes state in ``forward`` (a checkpointed segment may run forward twice).
"""
from __future__ import annotations

import torch  # noqa: F401  (used by the doctests)
from torch import nn

__all__ = ["conv_nd", "norm_nd", "pool_nd", "ConvNormAct", "DoubleConv", "check_channels"]


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


def count_parameters(module: nn.Module) -> int:
    """Number of trainable parameter elements."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


__all__.append("count_parameters")

