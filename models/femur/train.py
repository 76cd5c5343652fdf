"""Train the femur framework: the 2D ROI detector on slices, then the branched network compiled with
memplan on ROI patches — L_branch for the first epochs, L_branch + L_gan with D_pair after.

Checkpoints hold the original (uncompiled) modules' ``state_dict``s, so they load without memplan.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from models.femur.adversarial import (AdversarialSchedule, PairDiscriminator, discriminator_loss,
                                      generator_adversarial_loss, make_pair, real_pair)
from models.femur.dataset import FemurDataset, RoiSliceDataset
from models.femur.losses import BranchLossConfig, branch_loss, hybrid_loss
from models.femur.net import BranchedFemurNet
from models.femur.roi import ROI_MARGIN_VOX, RoiUNet

__all__ = ["TrainConfig", "TrainResult", "compile_model", "train_roi", "train_branch", "train",
           "BRANCH_CHECKPOINT", "ROI_CHECKPOINT", "load_branch", "load_roi"]

BRANCH_CHECKPOINT = "femur_branch.pt"
ROI_CHECKPOINT = "femur_roi.pt"


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run needs; the tiny widths in tests, the defaults for real data."""

    data_dir: str
    out_dir: str
    patch_size: tuple[int, int, int] = (64, 64, 64)
    channels: tuple[int, int, int, int] = (16, 32, 64, 128)
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
    flip: bool = True
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        BranchedFemurNet.check_input_shape(self.patch_size)
        if self.batch_size < 1 or self.lr <= 0 or self.roi_epochs < 0:
            raise ValueError(f"need batch_size >= 1, lr > 0, roi_epochs >= 0; got batch_size={self.batch_size}, "
                             f"lr={self.lr}, roi_epochs={self.roi_epochs}")


@dataclass(frozen=True)
class TrainResult:
    """Per-epoch mean losses of both stages and where the checkpoints went."""

    roi_history: list[float]
    branch_history: list[dict[str, float]]
    branch_checkpoint: Path
    roi_checkpoint: Path | None


def compile_model(model: nn.Module, input_shape: Sequence[int], budget: str | int | None) -> nn.Module:
    """``model`` planned by memplan for inputs of ``input_shape`` (traced on meta tensors)."""
    import memplan
    example = torch.empty(tuple(input_shape), device="meta")
    return memplan.compile(model, example, budget=budget)


def _loader(dataset, batch_size: int, seed: int) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=len(dataset) >= batch_size,
                      generator=torch.Generator().manual_seed(seed))


def train_roi(config: TrainConfig) -> tuple[RoiUNet, list[float]]:
    """Train the 2D ROI U-Net on every slice of the training volumes with the hybrid loss (batch Dice:
    most slices hold no femur)."""
    torch.manual_seed(config.seed)
    data = RoiSliceDataset(config.data_dir, config.roi_volume_size)
    model = RoiUNet(2, 1, 2, channels=config.roi_channels)
    opt = torch.optim.Adam(model.parameters(), lr=config.lr)
    history = []
    for epoch in range(config.roi_epochs):
        model.train()
        losses = []
        for image, labels in tqdm(_loader(data, 8, config.seed + epoch), desc=f"roi {epoch + 1}/{config.roi_epochs}",
                                  disable=not config.progress, leave=False):
            loss = hybrid_loss(torch.softmax(model(image), dim=1), labels, config.loss.theta, batch_dice=True)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        history.append(float(np.mean(losses)))
    return model, history


def _adversarial_terms(outputs, batch, disc: nn.Module, disc_opt: torch.optim.Optimizer,
                       num_classes: int) -> tuple[torch.Tensor, float]:
    """One D_pair step on (real, detached fake); returns the generator's L_gan and D's loss."""
    fake = make_pair(*outputs)
    real = real_pair(batch["labels"], batch["heatmaps"], num_classes)
    d_loss = discriminator_loss(disc(real), disc(fake.detach()))
    disc_opt.zero_grad()
    d_loss.backward()
    disc_opt.step()
    return generator_adversarial_loss(disc(fake)), d_loss.item()


def _branch_epoch(step_model: nn.Module, model: BranchedFemurNet, disc: nn.Module, opts, loader,
                  config: TrainConfig, epoch: int) -> dict[str, float]:
    """One epoch; the adversarial term joins once the schedule says so."""
    adversarial = config.schedule.is_adversarial(epoch)
    sums: dict[str, list[float]] = {}
    bar = tqdm(loader, desc=f"femur {epoch + 1}/{config.schedule.total_epochs}" + (" +gan" if adversarial else ""),
               disable=not config.progress, leave=False)
    for batch in bar:
        outputs = step_model(batch["image"])
        terms = branch_loss(outputs, batch["labels"], batch["heatmaps"], config.loss)
        loss = terms.total
        parts = {"total": terms.total.item(), "hybrid": terms.hybrid.item(), "reg": terms.reg.item(),
                 "cd": terms.cd.item()}
        if adversarial:
            g_adv, parts["d"] = _adversarial_terms(outputs, batch, disc, opts[1], model.config.out_channels)
            loss = loss + config.schedule.adv_weight * g_adv
            parts["gan"] = g_adv.item()
        opts[0].zero_grad()
        loss.backward()
        opts[0].step()
        for k, v in parts.items():
            sums.setdefault(k, []).append(v)
        bar.set_postfix(loss=f"{parts['total']:.3f}")
    return {k: float(np.mean(v)) for k, v in sums.items()}


def train_branch(config: TrainConfig, dataset: FemurDataset | None = None
                 ) -> tuple[BranchedFemurNet, PairDiscriminator, list[dict[str, float]]]:
    """Train the branched network (compiled by memplan unless ``config.compile`` is False)."""
    torch.manual_seed(config.seed)
    data = dataset or FemurDataset(config.data_dir, config.patch_size, roi_margin_vox=config.roi_margin_vox,
                                   sigma_vox=config.sigma_vox, flip=config.flip)
    model = BranchedFemurNet(3, 1, 2, channels=config.channels)
    disc = PairDiscriminator(3, model.config.out_channels + 2, channels=config.disc_channels)
    step_model = (compile_model(model, (config.batch_size, 1, *config.patch_size), config.budget)
                  if config.compile else model)
    opts = (torch.optim.Adam(model.parameters(), lr=config.lr), torch.optim.Adam(disc.parameters(), lr=config.lr))
    loader = _loader(data, config.batch_size, config.seed)
    history = []
    step_model.train()
    for epoch in range(config.schedule.total_epochs):
        history.append(_branch_epoch(step_model, model, disc, opts, loader, config, epoch))
    return model, disc, history


def _config_dict(config: TrainConfig) -> dict:
    return {k: v for k, v in asdict(config).items() if k not in ("schedule", "loss")} | {
        "schedule": asdict(config.schedule), "loss": asdict(config.loss)}


def train(config: TrainConfig) -> TrainResult:
    """ROI detector (if ``roi_epochs``), then the branched network; checkpoints into ``out_dir``."""
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    roi_history, roi_path = [], None
    if config.roi_epochs:
        roi, roi_history = train_roi(config)
        roi_path = out / ROI_CHECKPOINT
        torch.save({"model": roi.state_dict(), "channels": list(config.roi_channels),
                    "volume_size": list(config.roi_volume_size), "history": roi_history}, roi_path)
    model, disc, history = train_branch(config)
    branch_path = out / BRANCH_CHECKPOINT
    torch.save({"model": model.state_dict(), "discriminator": disc.state_dict(), "config": _config_dict(config),
                "history": history}, branch_path)
    return TrainResult(roi_history, history, branch_path, roi_path)


def load_branch(path: str | Path) -> tuple[BranchedFemurNet, dict]:
    """The branched network of a checkpoint (eval mode) and the training config it stored."""
    ckpt = _load(path)
    config = ckpt["config"]
    model = BranchedFemurNet(3, 1, 2, channels=tuple(config["channels"]))
    model.load_state_dict(ckpt["model"])
    return model.eval(), config


def load_roi(path: str | Path) -> tuple[RoiUNet, tuple[int, int, int]]:
    """The ROI detector of a checkpoint (eval mode) and the volume size it works at."""
    ckpt = _load(path)
    model = RoiUNet(2, 1, 2, channels=tuple(ckpt["channels"]))
    model.load_state_dict(ckpt["model"])
    return model.eval(), tuple(ckpt["volume_size"])


def _load(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"checkpoint {str(p)!r} does not exist; run `python -m models.femur train` first")
    return torch.load(p, map_location="cpu", weights_only=False)
