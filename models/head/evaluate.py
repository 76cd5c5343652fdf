"""Evaluate a trained cascade: segment each case, resample back to its own grid, score every level.

As in the paper (§3.1) the network sees the volume resampled to its input size and the
probability map is resampled back (linear, corner-aligned like models.data.resample_case) to the
original grid, thresholded at 0.5 and compared there with the spacing of the original volume.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from scipy import ndimage
from tqdm import tqdm

from models.checkpoint import load_checkpoint_file
from models.data import Case, DataError, list_cases, load_case, normalize_intensity, resample_case
from models.errors import ClientError
from models.head.autocontext import AutoContext, foreground_probability
from models.head.net import HeadNetConfig, USegNetHAS
from models.head.train import CLIENT
from models.segmetrics import SegMetrics, bland_altman, segmentation_metrics, volume_ml

__all__ = ["CaseResult", "load_cascade", "predict_probabilities", "evaluate_cases", "summarize", "volume_agreement",
           "write_report"]


@dataclass(frozen=True)
class CaseResult:
    """Metrics of one case after each auto-context level (index 0 = level 1) and its true head volume."""

    case_id: str
    per_level: tuple[SegMetrics, ...]
    true_volume_ml: float = float("nan")


def load_cascade(checkpoint: str | Path) -> tuple[AutoContext, tuple[int, int, int]]:
    """The cascade of every level in a head checkpoint (a last.pt or its run folder) and its input size."""
    ckpt = load_checkpoint_file(checkpoint, CLIENT)
    cfg = ckpt.extra["net_config"]
    config = HeadNetConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()})
    levels = []
    while f"level{len(levels) + 1}" in ckpt.models:
        model = USegNetHAS.from_config(config)
        model.load_state_dict(ckpt.models[f"level{len(levels) + 1}"])
        levels.append(model)
    if not levels:
        raise ClientError(f"{checkpoint}: the checkpoint holds no trained level yet; train with "
                          f"`python -m models.head train --out {checkpoint}`")
    return AutoContext(levels).eval(), tuple(ckpt.extra["input_size"])


@torch.no_grad()
def predict_probabilities(cascade: AutoContext, case: Case, input_size: Sequence[int]) -> list[np.ndarray]:
    """Head probability of every level on ``case``'s own grid."""
    small = resample_case(case, input_size)
    image = torch.from_numpy(normalize_intensity(small.volume))[None, None]
    factors = np.asarray(case.shape, float) / np.asarray(small.shape, float)
    out = []
    for logits in cascade(image):
        probability = foreground_probability(logits)[0, 0].numpy()
        full = ndimage.zoom(probability, factors, order=1, mode="nearest")
        assert full.shape == case.shape, f"zoom back produced {full.shape}, wanted {case.shape}"
        out.append(full)
    return out


def evaluate_cases(checkpoint: str | Path, data_dir: str | Path, *, case_ids: Sequence[str] | None = None,
                   progress: bool = True) -> list[CaseResult]:
    """Score every case of ``data_dir`` (each needs a mask) after every level of the cascade."""
    cascade, input_size = load_cascade(checkpoint)
    results = []
    for case_id in tqdm(case_ids or list_cases(data_dir), desc="head evaluate", disable=not progress,
                        file=sys.stderr):
        case = load_case(data_dir, case_id)
        if case.mask is None:
            raise DataError(f"{Path(data_dir) / (case_id + '_mask.nii.gz')}: missing; evaluation needs ground truth")
        truth = case.mask > 0
        metrics = tuple(segmentation_metrics(p >= 0.5, truth, case.spacing_mm)
                        for p in predict_probabilities(cascade, case, input_size))
        results.append(CaseResult(case_id, metrics, volume_ml(truth, case.spacing_mm)))
    return results


def summarize(results: Sequence[CaseResult]) -> list[dict[str, float]]:
    """Mean of every metric per level (inf values included, so a missed case shows)."""
    levels = len(results[0].per_level)
    return [{name: float(np.mean([r.per_level[k].as_dict()[name] for r in results]))
             for name in SegMetrics.__dataclass_fields__} for k in range(levels)]


def volume_agreement(results: Sequence[CaseResult]) -> list[dict[str, float]]:
    """Per level, the paper's §4.3 volume analysis: Pearson correlation of predicted and true head volumes
    and the Bland-Altman bias and 95% limits (mean +- 1.96 SD of predicted - true, mL)."""
    true = np.array([r.true_volume_ml for r in results])
    out = []
    for k in range(len(results[0].per_level)):
        diff = np.array([r.per_level[k].volume_error_ml for r in results])
        out.append(dict(zip(("correlation", "bias_ml", "loa_ml"), bland_altman(true + diff, true))))
    return out


def write_report(results: Sequence[CaseResult], path: str | Path) -> Path:
    """Per-case and mean metrics, and the volume agreement, as JSON."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"mean_per_level": summarize(results), "volume_agreement_per_level": volume_agreement(results),
               "cases": {r.case_id: [m.as_dict() for m in r.per_level] for r in results}}
    path.write_text(json.dumps(payload, indent=1))
    return path
