"""Distance-ratio graph prior (paper 003, §2.3, Eq. 4): pick one box per landmark from the top-2.

Nodes are the landmarks in LANDMARKS order (1 left eye, 2 eyebrow middle, 3 right eye, 4 nose, 5 chin,
Fig. 3a); an edge's length is the Euclidean distance in mm. The paper's figure of the 9 edges and
their ratio pairs is not in its text, so :data:`EDGES` and :data:`RELATIONS` are our reading: every
node pair except eyebrow-chin (implied by brow-nose and nose-chin), and a relation for every pair of
edges: mirror pairs (left vs right) use the normalised difference (Dist(c) - Dist(d)) / (Dist(c) +
Dist(d)), the others the ratio Dist(a) / Dist(b). (All 36 pairs halve the wrong picks of a hand-picked
set of 9 in our planted-outlier trials.) Each relation is fitted with a Gaussian on training
faces; a combination's penalty is Eq. 4, sum_i sigma_i exp((r_i - mu_i)^2 / (2 sigma_i^2)), and the
lowest wins. We compare log-penalties (logsumexp) so far outliers cannot overflow to inf ties.
"""
from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from models.face.anchors import LANDMARKS, box_iou

__all__ = ["EDGES", "MIRROR_PAIRS", "RELATIONS", "relation_values", "GraphPrior", "Candidates", "Selection",
           "top_candidates", "choose_combination"]

#: the 9 graph edges as pairs of LANDMARKS indices (0-based)
EDGES = ((0, 1), (1, 2), (0, 2), (0, 3), (2, 3), (1, 3), (3, 4), (0, 4), (2, 4))
#: edges that mirror each other across the midline (left eye vs right eye): indices into EDGES
MIRROR_PAIRS = ((0, 1), (3, 4), (7, 8))
#: (kind, edge a, edge b) for every pair a < b of the 9 edges: "sym" = (Dist(a) - Dist(b)) / (Dist(a) + Dist(b))
#: for mirror pairs, "ratio" = Dist(a) / Dist(b) otherwise (36 relations)
RELATIONS = tuple(("sym" if (a, b) in MIRROR_PAIRS else "ratio", a, b)
                  for a, b in itertools.combinations(range(len(EDGES)), 2))


def relation_values(points_mm: np.ndarray) -> np.ndarray:
    """The relation values r of landmark sets ``points_mm`` (..., 5, 3): (..., len(RELATIONS)).

    >>> face = np.array([[-1., 0, 0], [0, 1, 0], [1, 0, 0], [0, -1, 0], [0, -3, 0]])
    >>> r = relation_values(face)
    >>> r.shape, float(r[RELATIONS.index(("sym", 7, 8))])   # eyeL-chin vs eyeR-chin: symmetric face -> 0
    ((36,), 0.0)
    >>> [round(float(r[RELATIONS.index(("ratio", a, b))]), 4) for a, b in ((2, 5), (0, 2))]   # eyes / brow-nose
    [1.0, 0.7071]
    """
    p = np.asarray(points_mm, dtype=np.float64)
    if p.shape[-2:] != (len(LANDMARKS), 3):
        raise ValueError(f"points must have shape (..., {len(LANDMARKS)}, 3) in order {LANDMARKS}, got {p.shape}")
    dist = np.stack([np.linalg.norm(p[..., a, :] - p[..., b, :], axis=-1) for a, b in EDGES], axis=-1)
    dist = np.maximum(dist, 1e-9)   # coincident candidates: finite (and far from any fitted mean)
    out = []
    for kind, a, b in RELATIONS:
        da, db = dist[..., a], dist[..., b]
        out.append((da - db) / (da + db) if kind == "sym" else da / db)
    return np.stack(out, axis=-1)


@dataclass(frozen=True)
class GraphPrior:
    """Gaussian (mean, std) of each relation, fitted on training faces; JSON round-trip."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def fit(cls, faces_mm: np.ndarray, *, min_std: float = 1e-3) -> "GraphPrior":
        """Fit on (n, 5, 3) training landmark sets in mm (n >= 2); stds floored at ``min_std``."""
        faces = np.asarray(faces_mm, dtype=np.float64)
        if faces.ndim != 3 or faces.shape[0] < 2:
            raise ValueError(f"fit needs at least 2 training faces of shape (n, 5, 3), got {faces.shape}")
        r = relation_values(faces)
        return cls(tuple(r.mean(0).tolist()), tuple(np.maximum(r.std(0, ddof=1), min_std).tolist()))

    def log_penalty(self, points_mm: np.ndarray) -> np.ndarray:
        """log of Eq. 4 for landmark sets (..., 5, 3): (...)."""
        r = relation_values(points_mm)
        mean, std = np.asarray(self.mean), np.asarray(self.std)
        terms = np.log(std) + (r - mean) ** 2 / (2 * std ** 2)
        top = terms.max(-1, keepdims=True)
        return (top + np.log(np.exp(terms - top).sum(-1, keepdims=True)))[..., 0]

    def penalty(self, points_mm: np.ndarray) -> np.ndarray:
        """Eq. 4 itself (may be inf for far outliers; rank with :meth:`log_penalty`)."""
        with np.errstate(over="ignore"):
            return np.exp(self.log_penalty(points_mm))

    def to_json(self) -> str:
        return json.dumps({"relations": [list(r) for r in RELATIONS], "mean": self.mean, "std": self.std})

    @classmethod
    def from_json(cls, text: str, *, source: str = "graph prior") -> "GraphPrior":
        data = json.loads(text)
        if [tuple(r) for r in data.get("relations", [])] != list(RELATIONS):
            raise ValueError(f"{source}: fitted for relations {data.get('relations')}, this code uses "
                             f"{[list(r) for r in RELATIONS]}; refit it on the training set")
        return cls(tuple(data["mean"]), tuple(data["std"]))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> "GraphPrior":
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"{p}: no graph prior file; train first (it is written beside the checkpoint)")
        return cls.from_json(p.read_text(), source=str(p))


@dataclass(frozen=True)
class Candidates:
    """Per landmark the top boxes (K, T, 6), their class scores (K, T); T <= ``top``, -inf pads."""

    boxes: torch.Tensor
    scores: torch.Tensor


@dataclass(frozen=True)
class Selection:
    """The chosen box (K, 6) and score (K,) per landmark, the candidate index per landmark, its penalty."""

    boxes: torch.Tensor
    scores: torch.Tensor
    choice: tuple[int, ...]
    log_penalty: float


def top_candidates(probs: torch.Tensor, boxes: torch.Tensor, *, top: int = 2,
                   suppress_iou: float | None = None) -> Candidates:
    """The ``top`` highest-scoring boxes per landmark class from (A, K+1) probabilities and (A, 6) boxes.

    The paper takes the raw top-2 (``suppress_iou=None``). With ``suppress_iou`` a later candidate must
    overlap every earlier one of its class by IoU <= it (3D NMS; an option: with 64 anchors per cell the
    raw top-2 is often the same spot twice).
    """
    num_classes = probs.shape[1] - 1
    out_boxes = torch.zeros(num_classes, top, 6)
    out_scores = torch.full((num_classes, top), float("-inf"))
    pool = min(probs.shape[0], 64 * top)   # NMS only among the best few hundred
    for k in range(num_classes):
        values, order = probs[:, k + 1].topk(pool)
        kept: list[int] = []
        for i in range(pool):
            if len(kept) == top:
                break
            box = boxes[order[i]][None]
            if suppress_iou is not None and kept and box_iou(box, boxes[order[kept]]).max() > suppress_iou:
                continue
            out_boxes[k, len(kept)], out_scores[k, len(kept)] = box[0], values[i]
            kept.append(i)
    return Candidates(out_boxes, out_scores)


def choose_combination(candidates: Candidates, prior: GraphPrior, spacing_mm: Sequence[float]) -> Selection:
    """Score every combination (2^5 = 32 for top-2) with Eq. 4 on box centres in mm; lowest wins."""
    available = [int(torch.isfinite(s).sum()) for s in candidates.scores]
    if min(available) == 0:
        raise ValueError(f"every landmark needs at least one candidate, got counts {available}")
    combos = list(itertools.product(*(range(n) for n in available)))
    centres = candidates.boxes[..., :3].double().numpy() * np.asarray(spacing_mm, dtype=np.float64)
    points = np.stack([centres[np.arange(len(available)), list(c)] for c in combos])   # (C, K, 3)
    log_pen = prior.log_penalty(points)
    best = int(np.argmin(log_pen))
    choice = combos[best]
    index = torch.arange(len(available))
    pick = torch.tensor(choice)
    return Selection(candidates.boxes[index, pick], candidates.scores[index, pick], tuple(choice),
                     float(log_pen[best]))
