"""Self-supervised online refinement (SSL) at test time: FetusMap §2.2 and FetusMapV2 §3.3.

Per test case a copy of the detector is compiled with memplan and fine-tuned for a few iterations.
Each iteration predicts the pose P_t, registers the pose library S onto it on stable landmarks, keeps
the K best atlases (Eq. 9 / FetusMap Eq. 1) and makes a label proxy:

- V2: pseudo-labels P_p^i = (P_t^i + mean_a T_a P_a^i) / 2 for i in {1, 4, 6, 8, 10} (Eq. 10),
  loss L_ssl = 1/5 sum_i sum_voxels (H(P_p^i) - S(P_t^i))^2 (Eq. 11), S the spatial softmax of the
  logits (the distribution the KL-trained detector predicts) and H the Eq. 2 Gaussian;
- FetusMap: every channel's proxy is the mean of the K aligned atlases' Gaussian maps, L2 loss.

Registration runs in world mm (the grid's affine), so anisotropic resampling does not bend the poses
and a mirrored grid (negative-determinant affine) does not mirror them; Eq. 7 decides sides there too.
A detector that is already compiled (a REV checkpoint: memplan replaced passes) is copied, not
compiled again.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from models.pose.heatmaps import SIGMA_VOX, decode_argmax, gaussian_heatmaps
from models.pose.landmarks import FETUSMAP_LANDMARKS, V2_LANDMARKS, LandmarkSet
from models.pose.lr_rule import assign_sides
from models.pose.registration import PoseLibrary

__all__ = ["SSLConfig", "V2_SSL", "FETUSMAP_SSL", "RefineResult", "ssl_v2_loss", "refine_case", "ssl_planning_loss", "as_affine",
           "to_world", "to_voxel"]


@dataclass(frozen=True)
class SSLConfig:
    """One paper's SSL settings; landmark indices are the papers' 1-based ones."""

    landmarks: LandmarkSet
    registration: tuple[int, ...]
    targets: tuple[int, ...]
    k: int
    iterations: int
    lr: float
    with_scale: bool                # similarity (V2 "transformation") or rigid (FetusMap)
    proxy: str                      # "pseudo_label" (V2 Eq. 10-11) or "atlas_mean" (FetusMap)
    sigma: float = SIGMA_VOX

    def __post_init__(self):
        if self.proxy not in ("pseudo_label", "atlas_mean"):
            raise ValueError(f"SSL proxy must be 'pseudo_label' or 'atlas_mean', got {self.proxy!r}")
        if self.iterations < 1 or self.k < 1 or self.lr <= 0:
            raise ValueError(f"SSL needs iterations >= 1, K >= 1 and lr > 0; got {self.iterations}, {self.k}, {self.lr}")


V2_SSL = SSLConfig(V2_LANDMARKS, registration=(2, 3, 5, 7, 9), targets=(1, 4, 6, 8, 10), k=8, iterations=8,
                   lr=5e-4, with_scale=True, proxy="pseudo_label")
FETUSMAP_SSL = SSLConfig(FETUSMAP_LANDMARKS, registration=(1, 2, 3, 4, 5, 7, 8, 9, 11, 14),
                         targets=tuple(range(1, 17)), k=10, iterations=6, lr=5e-4, with_scale=False,
                         proxy="atlas_mean")


@dataclass(frozen=True, eq=False)
class RefineResult:
    """Voxel coordinates (L, 3) before and after refinement, the SSL loss per iteration, the last atlases."""

    before_vox: np.ndarray
    after_vox: np.ndarray
    losses: list[float] = field(default_factory=list)
    atlas_indices: np.ndarray | None = None


def ssl_v2_loss(logits: torch.Tensor, pseudo_heatmaps: torch.Tensor) -> torch.Tensor:
    """Eq. 11 on the target channels: mean over them of sum_voxels (H(P_p) - S(P_t))^2, logits (1, n, X, Y, Z)."""
    probs = torch.softmax(logits.flatten(2), dim=-1)
    return ((pseudo_heatmaps.flatten(2) - probs) ** 2).sum(-1).mean()


def as_affine(frame: Sequence[float] | np.ndarray) -> np.ndarray:
    """A 4x4 voxel -> mm affine from an affine or a (3,) spacing (diagonal, origin 0).

    >>> as_affine([1.0, 2.0, 3.0])[:3, :3].diagonal().tolist()
    [1.0, 2.0, 3.0]
    """
    f = np.asarray(frame, dtype=np.float64)
    if f.shape == (3,):
        return np.diag([*f, 1.0])
    if f.shape != (4, 4) or abs(np.linalg.det(f[:3, :3])) < 1e-12:
        raise ValueError(f"frame must be a (3,) spacing or an invertible 4x4 affine, got shape {f.shape}")
    return f


def to_world(points_vox: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """(..., 3) voxel coordinates -> world mm."""
    return np.asarray(points_vox, dtype=np.float64) @ affine[:3, :3].T + affine[:3, 3]


def to_voxel(points_mm: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """(..., 3) world mm -> voxel coordinates."""
    inverse = np.linalg.inv(affine)
    return np.asarray(points_mm, dtype=np.float64) @ inverse[:3, :3].T + inverse[:3, 3]


def ssl_planning_loss(config: SSLConfig) -> Callable[[torch.Tensor], torch.Tensor]:
    """The SSL loss on the target channels against zero maps shaped like them: what memplan plans with
    (Eq. 11 for V2, the L2 of the atlas proxy for FetusMap)."""
    channels = list(config.landmarks.channels(*config.targets))

    def loss(out: torch.Tensor) -> torch.Tensor:
        target = out.new_zeros((out.shape[0], len(channels), *out.shape[2:]))
        if config.proxy == "pseudo_label":
            return ssl_v2_loss(out[:, channels], target)
        return ((out[:, channels] - target) ** 2).flatten(2).sum(-1).mean()
    return loss


def _proxy(config: SSLConfig, pred_mm: np.ndarray, atlases_mm: np.ndarray, affine: np.ndarray,
           shape: Sequence[int]) -> tuple[list[int], torch.Tensor]:
    """(channels, target heatmaps (1, n, X, Y, Z)) of this iteration's label proxy."""
    channels = list(config.landmarks.channels(*config.targets))
    if config.proxy == "pseudo_label":
        pseudo_mm = 0.5 * (pred_mm[channels] + atlases_mm[:, channels].mean(0))          # Eq. 10
        return channels, gaussian_heatmaps(to_voxel(pseudo_mm, affine), shape, sigma=config.sigma)[None]
    maps = gaussian_heatmaps(to_voxel(atlases_mm[:, channels], affine), shape, sigma=config.sigma, normalized=False)
    return channels, maps.mean(0, keepdim=True)                                          # FetusMap label proxy


def _decode(logits: torch.Tensor, pair_sides: bool, affine: np.ndarray) -> np.ndarray:
    coords = decode_argmax(logits)[0].cpu().numpy().astype(np.float64)
    return assign_sides(coords, frame=affine) if pair_sides else coords


def refine_case(model: nn.Module, image: torch.Tensor, frame: Sequence[float] | np.ndarray, library: PoseLibrary,
                config: SSLConfig = V2_SSL, *, compile_fn: Callable[[nn.Module, Sequence[int]], nn.Module] | None = None
                ) -> RefineResult:
    """Fine-tune a copy of ``model`` on one image (1, 1, X, Y, Z) with SSL; ``model`` is left unchanged.

    ``frame``: the image grid's voxel -> mm affine (4x4) or its spacing (3,). ``compile_fn(module,
    input_shape)`` wraps the copy (default: memplan.compile, no budget); a module memplan already
    compiled (it carries ``memplan_plan``, e.g. a REV checkpoint) is only copied.
    """
    if tuple(library.names) != tuple(config.landmarks.names):
        raise ValueError(f"pose library landmarks {library.names[:3]}... do not match {config.landmarks.name}'s; "
                         f"build the library with PoseLibrary.from_directory(dir, {config.landmarks.name} names)")
    if getattr(model, "memplan_plan", None) is not None:
        detector = copy.deepcopy(model)                          # compiled already (REV): planning again fails
    else:
        if compile_fn is None:
            from models.planning import compile_for_training
            compile_fn = lambda m, shape: compile_for_training(  # noqa: E731
                m, shape, loss_fn=ssl_planning_loss(config), device=image.device).module
        detector = compile_fn(copy.deepcopy(model), tuple(image.shape))
    optimizer = torch.optim.Adam(detector.parameters(), lr=config.lr, betas=(0.5, 0.999))
    affine = as_affine(frame)
    reg = config.landmarks.channels(*config.registration)
    pair_sides = config.landmarks is V2_LANDMARKS
    losses, before, atlases = [], None, None
    for _ in range(config.iterations):
        logits = detector(image)
        pred_vox = _decode(logits, pair_sides, affine)
        before = pred_vox if before is None else before
        pred_mm = to_world(pred_vox, affine)
        atlases = library.align(pred_mm, reg, config.k, with_scale=config.with_scale)
        channels, target = _proxy(config, pred_mm, atlases.poses, affine, image.shape[2:])
        target = target.to(logits.device)
        if config.proxy == "pseudo_label":
            loss = ssl_v2_loss(logits[:, channels], target)
        else:
            loss = ((logits[:, channels] - target) ** 2).flatten(2).sum(-1).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    with torch.no_grad():
        after = _decode(detector(image), pair_sides, affine)
    return RefineResult(before, after, losses, atlases.indices)
