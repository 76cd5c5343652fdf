"""A tiny 3D U-Net (2 poolings, widths 4-8-16): plans in about a second, for trying the command line.

A model file for the memplan command line: it defines ``build_model()`` and ``INPUT_SHAPE``.

    memplan optimize examples/tiny_unet.py
    memplan fit examples/tiny_unet.py --budget 8MiB
"""
import torch
from torch import nn

INPUT_SHAPE = (1, 1, 32, 24, 24)   # (batch, channel, D, H, W); spatial sizes must be multiples of 4


def conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv3d(in_channels, out_channels, 3, padding=1, bias=False),
                         nn.BatchNorm3d(out_channels, track_running_stats=False), nn.ReLU())


class TinyUNet3D(nn.Module):
    """Two-level encoder-decoder with concatenating skips; two Conv-BN-ReLU per block."""

    def __init__(self, in_channels: int = 1, out_channels: int = 2, widths=(4, 8, 16)):
        super().__init__()
        self.down = nn.ModuleList()
        cin = in_channels
        for w in widths:
            self.down.append(nn.Sequential(conv_bn_relu(cin, w), conv_bn_relu(w, w)))
            cin = w
        self.pool = nn.MaxPool3d(2)
        self.up = nn.ModuleList(nn.ConvTranspose3d(hi, lo, 2, stride=2)
                                for hi, lo in zip(widths[::-1][:-1], widths[::-1][1:]))
        self.dec = nn.ModuleList(nn.Sequential(conv_bn_relu(2 * w, w), conv_bn_relu(w, w))
                                 for w in widths[::-1][1:])
        self.head = nn.Conv3d(widths[0], out_channels, 1)

    def forward(self, x):
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else self.pool(x))
            skips.append(x)
        x = skips.pop()
        for up, dec in zip(self.up, self.dec):
            x = dec(torch.cat([up(x), skips.pop()], dim=1))
        return self.head(x)


def build_model() -> nn.Module:
    return TinyUNet3D()
