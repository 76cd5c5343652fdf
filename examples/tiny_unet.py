"""A tiny 3D U-Net (2 poolings, widths 4-8-16): plans in about a second, for trying the command line.

A model file for the memplan command line: it defines ``build_model()`` and ``INPUT_SHAPE``.

    memplan optimize examples/tiny_unet.py
    memplan fit examples/tiny_unet.py --budget 8MiB
"""
import sys
from pathlib import Path

from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from fetusmapv2_unet import UNet3D  # noqa: E402  (the same U-Net, two levels, tiny widths)

INPUT_SHAPE = (1, 1, 32, 24, 24)   # (batch, channel, D, H, W); spatial sizes must be multiples of 4


class TinyUNet3D(UNet3D):
    """Two-level encoder-decoder with concatenating skips; two Conv-BN-ReLU per block."""

    def __init__(self, in_channels: int = 1, out_channels: int = 2, widths=(4, 8, 16)):
        super().__init__(in_channels, out_channels, widths)


def build_model() -> nn.Module:
    return TinyUNet3D()
