"""Train the face RPN through ``memplan.compile`` and fit the graph prior on the training landmarks.

Volumes are resampled to the paper's 1.3 mm voxels (``spacing_mm``), so the anchors (13-28 voxels) and
target boxes (14^3 / 24^3) have the paper's physical size. The checkpoint (``OUT/last.pt``,
models/checkpoint.py) holds the *original* model's state_dict (the compiled module shares its
parameters), the plan, the model arguments, the grid and the fitted graph prior.
"""
from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

import memplan
from models.checkpoint import CHECKPOINT_NAME, Checkpoint, save_checkpoint
from models.face.anchors import (ANCHOR_SIZES_VOX, LANDMARKS, AnchorTargets, generate_anchors, label_anchors,
                                 sample_anchors, target_boxes)
from models.face.dataset import PAPER_SPACING_MM, FaceDataset, augment, box_scale_for
from models.face.graph_prior import GraphPrior
from models.face.losses import ETA, RPNLoss, rpn_loss
from models.face.net import FEATURE_STRIDE, FaceRPN, flatten_head
from models.loop import Precision, run_epochs
from models.planning import Compiled, compile_for_training, resolve_device

__all__ = ["TrainConfig", "build_model", "make_anchors", "batch_targets", "compile_model", "planning_loss",
           "held_bytes", "batch_loss", "train_step", "fit_prior", "train", "CHECKPOINT_NAME", "CLIENT"]

CLIENT = "face"


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run needs. ``spacing_mm`` is the voxel size volumes are resampled to (the
    paper's 1.3 mm; the anchor and box sizes follow it); ``budget`` is memplan's memory budget (bytes or
    "8GB"; None = least memory)."""

    data: str
    out: str = "runs/face"
    input_size: tuple[int, int, int] = (160, 160, 160)      # 208 mm at 1.3 mm: a fetal head (models/face/net.py)
    epochs: int = 50
    batch_size: int = 1
    lr: float = 1e-3
    budget: str | int | None = None
    channels: tuple[int, ...] = (32, 64, 128, 256)
    fuse_channels: int = 128
    rpn_channels: int = 128
    spacing_mm: float | None = PAPER_SPACING_MM
    eta: float = ETA
    iou_balanced: bool = True
    anchor_batch: int = 256
    augment: bool = True
    seed: int = 0
    compile: bool = True
    device: str = "cpu"
    case_ids: tuple[str, ...] | None = None
    progress: bool = True
    amp: str | None = None                                  # None (fp32), "bf16" or "fp16" autocast

    def __post_init__(self) -> None:
        if any(s % 8 for s in self.input_size):
            raise ValueError(f"input_size {self.input_size} must be divisible by 8 on every axis (three poolings); "
                             f"try {tuple(max(8, round(s / 8) * 8) for s in self.input_size)}")
        if (self.spacing_mm is not None and self.spacing_mm <= 0) or self.epochs < 1 or self.batch_size < 1 \
                or self.lr <= 0:
            raise ValueError(f"need spacing_mm > 0, epochs >= 1, batch_size >= 1, lr > 0; got {self.spacing_mm}, "
                             f"{self.epochs}, {self.batch_size}, {self.lr}")

    @property
    def box_scale(self) -> float:
        """Paper box sizes (1.3 mm voxels) -> voxels of this grid."""
        return box_scale_for(self.spacing_mm)

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


def planning_loss(num_anchors: int, anchor_batch: int = 256) -> Callable[[tuple], torch.Tensor]:
    """rpn_loss's structure on fixed anchor rows, for memplan: the head maps flattened to anchor rows (the
    large copies), cross-entropy of ``anchor_batch`` rows and smooth L1 of half of them (the positives).

    Real targets pick rows by data, which fake tensors cannot; the fixed rows are the worst case of the
    real sampling (it picks at most ``anchor_batch`` rows, at most half of them positive). The rows are
    tiny next to the flattened maps and their full-size gradients, so the step's peak is the same:
    ``measure_step`` with the real rpn_loss equals it to the byte (tests/test_face_train.py). What the
    real step holds besides is the loop's data, :func:`held_bytes`.
    """
    def loss(outputs: tuple) -> torch.Tensor:
        scores, deltas = flatten_head(outputs[0], outputs[1], num_anchors)
        rows = min(anchor_batch, scores.shape[1])
        picked = scores[:, :rows].flatten(0, 1)
        labels = torch.zeros(picked.shape[0], dtype=torch.long, device=picked.device)
        cls = torch.nn.functional.cross_entropy(picked, labels)
        reg = torch.nn.functional.smooth_l1_loss(deltas[:, :rows // 2], torch.zeros_like(deltas[:, :rows // 2]))
        return cls + reg
    return loss


def held_bytes(input_size: Sequence[int], batch_size: int, num_landmarks: int = len(LANDMARKS)) -> int:
    """Bytes the training loop holds through every step besides the network: the anchors ((A, 6) float32,
    24 B per anchor) and per sample the AnchorTargets (labels and matched int64, deltas (A, 6) and max_iou
    float32: 44 B per anchor) and the (G, 6) float32 ground-truth boxes. memplan plans the network and its
    loss; these come on top (at 160^3, 4.1 M anchors, 279 MB), so the budget it plans for is the rest.

    >>> held_bytes((16, 16, 16), 1)                     # 64 cells x 64 anchors = 4096: 68 B each, + 5 boxes
    278648
    """
    anchors = len(ANCHOR_SIZES_VOX) ** 3
    for s in input_size:
        anchors *= s // FEATURE_STRIDE
    return 24 * anchors + batch_size * (44 * anchors + 24 * num_landmarks)


def compile_model(model: FaceRPN, input_size: Sequence[int], batch_size: int, budget: str | int | None, *,
                  device: str | torch.device = "cpu", anchor_batch: int = 256, amp: str | None = None) -> Compiled:
    """``memplan.compile`` of ``model`` for (batch, 1, *input_size) inputs, planned with the RPN loss in ``amp``.

    ``budget`` is the whole step's: memplan plans the network for it less :func:`held_bytes` (the anchors
    and targets the loop holds); a BudgetError names the smallest feasible budget with them included.
    """
    held = held_bytes(input_size, batch_size)
    # a budget the loop's data fills already still plans (for 1 B): the BudgetError then names the floor
    network_budget = None if budget is None else max(memplan.parse_bytes(budget) - held, 1)
    try:
        return compile_for_training(model, (batch_size, 1, *input_size), budget=network_budget, device=device,
                                    loss_fn=planning_loss(model.num_anchors, anchor_batch), amp=amp)
    except memplan.BudgetError as err:
        total = None if budget is None else memplan.parse_bytes(budget)
        raise memplan.BudgetError(f"{err}\n(face: plus {memplan.format_bytes(held)} of anchors and anchor "
                                  "targets held by the training loop)", budget_bytes=total,
                                  min_feasible_bytes=err.min_feasible_bytes + held) from None


def train_step(network: nn.Module, optimizer: torch.optim.Optimizer, image: torch.Tensor,
               targets: list[AnchorTargets], boxes: list[torch.Tensor], anchors: torch.Tensor, *,
               num_anchors: int, eta: float = ETA, iou_balanced: bool = True,
               precision: Precision | None = None) -> RPNLoss:
    """One optimiser step on a batch (forward and loss under ``precision``'s autocast); returns the loss
    parts (before the step)."""
    precision = precision or Precision(None, image.device)
    optimizer.zero_grad(set_to_none=True)
    with precision.autocast():
        loss = batch_loss(network(image), targets, boxes, anchors, num_anchors=num_anchors, eta=eta,
                          iou_balanced=iou_balanced)
    precision.backward(loss.total, optimizer)
    return loss


def batch_loss(outputs: tuple[torch.Tensor, torch.Tensor], targets: list[AnchorTargets], boxes: list[torch.Tensor],
               anchors: torch.Tensor, *, num_anchors: int, eta: float = ETA, iou_balanced: bool = True) -> RPNLoss:
    """rpn_loss of the network's two head maps. The flattened copies of the maps (48 B per anchor) are
    freed when it returns, before backward, as in the planning loss (held through backward they added
    that much to the step's peak)."""
    scores, deltas = flatten_head(outputs[0], outputs[1], num_anchors)
    return rpn_loss(scores, deltas, anchors, targets, boxes, eta=eta, iou_balanced=iou_balanced)


def fit_prior(dataset: FaceDataset) -> GraphPrior:
    """The graph prior fitted on every case's landmarks in mm (voxel x spacing of the input grid)."""
    faces = []
    for i in range(len(dataset)):
        case = dataset.case(i)
        faces.append(case.landmark_array(LANDMARKS) * np.asarray(case.spacing_mm))
    return GraphPrior.fit(np.stack(faces))


def _checkpoint(config: TrainConfig, model: FaceRPN, prior: GraphPrior, plan, epoch: int,
                losses: list[float]) -> Checkpoint:
    return Checkpoint(CLIENT, json.loads(json.dumps(dataclasses.asdict(config))), {"rpn": model.state_dict()},
                      plans={"rpn": None if plan is None else plan.to_json()}, epoch=epoch, history=losses,
                      extra={"model_kwargs": config.model_kwargs(), "box_scale": config.box_scale,
                             "input_size": list(config.input_size), "spacing_mm": config.spacing_mm,
                             "graph_prior": prior.to_json()})


def train(config: TrainConfig, *, progress: bool | None = None, log: Callable[[str], None] | None = None
          ) -> tuple[FaceRPN, list[float]]:
    """Train; returns the (original, uncompiled) model and the mean total loss of each epoch."""
    log = log or (lambda text: print(text, file=sys.stderr))
    device = resolve_device(config.device)
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    dataset = FaceDataset(config.data, config.input_size, spacing_mm=config.spacing_mm, case_ids=config.case_ids)
    if len(dataset) < max(config.batch_size, 2):
        raise ValueError(f"{config.data}: {len(dataset)} case(s) is too few for batch_size {config.batch_size} "
                         f"and the graph prior's fit (>= 2); add cases or lower --batch-size")
    prior = fit_prior(dataset)
    model = build_model(config).to(device)
    plan = None
    network: nn.Module = model
    if config.compile:
        compiled = compile_model(model, config.input_size, config.batch_size, config.budget, device=device,
                                 anchor_batch=config.anchor_batch, amp=config.amp)
        network, plan = compiled.module, compiled.plan
        log(f"face RPN, input {config.batch_size}x1x{'x'.join(map(str, config.input_size))}, "
            f"{config.spacing_mm} mm voxels\n{compiled.summary}\nface: the loop holds "
            f"{memplan.format_bytes(held_bytes(config.input_size, config.batch_size))} of anchors and anchor "
            f"targets on top of the planned peak{' (the budget above is --budget less them)' if config.budget else ''}")
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    precision = Precision(config.amp, device)
    anchors = make_anchors(config.input_size, config.box_scale)
    model.train()
    network.train()
    steps = len(dataset) // config.batch_size

    def batches(epoch: int):
        order = rng.permutation(len(dataset))
        for start in range(0, steps * config.batch_size, config.batch_size):
            yield [dataset[int(i)] for i in order[start:start + config.batch_size]]

    def step(samples) -> dict[str, float]:
        pairs = [augment(s["image"], s["landmarks"], rng) if config.augment else (s["image"], s["landmarks"])
                 for s in samples]
        image = torch.stack([p[0] for p in pairs]).to(device)
        targets, boxes = batch_targets(torch.stack([p[1] for p in pairs]), anchors, box_scale=config.box_scale,
                                       anchor_batch=config.anchor_batch, generator=generator)
        loss = train_step(network, optimizer, image, targets, boxes, anchors, num_anchors=model.num_anchors,
                          eta=config.eta, iou_balanced=config.iou_balanced, precision=precision)
        return {"loss": loss.total.item(), "cls": loss.cls.item(), "reg": loss.reg.item()}

    history: list[float] = []

    def on_epoch(epoch: int, means: dict[str, float]) -> None:
        history.append(means["loss"])
        save_checkpoint(Path(config.out) / CHECKPOINT_NAME, _checkpoint(config, model, prior, plan, epoch, history))
        prior.save(Path(config.out) / "graph_prior.json")

    run_epochs(step, batches, epochs=config.epochs, steps_per_epoch=steps, desc="face train",
               progress=config.progress if progress is None else progress, on_epoch=on_epoch)
    return model, history
