"""Training losses of the femur network: hybrid segmentation loss, L2 heatmap regression, the
center-distance loss (Eq. 1) and their weighted sum L_branch (Eq. 2).

M(H), the peak location in Eq. 1, is an argmax and has no gradient. We replace it by a soft-argmax:
M(H) = sum_v softmax(tau * H)_v * v, the expected voxel index under a Boltzmann distribution over the
heatmap (tau = ``temperature``). As tau grows it tends to the argmax; it is differentiable in H.
Coordinates are voxel indices of the network's input grid.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["BranchLossConfig", "BranchLossTerms", "weighted_cross_entropy", "dice_loss", "hybrid_loss",
           "heatmap_l2_loss", "soft_argmax", "center_distance_loss", "branch_loss", "frequency_weights"]


@dataclass(frozen=True)
class BranchLossConfig:
    """Weights of L_branch = alpha*L_hybrid + beta*(L_reg + gamma*L_CD), and L_hybrid = L_wCE + theta*L_DSC."""

    alpha: float = 1.0
    beta: float = 0.2
    gamma: float = 0.5
    theta: float = 100.0
    temperature: float = 50.0   # soft-argmax sharpness for L_CD (1 / heatmap units)
    cd_eps: float = 1.0         # voxel^2 added to the squared distance so L_CD <= 1 / cd_eps when peaks meet

    def __post_init__(self) -> None:
        for name in ("alpha", "beta", "gamma", "theta", "cd_eps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature!r}")


@dataclass(frozen=True)
class BranchLossTerms:
    """L_branch and its parts (tensors with autograd history)."""

    total: torch.Tensor
    hybrid: torch.Tensor
    reg: torch.Tensor
    cd: torch.Tensor


def _check_labels(probs: torch.Tensor, labels: torch.Tensor) -> None:
    if labels.shape != probs.shape[:1] + probs.shape[2:]:
        raise ValueError(f"labels of shape {tuple(labels.shape)} must be probs' shape {tuple(probs.shape)} "
                         "without the class axis")
    if labels.dtype not in (torch.int64, torch.int32, torch.uint8):
        raise ValueError(f"labels must be an integer label map, got dtype {labels.dtype}")


def frequency_weights(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Class weights w_c = 1 - N_c / N (Yang et al. 2017): rare classes weigh more.

    >>> frequency_weights(torch.tensor([0, 0, 0, 1]), 2).tolist()
    [0.25, 0.75]
    """
    counts = torch.bincount(labels.reshape(-1).long(), minlength=num_classes).to(torch.float32)
    return 1.0 - counts / counts.sum()


def weighted_cross_entropy(probs: torch.Tensor, labels: torch.Tensor, class_weights: torch.Tensor | None = None,
                           eps: float = 1e-7) -> torch.Tensor:
    """Mean over voxels of -w_{y} log p_{y}; ``probs`` (B, C, *S) softmax output, ``labels`` (B, *S).

    ``class_weights`` defaults to :func:`frequency_weights` of ``labels``.
    """
    _check_labels(probs, labels)
    labels = labels.long()
    if class_weights is None:
        class_weights = frequency_weights(labels, probs.shape[1])
    log_p = torch.log(probs.clamp_min(eps)).gather(1, labels.unsqueeze(1)).squeeze(1)
    return -(class_weights.to(probs)[labels] * log_p).mean()


def dice_loss(probs: torch.Tensor, labels: torch.Tensor, *, include_background: bool = False,
              smooth: float = 1e-5, batch_dice: bool = False) -> torch.Tensor:
    """1 - soft Dice, averaged over samples and (foreground) classes.

    ``batch_dice`` pools the batch into one Dice per class: 2D slice batches, where most slices hold
    no femur and a per-slice Dice would be 0 whatever the prediction, need it.
    """
    _check_labels(probs, labels)
    onehot = torch.nn.functional.one_hot(labels.long(), probs.shape[1]).movedim(-1, 1).to(probs)
    if not include_background:
        probs, onehot = probs[:, 1:], onehot[:, 1:]
    dims = (0, *range(2, probs.dim())) if batch_dice else tuple(range(2, probs.dim()))
    inter = (probs * onehot).sum(dims)
    dsc = (2 * inter + smooth) / (probs.sum(dims) + onehot.sum(dims) + smooth)
    return 1.0 - dsc.mean()


def hybrid_loss(probs: torch.Tensor, labels: torch.Tensor, theta: float = 100.0,
                class_weights: torch.Tensor | None = None, *, batch_dice: bool = False) -> torch.Tensor:
    """L_hybrid = L_wCross + theta * L_DSC (theta = 100 in the paper)."""
    return (weighted_cross_entropy(probs, labels, class_weights)
            + theta * dice_loss(probs, labels, batch_dice=batch_dice))


def heatmap_l2_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L_reg: squared L2 norm of (pred - target) over landmarks and voxels, averaged over the batch."""
    if pred.shape != target.shape:
        raise ValueError(f"predicted heatmaps {tuple(pred.shape)} and targets {tuple(target.shape)} differ in shape")
    return (pred - target).pow(2).flatten(1).sum(1).mean()


def soft_argmax(heatmaps: torch.Tensor, temperature: float) -> torch.Tensor:
    """Differentiable peak location: (B, K, *S) heatmaps -> (B, K, len(S)) expected voxel indices.

    >>> h = torch.zeros(1, 1, 1, 1, 4); h[..., 3] = 1.0
    >>> soft_argmax(h, temperature=100.0).squeeze().tolist()
    [0.0, 0.0, 3.0]
    """
    spatial = heatmaps.shape[2:]
    weights = torch.softmax(temperature * heatmaps.flatten(2), dim=-1)           # (B, K, V)
    axes = [torch.arange(n, dtype=heatmaps.dtype, device=heatmaps.device) for n in spatial]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, len(spatial))  # (V, D)
    return weights @ grid


def center_distance_loss(heatmap_1: torch.Tensor, heatmap_2: torch.Tensor, *, temperature: float = 50.0,
                         eps: float = 1.0) -> torch.Tensor:
    """L_CD = 1 / (||M(H1) - M(H2)||^2 + eps), batch mean; M = :func:`soft_argmax` (voxel units)."""
    if heatmap_1.shape != heatmap_2.shape or heatmap_1.shape[1] != 1:
        raise ValueError(f"heatmaps must be two (B, 1, *S) tensors of one shape, got {tuple(heatmap_1.shape)} "
                         f"and {tuple(heatmap_2.shape)}")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps!r}")
    d2 = (soft_argmax(heatmap_1, temperature) - soft_argmax(heatmap_2, temperature)).pow(2).sum(-1)
    return (1.0 / (d2 + eps)).mean()


def branch_loss(outputs: tuple[torch.Tensor, ...], labels: torch.Tensor, heatmap_targets: torch.Tensor,
                config: BranchLossConfig = BranchLossConfig(), class_weights: torch.Tensor | None = None
                ) -> BranchLossTerms:
    """L_branch (Eq. 2) from the network outputs ``(seg_probs, H1, H2)``; Unet-S's ``(seg_probs,)`` gives
    alpha L_hybrid, Unet-L's ``(H1, H2)`` beta (L_reg + gamma L_CD).

    ``labels`` (B, *S) integer map; ``heatmap_targets`` (B, 2, *S) Gaussian maps of the two endpoints;
    ``class_weights`` of wCross default to the labels' frequency weights.
    """
    if len(outputs) not in (1, 2, 3):
        raise ValueError(f"expected outputs (seg_probs, H1, H2), (seg_probs,) (Unet-S) or (H1, H2) (Unet-L), "
                         f"got {len(outputs)} tensors")
    segment, localize = len(outputs) != 2, len(outputs) != 1          # a one-branch baseline has no other term
    zero = outputs[0].new_zeros(())
    hyb = hybrid_loss(outputs[0], labels, config.theta, class_weights) if segment else zero
    if localize:
        h1, h2 = outputs[-2:]
        reg = heatmap_l2_loss(torch.cat([h1, h2], dim=1), heatmap_targets)
        cd = center_distance_loss(h1, h2, temperature=config.temperature, eps=config.cd_eps)
    else:
        reg = cd = zero
    total = config.alpha * hyb + config.beta * (reg + config.gamma * cd)
    return BranchLossTerms(total=total, hybrid=hyb, reg=reg, cd=cd)
