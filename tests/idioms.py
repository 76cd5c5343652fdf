"""Small 3D networks written the way public training code writes them: the idioms memplan must
plan and train exactly like the original (in-place residuals and activations, tensors created in
forward, stochastic depth, momentum-less BatchNorm, constants an exported graph bakes in)."""
from __future__ import annotations

import torch
from torch import nn


class IAddResNet(nn.Module):
    """Residual blocks with ``out += identity`` and in-place ReLUs (torchvision/MONAI ResNet style)."""

    def __init__(self, width: int = 4, blocks: int = 3):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv3d(1, width, 3, padding=1), nn.BatchNorm3d(width), nn.ReLU(inplace=True))
        self.convs = nn.ModuleList(nn.Sequential(nn.Conv3d(width, width, 3, padding=1), nn.BatchNorm3d(width),
                                                 nn.ReLU(inplace=True), nn.Conv3d(width, width, 3, padding=1),
                                                 nn.BatchNorm3d(width)) for _ in range(blocks))
        self.act = nn.ReLU(inplace=True)
        self.head = nn.Conv3d(width, 2, 1)

    def forward(self, x):
        x = self.stem(x)
        for conv in self.convs:
            identity = x
            out = conv(x)
            out += identity
            x = self.act(out)
        return self.head(x)


class InplaceChain(nn.Module):
    """Conv-norm-activation layers with an in-place activation (``act(inplace=True)``) and a pool."""

    def __init__(self, act: type[nn.Module] = nn.ELU, inplace: bool = True, width: int = 4, layers: int = 6):
        super().__init__()
        mods: list[nn.Module] = []
        c = 1
        for i in range(layers):
            mods += [nn.Conv3d(c, width, 3, padding=1), nn.InstanceNorm3d(width, affine=True), act(inplace=inplace)]
            c = width
            if i == layers // 2:
                mods.append(nn.MaxPool3d(2))
        self.body = nn.Sequential(*mods)
        self.head = nn.Conv3d(width, 2, 1)

    def forward(self, x):
        return self.head(self.body(x))


class TensorsInForward(nn.Module):
    """Creates tensors in forward without ``device=``: a constant, a noise scale and a coordinate grid."""

    def __init__(self, width: int = 4):
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv3d(1, width, 3, padding=1), nn.ReLU(), nn.Conv3d(width, width, 3, padding=1),
                                   nn.ReLU(), nn.Conv3d(width, width, 3, padding=1), nn.ReLU())
        self.conv2 = nn.Conv3d(width + 1, 2, 3, padding=1)

    def forward(self, x):
        h = self.conv1(x)
        scale = torch.ones(1) * 0.5 + torch.zeros(1)            # CPU tensors, no device=
        grid = torch.linspace(-1, 1, x.shape[-1]).to(x.dtype).view(1, 1, 1, 1, -1).expand(x.shape[0], 1, *x.shape[2:])
        return self.conv2(torch.cat([h * scale.to(h.device), grid.to(h.device)], dim=1))


class StochasticDepth(nn.Module):
    """Residual branches dropped per sample with ``torch.rand(B,1,1,1,1, device=h.device)`` in training."""

    def __init__(self, width: int = 4, blocks: int = 3, p: float = 0.5):
        super().__init__()
        self.p = p
        self.stem = nn.Conv3d(1, width, 3, padding=1)
        self.branches = nn.ModuleList(nn.Sequential(nn.Conv3d(width, width, 3, padding=1), nn.GroupNorm(2, width),
                                                    nn.GELU()) for _ in range(blocks))
        self.head = nn.Conv3d(width, 2, 1)

    def forward(self, x):
        h = self.stem(x)
        for branch in self.branches:
            if self.training:
                keep = (torch.rand(h.shape[0], 1, 1, 1, 1, device=h.device) > self.p).to(h.dtype)
                h = h + branch(h) * keep / (1 - self.p)
            else:
                h = h + branch(h)
        return self.head(h)


class CumulativeBN(nn.Module):
    """``BatchNorm3d(momentum=None)``: a cumulative average that reads ``num_batches_tracked`` as a number."""

    def __init__(self, width: int = 4):
        super().__init__()
        self.body = nn.Sequential(nn.Conv3d(1, width, 3, padding=1), nn.BatchNorm3d(width, momentum=None), nn.ReLU(),
                                  nn.Conv3d(width, width, 3, padding=1), nn.BatchNorm3d(width, momentum=None),
                                  nn.ReLU(), nn.Conv3d(width, 2, 1))

    def forward(self, x):
        return self.body(x)


class BakedConstants(nn.Module):
    """A relative-position table held as a plain CPU tensor attribute and a shape branch fx cannot trace,
    so torch.export bakes the table into its graph as a constant (Swin/UNETR-style attention)."""

    def __init__(self, width: int = 4, tokens: int = 8):
        super().__init__()
        self.conv = nn.Conv3d(1, width, 3, padding=1)
        self.table = nn.Parameter(torch.randn(2 * tokens - 1))
        idx = torch.arange(tokens)
        self.rel_index = (idx[:, None] - idx[None, :] + tokens - 1)   # plain attribute: an export constant
        self.mask = torch.tril(torch.ones(tokens, tokens))
        self.tokens = tokens
        self.head = nn.Conv3d(width, 2, 1)

    def forward(self, x):
        h = torch.relu(self.conv(x))
        if h.shape[-1] % 2 == 0:                                   # fx: a Proxy in a Python `if`
            h = h * 1.0
        n, c = h.shape[:2]
        t = h.reshape(n, c, self.tokens, -1)                      # tokens along the flattened volume
        bias = self.table[self.rel_index] * self.mask.to(h.dtype)
        mixed = torch.einsum("ij,ncjk->ncik", torch.softmax(bias, dim=-1).to(h.dtype), t)
        return self.head(mixed.reshape_as(h) + h)


class NoGradGate(nn.Module):
    """A frozen branch computed under ``torch.no_grad()`` gates a trainable one (teacher / gate idiom)."""

    def __init__(self, width: int = 4):
        super().__init__()
        self.frozen = nn.Conv3d(1, width, 3, padding=1)
        self.trained = nn.Sequential(nn.Conv3d(1, width, 3, padding=1), nn.ReLU(), nn.Conv3d(width, width, 3, padding=1))
        self.head = nn.Conv3d(width, 2, 1)

    def forward(self, x):
        with torch.no_grad():
            gate = torch.sigmoid(self.frozen(x))
        return self.head(self.trained(x) * gate)


class SkipDropout(nn.Module):
    """VNet-style: dropout on a skip connection read only at the end, and dropouts in the coarse path
    between. The skip's dropout (and pooling) depend on the stem alone, so a plan would like to run
    them early and free the full-resolution stem, before the coarse path's draws."""

    def __init__(self, width: int = 4, depth: int = 2, p: float = 0.5):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv3d(1, width, 3, padding=1), nn.ELU(), nn.Conv3d(width, width, 3, padding=1),
                                  nn.ELU())
        self.down = nn.Conv3d(width, 8 * width, 2, stride=2)
        self.deep = nn.ModuleList(nn.Sequential(nn.Conv3d(8 * width, 8 * width, 3, padding=1), nn.ELU(),
                                                nn.Dropout3d(p)) for _ in range(depth))
        self.skip_drop = nn.Dropout3d(p)
        self.head = nn.Conv3d(9 * width, 2, 1)

    def forward(self, x):
        s = self.stem(x)
        h = self.down(s)
        for block in self.deep:
            h = block(h)
        skip = torch.nn.functional.avg_pool3d(self.skip_drop(s), 2)
        return self.head(torch.cat([h, skip], 1))


class SharedNormBranches(nn.Module):
    """One Conv-BatchNorm encoder applied at two scales (shared-weights idiom): its running statistics
    are updated twice per step, first by the coarse call. The fine call and its pooling depend on the
    stem alone, so a plan would like to run them early and free the full-resolution stem."""

    def __init__(self, width: int = 4, depth: int = 2):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv3d(1, width, 3, padding=1), nn.ELU(), nn.Conv3d(width, width, 3, padding=1),
                                  nn.ELU())
        self.down = nn.Conv3d(width, width, 2, stride=2)
        self.encoder = nn.Sequential(nn.Conv3d(width, width, 3, padding=1), nn.BatchNorm3d(width), nn.ReLU())
        layers: list[nn.Module] = [nn.Conv3d(width, 8 * width, 3, padding=1), nn.ELU()]
        for _ in range(depth):
            layers += [nn.Conv3d(8 * width, 8 * width, 3, padding=1), nn.ELU()]
        self.deep = nn.Sequential(*layers)
        self.head = nn.Conv3d(9 * width, 2, 1)

    def forward(self, x):
        s = self.stem(x)
        coarse = self.deep(self.encoder(self.down(s)))
        fine = torch.nn.functional.avg_pool3d(self.encoder(s), 2)
        return self.head(torch.cat([coarse, fine], 1))


class CheckpointInside(nn.Module):
    """Residual blocks that already call ``torch.utils.checkpoint.checkpoint`` (non-reentrant) in forward."""

    def __init__(self, width: int = 4, blocks: int = 3):
        super().__init__()
        self.stem = nn.Conv3d(1, width, 3, padding=1)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Conv3d(width, width, 3, padding=1), nn.GroupNorm(2, width),
                                                  nn.GELU(), nn.Conv3d(width, width, 3, padding=1))
                                    for _ in range(blocks))
        self.head = nn.Conv3d(width, 2, 1)

    def forward(self, x):
        from torch.utils.checkpoint import checkpoint
        h = self.stem(x)
        for block in self.blocks:
            h = h + checkpoint(block, h, use_reentrant=False)
        return self.head(h)


class InterpolateCatList(nn.Module):
    """Dense features gathered in a Python list and ``torch.cat`` over it in a loop, then a coarse path
    brought back with ``F.interpolate(scale_factor=...)`` (trilinear, then nearest on the output)."""

    def __init__(self, width: int = 4, layers: int = 3):
        super().__init__()
        self.stem = nn.Conv3d(1, width, 3, padding=1, stride=2)
        self.layers = nn.ModuleList(nn.Sequential(nn.Conv3d(width * (i + 1), width, 3, padding=1), nn.ReLU())
                                    for i in range(layers))
        self.coarse = nn.Sequential(nn.Conv3d(width * (layers + 1), width, 3, padding=1, stride=2), nn.ReLU())
        self.head = nn.Conv3d(width * (layers + 2), 2, 3, padding=1)

    def forward(self, x):
        feats = [self.stem(x)]
        for layer in self.layers:
            feats.append(layer(torch.cat(feats, 1)))
        dense = torch.cat(feats, dim=1)
        up = torch.nn.functional.interpolate(self.coarse(dense), scale_factor=2, mode="trilinear", align_corners=False)
        out = self.head(torch.cat([dense, up], 1))
        return torch.nn.functional.interpolate(out, scale_factor=2.0, mode="nearest")


class WeightStandardized(nn.Module):
    """Convolutions that standardize their weight in forward (timm's StdConv, BiT) and a split whose
    width comes from a parameter's shape: graph nodes that read parameters only, no activation."""

    def __init__(self, width: int = 4, layers: int = 3):
        super().__init__()
        self.stem = nn.Conv3d(1, width, 3, padding=1)
        self.convs = nn.ModuleList(nn.Conv3d(width, width, 3, padding=1) for _ in range(layers))
        self.head = nn.Conv3d(width, 2, 1)

    def forward(self, x):
        h = self.stem(x)
        for conv in self.convs:
            w = conv.weight
            w = (w - w.mean(dim=(1, 2, 3, 4), keepdim=True)) / (w.std(dim=(1, 2, 3, 4), keepdim=True) + 1e-5)
            h = torch.relu(torch.nn.functional.conv3d(h, w, conv.bias, 1, 1))
            half = conv.weight.shape[0] // 2
            h = torch.cat([h[:, :half] * 2, h[:, half:]], 1)
        return self.head(h)
