"""3D anchors of the face RPN: generation, IoU, box coding (paper Eq. 1) and anchor labelling.

A box is a row ``(x, y, z, w, h, d)``: centre and size in voxels of the network input, axis order
(i, j, k) of the volume array; voxel ``i`` covers ``[i - 0.5, i + 0.5]``. A feature cell at index
``c`` with stride ``s`` has its anchors centred at ``c * s + (s - 1) / 2`` (the centre of the input
voxels it pools). Anchors are ordered cell-major (C order over the feature grid), then by shape.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Sequence

import torch

__all__ = ["LANDMARKS", "TARGET_SIZE_VOX", "ANCHOR_SIZES_VOX", "anchor_shapes", "generate_anchors",
           "box_iou", "box_iou_aligned", "encode_boxes", "decode_boxes", "target_boxes",
           "AnchorTargets", "label_anchors", "sample_anchors"]

#: the five landmarks in the paper's node order (Fig. 3a); class c + 1 is LANDMARKS[c], 0 is background
LANDMARKS = ("eye_left", "eyebrow_middle", "eye_right", "nose_tip", "chin")
#: edge length in voxels of each landmark's target box (§2.2: 14^3 for the eyes, 24^3 for the others)
TARGET_SIZE_VOX = {"eye_left": 14.0, "eyebrow_middle": 24.0, "eye_right": 14.0, "nose_tip": 24.0, "chin": 24.0}
#: anchor base sizes per axis (§2.2); every (w, h, d) triple -> 4^3 = 64 anchors per cell
ANCHOR_SIZES_VOX = (13.0, 16.0, 20.0, 28.0)
_MAX_LOG_SCALE = math.log(1000.0 / 16.0)   # clamp on tw, th, td before exp (no overflow from wild deltas)


def anchor_shapes(sizes_vox: Sequence[float] = ANCHOR_SIZES_VOX) -> torch.Tensor:
    """All (w, h, d) triples of ``sizes_vox``: shape (len(sizes)^3, 3), d varying fastest.

    >>> anchor_shapes().shape, anchor_shapes()[1].tolist()
    (torch.Size([64, 3]), [13.0, 13.0, 16.0])
    """
    if len(sizes_vox) == 0 or min(sizes_vox) <= 0:
        raise ValueError(f"anchor sizes must be positive voxel lengths, got {list(sizes_vox)}")
    return torch.tensor(list(itertools.product(sizes_vox, repeat=3)), dtype=torch.float32)


def generate_anchors(feature_shape: Sequence[int], stride_vox: int,
                     sizes_vox: Sequence[float] = ANCHOR_SIZES_VOX) -> torch.Tensor:
    """Anchors of a feature grid ``feature_shape`` (3 ints) at ``stride_vox``: (prod(shape) * S, 6).

    >>> a = generate_anchors((1, 1, 2), 4)
    >>> a.shape, a[0].tolist(), a[64, :3].tolist()
    (torch.Size([128, 6]), [1.5, 1.5, 1.5, 13.0, 13.0, 13.0], [1.5, 1.5, 5.5])
    """
    if len(feature_shape) != 3 or min(feature_shape) < 1:
        raise ValueError(f"feature_shape must be 3 positive ints, got {tuple(feature_shape)}")
    if stride_vox < 1:
        raise ValueError(f"stride_vox must be a positive int, got {stride_vox}")
    axes = [torch.arange(n, dtype=torch.float32) * stride_vox + (stride_vox - 1) / 2 for n in feature_shape]
    centres = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 1, 3)
    shapes = anchor_shapes(sizes_vox)
    centres = centres.expand(-1, shapes.shape[0], 3)
    return torch.cat([centres, shapes.expand(centres.shape[0], -1, 3)], dim=-1).reshape(-1, 6)


def _corners(boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    half = boxes[..., 3:] / 2
    return boxes[..., :3] - half, boxes[..., :3] + half


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU of boxes ``a`` (N, 6) and ``b`` (M, 6): (N, M).

    >>> box_iou(torch.tensor([[0., 0, 0, 2, 2, 2]]), torch.tensor([[1., 0, 0, 2, 2, 2]])).item()
    0.3333333432674408
    """
    lo_a, hi_a = _corners(a[:, None])
    lo_b, hi_b = _corners(b[None])
    inter = (torch.minimum(hi_a, hi_b) - torch.maximum(lo_a, lo_b)).clamp(min=0).prod(-1)
    union = a[:, None, 3:].prod(-1) + b[None, :, 3:].prod(-1) - inter
    return inter / union.clamp(min=1e-12)


def box_iou_aligned(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of corresponding rows of ``a`` and ``b`` (both (..., 6)): (...)."""
    lo_a, hi_a = _corners(a)
    lo_b, hi_b = _corners(b)
    inter = (torch.minimum(hi_a, hi_b) - torch.maximum(lo_a, lo_b)).clamp(min=0).prod(-1)
    union = a[..., 3:].prod(-1) + b[..., 3:].prod(-1) - inter
    return inter / union.clamp(min=1e-12)


def encode_boxes(boxes: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """Deltas (tx, ty, tz, tw, th, td) taking ``anchors`` to ``boxes``: the inverse of Eq. 1."""
    t_centre = (boxes[..., :3] - anchors[..., :3]) / anchors[..., 3:]
    t_size = torch.log(boxes[..., 3:] / anchors[..., 3:])
    return torch.cat([t_centre, t_size], dim=-1)


def decode_boxes(deltas: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """Eq. 1: x = xa + tx * wa, ..., w = wa * exp(tw), ...; log-scales clamped to avoid overflow.

    >>> decode_boxes(torch.tensor([0.5, 0, 0, math.log(2), 0, 0]), torch.tensor([1., 1, 1, 4, 4, 4])).tolist()
    [3.0, 1.0, 1.0, 8.0, 4.0, 4.0]
    """
    centre = anchors[..., :3] + deltas[..., :3] * anchors[..., 3:]
    size = anchors[..., 3:] * torch.exp(deltas[..., 3:].clamp(max=_MAX_LOG_SCALE))
    return torch.cat([centre, size], dim=-1)


def target_boxes(landmarks_vox: torch.Tensor, spacing_scale: float = 1.0) -> torch.Tensor:
    """Landmark-centred target boxes (5, 6) for ``landmarks_vox`` (5, 3) in LANDMARKS order.

    ``spacing_scale`` multiplies the paper's box edges (14 and 24 voxels at 1.3 mm) for volumes at
    another voxel size: pass ``1.3 / spacing_mm`` to keep the boxes' physical size.
    """
    if landmarks_vox.shape != (len(LANDMARKS), 3):
        raise ValueError(f"landmarks_vox must have shape ({len(LANDMARKS)}, 3) in order {LANDMARKS}, "
                         f"got {tuple(landmarks_vox.shape)}")
    sizes = torch.tensor([TARGET_SIZE_VOX[n] * spacing_scale for n in LANDMARKS], dtype=landmarks_vox.dtype)
    return torch.cat([landmarks_vox, sizes[:, None].expand(-1, 3)], dim=1)


@dataclass(frozen=True)
class AnchorTargets:
    """Per-anchor training targets: ``labels`` -1 ignore, 0 background, c >= 1 landmark class;
    ``matched`` index of the best ground-truth box; ``deltas`` encoded to it; ``max_iou`` its IoU."""

    labels: torch.Tensor    # (A,) long
    matched: torch.Tensor   # (A,) long
    deltas: torch.Tensor    # (A, 6)
    max_iou: torch.Tensor   # (A,)


def label_anchors(anchors: torch.Tensor, gt_boxes: torch.Tensor, gt_classes: torch.Tensor, *,
                  positive_iou: float = 0.5, negative_iou: float = 0.25) -> AnchorTargets:
    """§3: positive at IoU >= ``positive_iou`` or the best anchor of a ground truth (all ties), negative
    when IoU < ``negative_iou`` with every ground truth, ignored in between.

    >>> anchors = torch.tensor([[0., 0, 0, 2, 2, 2], [1., 0, 0, 2, 2, 2], [9., 9, 9, 2, 2, 2]])
    >>> t = label_anchors(anchors, torch.tensor([[0.2, 0, 0, 2, 2, 2]]), torch.tensor([3]))
    >>> t.labels.tolist()
    [3, -1, 0]
    """
    if not 0 <= negative_iou <= positive_iou <= 1:
        raise ValueError(f"need 0 <= negative_iou <= positive_iou <= 1, got {negative_iou} and {positive_iou}")
    if gt_boxes.shape[0] == 0:
        zeros = torch.zeros(anchors.shape[0], dtype=torch.long)
        return AnchorTargets(zeros, zeros.clone(), torch.zeros_like(anchors), torch.zeros(anchors.shape[0]))
    iou = box_iou(anchors, gt_boxes)                       # (A, G)
    max_iou, matched = iou.max(dim=1)
    labels = torch.full((anchors.shape[0],), -1, dtype=torch.long)
    labels[max_iou < negative_iou] = 0
    positive = max_iou >= positive_iou
    best_per_gt = iou.max(dim=0).values                    # (G,)
    best_anchor, best_gt = torch.nonzero((iou == best_per_gt[None]) & (best_per_gt[None] > 0), as_tuple=True)
    matched[best_anchor] = best_gt                         # a best anchor labels the GT it is best for
    positive[best_anchor] = True
    labels[positive] = gt_classes[matched[positive]].long()
    deltas = encode_boxes(gt_boxes[matched], anchors)
    return AnchorTargets(labels, matched, deltas, max_iou)


def sample_anchors(labels: torch.Tensor, *, batch_size: int = 256, positive_fraction: float = 0.5,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Faster R-CNN's RPN mini-batch: at most ``batch_size * positive_fraction`` positives and the rest
    negatives, drawn at random; every other anchor becomes -1 (ignored). Returns new labels."""
    if batch_size < 1 or not 0 < positive_fraction <= 1:
        raise ValueError(f"need batch_size >= 1 and 0 < positive_fraction <= 1, got {batch_size}, "
                         f"{positive_fraction}")
    out = torch.full_like(labels, -1)
    pos = torch.nonzero(labels > 0).flatten()
    neg = torch.nonzero(labels == 0).flatten()
    n_pos = min(pos.numel(), int(batch_size * positive_fraction))
    n_neg = min(neg.numel(), batch_size - n_pos)
    keep_pos = pos[torch.randperm(pos.numel(), generator=generator)[:n_pos]]
    keep_neg = neg[torch.randperm(neg.numel(), generator=generator)[:n_neg]]
    out[keep_pos] = labels[keep_pos]
    out[keep_neg] = 0
    return out
