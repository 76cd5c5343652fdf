"""Train the femur framework: the 2D ROI detector on slices, then the branched network compiled with
memplan (planned with L_branch) on ROI patches — L_branch for the first epochs, L_branch + L_gan with
D_pair after.

Variants (Tables 1-2): BRN (no cross connections, no L_CD), BRND (+ L_CD), BRNDC (+ cross
connections), BRNDC-D (+ adversarial fine-tuning, the paper's full method). The checkpoint
(``OUT/last.pt``, models/checkpoint.py) holds the original modules' state_dicts ("branch",
"discriminator", "roi"), so it loads without memplan, and the branch network's plan.
"""
from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader

from models.checkpoint import CHECKPOINT_NAME, Checkpoint, load_checkpoint_file, save_checkpoint
from models.femur.adversarial import (AdversarialSchedule, PairDiscriminator, discriminator_loss,
                                      generator_adversarial_loss, make_pair, real_pair)
from models.femur.dataset import PAPER_ROI_SCALE, FemurDataset, RoiSliceDataset, femur_augmentation
from models.femur.losses import BranchLossConfig, branch_loss, hybrid_loss
from models.femur.net import BranchedFemurNet
from models.femur.roi import ROI_MARGIN_VOX, RoiUNet
from models.loop import Precision, run_epochs
from models.planning import Compiled, compile_for_training, resolve_device

__all__ = ["TrainConfig", "TrainResult", "VARIANTS", "planning_loss", "compile_model", "train_roi", "train_branch",
           "train", "load_branch", "load_roi", "CLIENT"]

CLIENT = "femur"

#: Table 1-2 variants: (cross connections, gamma of L_CD or None for the config's, adversarial epochs or None
#: for the config's, branches). Unet-S / Unet-L: one branch of BRN, its loss terms only.
VARIANTS = {"unet-s": (False, 0.0, 0, "seg"), "unet-l": (False, 0.0, 0, "loc"), "brn": (False, 0.0, 0, "both"),
            "brnd": (False, None, 0, "both"), "brndc": (True, None, 0, "both"), "brndc-d": (True, None, None, "both")}


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run needs; the tiny widths in tests, the defaults for real data.

    ``roi_scale`` (the paper's 0.65) rescales each ROI keeping its aspect; ``patch_size`` is used only
    without it. ``cross``: BRNDC's cross connections.
    """

    data_dir: str
    out_dir: str = "runs/femur"
    patch_size: tuple[int, int, int] | None = None
    roi_scale: float | None = PAPER_ROI_SCALE
    channels: tuple[int, int, int, int] = (16, 32, 64, 128)
    cross: bool = True
    branches: str = "both"
    schedule: AdversarialSchedule = field(default_factory=AdversarialSchedule)
    loss: BranchLossConfig = field(default_factory=BranchLossConfig)
    disc_channels: tuple[int, ...] = (16, 32, 64, 64, 128, 128)
    batch_size: int = 1
    lr: float = 1e-3
    roi_epochs: int = 2
    roi_channels: tuple[int, ...] = (16, 32, 64, 128)
    roi_volume_size: tuple[int, int, int] = (64, 64, 64)
    roi_margin_vox: int = ROI_MARGIN_VOX
    sigma_vox: float = 2.0
    budget: str | int | None = None
    compile: bool = True
    augment: bool = True
    seed: int = 0
    device: str = "cpu"
    progress: bool = True
    amp: str | None = None          # None (fp32), "bf16" or "fp16" autocast, for both stages

    def __post_init__(self) -> None:
        if (self.patch_size is None) == (self.roi_scale is None):
            raise ValueError("give either roi_scale (the paper's 0.65) or a fixed patch_size, not both or neither")
        if self.patch_size is not None:
            BranchedFemurNet.check_input_shape(self.patch_size)
        if self.roi_scale is not None and not 0 < self.roi_scale <= 1:
            raise ValueError(f"roi_scale must be in (0, 1], got {self.roi_scale}")
        if self.branches != "both" and self.schedule.adversarial_epochs:
            raise ValueError(f"D_pair judges (segmentation, heatmaps) pairs: a one-branch network ({self.branches!r}) "
                             f"cannot be fine-tuned adversarially; use adversarial_epochs=0 (--adv-epochs 0)")
        if self.batch_size < 1 or self.lr <= 0 or self.roi_epochs < 0:
            raise ValueError(f"need batch_size >= 1, lr > 0, roi_epochs >= 0; got batch_size={self.batch_size}, "
                             f"lr={self.lr}, roi_epochs={self.roi_epochs}")


@dataclass(frozen=True)
class TrainResult:
    """Per-epoch mean losses of both stages and where the checkpoint went."""

    roi_history: list[float]
    branch_history: list[dict[str, float]]
    checkpoint: Path
    plan: object = None


def planning_loss(config: BranchLossConfig) -> Callable[[tuple], torch.Tensor]:
    """L_branch on an all-background label map and zero heatmaps shaped like the outputs: what memplan plans
    with (wCross with the weights a tensor of the class count, as frequency_weights' result is; its
    bincount has no meta kernel)."""
    def loss(outputs: tuple) -> torch.Tensor:
        probs = outputs[0]
        labels = torch.zeros((probs.shape[0], *probs.shape[2:]), dtype=torch.long, device=probs.device)
        maps = len(outputs) if len(outputs) == 2 else len(outputs) - 1            # Unet-L returns (H1, H2) only
        targets = torch.zeros((probs.shape[0], maps, *probs.shape[2:]), device=probs.device)
        weights = torch.zeros(probs.shape[1], device=probs.device)             # 1 - N_c / N with every voxel class 0
        weights[1:] = 1.0
        return branch_loss(outputs, labels, targets, config, class_weights=weights).total
    return loss


def compile_model(model: nn.Module, input_shape: Sequence[int], budget: str | int | None, *,
                  loss: BranchLossConfig = BranchLossConfig(), device: str | torch.device = "cpu",
                  amp: str | None = None) -> Compiled:
    """``model`` planned by memplan (with L_branch, in ``amp``) for inputs of ``input_shape`` (traced on meta
    tensors)."""
    return compile_for_training(model, tuple(input_shape), loss_fn=planning_loss(loss), budget=budget, device=device,
                                amp=amp)


def _loader(dataset, batch_size: int, seed: int) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=len(dataset) >= batch_size,
                      generator=torch.Generator().manual_seed(seed))


def train_roi(config: TrainConfig) -> tuple[RoiUNet, list[float]]:
    """Train the 2D ROI U-Net on every slice of the training volumes with the hybrid loss (batch Dice:
    most slices hold no femur)."""
    torch.manual_seed(config.seed)
    device = resolve_device(config.device)
    data = RoiSliceDataset(config.data_dir, config.roi_volume_size)
    model = RoiUNet(2, 1, 2, channels=config.roi_channels).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=config.lr)
    loader = _loader(data, 8, config.seed)
    precision = Precision(config.amp, device)

    def step(batch) -> dict[str, float]:
        image, labels = (t.to(device) for t in batch)
        with precision.autocast():
            loss = hybrid_loss(torch.softmax(model(image), dim=1), labels, config.loss.theta, batch_dice=True)
        opt.zero_grad()
        precision.backward(loss, opt)
        return {"loss": loss.item()}

    model.train()
    history = run_epochs(step, lambda epoch: loader, epochs=config.roi_epochs, steps_per_epoch=len(loader),
                         desc="femur ROI detector", progress=config.progress)
    return model, [h["loss"] for h in history]


def _adversarial_terms(outputs, batch, disc: nn.Module, disc_opt: torch.optim.Optimizer,
                       num_classes: int, precision: Precision | None = None) -> tuple[torch.Tensor, float]:
    """One D_pair step on (real, detached fake), forward under ``precision``'s autocast; returns the
    generator's L_gan and D's loss."""
    precision = precision or Precision(None, "cpu")
    with precision.autocast():
        fake = make_pair(*outputs)
        real = real_pair(batch["labels"], batch["heatmaps"], num_classes)
        d_loss = discriminator_loss(disc(real), disc(fake.detach()))
    disc_opt.zero_grad()
    precision.backward(d_loss, disc_opt)
    with precision.autocast():
        g_adv = generator_adversarial_loss(disc(fake))
    return g_adv, d_loss.item()


def make_dataset(config: TrainConfig) -> FemurDataset:
    """The training ROIs ``config`` describes (its grid, targets and augmentation)."""
    return FemurDataset(config.data_dir, config.patch_size, roi_margin_vox=config.roi_margin_vox,
                        sigma_vox=config.sigma_vox, augment=femur_augmentation() if config.augment else None,
                        roi_scale=config.roi_scale, seed=config.seed)


def train_branch(config: TrainConfig, dataset: FemurDataset | None = None, *,
                 on_epoch: Callable[[int, BranchedFemurNet, PairDiscriminator, list, object], None] | None = None,
                 log: Callable[[str], None] | None = None
                 ) -> tuple[BranchedFemurNet, PairDiscriminator, list[dict[str, float]], object]:
    """Train the branched network (compiled by memplan unless ``config.compile`` is False); returns the model,
    the discriminator, the per-epoch loss terms and the plan (None without memplan)."""
    log = log or (lambda text: print(text, file=sys.stderr))
    device = resolve_device(config.device)
    torch.manual_seed(config.seed)
    data = dataset or make_dataset(config)
    grid = tuple(data.input_size)
    model = BranchedFemurNet(3, 1, 2, channels=config.channels, cross=config.cross, branches=config.branches).to(device)
    disc = PairDiscriminator(3, model.config.out_channels + 2, channels=config.disc_channels).to(device)
    step_model, plan = model, None
    if config.compile:
        compiled = compile_model(model, (config.batch_size, 1, *grid), config.budget, loss=config.loss, device=device,
                                 amp=config.amp)
        step_model, plan = compiled.module, compiled.plan
        name = {"seg": "Unet-S", "loc": "Unet-L"}.get(config.branches, "BRNDC" if config.cross else "BRN")
        log(f"femur network ({name}), input "
            f"{config.batch_size}x1x{'x'.join(map(str, grid))}\n{compiled.summary}")
    opts = (torch.optim.Adam(model.parameters(), lr=config.lr), torch.optim.Adam(disc.parameters(), lr=config.lr))
    loader = _loader(data, config.batch_size, config.seed)
    state = {"epoch": 0}
    precision, disc_precision = Precision(config.amp, device), Precision(config.amp, device)   # a scaler each

    def step(batch) -> dict[str, float]:
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        with precision.autocast():
            outputs = step_model(batch["image"])
            terms = branch_loss(outputs, batch["labels"], batch["heatmaps"], config.loss)
        loss = terms.total
        parts = {"loss": terms.total.item(), "total": terms.total.item(), "hybrid": terms.hybrid.item(),
                 "reg": terms.reg.item(), "cd": terms.cd.item()}
        if config.schedule.is_adversarial(state["epoch"]):
            g_adv, parts["d"] = _adversarial_terms(outputs, batch, disc, opts[1], model.config.out_channels,
                                                   disc_precision)
            loss = loss + config.schedule.adv_weight * g_adv
            parts["gan"] = g_adv.item()
        opts[0].zero_grad()
        precision.backward(loss, opts[0])
        return parts

    history: list[dict[str, float]] = []

    def batches(epoch: int):
        state["epoch"] = epoch
        return loader

    def epoch_done(epoch: int, means: dict[str, float]) -> None:
        history.append(means)
        if on_epoch is not None:
            on_epoch(epoch, model, disc, history, plan)

    step_model.train()
    run_epochs(step, batches, epochs=config.schedule.total_epochs, steps_per_epoch=len(loader),
               desc="femur branched network", progress=config.progress, on_epoch=epoch_done)
    return model, disc, history, plan


def _config_dict(config: TrainConfig) -> dict:
    return json.loads(json.dumps({k: v for k, v in asdict(config).items() if k not in ("schedule", "loss")} | {
        "schedule": asdict(config.schedule), "loss": asdict(config.loss)}))


def train(config: TrainConfig, *, log: Callable[[str], None] | None = None) -> TrainResult:
    """ROI detector (if ``roi_epochs``), then the branched network; the checkpoint goes to ``out_dir``/last.pt
    after every branch epoch."""
    resolve_device(config.device)
    path = Path(config.out_dir) / CHECKPOINT_NAME
    roi_history: list[float] = []
    models: dict = {}
    if config.roi_epochs:
        roi, roi_history = train_roi(config)
        models["roi"] = roi.state_dict()
    extra = {"roi_history": roi_history, "roi_channels": list(config.roi_channels),
             "roi_volume_size": list(config.roi_volume_size)}

    def save(epoch, model, disc, history, plan) -> None:
        extra["patch_grid"] = list(grid)
        ckpt = Checkpoint(CLIENT, _config_dict(config), {**models, "branch": model.state_dict(),
                                                          "discriminator": disc.state_dict()},
                          plans={"branch": None if plan is None else plan.to_json()}, epoch=epoch,
                          history=list(history), extra=extra)
        save_checkpoint(path, ckpt)

    dataset = make_dataset(config)
    grid = tuple(dataset.input_size)
    model, disc, history, plan = train_branch(config, dataset, on_epoch=save, log=log)
    return TrainResult(roi_history, history, path, plan)


def load_branch(path: str | Path) -> tuple[BranchedFemurNet, dict]:
    """The branched network of a checkpoint (a last.pt or its run folder; eval mode) and its training config."""
    ckpt = load_checkpoint_file(path, CLIENT)
    config = ckpt.config
    model = BranchedFemurNet(3, 1, 2, channels=tuple(config["channels"]), cross=bool(config.get("cross", True)),
                             branches=config.get("branches", "both"))
    model.load_state_dict(ckpt.models["branch"])
    return model.eval(), dict(config)


def load_roi(path: str | Path) -> tuple[RoiUNet, tuple[int, int, int]] | None:
    """The ROI detector of a checkpoint (eval mode) and the volume size it works at; None if none was trained."""
    ckpt = load_checkpoint_file(path, CLIENT)
    if "roi" not in ckpt.models:
        return None
    model = RoiUNet(2, 1, 2, channels=tuple(ckpt.extra["roi_channels"]))
    model.load_state_dict(ckpt.models["roi"])
    return model.eval(), tuple(ckpt.extra["roi_volume_size"])
