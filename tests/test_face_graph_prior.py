"""Graph prior (Eq. 4): relation values, fit, penalty, and picking the true landmarks among outliers."""
import itertools
import math

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from models.face.graph_prior import (EDGES, RELATIONS, Candidates, GraphPrior, choose_combination, relation_values,
                                     top_candidates)
from tools.phantoms.face import TEMPLATE_MM

TEMPLATE = np.array(list(TEMPLATE_MM.values()))


def _faces(rng, n):
    """Template faces with 1 mm anatomical jitter, random orientation, size and position."""
    out = []
    for _ in range(n):
        rot = Rotation.random(random_state=rng).as_matrix()
        face = (TEMPLATE + rng.normal(scale=1.0, size=TEMPLATE.shape)) @ rot.T * rng.uniform(0.8, 1.2)
        out.append(face + rng.uniform(-50, 50, size=3))
    return np.stack(out)


def test_graph_has_9_edges_and_relations_by_hand():
    assert len(EDGES) == 9 and len(set(EDGES)) == 9
    face = np.array([[3.0, 0, 0], [0, 4, 0], [-1, 0, 0], [0, -2, 0], [0, -6, 0]])
    d = {e: float(np.linalg.norm(face[e[0]] - face[e[1]])) for e in EDGES}
    r = dict(zip(RELATIONS, relation_values(face)))
    assert len(r) == 36 and sum(kind == "sym" for kind, _, _ in r) == 3
    # sym: (eyeL-brow - eyeR-brow) / sum = (5 - sqrt 17) / (5 + sqrt 17)
    assert r[("sym", 0, 1)] == pytest.approx((5 - math.sqrt(17)) / (5 + math.sqrt(17)))
    assert r[("ratio", 2, 5)] == pytest.approx(4 / 6)       # inter-ocular 4 / brow-nose 6
    assert r[("ratio", 5, 6)] == pytest.approx(6 / 4)       # brow-nose 6 / nose-chin 4
    assert r[("sym", 7, 8)] == pytest.approx((45 ** 0.5 - 37 ** 0.5) / (45 ** 0.5 + 37 ** 0.5))   # eye-chin
    for value, (kind, a, b) in zip(r.values(), RELATIONS):
        da, db = d[EDGES[a]], d[EDGES[b]]
        assert value == pytest.approx((da - db) / (da + db) if kind == "sym" else da / db)


def test_relations_are_similarity_invariant():
    rng = np.random.default_rng(0)
    face = _faces(rng, 1)[0]
    moved = face @ Rotation.random(random_state=rng).as_matrix().T * 1.7 + 5.0
    assert np.allclose(relation_values(face), relation_values(moved))


def test_fit_and_penalty_follow_eq4():
    faces = _faces(np.random.default_rng(1), 40)
    prior = GraphPrior.fit(faces)
    r = relation_values(faces)
    assert np.allclose(prior.mean, r.mean(0)) and np.allclose(prior.std, r.std(0, ddof=1))
    probe = faces[3]
    rv = relation_values(probe)
    by_hand = sum(s * math.exp((x - m) ** 2 / (2 * s * s)) for x, m, s in zip(rv, prior.mean, prior.std))
    assert prior.penalty(probe) == pytest.approx(by_hand)
    assert prior.log_penalty(probe) == pytest.approx(math.log(by_hand))
    assert GraphPrior.from_json(prior.to_json()) == prior
    with pytest.raises(ValueError, match="at least 2 training faces"):
        GraphPrior.fit(faces[:1])


def test_far_outlier_penalty_is_finite_in_log_space():
    prior = GraphPrior.fit(_faces(np.random.default_rng(2), 20))
    face = TEMPLATE.copy()
    face[0] += 1000.0     # inter-ocular / brow-nose ~ 60 against a fitted 1.2 +- 0.1
    assert np.isinf(prior.penalty(face)) and np.isfinite(prior.log_penalty(face))


def _candidates(true_face, outliers, outlier_first):
    boxes = torch.zeros(5, 2, 6)
    scores = torch.zeros(5, 2)
    for k in range(5):
        pair = [true_face[k], outliers[k]]
        order = (1, 0) if outlier_first[k] else (0, 1)
        for slot, which in enumerate(order):
            boxes[k, slot, :3] = torch.tensor(pair[which])
            boxes[k, slot, 3:] = 14.0
            scores[k, slot] = 0.9 - 0.1 * slot
    return Candidates(boxes, scores)


def _trial(rng, distance_mm):
    """A face, one outlier per landmark ``distance_mm`` away in a random direction, random slot order."""
    face_mm = _faces(rng, 1)[0]
    shift = rng.normal(size=(5, 3))
    outliers_mm = face_mm + distance_mm * shift / np.linalg.norm(shift, axis=1, keepdims=True)
    first = rng.random(5) < 0.5
    return face_mm, outliers_mm, first


def test_prior_picks_true_combination_among_planted_outliers():
    rng = np.random.default_rng(3)
    prior = GraphPrior.fit(_faces(rng, 60))
    spacing = np.array([1.3, 1.3, 1.3])
    for _ in range(25):
        face_mm, outliers_mm, first = _trial(rng, 20.0)   # a false positive on another structure
        cands = _candidates(face_mm / spacing, outliers_mm / spacing, first)
        chosen = choose_combination(cands, prior, spacing)
        assert chosen.choice == tuple(int(f) for f in first)     # the slot holding the true point
        assert torch.allclose(chosen.boxes[:, :3].double(), torch.tensor(face_mm / spacing), atol=1e-4)
        # brute force over the 32 combinations agrees
        centres = cands.boxes[..., :3].double().numpy() * spacing
        pens = {c: prior.log_penalty(centres[np.arange(5), list(c)]) for c in itertools.product((0, 1), repeat=5)}
        assert len(pens) == 32 and min(pens, key=pens.get) == chosen.choice


def test_prior_mostly_rejects_near_outliers():
    # 8 mm off (< the eye box): distances alone cannot see every direction (a chin swung about the nose
    # keeps nose-chin), so ask for a high rate, far above the 1/32 of a random pick
    rng = np.random.default_rng(4)
    prior = GraphPrior.fit(_faces(rng, 60))
    hits = 0
    for _ in range(100):
        face_mm, outliers_mm, first = _trial(rng, 8.0)
        chosen = choose_combination(_candidates(face_mm, outliers_mm, first), prior, (1.0, 1.0, 1.0))
        hits += chosen.choice == tuple(int(f) for f in first)
    assert hits >= 85


def test_top_candidates_raw_as_the_paper_or_with_nms():
    boxes = torch.tensor([[10.0, 10, 10, 14, 14, 14], [11.0, 10, 10, 14, 14, 14], [40.0, 10, 10, 14, 14, 14],
                          [70.0, 10, 10, 14, 14, 14]])
    probs = torch.tensor([[0.1, 0.9], [0.1, 0.8], [0.3, 0.7], [0.9, 0.1]])
    raw = top_candidates(probs, boxes, top=2)                     # the paper: the two best, overlapping or not
    assert raw.boxes[0, :, 0].tolist() == [10.0, 11.0]
    assert raw.scores[0].tolist() == pytest.approx([0.9, 0.8])
    c = top_candidates(probs, boxes, top=2, suppress_iou=0.1)     # IoU(box 0, box 1) = 13/15 > 0.1: skipped
    assert c.boxes[0, :, 0].tolist() == [10.0, 40.0]
    assert c.scores[0].tolist() == pytest.approx([0.9, 0.7])


def test_choose_needs_a_candidate_per_landmark():
    cands = Candidates(torch.zeros(5, 2, 6), torch.full((5, 2), float("-inf")))
    with pytest.raises(ValueError, match="at least one candidate"):
        choose_combination(cands, GraphPrior((0.0,) * 9, (1.0,) * 9), (1, 1, 1))
