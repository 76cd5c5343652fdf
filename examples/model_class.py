"""A model file that defines a class: ``Model`` (found by default) and ``Encoder`` (pick it with
``examples/model_class.py:Encoder``). It gives no input shape, so pass one.

    memplan optimize examples/model_class.py --input-shape 1,2,24,24,24
    memplan optimize examples/model_class.py:Encoder --input-shape 1,2,24,24,24 --budget 4MiB
"""
from torch import nn


class Encoder(nn.Module):
    """Three Conv-BN-ReLU stages, each halving the size with a max pool."""

    def __init__(self, in_channels: int = 2, widths=(4, 8, 8)):
        super().__init__()
        layers, cin = [], in_channels
        for w in widths:
            layers += [nn.Conv3d(cin, w, 3, padding=1), nn.BatchNorm3d(w), nn.ReLU(), nn.MaxPool3d(2)]
            cin = w
        self.features = nn.Sequential(*layers)

    def forward(self, x):
        return self.features(x)


class Model(nn.Module):
    """An encoder and a linear classifier head (global average pooled)."""

    def __init__(self, in_channels: int = 2, classes: int = 3):
        super().__init__()
        self.encoder = Encoder(in_channels)
        self.head = nn.Linear(8, classes)

    def forward(self, x):
        return self.head(self.encoder(x).mean(dim=(2, 3, 4)))
