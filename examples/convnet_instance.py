"""A model file that defines a ready ``model`` instance and ``example_inputs()`` (a small 3D conv net).

    memplan optimize examples/convnet_instance.py
    memplan fit examples/convnet_instance.py --budget 4MiB
"""
import torch
from torch import nn


def conv_bn_relu(in_channels: int, out_channels: int) -> list[nn.Module]:
    return [nn.Conv3d(in_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm3d(out_channels), nn.ReLU()]


model = nn.Sequential(
    *conv_bn_relu(1, 4), *conv_bn_relu(4, 4),      # the second keeps its shape: REV-eligible
    nn.MaxPool3d(2),
    *conv_bn_relu(4, 8), *conv_bn_relu(8, 8),
    nn.Conv3d(8, 2, 1),
)


def example_inputs() -> torch.Tensor:
    """Two volumes of 16^3 voxels; memplan plans on a meta copy, `measure --real` uses them as they are."""
    return torch.randn(2, 1, 16, 16, 16, generator=torch.Generator().manual_seed(0))
