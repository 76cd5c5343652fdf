"""Training and evaluation of the pose detector, compiled with memplan for a memory budget.

A variant ("v2" = FetusMapV2, "fetusmap" = FetusMap) fixes the landmark set, the loss, the target
scale, the paper's learning rate and epochs, its augmentation and its AUC range; the network sizes come
from the config. Optimiser as both papers: Adam, moment term 0.5. The plan is made with the variant's
real loss. Checkpoints follow models/checkpoint.py: the original model's ``state_dict`` under
"detector" (the compiled module shares its parameters), the plan, and with ``rev`` the substituted
network's own state (it is rebuilt from the plan on load). With ``val_fraction`` a validation split
is held out and ``best.pt`` keeps the epoch with the lowest mean validation error (V2 §4.1 selects
on its validation set).
"""
from __future__ import annotations

import json
import sys
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from models.augment import AugmentConfig
from models.checkpoint import Checkpoint, load_checkpoint_file, save_checkpoint
from models.data import list_cases
from models.errors import ClientError
from models.loop import Precision, run_epochs
from models.planning import Compiled, compile_for_training, resolve_device
from models.pose.dataset import PoseDataset, fetusmap_augmentation, v2_augmentation
from models.pose.heatmaps import decode_argmax
from models.pose.landmarks import FETUSMAP_LANDMARKS, V2_LANDMARKS, LandmarkSet
from models.pose.losses import FetusMapV2Loss, HeatmapL2Loss
from models.pose.lr_rule import assign_sides
from models.pose.metrics import FETUSMAP_PCK_MAX_MM, PCK_MAX_MM, clinical_measures, distance_errors_mm, summarize
from models.pose.net import PoseUNet, check_input_size

__all__ = ["Variant", "VARIANTS", "PRESETS", "PAPER_WIDTH", "TrainConfig", "build_model", "planning_loss",
           "compile_detector", "train", "load_checkpoint", "predict_landmarks", "evaluate", "EvalResult",
           "make_dataset", "split_cases"]

CLIENT = "pose"
#: Base width whose V2 U-Net has 37,063,407 parameters (148.25 MB float32), V2 Table 4's 147.98 MB.
PAPER_WIDTH = 41


@dataclass(frozen=True)
class Variant:
    """What distinguishes FetusMap from FetusMapV2 at training time (the papers' settings)."""

    name: str
    landmarks: LandmarkSet
    loss: Callable[[], nn.Module]
    normalized_heatmaps: bool       # Eq. 2 distributions (KL losses) or peak-1 maps (L2 regression)
    pair_sides: bool                # Pair Loss trains sides loosely: assign them with Eq. 7 at inference
    convs: int
    lr: float
    epochs: int
    pck_max_mm: float
    augmentation: Callable[[], AugmentConfig]


VARIANTS = {
    "v2": Variant("FetusMapV2", V2_LANDMARKS, FetusMapV2Loss, True, True, convs=2, lr=1e-4, epochs=100,
                  pck_max_mm=PCK_MAX_MM, augmentation=v2_augmentation),
    "fetusmap": Variant("FetusMap", FETUSMAP_LANDMARKS, HeatmapL2Loss, False, False, convs=3, lr=1e-3, epochs=20,
                        pck_max_mm=FETUSMAP_PCK_MAX_MM, augmentation=lambda: fetusmap_augmentation(FETUSMAP_LANDMARKS)),
}

#: The papers' full set-ups: ``--preset NAME`` fills these config fields (explicit flags win).
PRESETS = {
    "fetusmapv2": {"variant": "v2", "input_size": (208, 128, 144), "rev": True, "budget": "8GB"},
    "fetusmap": {"variant": "fetusmap", "scale_ratio": 0.5, "budget": "12GB"},
}


def _variant(name: str) -> Variant:
    if name not in VARIANTS:
        raise ClientError(f"unknown pose variant {name!r}; choose one of {sorted(VARIANTS)}")
    return VARIANTS[name]


@dataclass(frozen=True)
class TrainConfig:
    """Everything ``train`` needs; the CLI fills it from its flags. ``None`` means the variant's value.

    ``scale_ratio`` (FetusMap: 0.4, 0.5 with GCP) replaces the fixed ``input_size``: each volume is
    downsampled by it and padded to the largest; ``val_fraction`` holds out validation cases.
    """

    data: str
    out: str = "runs/pose"
    variant: str = "v2"
    input_size: tuple[int, int, int] | None = (176, 112, 112)
    channels: int = 32
    depth: int = 4
    convs: int | None = None        # None: the variant's (V2 2, FetusMap 3)
    epochs: int | None = None       # None: the variant's (V2 100, FetusMap 20)
    lr: float | None = None         # None: the variant's (V2 1e-4, FetusMap 1e-3)
    batch_size: int = 1
    budget: str | int | None = None
    rev: bool = False
    device: str = "cpu"
    augment: bool = True
    seed: int = 0
    case_ids: tuple[str, ...] | None = None
    progress: bool = True
    scale_ratio: float | None = None
    val_fraction: float = 0.0
    amp: str | None = None          # None (fp32), "bf16" or "fp16" autocast

    def __post_init__(self) -> None:
        _variant(self.variant)
        if self.batch_size < 1 or (self.epochs is not None and self.epochs < 1) or (self.lr is not None and self.lr <= 0):
            raise ClientError(f"need batch_size >= 1, epochs >= 1, lr > 0; got {self.batch_size}, {self.epochs}, "
                              f"{self.lr}")
        if not 0 <= self.val_fraction < 1:
            raise ClientError(f"val_fraction must be in [0, 1), got {self.val_fraction}")

    @property
    def resolved_epochs(self) -> int:
        return self.epochs or _variant(self.variant).epochs

    @property
    def resolved_lr(self) -> float:
        return self.lr or _variant(self.variant).lr


def build_model(variant: str, *, channels: int = 32, depth: int = 4, convs: int | None = None) -> PoseUNet:
    """The detector of ``variant`` with the given sizes."""
    v = _variant(variant)
    return PoseUNet(3, 1, len(v.landmarks), channels=channels, depth=depth, convs=convs or v.convs,
                    track_running_stats=False)


def planning_loss(variant: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The variant's training loss on zero targets shaped like the output: what memplan plans with.

    >>> float(planning_loss("fetusmap")(torch.ones(1, 2, 3, 3, 3)))
    27.0
    """
    loss = _variant(variant).loss()
    return lambda out: loss(out, torch.zeros_like(out))


def compile_detector(model: nn.Module, input_shape: Sequence[int], *, budget: str | int | None = None,
                     rev: bool = False, device: str | torch.device = "cpu", variant: str = "v2",
                     plan: Any = None, amp: str | None = None) -> nn.Module:
    """The memplan-compiled training module of ``model`` for inputs of ``input_shape`` (B, 1, X, Y, Z),
    planned for ``amp`` autocast (None: fp32)."""
    return _compile(model, input_shape, budget=budget, rev=rev, device=device, variant=variant, plan=plan,
                    amp=amp).module


def _compile(model, input_shape, *, budget, rev, device, variant, plan=None, amp=None) -> Compiled:
    return compile_for_training(model, tuple(input_shape), loss_fn=planning_loss(variant), budget=budget, rev=rev,
                                device=device, plan=plan, amp=amp)


def split_cases(config: TrainConfig) -> tuple[list[str], list[str]]:
    """(train, validation) case ids; validation is a seeded random ``val_fraction`` of the cases."""
    ids = list(config.case_ids) if config.case_ids else list_cases(config.data)
    n_val = int(round(config.val_fraction * len(ids)))
    if config.val_fraction and (n_val < 1 or n_val >= len(ids)):
        raise ClientError(f"--val-fraction {config.val_fraction} of {len(ids)} cases leaves no training or no "
                          f"validation case; add cases or change it")
    order = np.random.default_rng(config.seed).permutation(len(ids))
    val = sorted(ids[i] for i in order[:n_val])
    return [i for i in ids if i not in val], val


def make_dataset(config: TrainConfig, case_ids: Sequence[str] | None, *, augment: bool, data: str | None = None
                 ) -> PoseDataset:
    """The dataset ``config`` describes (its grid, targets and, when ``augment``, the variant's augmentation)."""
    v = _variant(config.variant)
    return PoseDataset(data or config.data, None if config.scale_ratio else config.input_size,
                       landmarks=v.landmarks, normalized_heatmaps=v.normalized_heatmaps,
                       augment=v.augmentation() if augment else None, case_ids=case_ids,
                       scale_ratio=config.scale_ratio, multiple=2 ** config.depth, seed=config.seed)


def _checkpoint(model: nn.Module, compiled: Compiled, config: TrainConfig, epoch: int, history: list,
                input_size: Sequence[int], val: list) -> Checkpoint:
    return Checkpoint(CLIENT, {**asdict(config), "grid": list(input_size)}, {"detector": model.state_dict()},
                      plans={"detector": compiled.plan.to_json()},
                      compiled={"detector": compiled.module.state_dict()} if config.rev else {},
                      epoch=epoch, history=history, extra={"val_mean_ed_mm": val})


def train(config: TrainConfig, *, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Train on ``config.data``; returns {"losses": per-epoch means, "checkpoint": path, "best": path or None,
    "val_mean_ed_mm": per-epoch validation errors, "plan": the memplan plan}."""
    log = log or (lambda text: print(text, file=sys.stderr))
    device = resolve_device(config.device)
    v = _variant(config.variant)
    if config.input_size is not None and config.scale_ratio is None:
        check_input_size(config.input_size, config.depth)
    torch.manual_seed(config.seed)
    train_ids, val_ids = split_cases(config)
    data = make_dataset(config, train_ids, augment=config.augment)
    grid = tuple(data.input_size)
    loader = DataLoader(data, batch_size=config.batch_size, shuffle=True, num_workers=0, drop_last=True,
                        generator=torch.Generator().manual_seed(config.seed))
    model = build_model(config.variant, channels=config.channels, depth=config.depth, convs=config.convs).to(device)
    compiled = _compile(model, (config.batch_size, 1, *grid), budget=config.budget, rev=config.rev, device=device,
                        variant=config.variant, amp=config.amp)
    precision = Precision(config.amp, device)
    log(f"{v.name} detector, input {config.batch_size}x1x{'x'.join(map(str, grid))}\n{compiled.summary}")
    optimizer = torch.optim.Adam(compiled.module.parameters(), lr=config.resolved_lr, betas=(0.5, 0.999))
    loss_fn = v.loss()
    out = Path(config.out)
    val_data = make_dataset(config, val_ids, augment=False) if val_ids else None
    val_history: list[float] = []
    history: list[dict[str, float]] = []

    def step(batch) -> dict[str, float]:
        image, target = batch["image"].to(device), batch["heatmaps"].to(device)
        optimizer.zero_grad(set_to_none=True)
        with precision.autocast():
            loss = loss_fn(compiled.module(image), target)
        precision.backward(loss, optimizer)
        return {"loss": loss.item()}

    def on_epoch(epoch: int, means: dict[str, float]) -> None:
        history.append(means)
        if val_data is not None:
            val_history.append(float(evaluate(compiled.module, val_data, config.variant, device=device).errors_mm.mean()))
        ckpt = _checkpoint(model, compiled, config, epoch, [h["loss"] for h in history], grid, val_history)
        save_checkpoint(out / "last.pt", ckpt)
        if val_history and val_history[-1] == min(val_history):
            save_checkpoint(out / "best.pt", ckpt)

    run_epochs(step, lambda epoch: loader, epochs=config.resolved_epochs, steps_per_epoch=len(loader),
               desc=f"train {v.name}", progress=config.progress, on_epoch=on_epoch)
    (out / "config.json").write_text(json.dumps(asdict(config), indent=1))
    return {"losses": [h["loss"] for h in history], "checkpoint": str(out / "last.pt"),
            "best": str(out / "best.pt") if val_history else None, "val_mean_ed_mm": val_history,
            "plan": compiled.plan}


def _config_from(raw: dict) -> TrainConfig:
    raw = {k: v for k, v in raw.items() if k in TrainConfig.__dataclass_fields__}
    raw["input_size"] = tuple(raw["input_size"]) if raw.get("input_size") else None
    raw["case_ids"] = tuple(raw["case_ids"]) if raw.get("case_ids") else None
    return TrainConfig(**raw)


def load_checkpoint(path: str | Path, device: str = "cpu") -> tuple[nn.Module, TrainConfig]:
    """The trained model and its config from a ``train`` checkpoint (a file or the run folder).

    A REV-trained checkpoint rebuilds the substituted network from its saved plan and loads its trained
    state (the module returned is then memplan-compiled); otherwise the plain PoseUNet.
    """
    ckpt = load_checkpoint_file(path, CLIENT, device="cpu")
    config = _config_from(dict(ckpt.config))
    model = build_model(config.variant, channels=config.channels, depth=config.depth, convs=config.convs)
    model.load_state_dict(ckpt.models["detector"])
    if "detector" in ckpt.compiled:
        grid = tuple(ckpt.config["grid"])
        with warnings.catch_warnings():               # "new blocks start from fresh weights": the trained ones load next
            warnings.filterwarnings("ignore", message="memplan plan replaces", category=UserWarning)
            compiled = compile_detector(model, (config.batch_size, 1, *grid), plan=ckpt.plans["detector"],
                                        variant=config.variant, amp=config.amp)
        compiled.load_state_dict(ckpt.compiled["detector"])          # strict: a different substitution fails here
        return compiled.to(device), config
    return model.to(device), config


@torch.no_grad()
def predict_landmarks(model: nn.Module, image: torch.Tensor, variant: str,
                      affine: np.ndarray | torch.Tensor | None = None) -> np.ndarray:
    """Voxel coordinates (B, L, 3) by argmax, sides assigned by Eq. 7 for V2 in world coordinates
    (``affine``: the grid's voxel -> mm affine, (4, 4) or (B, 4, 4); None: the voxel grid itself)."""
    coords = decode_argmax(model(image)).cpu().numpy().astype(np.float64)
    if not _variant(variant).pair_sides:
        return coords
    frame = None if affine is None else np.asarray(affine, dtype=np.float64)
    return assign_sides(coords, frame=frame)


@dataclass(frozen=True, eq=False)
class EvalResult:
    """Per case and landmark errors (mm), clinical measure errors (V2 only) and the printed table."""

    case_ids: list[str]
    errors_mm: np.ndarray
    measures: list[dict[str, float]] = field(default_factory=list)
    table: str = ""


def evaluate(model: nn.Module, data: PoseDataset, variant: str, *, device: str | torch.device = "cpu",
             predict: Callable[[torch.Tensor, dict], np.ndarray] | None = None) -> EvalResult:
    """Errors of ``model`` on every case of ``data``; ``predict(image, sample)`` overrides the prediction (SSL)."""
    v = _variant(variant)
    ids, errors, measures = [], [], []
    for i in range(len(data)):
        sample = data[i]
        image = sample["image"][None].to(device)
        affine = sample["affine"].numpy()
        pred = predict(image, sample) if predict else predict_landmarks(model, image, variant, affine)[0]
        truth = sample["landmarks_vox"].numpy().astype(np.float64)
        spacing = sample["spacing_mm"].numpy().astype(np.float64)
        errors.append(distance_errors_mm(pred, truth, spacing))
        if v.landmarks is V2_LANDMARKS:
            measures.append(clinical_measures(pred * spacing, truth * spacing, v.landmarks))
        ids.append(sample["id"])
    e = np.stack(errors)
    return EvalResult(ids, e, measures, summarize(e, v.landmarks.names, measures, pck_max_mm=v.pck_max_mm))
