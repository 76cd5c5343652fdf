"""A file with building blocks but no model: `memplan optimize examples/no_model.py` explains what to add
(`model`, `build_model()` or `Model`) and suggests `examples/no_model.py:Block`.
"""
from torch import nn


class Block(nn.Module):
    """A Conv-ReLU block; it needs its channel counts, so memplan cannot build it alone."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv3d(in_channels, out_channels, 3, padding=1)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.conv(x))


def helper(channels: int) -> nn.Module:
    return Block(channels, channels)
