"""Training and evaluation of the pose detector, compiled with memplan for a memory budget.

A variant ("v2" = FetusMapV2, "fetusmap" = FetusMap) fixes the landmark set, the loss and the target
scale; the network sizes come from the config. Optimiser as both papers: Adam, moment term 0.5.
Checkpoints hold the original model's ``state_dict`` (the compiled module shares its parameters; with
``rev`` the REV-substituted module's own state is saved beside it under "compiled_state").
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from models.pose.dataset import PoseDataset
from models.pose.heatmaps import decode_argmax
from models.pose.landmarks import FETUSMAP_LANDMARKS, V2_LANDMARKS, LandmarkSet
from models.pose.losses import FetusMapV2Loss, HeatmapL2Loss
from models.pose.lr_rule import assign_sides
from models.pose.metrics import clinical_measures, distance_errors_mm, summarize
from models.pose.net import PoseUNet, check_input_size

__all__ = ["Variant", "VARIANTS", "TrainConfig", "build_model", "compile_detector", "train", "load_checkpoint",
           "predict_landmarks", "evaluate", "EvalResult"]


@dataclass(frozen=True)
class Variant:
    """What distinguishes FetusMap from FetusMapV2 at training time."""

    name: str
    landmarks: LandmarkSet
    loss: Callable[[], nn.Module]
    normalized_heatmaps: bool       # Eq. 2 distributions (KL losses) or peak-1 maps (L2 regression)
    pair_sides: bool                # Pair Loss trains sides loosely: assign them with Eq. 7 at inference
    convs: int


VARIANTS = {
    "v2": Variant("FetusMapV2", V2_LANDMARKS, FetusMapV2Loss, True, True, convs=2),
    "fetusmap": Variant("FetusMap", FETUSMAP_LANDMARKS, HeatmapL2Loss, False, False, convs=3),
}


def _variant(name: str) -> Variant:
    if name not in VARIANTS:
        raise ValueError(f"unknown pose variant {name!r}; choose one of {sorted(VARIANTS)}")
    return VARIANTS[name]


@dataclass(frozen=True)
class TrainConfig:
    """Everything ``train`` needs; the CLI fills it from its flags."""

    data: str
    out: str = "runs/pose"
    variant: str = "v2"
    input_size: tuple[int, int, int] = (176, 112, 112)
    channels: int = 32
    depth: int = 4
    convs: int | None = None        # None: the variant's (V2 2, FetusMap 3)
    epochs: int = 100
    lr: float = 1e-4
    batch_size: int = 1
    budget: str | int | None = None
    rev: bool = False
    device: str = "cpu"
    augment: bool = True
    seed: int = 0
    case_ids: tuple[str, ...] | None = None
    progress: bool = True


def build_model(variant: str, *, channels: int = 32, depth: int = 4, convs: int | None = None) -> PoseUNet:
    """The detector of ``variant`` with the given sizes."""
    v = _variant(variant)
    return PoseUNet(3, 1, len(v.landmarks), channels=channels, depth=depth, convs=convs or v.convs,
                    track_running_stats=False)


def compile_detector(model: nn.Module, input_shape: Sequence[int], *, budget: str | int | None = None,
                     rev: bool = False, device: str | torch.device = "cpu") -> nn.Module:
    """``memplan.compile`` of ``model`` for inputs of ``input_shape`` (B, 1, X, Y, Z), planned on meta tensors."""
    import memplan                                   # the planner is optional for the rest of this package
    example = torch.empty(tuple(input_shape), device="meta")
    return memplan.compile(model, example, budget=budget, optimizer="adam", rev=rev).to(device)


def _save(path: Path, model: nn.Module, compiled: nn.Module, config: TrainConfig, epoch: int, losses: list[float]) -> None:
    state = {"model": model.state_dict(), "config": asdict(config), "epoch": epoch, "losses": losses}
    if config.rev:
        state["compiled_state"] = compiled.state_dict()
        plan = getattr(compiled, "memplan_plan", None)
        state["plan_json"] = plan.to_json() if plan is not None else None
    torch.save(state, path)


def train(config: TrainConfig) -> dict[str, Any]:
    """Train on ``config.data``; returns {"losses": per-epoch means, "checkpoint": path, "step_losses": [...]}."""
    v = _variant(config.variant)
    check_input_size(config.input_size, config.depth)
    torch.manual_seed(config.seed)
    data = PoseDataset(config.data, config.input_size, landmarks=v.landmarks, normalized_heatmaps=v.normalized_heatmaps,
                       augment=config.augment, case_ids=config.case_ids)
    loader = DataLoader(data, batch_size=config.batch_size, shuffle=True, num_workers=0)
    model = build_model(config.variant, channels=config.channels, depth=config.depth, convs=config.convs).to(config.device)
    compiled = compile_detector(model, (config.batch_size, 1, *config.input_size), budget=config.budget,
                                rev=config.rev, device=config.device)
    optimizer = torch.optim.Adam(compiled.parameters(), lr=config.lr, betas=(0.5, 0.999))
    loss_fn = v.loss()
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    epoch_losses: list[float] = []
    step_losses: list[float] = []
    bar = tqdm(range(config.epochs), desc=f"train {v.name}", disable=not config.progress)
    for epoch in bar:
        running = []
        for batch in loader:
            image, target = batch["image"].to(config.device), batch["heatmaps"].to(config.device)
            loss = loss_fn(compiled(image), target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            running.append(loss.item())
        epoch_losses.append(float(np.mean(running)))
        step_losses.extend(running)
        bar.set_postfix(loss=f"{epoch_losses[-1]:.4f}")
        _save(out / "last.pt", model, compiled, config, epoch, epoch_losses)
    (out / "config.json").write_text(json.dumps(asdict(config), indent=1))
    return {"losses": epoch_losses, "step_losses": step_losses, "checkpoint": str(out / "last.pt")}


def load_checkpoint(path: str | Path, device: str = "cpu") -> tuple[nn.Module, TrainConfig]:
    """The trained model and its config from a ``train`` checkpoint.

    A REV-trained checkpoint rebuilds the substituted network (REV planning is deterministic for the
    same model, input shape and budget) and loads its trained state; otherwise the plain PoseUNet.
    """
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"checkpoint {str(p)!r} does not exist; train one with `python -m models.pose train`")
    state = torch.load(p, map_location=device, weights_only=False)
    raw = dict(state["config"])
    raw["input_size"] = tuple(raw["input_size"])
    raw["case_ids"] = tuple(raw["case_ids"]) if raw.get("case_ids") else None
    config = TrainConfig(**raw)
    model = build_model(config.variant, channels=config.channels, depth=config.depth, convs=config.convs)
    model.load_state_dict(state["model"])
    if config.rev and "compiled_state" in state:
        compiled = compile_detector(model, (config.batch_size, 1, *config.input_size), budget=config.budget,
                                    rev=True, device=device)
        compiled.load_state_dict(state["compiled_state"])          # strict: a different substitution fails here
        return compiled, config
    return model.to(device), config


@torch.no_grad()
def predict_landmarks(model: nn.Module, image: torch.Tensor, variant: str) -> np.ndarray:
    """Voxel coordinates (B, L, 3) by argmax, sides assigned by Eq. 7 for V2."""
    coords = decode_argmax(model(image)).cpu().numpy().astype(np.float64)
    return assign_sides(coords) if _variant(variant).pair_sides else coords


@dataclass(frozen=True, eq=False)
class EvalResult:
    """Per case and landmark errors (mm), clinical measure errors (V2 only) and the printed table."""

    case_ids: list[str]
    errors_mm: np.ndarray
    measures: list[dict[str, float]] = field(default_factory=list)
    table: str = ""


def evaluate(model: nn.Module, data: PoseDataset, variant: str, *, device: str = "cpu",
             predict: Callable[[torch.Tensor, dict], np.ndarray] | None = None) -> EvalResult:
    """Errors of ``model`` on every case of ``data``; ``predict(image, sample)`` overrides the prediction (SSL)."""
    v = _variant(variant)
    ids, errors, measures = [], [], []
    for i in range(len(data)):
        sample = data[i]
        image = sample["image"][None].to(device)
        pred = predict(image, sample) if predict else predict_landmarks(model, image, variant)[0]
        truth = sample["landmarks_vox"].numpy().astype(np.float64)
        spacing = sample["spacing_mm"].numpy().astype(np.float64)
        errors.append(distance_errors_mm(pred, truth, spacing))
        if v.landmarks is V2_LANDMARKS:
            measures.append(clinical_measures(pred * spacing, truth * spacing, v.landmarks))
        ids.append(sample["id"])
    e = np.stack(errors)
    return EvalResult(ids, e, measures, summarize(e, v.landmarks.names, measures))
