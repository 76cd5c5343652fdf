"""The networks the peak-memory benchmark runs: each client at its paper's input size, and a reduced
twin (same topology, a quarter of the widths, a small volume) that a CPU can train in about a second.

The reduced twin keeps the paper network's balance of activations against parameters (at the real
widths and a 64^3 volume, parameters, gradients and Adam state would dominate the peak and every
method would look alike), so its measured ratios are comparable in kind with the paper-size ones.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

__all__ = ["ModelSpec", "specs", "quick_specs", "SPEC_KEYS"]


@dataclass(frozen=True)
class ModelSpec:
    """One client: how to build it at paper and reduced size, its input shapes, and its blocks.

    ``blocks`` are the qualified module names a user would wrap in ``torch.utils.checkpoint``
    ("every encoder/decoder block"); ``size_note`` says where the paper input size comes from.
    """
    key: str
    title: str
    build: Callable[[], nn.Module]
    paper_shape: tuple[int, ...]
    size_note: str
    build_reduced: Callable[[], nn.Module]
    reduced_shape: tuple[int, ...]
    reduced_note: str
    blocks: tuple[str, ...]
    paper_ref: str = ""

    @property
    def paper_size(self) -> str:
        return "x".join(map(str, self.paper_shape[2:]))

    @property
    def reduced_size(self) -> str:
        return "x".join(map(str, self.reduced_shape[2:]))


def _prefixed(prefix: str, count: int) -> tuple[str, ...]:
    return tuple(f"{prefix}.{i}" for i in range(count))


def _pose_v2() -> ModelSpec:
    from models.pose import fetusmap_v2
    return ModelSpec(
        key="fetusmapv2", title="FetusMapV2 pose U-Net (22 landmarks, 2 convs per block)",
        build=fetusmap_v2, paper_shape=(1, 1, 176, 112, 112),
        size_note="FetusMapV2 Table 1/4: the vanilla UNet's largest input under 8 GB",
        build_reduced=lambda: fetusmap_v2(channels=8), reduced_shape=(1, 1, 80, 48, 48),
        reduced_note="widths 8..128 (paper 32..512), 80x48x48",
        blocks=_prefixed("encoders", 5) + _prefixed("decoders", 4), paper_ref="Table 4")


def _pose_v1() -> ModelSpec:
    from models.pose import fetusmap
    return ModelSpec(
        key="fetusmap", title="FetusMap pose U-Net (16 landmarks, 3 convs per block)",
        build=fetusmap, paper_shape=(1, 1, 112, 96, 128),
        size_note="FetusMap §3: 0.5 x the mean volume 220x205x260 (the ratio GCP allowed on 12 GB), "
                  "rounded to multiples of 16",
        build_reduced=lambda: fetusmap(channels=8), reduced_shape=(1, 1, 64, 48, 64),
        reduced_note="widths 8..128 (paper 32..512), 64x48x64",
        blocks=_prefixed("encoders", 5) + _prefixed("decoders", 4))


def _femur() -> ModelSpec:
    from models.femur import BranchedFemurNet
    return ModelSpec(
        key="femur", title="Femur branched segmentation + localization net",
        build=BranchedFemurNet, paper_shape=(1, 1, 152, 80, 120),
        size_note="femur paper: ROI 228x124x190 x 0.65 = 148x81x124, rounded to multiples of 8",
        build_reduced=lambda: BranchedFemurNet(channels=(4, 8, 16, 32)), reduced_shape=(1, 1, 64, 32, 48),
        reduced_note="widths 4..32 (paper 16..128), 64x32x48",
        blocks=("stem", "enc1", "seg_bottom", "loc_enc2", "loc_bottom", "loc_dec2", "seg_dec1", "seg_dec0",
                "loc_dec1", "loc_dec0"))


def _face() -> ModelSpec:
    from models.face.net import FaceRPN
    return ModelSpec(
        key="face", title="Face 3D RPN (VGG-style backbone, 64 anchors)",
        build=FaceRPN, paper_shape=(1, 1, 160, 160, 160),
        size_note="no size in the paper; 160^3 voxels of 1.3 mm = 208 mm holds a fetal head with the face "
                  "anywhere (models/face/net.py)",
        build_reduced=lambda: FaceRPN(channels=(8, 16, 32, 64), fuse_channels=32, rpn_channels=32),
        reduced_shape=(1, 1, 48, 48, 48), reduced_note="widths 8..64, fuse/RPN 32 (paper 32..256, 128), 48^3",
        blocks=("block1", "block2", "block3", "block4", "fuse", "rpn"))


def _head() -> ModelSpec:
    from models.head import PAPER_INPUT_SIZE, USegNetHAS
    return ModelSpec(
        key="head", title="Head USegNet-DS-HAS (deep supervision, hybrid attention)",
        build=USegNetHAS, paper_shape=(1, 1, *PAPER_INPUT_SIZE),
        size_note="head paper: 388x258x440 x 0.4, rounded to multiples of 8",
        build_reduced=lambda: USegNetHAS(channels=(8, 16, 16, 16), attention_channels=8,
                                         attention_out_channels=16),
        reduced_shape=(1, 1, 48, 32, 56), reduced_note="widths 8..16, attention 8/16 (paper 32..64, 32/64), "
                                                      "48x32x56",
        blocks=_prefixed("encoders", 4) + _prefixed("sams", 3) + _prefixed("uams", 3))


_BUILDERS: dict[str, Callable[[], ModelSpec]] = {
    "fetusmapv2": _pose_v2, "fetusmap": _pose_v1, "femur": _femur, "face": _face, "head": _head}
SPEC_KEYS = tuple(_BUILDERS)


def specs(keys: tuple[str, ...] = SPEC_KEYS) -> tuple[list[ModelSpec], list[str]]:
    """The specs of ``keys`` whose client package imports, and a line per client that does not."""
    unknown = [k for k in keys if k not in _BUILDERS]
    if unknown:
        raise ValueError(f"unknown model {unknown[0]!r}; choose from {', '.join(SPEC_KEYS)}")
    out, missing = [], []
    for k in keys:
        try:
            out.append(_BUILDERS[k]())
        except ImportError as exc:      # a client still being written: the benchmark runs the others
            missing.append(f"{k}: skipped, its client does not import ({exc})")
    return out, missing


def quick_specs() -> list[ModelSpec]:
    """CI's smoke run: a two-level pose U-Net with base width 4; predicted at 176x112x112, measured at 16^3."""
    from models.pose import fetusmap_v2
    tiny = lambda: fetusmap_v2(channels=4, depth=2)   # noqa: E731
    return [ModelSpec(
        key="fetusmapv2", title="tiny FetusMapV2-shaped U-Net (--quick: depth 2, base width 4)",
        build=tiny, paper_shape=(1, 1, 176, 112, 112), size_note="FetusMapV2 vanilla input (tiny network)",
        build_reduced=tiny, reduced_shape=(1, 1, 16, 16, 16), reduced_note="the same tiny network at 16^3",
        blocks=_prefixed("encoders", 3) + _prefixed("decoders", 2), paper_ref="Table 4")]
