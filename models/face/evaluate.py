"""Evaluate a trained face RPN: per case, forward -> Eq. 1 boxes -> top-2 per landmark (raw, as the paper;
NMS optional) -> graph prior.

Reports Table 1's metrics (AP, AP35, AP50, AP75, mIoU, d-mean mm, time ms per volume: forward, decoding
and the prior, after one warm-up volume). ``use_prior=False`` keeps the top-1 box of each landmark
instead (the paper's ablation without the prior).
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from tqdm import tqdm

from models.checkpoint import load_checkpoint_file
from models.errors import ClientError
from models.face.anchors import LANDMARKS, decode_boxes, target_boxes
from models.face.dataset import PAPER_SPACING_MM, FaceDataset
from models.face.graph_prior import GraphPrior, Selection, choose_combination, top_candidates
from models.face.metrics import Detection, FaceMetrics, summarize
from models.face.net import FaceRPN, flatten_head
from models.face.train import CLIENT, make_anchors
from models.planning import resolve_device

__all__ = ["LoadedModel", "load_checkpoint", "predict", "evaluate", "format_metrics"]


@dataclass(frozen=True)
class LoadedModel:
    """A trained model in eval mode with what inference needs."""

    model: FaceRPN
    prior: GraphPrior
    box_scale: float
    input_size: tuple[int, int, int]
    spacing_mm: float | None = PAPER_SPACING_MM


def load_checkpoint(path: str | Path, *, device: str = "cpu") -> LoadedModel:
    """Read ``path`` (a last.pt, or the run folder holding it) written by :func:`models.face.train.train`."""
    ckpt = load_checkpoint_file(path, CLIENT)
    extra = ckpt.extra
    try:
        model = FaceRPN(**extra["model_kwargs"])
        model.load_state_dict(ckpt.models["rpn"])
    except (KeyError, RuntimeError, TypeError) as exc:
        raise ClientError(f"{path}: not a complete face checkpoint ({type(exc).__name__}: {exc}); retrain") from None
    model.to(resolve_device(str(device))).eval()
    return LoadedModel(model, GraphPrior.from_json(extra["graph_prior"], source=str(path)), float(extra["box_scale"]),
                       tuple(extra["input_size"]), extra.get("spacing_mm"))


@torch.no_grad()
def predict(loaded: LoadedModel, image: torch.Tensor, spacing_mm: Sequence[float], *, use_prior: bool = True,
            anchors: torch.Tensor | None = None, suppress_iou: float | None = None) -> Selection:
    """The chosen box per landmark for one (1, X, Y, Z) image."""
    anchors = make_anchors(image.shape[1:], loaded.box_scale) if anchors is None else anchors
    device = next(loaded.model.parameters()).device
    cls_map, reg_map = loaded.model(image[None].to(device))
    scores, deltas = flatten_head(cls_map, reg_map, loaded.model.num_anchors)
    probs = scores[0].softmax(-1).cpu()
    boxes = decode_boxes(deltas[0].cpu(), anchors)
    candidates = top_candidates(probs, boxes, top=2 if use_prior else 1, suppress_iou=suppress_iou)
    return choose_combination(candidates, loaded.prior, spacing_mm)


def evaluate(loaded: LoadedModel, data: str | Path, *, case_ids: Sequence[str] | None = None,
             use_prior: bool = True, suppress_iou: float | None = None, progress: bool = False) -> FaceMetrics:
    """Metrics of ``loaded`` on the cases of ``data`` (on the grid it was trained on); ``suppress_iou``
    turns on NMS among the candidates (the paper: raw top-2)."""
    dataset = FaceDataset(data, loaded.input_size, spacing_mm=loaded.spacing_mm, case_ids=case_ids)
    anchors = make_anchors(loaded.input_size, loaded.box_scale)
    detections, truths, spacings, times = [], {}, {}, []
    for i in tqdm(range(len(dataset)), desc="face evaluate", disable=not progress, file=sys.stderr):
        sample = dataset[i]
        start = time.perf_counter()
        chosen = predict(loaded, sample["image"], sample["spacing_mm"].tolist(), use_prior=use_prior, anchors=anchors,
                         suppress_iou=suppress_iou)
        times.append(time.perf_counter() - start)
        case_id = sample["id"]
        spacings[case_id] = sample["spacing_mm"].tolist()
        gt = target_boxes(sample["landmarks"], loaded.box_scale)
        for k in range(len(LANDMARKS)):
            truths[(case_id, k + 1)] = tuple(gt[k].tolist())
            detections.append(Detection(case_id, k + 1, float(chosen.scores[k]), tuple(chosen.boxes[k].tolist())))
    timed = times[1:] if len(times) > 1 else times   # the first call pays one-off allocation costs
    return summarize(detections, truths, spacings, 1000.0 * sum(timed) / len(timed))


def format_metrics(metrics: FaceMetrics) -> str:
    """Table 1-style one-row table (AP values in percent)."""
    head = f"{'AP':>7} {'AP35':>7} {'AP50':>7} {'AP75':>7} {'mIoU':>7} {'d-mean':>8} {'time':>8}"
    row = (f"{100 * metrics.ap:7.2f} {100 * metrics.ap35:7.2f} {100 * metrics.ap50:7.2f} {100 * metrics.ap75:7.2f} "
           f"{100 * metrics.miou:7.2f} {metrics.mean_distance_mm:6.2f}mm {metrics.inference_ms:6.0f}ms")
    return f"{head}\n{row}"
