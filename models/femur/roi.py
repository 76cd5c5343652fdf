"""Femur ROI detection (paper Fig. 3): a 2D U-Net segments the femur slice by slice; the per-slice 2D
bounding boxes merge into one 3D box, enlarged by 30 voxels per side and clipped to the volume.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

from models.blocks import UNet

__all__ = ["RoiUNet", "Box3D", "slice_boxes", "merge_boxes", "enlarge_box", "crop", "predict_slices",
           "largest_component", "detect_roi", "ROI_MARGIN_VOX"]

ROI_MARGIN_VOX = 30  # the paper enlarges the merged box by 30 voxels on every side


class RoiUNet(UNet):
    """Basic 2D U-Net (Unet-ROI, models.blocks.UNet): per level two 3x3 Conv-BN-ReLU, 2x max-pool down,
    a plain transposed conv up, concatenating skips; returns class logits. Spatial sizes must divide by
    2**(len(channels)-1).

    >>> RoiUNet(2, 1, 2, channels=(2, 4, 8))(torch.zeros(3, 1, 8, 12)).shape
    torch.Size([3, 2, 8, 12])
    """

    def __init__(self, spatial_dims: int = 2, in_channels: int = 1, out_channels: int = 2, *,
                 channels: tuple[int, ...] = (32, 64, 128, 256, 512)):
        if spatial_dims != 2:
            raise ValueError(f"RoiUNet segments 2D slices: spatial_dims must be 2, got {spatial_dims!r}")
        super().__init__(2, in_channels, out_channels, channels=tuple(channels), up_norm=False)


@dataclass(frozen=True)
class Box3D:
    """Half-open voxel box ``[start, stop)`` per axis."""

    start: tuple[int, int, int]
    stop: tuple[int, int, int]

    def __post_init__(self) -> None:
        if len(self.start) != 3 or len(self.stop) != 3 or any(a >= b for a, b in zip(self.start, self.stop)):
            raise ValueError(f"box needs 3 axes with start < stop, got start={self.start}, stop={self.stop}")

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(b - a for a, b in zip(self.start, self.stop))

    @property
    def slices(self) -> tuple[slice, slice, slice]:
        return tuple(slice(a, b) for a, b in zip(self.start, self.stop))

    def iou(self, other: "Box3D") -> float:
        """Intersection over union of two boxes (the paper reports 78.1 % for its detector)."""
        inter = np.prod([max(0, min(b1, b2) - max(a1, a2))
                         for a1, b1, a2, b2 in zip(self.start, self.stop, other.start, other.stop)])
        return float(inter / (np.prod(self.shape) + np.prod(other.shape) - inter))


def slice_boxes(mask: np.ndarray, axis: int = 2) -> dict[int, tuple[int, int, int, int]]:
    """2D bounding boxes ``(r0, r1, c0, c1)`` (half-open) of the foreground in each slice along ``axis``.

    >>> m = np.zeros((4, 4, 3), bool); m[1, 2, 0] = m[3, 1, 0] = m[0, 0, 2] = True
    >>> slice_boxes(m)
    {0: (1, 4, 1, 3), 2: (0, 1, 0, 1)}
    """
    if mask.ndim != 3:
        raise ValueError(f"mask must be 3D, got shape {mask.shape}")
    boxes = {}
    for k in range(mask.shape[axis]):
        plane = np.take(mask, k, axis=axis)
        rows, cols = np.nonzero(plane.any(axis=1))[0], np.nonzero(plane.any(axis=0))[0]
        if rows.size:
            boxes[k] = (int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1)
    return boxes


def merge_boxes(boxes: dict[int, tuple[int, int, int, int]], axis: int = 2) -> Box3D:
    """The 3D box enclosing every per-slice 2D box (slice index ``k`` along ``axis``).

    >>> merge_boxes({0: (1, 4, 1, 3), 2: (0, 1, 0, 1)})
    Box3D(start=(0, 0, 0), stop=(4, 3, 3))
    """
    if not boxes:
        raise ValueError("no slice has foreground: cannot merge an empty set of boxes")
    ks = sorted(boxes)
    r0, r1 = min(b[0] for b in boxes.values()), max(b[1] for b in boxes.values())
    c0, c1 = min(b[2] for b in boxes.values()), max(b[3] for b in boxes.values())
    in_plane = [(r0, r1), (c0, c1)]
    in_plane.insert(axis, (ks[0], ks[-1] + 1))
    return Box3D(tuple(a for a, _ in in_plane), tuple(b for _, b in in_plane))


def enlarge_box(box: Box3D, shape: tuple[int, int, int], margin_vox: int = ROI_MARGIN_VOX) -> Box3D:
    """Grow ``box`` by ``margin_vox`` on every side, clipped to a volume of ``shape``.

    >>> enlarge_box(Box3D((0, 5, 40), (4, 9, 50)), (100, 100, 60))
    Box3D(start=(0, 0, 10), stop=(34, 39, 60))
    """
    if margin_vox < 0:
        raise ValueError(f"margin_vox must be >= 0, got {margin_vox}")
    return Box3D(tuple(max(0, a - margin_vox) for a in box.start),
                 tuple(min(n, b + margin_vox) for b, n in zip(box.stop, shape)))


def crop(volume: np.ndarray, box: Box3D) -> np.ndarray:
    """The part of ``volume`` (last three axes) inside ``box``."""
    return volume[(..., *box.slices)]


@torch.no_grad()
def predict_slices(model: RoiUNet, volume: np.ndarray, axis: int = 2, batch_size: int = 16) -> np.ndarray:
    """Foreground mask of ``volume`` from the 2D detector applied to every slice along ``axis``."""
    model.eval()
    slices = torch.from_numpy(np.ascontiguousarray(np.moveaxis(volume, axis, 0), dtype=np.float32))[:, None]
    m = model.size_multiple
    pad = [(-n) % m for n in slices.shape[-2:]]
    slices = torch.nn.functional.pad(slices, (0, pad[1], 0, pad[0]))
    out = [model(slices[i:i + batch_size]).argmax(1) > 0 for i in range(0, slices.shape[0], batch_size)]
    mask = torch.cat(out)
    h, w = (n for i, n in enumerate(volume.shape) if i != axis)
    return np.moveaxis(mask[:, :h, :w].numpy(), 0, axis)


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 26-connected component of a 3D boolean mask (empty stays empty).

    >>> m = np.zeros((5, 1, 1), bool); m[0] = m[2:5] = True
    >>> largest_component(m).ravel().tolist()
    [False, False, True, True, True]
    """
    labels, count = ndimage.label(mask, structure=np.ones((3, 3, 3), bool))
    if count <= 1:
        return mask.astype(bool)
    sizes = np.bincount(labels.ravel())[1:]
    return labels == 1 + int(np.argmax(sizes))


def detect_roi(model: RoiUNet, volume: np.ndarray, *, axis: int = 2, margin_vox: int = ROI_MARGIN_VOX,
               keep_largest: bool = True) -> Box3D | None:
    """The femur ROI of a 3D ``volume``: detector slice masks -> merged 3D box -> enlarged; None if empty.

    ``keep_largest`` drops every detection outside the largest 3D component before the boxes are
    merged (our addition: one stray false positive would otherwise stretch the merged box).
    """
    mask = predict_slices(model, volume, axis)
    boxes = slice_boxes(largest_component(mask) if keep_largest else mask, axis)
    return enlarge_box(merge_boxes(boxes, axis), volume.shape, margin_vox) if boxes else None
