"""A model file for a network with two inputs (an image and a mask): ``example_inputs()`` returns both.

    memplan optimize examples/two_inputs.py
"""
import torch
from torch import nn


class Model(nn.Module):
    """Image and mask through their own convolution, summed, then a 1x1x1 head."""

    def __init__(self, channels: int = 4):
        super().__init__()
        self.image = nn.Sequential(nn.Conv3d(1, channels, 3, padding=1), nn.ReLU())
        self.mask = nn.Sequential(nn.Conv3d(1, channels, 3, padding=1), nn.ReLU())
        self.head = nn.Conv3d(channels, 2, 1)

    def forward(self, image, mask):
        return self.head(self.image(image) + self.mask(mask))


def example_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    """One 16^3 image and its mask (meta tensors: planning needs only their shapes)."""
    return torch.empty(1, 1, 16, 16, 16, device="meta"), torch.empty(1, 1, 16, 16, 16, device="meta")
