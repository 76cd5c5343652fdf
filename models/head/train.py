"""Train the auto-context cascade level by level, each level compiled by memplan (head paper §3.1).

Paper settings, the defaults here: Adam (moment 0.5), batch size 1, learning rate 1e-5, 30 epochs
per level, k = 2 levels, input 0.4x the volume (PAPER_INPUT_SIZE). Eq. 2's lambda ||W||^2 is Adam's
weight decay (1e-5 here; the paper gives no value). One checkpoint (``OUT/last.pt``,
models/checkpoint.py) holds every trained level's *original* state_dict ("level1", "level2", ...; the
compiled module shares its parameters, so they load into a plain USegNetHAS) and each level's plan.
"""
from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from models.checkpoint import CHECKPOINT_NAME, Checkpoint, save_checkpoint
from models.head.augment import AugmentConfig, augment
from models.head.autocontext import PAPER_LEVELS, AutoContext, context_input, foreground_probability
from models.head.dataset import HeadDataset
from models.head.losses import PAPER_AUX_WEIGHTS, DeepSupervisionLoss
from models.head.net import PAPER_CONFIG, PAPER_INPUT_SIZE, HeadNetConfig, USegNetHAS
from models.loop import Precision, run_epochs
from models.planning import Compiled, compile_for_training, resolve_device

__all__ = ["TrainConfig", "LevelResult", "compile_level", "planning_loss", "level_input", "train_step",
           "train_level", "train", "CLIENT"]

CLIENT = "head"


@dataclass(frozen=True)
class TrainConfig:
    """Everything one training run needs; ``budget`` is bytes or a string like "8GB" (None: least memory)."""

    data_dir: Path
    out_dir: Path = Path("runs/head")
    input_size: tuple[int, int, int] = PAPER_INPUT_SIZE
    net: HeadNetConfig = PAPER_CONFIG
    levels: int = PAPER_LEVELS
    epochs: int = 30
    lr: float = 1e-5
    betas: tuple[float, float] = (0.5, 0.999)
    weight_decay: float = 1e-5
    aux_weights: tuple[float, ...] | None = None      # None: the paper's (1, 1), or () without deep supervision
    budget: int | str | None = None
    augment: AugmentConfig | None = field(default_factory=AugmentConfig)
    seed: int = 0
    device: str = "cpu"
    progress: bool = True
    amp: str | None = None                            # None (fp32), "bf16" or "fp16" autocast

    def __post_init__(self) -> None:
        if self.levels < 1 or self.epochs < 1:
            raise ValueError(f"levels and epochs must be >= 1, got levels={self.levels}, epochs={self.epochs}")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if len(self.resolved_aux_weights) != self.aux_outputs:
            raise ValueError(f"aux_weights {self.aux_weights} needs {self.aux_outputs} entries, one per auxiliary "
                             f"output of a net with {self.net.pools} poolings (deep supervision "
                             f"{'on' if self.net.deep_supervision else 'off'})")

    @property
    def aux_outputs(self) -> int:
        return self.net.pools - 1 if self.net.deep_supervision else 0

    @property
    def resolved_aux_weights(self) -> tuple[float, ...]:
        if self.aux_weights is not None:
            return tuple(self.aux_weights)
        return PAPER_AUX_WEIGHTS[:self.aux_outputs] + (1.0,) * max(0, self.aux_outputs - len(PAPER_AUX_WEIGHTS))


@dataclass(frozen=True)
class LevelResult:
    """One trained level: the run's checkpoint and its mean training loss per epoch."""

    level: int
    checkpoint: Path
    epoch_losses: tuple[float, ...]


def planning_loss(aux_weights: Sequence[float]) -> Callable[[tuple], torch.Tensor]:
    """Eq. 2 (deep supervision cross entropy) on an all-background label map: what memplan plans with."""
    loss = DeepSupervisionLoss(aux_weights)

    def fn(outputs: tuple) -> torch.Tensor:
        main = outputs[0]
        labels = torch.zeros((main.shape[0], *main.shape[2:]), dtype=torch.long, device=main.device)
        return loss(outputs, labels)
    return fn


def compile_level(model: nn.Module, input_size: Sequence[int], budget: int | str | None, *,
                  aux_weights: Sequence[float] = PAPER_AUX_WEIGHTS, device: str | torch.device = "cpu",
                  amp: str | None = None) -> Compiled:
    """The memplan-compiled training module of one level (batch 1, one channel), planned with Eq. 2 in ``amp``."""
    return compile_for_training(model, (1, 1, *input_size), loss_fn=planning_loss(aux_weights), budget=budget,
                                device=device, amp=amp)


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
               image: torch.Tensor, labels: torch.Tensor, precision: Precision | None = None) -> float:
    """One step: forward the compiled module and the deep-supervision loss (under ``precision``'s
    autocast), backward, update; returns the loss."""
    precision = precision or Precision(None, image.device)
    optimizer.zero_grad(set_to_none=True)
    with precision.autocast():
        loss = loss_fn(compiled(image), labels)
    precision.backward(loss, optimizer)
    return float(loss.detach())


def _sample(dataset: HeadDataset, index: int, rng: np.random.Generator,
            config: AugmentConfig | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(image (1, 1, *S), labels (1, *S)) of case ``index``, augmented when ``config`` is given."""
    sample = dataset[index]
    image, mask = sample["image"].numpy(), sample["mask"].numpy()
    if config is not None:
        image, mask = augment(rng, image, mask, config)
    return torch.from_numpy(np.ascontiguousarray(image))[None], torch.from_numpy(np.ascontiguousarray(mask))[None]


def _checkpoint(config: TrainConfig, models: dict, plans: dict, epoch: int, history: list) -> Checkpoint:
    raw = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()}
    return Checkpoint(CLIENT, json.loads(json.dumps(raw)), models, plans=plans, epoch=epoch, history=history,
                      extra={"net_config": asdict(config.net), "input_size": list(config.input_size)})


def train_level(level: int, previous: Sequence[nn.Module], dataset: HeadDataset, config: TrainConfig,
                rng: np.random.Generator, *, saved: dict, plans: dict, history: list,
                log: Callable[[str], None]) -> tuple[USegNetHAS, LevelResult]:
    """Train level ``level`` (1-based) with the ``previous`` levels frozen; saved into the run's checkpoint
    after every epoch beside the earlier levels (``saved``, ``plans``, ``history`` accumulate)."""
    device = resolve_device(config.device)
    model = USegNetHAS.from_config(config.net).to(device)
    model.check_input_shape(config.input_size)
    compiled = compile_level(model, config.input_size, config.budget, aux_weights=config.resolved_aux_weights,
                             device=device, amp=config.amp)
    precision = Precision(config.amp, device)
    log(f"head level {level}/{config.levels}, input 1x1x{'x'.join(map(str, config.input_size))}\n{compiled.summary}")
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, betas=config.betas,
                                 weight_decay=config.weight_decay)
    loss_fn = DeepSupervisionLoss(config.resolved_aux_weights)
    model.train()
    path = Path(config.out_dir) / CHECKPOINT_NAME
    plans[f"level{level}"] = compiled.plan.to_json()

    def batches(epoch: int):
        for index in rng.permutation(len(dataset)):
            yield {"index": int(index), "id": dataset.case_ids[int(index)]}

    def step(batch) -> dict[str, float]:
        image, labels = (t.to(device) for t in _sample(dataset, batch["index"], rng, config.augment))
        return {"loss": train_step(compiled.module, loss_fn, optimizer, level_input(previous, image), labels,
                                   precision)}

    losses: list[float] = []

    def on_epoch(epoch: int, means: dict[str, float]) -> None:
        losses.append(means["loss"])
        saved[f"level{level}"] = model.state_dict()
        save_checkpoint(path, _checkpoint(config, saved, plans, epoch, [*history, losses]))

    run_epochs(step, batches, epochs=config.epochs, steps_per_epoch=len(dataset),
               desc=f"head level {level}/{config.levels}", progress=config.progress, on_epoch=on_epoch)
    history.append(losses)
    return model, LevelResult(level, path, tuple(losses))


def train(config: TrainConfig, *, log: Callable[[str], None] | None = None) -> list[LevelResult]:
    """Train every auto-context level in turn (level k starts after level k-1 is done)."""
    log = log or (lambda text: print(text, file=sys.stderr))
    resolve_device(config.device)
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    dataset = HeadDataset(config.data_dir, config.input_size)
    levels: list[nn.Module] = []
    results = []
    saved: dict = {}
    plans: dict = {}
    history: list = []
    for level in range(1, config.levels + 1):
        model, result = train_level(level, levels, dataset, config, rng, saved=saved, plans=plans, history=history,
                                    log=log)
        for p in model.parameters():
            p.requires_grad_(False)
        levels.append(model.eval())
        results.append(result)
    return results
