"""Adversarial refinement (paper Eq. 3): a pair discriminator D_pair judges (segmentation, H1, H2)
triples; the branched network is trained with L_branch first, then fine-tuned with L_branch + L_gan.

Eq. 3 is the standard GAN value  E_real[log D] + E_fake[log(1 - D)]  (the printed "1 - log D" is read
as log(1 - D)). D maximises it: :func:`discriminator_loss` is its negative as two binary
cross-entropies. The generator uses the usual non-saturating form, -log D(fake)
(:func:`generator_adversarial_loss`), which has the same fixed point and useful gradients early on.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.blocks import check_channels, conv_nd

__all__ = ["PairDiscriminator", "AdversarialSchedule", "make_pair", "real_pair", "discriminator_loss",
           "generator_adversarial_loss"]


class PairDiscriminator(nn.Module):
    """D_pair: six conv layers (kernel 4; stride 2 in the first two, 1 after), LeakyReLU, global average
    pooling, one fully connected layer -> a real/fake logit per sample. Any input size >= 4 works.

    >>> PairDiscriminator(3, in_channels=4, channels=(2, 2, 4, 4, 4, 4))(torch.zeros(2, 4, 8, 8, 12)).shape
    torch.Size([2, 1])
    """

    def __init__(self, spatial_dims: int = 3, in_channels: int = 4, out_channels: int = 1, *,
                 channels: tuple[int, ...] = (16, 32, 64, 64, 128, 128)):
        super().__init__()
        if len(channels) != 6:
            raise ValueError(f"D_pair has 6 conv layers: channels needs 6 widths, got {tuple(channels)!r}")
        check_channels(in_channels=in_channels, out_channels=out_channels,
                       **{f"channels[{i}]": c for i, c in enumerate(channels)})
        conv = conv_nd(spatial_dims)
        layers: list[nn.Module] = []
        widths = (in_channels, *channels)
        # stride 2: pad 1 halves the size; stride 1: pad 1 before, 2 after keeps it (kernel 4 is even)
        pad_cls = {1: nn.ConstantPad1d, 2: nn.ConstantPad2d, 3: nn.ConstantPad3d}[spatial_dims]
        same_pad = pad_cls((1, 2) * spatial_dims, 0.0)
        for i in range(6):
            if i < 2:
                layers.append(conv(widths[i], widths[i + 1], kernel_size=4, stride=2, padding=1))
            else:
                layers += [same_pad, conv(widths[i], widths[i + 1], kernel_size=4, stride=1)]
            layers.append(nn.LeakyReLU(0.2))
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(channels[-1], out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.features(x).flatten(2).mean(-1)   # global average pooling
        return self.fc(pooled)


@dataclass(frozen=True)
class AdversarialSchedule:
    """Epochs of branch-only training, then of adversarial fine-tuning (paper: 16 then 5)."""

    branch_epochs: int = 16
    adversarial_epochs: int = 5
    adv_weight: float = 1.0     # L = L_branch + adv_weight * L_gan during fine-tuning

    def __post_init__(self) -> None:
        if self.branch_epochs < 0 or self.adversarial_epochs < 0 or self.branch_epochs + self.adversarial_epochs < 1:
            raise ValueError(f"epochs must be >= 0 with at least one in all, got branch_epochs={self.branch_epochs}, "
                             f"adversarial_epochs={self.adversarial_epochs}")
        if self.adv_weight < 0:
            raise ValueError(f"adv_weight must be >= 0, got {self.adv_weight}")

    @property
    def total_epochs(self) -> int:
        return self.branch_epochs + self.adversarial_epochs

    def is_adversarial(self, epoch: int) -> bool:
        """True when 0-based ``epoch`` belongs to the fine-tuning phase.

        >>> [AdversarialSchedule(2, 1).is_adversarial(e) for e in range(3)]
        [False, False, True]
        """
        return epoch >= self.branch_epochs


def make_pair(seg_probs: torch.Tensor, heatmap_1: torch.Tensor, heatmap_2: torch.Tensor) -> torch.Tensor:
    """The generator's (y_hat, H1_hat, H2_hat) as one channel-stacked tensor (a fake pair)."""
    return torch.cat([seg_probs, heatmap_1, heatmap_2], dim=1)


def real_pair(labels: torch.Tensor, heatmap_targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """The ground truth (y, H1, H2): one-hot labels (B, *S) and the (B, 2, *S) Gaussian maps."""
    onehot = F.one_hot(labels.long(), num_classes).movedim(-1, 1).to(heatmap_targets.dtype)
    return torch.cat([onehot, heatmap_targets], dim=1)


def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """-(log D(real) + log(1 - D(fake))), batch means: what D minimises (Eq. 3 maximised).

    >>> round(float(discriminator_loss(torch.zeros(1, 1), torch.zeros(1, 1))), 4)   # D = 1/2: 2 log 2
    1.3863
    """
    return (F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits))
            + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits)))


def generator_adversarial_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """-log D(fake), batch mean: the generator's L_gan (non-saturating)."""
    return F.binary_cross_entropy_with_logits(fake_logits, torch.ones_like(fake_logits))
