"""Train the face RPN through ``memplan.compile`` and fit the graph prior on the training landmarks.

The checkpoint (``OUT/face.pt``) holds the *original* model's state_dict (the compiled module shares
its parameters), the model arguments, the box scale and input size, and the fitted graph prior.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

import memplan
from models.face.anchors import (ANCHOR_SIZES_VOX, LANDMARKS, AnchorTargets, generate_anchors, label_anchors,
                                 sample_anchors, target_boxes)
from models.face.dataset import FaceDataset, augment
from models.face.graph_prior import GraphPrior
from models.face.losses import ETA, RPNLoss, rpn_loss
from models.face.net import FEATURE_STRIDE, FaceRPN, flatten_head

__all__ = ["TrainConfig", "build_model", "make_anchors", "batch_targets", "compile_model", "train_step",
           "fit_prior", "train", "CHECKPOINT_NAME"]

CHECKPOINT_NAME = "face.pt"


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run needs; ``box_scale`` multiplies anchor and target box sizes (1 = paper,
    for 1.3 mm voxels); ``budget`` is memplan's memory budget (bytes or "8GB"; None = least memory)."""

    data: str
    out: str
    input_size: tuple[int, int, int] = (64, 64, 64)
    epochs: int = 50
    batch_size: int = 1
    lr: float = 1e-3
    budget: str | int | None = None
    channels: tuple[int, ...] = (32, 64, 128, 256)
    fuse_channels: int = 128
    rpn_channels: int = 128
    box_scale: float = 1.0
    eta: float = ETA
    iou_balanced: bool = True
    anchor_batch: int = 256
    augment: bool = True
    seed: int = 0
    compile: bool = True
    device: str = "cpu"
    case_ids: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if any(s % 8 for s in self.input_size):
            raise ValueError(f"input_size {self.input_size} must be divisible by 8 on every axis (three poolings); "
                             f"try {tuple(max(8, round(s / 8) * 8) for s in self.input_size)}")
        if self.box_scale <= 0 or self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError(f"need box_scale > 0, epochs >= 1, batch_size >= 1, lr > 0; got {self.box_scale}, "
                             f"{self.epochs}, {self.batch_size}, {self.lr}")

    def model_kwargs(self) -> dict[str, Any]:
        return {"channels": tuple(self.channels), "fuse_channels": self.fuse_channels,
                "rpn_channels": self.rpn_channels}


def build_model(config: TrainConfig) -> FaceRPN:
    return FaceRPN(**config.model_kwargs())


def make_anchors(input_size: Sequence[int], box_scale: float = 1.0) -> torch.Tensor:
    """All anchors of an input of ``input_size`` (the head's grid is input / 4)."""
    grid = [s // FEATURE_STRIDE for s in input_size]
    return generate_anchors(grid, FEATURE_STRIDE, [s * box_scale for s in ANCHOR_SIZES_VOX])


def batch_targets(landmarks: torch.Tensor, anchors: torch.Tensor, *, box_scale: float = 1.0, anchor_batch: int = 256,
                  generator: torch.Generator | None = None) -> tuple[list[AnchorTargets], list[torch.Tensor]]:
    """Sampled anchor targets and ground-truth boxes for (N, 5, 3) voxel landmarks."""
    targets, boxes = [], []
    classes = torch.arange(1, landmarks.shape[1] + 1)
    for points in landmarks:
        gt = target_boxes(points.float(), box_scale)
        full = label_anchors(anchors, gt, classes)
        labels = sample_anchors(full.labels, batch_size=anchor_batch, generator=generator)
        targets.append(dataclasses.replace(full, labels=labels))
        boxes.append(gt)
    return targets, boxes


def compile_model(model: nn.Module, input_size: Sequence[int], batch_size: int, budget: str | int | None) -> nn.Module:
    """``memplan.compile`` of ``model`` for (batch, 1, *input_size) inputs (planned on meta tensors)."""
    example = torch.empty((batch_size, 1, *input_size), device="meta")
    return memplan.compile(model, example, budget=budget)


def train_step(network: nn.Module, optimizer: torch.optim.Optimizer, image: torch.Tensor,
               targets: list[AnchorTargets], boxes: list[torch.Tensor], anchors: torch.Tensor, *,
               num_anchors: int, eta: float = ETA, iou_balanced: bool = True) -> RPNLoss:
    """One optimiser step on a batch; returns the loss parts (before the step)."""
    optimizer.zero_grad(set_to_none=True)
    cls_map, reg_map = network(image)
    scores, deltas = flatten_head(cls_map, reg_map, num_anchors)
    loss = rpn_loss(scores, deltas, anchors, targets, boxes, eta=eta, iou_balanced=iou_balanced)
    loss.total.backward()
    optimizer.step()
    return loss


def fit_prior(dataset: FaceDataset) -> GraphPrior:
    """The graph prior fitted on every case's landmarks in mm (voxel x spacing of the input grid)."""
    faces = []
    for i in range(len(dataset)):
        case = dataset.case(i)
        faces.append(case.landmark_array(LANDMARKS) * np.asarray(case.spacing_mm))
    return GraphPrior.fit(np.stack(faces))


def _save(config: TrainConfig, model: FaceRPN, prior: GraphPrior, epoch: int, losses: list[float]) -> Path:
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / CHECKPOINT_NAME
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save({"model": state, "model_kwargs": config.model_kwargs(), "box_scale": config.box_scale,
                "input_size": list(config.input_size), "graph_prior": prior.to_json(), "epoch": epoch,
                "losses": losses, "config": json.loads(json.dumps(dataclasses.asdict(config)))}, path)
    prior.save(out / "graph_prior.json")
    return path


def train(config: TrainConfig, *, progress: bool = True) -> tuple[FaceRPN, list[float]]:
    """Train; returns the (original, uncompiled) model and the mean total loss of each epoch."""
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    dataset = FaceDataset(config.data, config.input_size, case_ids=config.case_ids)
    if len(dataset) < max(config.batch_size, 2):
        raise ValueError(f"{config.data}: {len(dataset)} case(s) is too few for batch_size {config.batch_size} "
                         f"and the graph prior's fit (>= 2); add cases or lower --batch-size")
    prior = fit_prior(dataset)
    model = build_model(config).to(config.device)
    network = compile_model(model, config.input_size, config.batch_size, config.budget) if config.compile else model
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    anchors = make_anchors(config.input_size, config.box_scale)
    model.train()
    network.train()
    history: list[float] = []
    bar = tqdm(range(config.epochs), desc="face train", disable=not progress)
    for epoch in bar:
        order = rng.permutation(len(dataset))
        total = []
        for start in range(0, len(order) - config.batch_size + 1, config.batch_size):
            samples = [dataset[int(i)] for i in order[start:start + config.batch_size]]
            pairs = [augment(s["image"], s["landmarks"], rng) if config.augment else (s["image"], s["landmarks"])
                     for s in samples]
            image = torch.stack([p[0] for p in pairs]).to(config.device)
            targets, boxes = batch_targets(torch.stack([p[1] for p in pairs]), anchors, box_scale=config.box_scale,
                                           anchor_batch=config.anchor_batch, generator=generator)
            loss = train_step(network, optimizer, image, targets, boxes, anchors, num_anchors=model.num_anchors,
                              eta=config.eta, iou_balanced=config.iou_balanced)
            total.append(loss.total.item())
            bar.set_postfix(loss=f"{total[-1]:.4f}", cls=f"{loss.cls.item():.4f}", reg=f"{loss.reg.item():.4f}")
        history.append(float(np.mean(total)))
        _save(config, model, prior, epoch, history)
    return model, history
