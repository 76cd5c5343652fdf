"""A FetusMapV2-shaped 3D U-Net (4 poolings, channels 32..512, two Conv-BN-ReLU per block, 22 heatmaps).

A model file for the memplan command line: it defines ``build_model()`` and ``INPUT_SHAPE``.

    memplan optimize examples/fetusmapv2_unet.py --budget 6GB
"""
import torch
from torch import nn

INPUT_SHAPE = (1, 1, 176, 112, 112)   # FetusMapV2's vanilla input (batch, channel, D, H, W)


def conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv3d(cin, cout, 3, padding=1, bias=False),
                         nn.BatchNorm3d(cout, track_running_stats=False), nn.ReLU())


class UNet3D(nn.Module):
    """Encoder-decoder with concatenating skips; ``widths`` per level, 2 convs per block."""

    def __init__(self, in_channels: int = 1, out_channels: int = 22, widths=(32, 64, 128, 256, 512)):
        super().__init__()
        self.down = nn.ModuleList()
        cin = in_channels
        for w in widths:
            self.down.append(nn.Sequential(conv_bn_relu(cin, w), conv_bn_relu(w, w)))
            cin = w
        self.pool = nn.MaxPool3d(2)
        self.up = nn.ModuleList(nn.ConvTranspose3d(w_hi, w_lo, 2, stride=2)
                                for w_hi, w_lo in zip(widths[::-1][:-1], widths[::-1][1:]))
        self.dec = nn.ModuleList(nn.Sequential(conv_bn_relu(2 * w, w), conv_bn_relu(w, w)) for w in widths[::-1][1:])
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
    return UNet3D()
