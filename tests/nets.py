"""Small networks the tests trace, plan and train (real compute stays tiny)."""
from __future__ import annotations

import torch
from torch import nn


def cbr(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv3d(cin, cout, 3, padding=1), nn.BatchNorm3d(cout), nn.ReLU())


class TinyUNet3D(nn.Module):
    """Two poolings, concatenating skips, optional dropout at the bottom."""

    def __init__(self, in_channels: int = 1, out_channels: int = 2, width: int = 4, dropout: float = 0.0):
        super().__init__()
        w = width
        self.enc1 = nn.Sequential(cbr(in_channels, w), cbr(w, w))
        self.enc2 = nn.Sequential(cbr(w, 2 * w), cbr(2 * w, 2 * w))
        self.bottom = nn.Sequential(cbr(2 * w, 4 * w), nn.Dropout(dropout), cbr(4 * w, 4 * w))
        self.pool = nn.MaxPool3d(2)
        self.up2 = nn.ConvTranspose3d(4 * w, 2 * w, 2, stride=2)
        self.dec2 = nn.Sequential(cbr(4 * w, 2 * w), cbr(2 * w, 2 * w))
        self.up1 = nn.ConvTranspose3d(2 * w, w, 2, stride=2)
        self.dec1 = nn.Sequential(cbr(2 * w, w), cbr(w, w))
        self.head = nn.Conv3d(w, out_channels, 1)

    def forward(self, x):
        e1 = self.enc1(x)
        e2 = self.enc2(self.pool(e1))
        b = self.bottom(self.pool(e2))
        d2 = self.dec2(torch.cat([self.up2(b), e2], dim=1))
        d1 = self.dec1(torch.cat([self.up1(d2), e1], dim=1))
        return self.head(d1)


class ResNet3D(nn.Module):
    """Residual blocks (add joins)."""

    def __init__(self, width: int = 4, blocks: int = 3):
        super().__init__()
        self.stem = nn.Conv3d(1, width, 3, padding=1)
        self.blocks = nn.ModuleList(nn.Sequential(cbr(width, width), nn.Conv3d(width, width, 3, padding=1))
                                    for _ in range(blocks))
        self.head = nn.Conv3d(width, 1, 1)

    def forward(self, x):
        x = self.stem(x)
        for b in self.blocks:
            x = torch.relu(x + b(x))
        return self.head(x)


class TwoBranch(nn.Module):
    """A shared stem, two branches, two outputs (a segmentation map and a pooled vector)."""

    def __init__(self, width: int = 4):
        super().__init__()
        self.stem = cbr(1, width)
        self.seg = nn.Sequential(cbr(width, width), nn.Conv3d(width, 2, 1))
        self.loc = nn.Sequential(nn.MaxPool3d(2), cbr(width, 2 * width), nn.AdaptiveAvgPool3d(1), nn.Flatten(),
                                 nn.Linear(2 * width, 3))

    def forward(self, x):
        s = self.stem(x)
        return self.seg(s), self.loc(s)


class ShapeBranch(nn.Module):
    """Python control flow on a shape: fx cannot trace it, torch.export specialises it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(1, 2, 3, padding=1)

    def forward(self, x):
        if x.shape[-1] % 2 == 0:
            return self.conv(x) * 2
        return self.conv(x)


class ProxyTypeCheck(nn.Module):
    """fx traces this *wrongly*: isinstance(x, Tensor) is False for a Proxy, so the skip is dropped."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(1, 1, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        if isinstance(x, torch.Tensor):
            y = y + x
        return y


class ValueBranch(nn.Module):
    """Control flow on a tensor value: no tracer can capture it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(1, 1, 3, padding=1)

    def forward(self, x):
        if x.sum() > 0:
            return self.conv(x) * 2
        return self.conv(x)


class RandomDAGNet(nn.Module):
    """A DAG of C-channel tensors from a spec: ("conv", i), ("relu", i), ("bn", i), ("add", i, j),
    ("cat", i, j) (concatenate then 1x1x1 conv back to C), ("pool", i) (max-pool then upsample).
    Index 0 is the input's stem conv; node k reads earlier nodes. The last node, and every node
    listed in ``extra_outputs``, is returned."""

    def __init__(self, spec: list[tuple], channels: int = 2, extra_outputs: tuple[int, ...] = ()):
        super().__init__()
        self.spec = [tuple(s) for s in spec]
        self.extra_outputs = tuple(extra_outputs)
        c = channels
        self.stem = nn.Conv3d(1, c, 3, padding=1)
        mods = []
        for s in self.spec:
            kind = s[0]
            mods.append(nn.Conv3d(c, c, 3, padding=1) if kind == "conv"
                        else nn.BatchNorm3d(c) if kind == "bn"
                        else nn.Conv3d(2 * c, c, 1) if kind == "cat"
                        else nn.Identity())
        self.ops = nn.ModuleList(mods)

    def forward(self, x):
        vals = [self.stem(x)]
        for s, m in zip(self.spec, self.ops):
            kind, a = s[0], vals[s[1]]
            if kind in ("conv", "bn"):
                v = m(a)
            elif kind == "relu":
                v = torch.relu(a)
            elif kind == "add":
                v = a + vals[s[2]]
            elif kind == "cat":
                v = m(torch.cat([a, vals[s[2]]], dim=1))
            else:
                v = nn.functional.interpolate(nn.functional.max_pool3d(a, 2), scale_factor=2.0)
            vals.append(v)
        if self.extra_outputs:
            return (vals[-1],) + tuple(vals[i] for i in self.extra_outputs)
        return vals[-1]


def random_spec(draw_int, n: int) -> list[tuple]:
    """A random spec of ``n`` nodes using ``draw_int(lo, hi)`` for choices (hypothesis or random)."""
    kinds = ["conv", "relu", "bn", "add", "cat", "pool"]
    spec = []
    for k in range(1, n + 1):
        kind = kinds[draw_int(0, len(kinds) - 1)]
        a = draw_int(max(0, k - 3), k - 1)
        if kind in ("add", "cat"):
            spec.append((kind, a, draw_int(0, k - 1)))
        else:
            spec.append((kind, a))
    return spec


class PlainCoupling(nn.Module):
    """y1 = x1 + F(x2), y2 = x2 + G(y1) through ordinary autograd: the independent truth for REV blocks."""

    def __init__(self, f, g):
        super().__init__()
        self.f, self.g = f, g

    def forward(self, x):
        x1, x2 = x.chunk(2, dim=1)
        y1 = x1 + self.f(x2)
        return torch.cat([y1, x2 + self.g(y1)], dim=1)


#: A model file whose forward branches on a tensor value: no tracer can capture it.
UNTRACEABLE_MODEL_SOURCE = """
    from torch import nn
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv3d(1, 2, 3, padding=1)
        def forward(self, x):
            y = self.conv(x)
            return y * 2 if y.mean() > 0 else y
    INPUT_SHAPE = (1, 1, 8, 8, 8)
"""
