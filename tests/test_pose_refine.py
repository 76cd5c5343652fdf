"""SSL online refinement (V2 Eq. 9-11, FetusMap label proxy) on phantom poses.

The detector here is a free logit field (plus a frozen image probe so it is a real function of the
image): it isolates SSL from the detector's training. A field moves one voxel's logit by about lr per
Adam step, where a U-Net's shared weights move whole heatmaps at the papers' 5e-4, hence lr 0.1.
"""
import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from models.pose.heatmaps import gaussian_heatmaps
from models.pose.landmarks import FETUSMAP_NAMES, V2_NAMES
from models.pose.refine import FETUSMAP_SSL, V2_SSL, refine_case
from models.pose.registration import PoseLibrary
from tools.phantoms.pose import generate

SIZE = 32


class FieldDetector(nn.Module):
    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.field = nn.Parameter(logits)
        self.probe = nn.Conv3d(1, logits.shape[1], 1)
        nn.init.zeros_(self.probe.weight)
        nn.init.zeros_(self.probe.bias)
        self.probe.requires_grad_(False)

    def forward(self, x):
        return self.field + self.probe(x)


@pytest.fixture(scope="module")
def phantoms():
    library = [generate(np.random.default_rng([5, i]), (SIZE,) * 3) for i in range(24)]
    tests = [generate(np.random.default_rng([6, i]), (SIZE,) * 3) for i in range(2)]
    return library, tests


def _library(cases, names):
    return PoseLibrary(tuple(names), np.stack([[c.landmarks[n] * c.spacing_mm[0] for n in names] for c in cases]))


def _perturbed(case, names, channel, shift_vox=5.0):
    truth = np.stack([case.landmarks[n] for n in names])
    pred = truth.copy()
    pred[channel] += shift_vox * np.array([1.0, 1.0, 0.0]) / np.sqrt(2)
    return truth, pred


@pytest.mark.parametrize("index", [0, 1])
def test_v2_ssl_pulls_a_perturbed_crown_back(phantoms, index):
    library_cases, tests = phantoms
    case = tests[index]
    truth, pred = _perturbed(case, V2_NAMES, channel=0)
    logits = torch.log(gaussian_heatmaps(pred, (SIZE,) * 3, normalized=False))[None]   # softmax = Eq. 2 maps
    detector = FieldDetector(logits)
    before_state = detector.field.detach().clone()
    torch.manual_seed(0)
    result = refine_case(detector, torch.randn(1, 1, SIZE, SIZE, SIZE), case.spacing_mm,
                         _library(library_cases, V2_NAMES), dataclasses.replace(V2_SSL, lr=0.1))
    err_before = np.linalg.norm(result.before_vox - truth, axis=1)
    err_after = np.linalg.norm(result.after_vox - truth, axis=1)
    assert err_before[0] > 4.0
    assert err_after[0] < err_before[0] - 1.5                    # Eq. 10 halves the gap each time it is met
    assert np.mean(err_after[1:]) < 1.0                          # the rest stays put
    assert len(result.losses) == V2_SSL.iterations and len(result.atlas_indices) == V2_SSL.k
    assert torch.equal(detector.field, before_state)             # the caller's detector is untouched


def test_fetusmap_ssl_atlas_proxy_corrects_a_landmark(phantoms):
    """Registered on the trunk without the perturbed landmark (our phantom's knees move too freely)."""
    library_cases, tests = phantoms
    case = tests[0]
    channel = FETUSMAP_NAMES.index("thoracic_spine")             # paper index 3
    truth, pred = _perturbed(case, FETUSMAP_NAMES, channel)
    # a FetusMap detector regresses peak-1 Gaussians (L2), so its logits are the maps themselves
    detector = FieldDetector(gaussian_heatmaps(pred, (SIZE,) * 3, normalized=False)[None])
    lib = _library(library_cases, FETUSMAP_NAMES)
    result = refine_case(detector, torch.zeros(1, 1, SIZE, SIZE, SIZE), case.spacing_mm, lib,
                         dataclasses.replace(FETUSMAP_SSL, lr=0.1, registration=(1, 2, 4, 5, 7, 8, 9)))
    before = np.linalg.norm(result.before_vox[channel] - truth[channel])
    after = np.linalg.norm(result.after_vox[channel] - truth[channel])
    assert before > 4.0 and after < before - 1.5


def test_library_of_the_wrong_landmark_set_is_rejected(phantoms):
    library_cases, tests = phantoms
    lib = _library(library_cases, FETUSMAP_NAMES)
    with pytest.raises(ValueError, match="do not match FetusMapV2"):
        refine_case(nn.Identity(), torch.zeros(1, 1, 4, 4, 4), (1, 1, 1), lib, V2_SSL)


def test_bad_ssl_config():
    with pytest.raises(ValueError, match="proxy must be"):
        dataclasses.replace(V2_SSL, proxy="nope")
    with pytest.raises(ValueError, match="iterations >= 1"):
        dataclasses.replace(V2_SSL, iterations=0)


@pytest.mark.parametrize("config", [V2_SSL, FETUSMAP_SSL], ids=["v2", "fetusmap"])
def test_memplan_plans_refinement_with_the_ssl_loss(config):
    from models.pose.refine import ssl_planning_loss, ssl_v2_loss
    torch.manual_seed(0)
    out = torch.randn(1, len(config.landmarks), 4, 4, 4)
    channels = list(config.landmarks.channels(*config.targets))
    zeros = torch.zeros(1, len(channels), 4, 4, 4)
    expected = ssl_v2_loss(out[:, channels], zeros) if config.proxy == "pseudo_label" else \
        (out[:, channels] ** 2).flatten(2).sum(-1).mean()
    assert float(ssl_planning_loss(config)(out)) == pytest.approx(float(expected))
