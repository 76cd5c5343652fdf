"""Eq. 2 heatmaps and argmax decoding."""
import math

import numpy as np
import pytest
import torch

from models.pose.heatmaps import decode_argmax, gaussian_heatmaps, mm_to_voxel, voxel_to_mm


def test_eq2_values_by_hand():
    h = gaussian_heatmaps(torch.tensor([[2.0, 3.0, 4.0]]), (6, 7, 8), sigma=2.0)[0]
    norm = 1 / (math.sqrt(2 * math.pi) * 2.0) ** 3
    assert float(h[2, 3, 4]) == pytest.approx(norm)
    # offset (1, 2, 2): squared distance 9 -> exp(-9 / 8)
    assert float(h[3, 5, 6]) == pytest.approx(norm * math.exp(-9 / 8), rel=1e-6)
    peak1 = gaussian_heatmaps(torch.tensor([[2.0, 3.0, 4.0]]), (6, 7, 8), normalized=False)[0]
    assert float(peak1[2, 3, 4]) == pytest.approx(1.0)


def test_normalised_gaussian_sums_to_one_inside_the_grid():
    h = gaussian_heatmaps(np.array([[10.3, 9.7, 11.1]]), (21, 21, 22))
    assert float(h.sum()) == pytest.approx(1.0, abs=1e-3)


def test_batched_centres_and_argmax_round_trip():
    torch.manual_seed(0)
    centres = torch.randint(0, 9, (2, 4, 3)).float()
    h = gaussian_heatmaps(centres, (9, 10, 11))
    assert h.shape == (2, 4, 9, 10, 11)
    torch.testing.assert_close(decode_argmax(h), centres)


def test_subvoxel_centre_decodes_to_nearest_voxel():
    h = gaussian_heatmaps(torch.tensor([[3.4, 5.6, 1.2]]), (8, 8, 8))
    assert decode_argmax(h).tolist() == [[3.0, 6.0, 1.0]]


def test_bad_sigma_and_centres():
    with pytest.raises(ValueError, match="sigma must be positive"):
        gaussian_heatmaps(torch.zeros(1, 3), (4, 4, 4), sigma=0)
    with pytest.raises(ValueError, match=r"\(\.\.\., L, 3\)"):
        gaussian_heatmaps(torch.zeros(1, 2), (4, 4, 4))


def test_mm_conversion():
    mm = voxel_to_mm([[1.0, 2.0, 3.0]], [0.5, 1.0, 2.0])
    assert mm.tolist() == [[0.5, 2.0, 6.0]]
    assert mm_to_voxel(mm, [0.5, 1.0, 2.0]).tolist() == [[1.0, 2.0, 3.0]]
