"""Train the auto-context cascade level by level, each level compiled by memplan (head paper §3.1).

Paper settings: Adam (moment 0.5), batch size 1, 30 epochs per level, k = 2 levels; learning rate
1e-5 there, 1e-4 by default here (shorter runs on phantoms). Eq. 2's lambda ||W||^2 is Adam's
weight decay (1e-5 here; the paper gives no value). Checkpoints hold the *original* model's
state_dict (the compiled module shares its parameters), so they load into a plain USegNetHAS.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

import memplan
from models.head.augment import AugmentConfig, augment
from models.head.autocontext import PAPER_LEVELS, AutoContext, context_input, foreground_probability
from models.head.dataset import HeadDataset
from models.head.losses import PAPER_AUX_WEIGHTS, DeepSupervisionLoss
from models.head.net import PAPER_CONFIG, HeadNetConfig, USegNetHAS

__all__ = ["TrainConfig", "LevelResult", "compile_level", "level_input", "train_step", "train_level", "train",
           "checkpoint_path"]


@dataclass(frozen=True)
class TrainConfig:
    """Everything one training run needs; ``budget`` is bytes or a string like "8GB" (None: least memory)."""

    data_dir: Path
    out_dir: Path
    input_size: tuple[int, int, int] = (64, 64, 64)
    net: HeadNetConfig = PAPER_CONFIG
    levels: int = PAPER_LEVELS
    epochs: int = 30
    lr: float = 1e-4
    betas: tuple[float, float] = (0.5, 0.999)
    weight_decay: float = 1e-5
    aux_weights: tuple[float, ...] = PAPER_AUX_WEIGHTS
    budget: int | str | None = None
    augment: AugmentConfig | None = field(default_factory=AugmentConfig)
    seed: int = 0
    device: str = "cpu"
    progress: bool = True

    def __post_init__(self) -> None:
        if self.levels < 1 or self.epochs < 1:
            raise ValueError(f"levels and epochs must be >= 1, got levels={self.levels}, epochs={self.epochs}")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if len(self.aux_weights) != self.net.pools - 1:
            raise ValueError(f"aux_weights {self.aux_weights} needs {self.net.pools - 1} entries, one per auxiliary "
                             f"output of a net with {self.net.pools} poolings")


@dataclass(frozen=True)
class LevelResult:
    """One trained level: its checkpoint and mean training loss per epoch."""

    level: int
    checkpoint: Path
    epoch_losses: tuple[float, ...]


def checkpoint_path(out_dir: str | Path, level: int) -> Path:
    """Where level ``level`` (1-based) is saved."""
    return Path(out_dir) / f"level{level}.pt"


def compile_level(model: nn.Module, input_size: Sequence[int], budget: int | str | None) -> nn.Module:
    """The memplan-compiled training module of one level (batch 1, one channel, meta example input)."""
    example = torch.empty(1, 1, *input_size, device="meta")
    return memplan.compile(model, example, budget=budget)


@torch.no_grad()
def level_input(previous: Sequence[nn.Module], volume: torch.Tensor) -> torch.Tensor:
    """Input of the next level: volume + the last previous level's foreground probability (0 if none)."""
    if not previous:
        return context_input(volume, None)
    cascade = AutoContext(previous)
    was_training = [m.training for m in previous]
    cascade.eval()
    try:
        probability = foreground_probability(cascade(volume)[-1])
    finally:
        for m, mode in zip(previous, was_training):
            m.train(mode)
    return context_input(volume, probability)


def train_step(compiled: nn.Module, loss_fn: DeepSupervisionLoss, optimizer: torch.optim.Optimizer,
               image: torch.Tensor, labels: torch.Tensor) -> float:
    """One step: forward the compiled module, deep-supervision loss, backward, update; returns the loss."""
    optimizer.zero_grad(set_to_none=True)
    loss = loss_fn(compiled(image), labels)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def _sample(dataset: HeadDataset, index: int, rng: np.random.Generator,
            config: AugmentConfig | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(image (1, 1, *S), labels (1, *S)) of case ``index``, augmented when ``config`` is given."""
    sample = dataset[index]
    image, mask = sample["image"].numpy(), sample["mask"].numpy()
    if config is not None:
        image, mask = augment(rng, image, mask, config)
    return torch.from_numpy(np.ascontiguousarray(image))[None], torch.from_numpy(np.ascontiguousarray(mask))[None]


def train_level(level: int, previous: Sequence[nn.Module], dataset: HeadDataset, config: TrainConfig,
                rng: np.random.Generator) -> tuple[USegNetHAS, LevelResult]:
    """Train level ``level`` (1-based) with the ``previous`` levels frozen; save and return it."""
    model = USegNetHAS.from_config(config.net).to(config.device)
    model.check_input_shape(config.input_size)
    compiled = compile_level(model, config.input_size, config.budget)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, betas=config.betas,
                                 weight_decay=config.weight_decay)
    loss_fn = DeepSupervisionLoss(config.aux_weights)
    model.train()
    epoch_losses = []
    bar = tqdm(total=config.epochs * len(dataset), desc=f"head level {level}/{config.levels}",
               disable=not config.progress)
    for _ in range(config.epochs):
        losses = []
        for index in rng.permutation(len(dataset)):
            image, labels = (t.to(config.device) for t in _sample(dataset, int(index), rng, config.augment))
            losses.append(train_step(compiled, loss_fn, optimizer, level_input(previous, image), labels))
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
        epoch_losses.append(float(np.mean(losses)))
    bar.close()
    path = checkpoint_path(config.out_dir, level)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {k: v.cpu() for k, v in model.state_dict().items()},
                "net_config": asdict(config.net), "level": level, "input_size": list(config.input_size),
                "epoch_losses": epoch_losses}, path)
    return model, LevelResult(level, path, tuple(epoch_losses))


def train(config: TrainConfig) -> list[LevelResult]:
    """Train every auto-context level in turn (level k starts after level k-1 is done)."""
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    dataset = HeadDataset(config.data_dir, config.input_size)
    levels: list[nn.Module] = []
    results = []
    for level in range(1, config.levels + 1):
        model, result = train_level(level, levels, dataset, config, rng)
        for p in model.parameters():
            p.requires_grad_(False)
        levels.append(model.eval())
        results.append(result)
    return results
