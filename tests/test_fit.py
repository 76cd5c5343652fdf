"""fit: the grid of shapes, the size multiple a network needs, the search, and real answers that fit."""
import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import memplan
from memplan.errors import MemplanError
from memplan.fit import Grid, detect_multiple, fit, largest_fit, make_grid

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))
from fetusmapv2_unet import UNet3D  # noqa: E402
from tiny_unet import TinyUNet3D  # noqa: E402


def test_grid_keeps_the_aspect_ratio_on_multiples():
    grid = Grid(base=(1, 1, 176, 112, 112), axes=(2, 3, 4), multiples=(16, 16, 16))
    assert grid.start == 11 and grid.shape(11) == (1, 1, 176, 112, 112)
    # 208 / 176 * 112 = 132.4 -> 128; 272 / 176 * 112 = 173.1 -> 160
    assert grid.shape(13) == (1, 1, 208, 128, 128) and grid.shape(17) == (1, 1, 272, 160, 160)
    assert grid.shape(1) == (1, 1, 16, 16, 16)          # never below one multiple
    one_axis = Grid(base=(1, 1, 176, 112, 112), axes=(3,), multiples=(16,))
    assert one_axis.shape(9) == (1, 1, 176, 144, 112)


@pytest.mark.parametrize("net, base, axis, multiple", [
    (TinyUNet3D(), (1, 1, 32, 24, 24), 2, 4),                        # 2 poolings
    (TinyUNet3D(), (1, 1, 32, 24, 24), 4, 4),
    (UNet3D(widths=(2, 2, 2, 2, 2)), (1, 1, 176, 112, 112), 3, 16),  # 4 poolings
    (UNet3D(widths=(2, 2, 2, 2, 2)), (1, 1, 176, 112, 112), 0, 1),   # the batch takes any size
    (nn.Conv3d(1, 2, 3), (1, 1, 9, 9, 9), 2, 1),                      # no pooling
])
def test_detect_multiple(net, base, axis, multiple):
    assert detect_multiple(net, base, axis) == multiple


def brute_force(grid: Grid, peak, budget: int) -> int | None:
    fitting = [n for n in range(1, grid.max_n + 1) if peak(grid.shape(n)) <= budget]
    return max(fitting) if fitting else None


@pytest.mark.parametrize("budget, start", [(10**6, None), (10**6, 1), (10**6, 90), (10**7, 5), (5000, 3)])
def test_largest_fit_matches_brute_force(budget, start):
    grid = Grid(base=(1, 1, 40, 30, 20), axes=(2, 3, 4), multiples=(2, 2, 2), max_dim=200)
    calls = []

    def peak(shape):
        calls.append(shape)
        return 4 * math.prod(shape) + 1000

    best = brute_force(grid, peak, budget)
    calls.clear()
    r = largest_fit("toy", peak, grid, budget, start=start)
    assert r.shape == grid.shape(best) and r.peak_bytes == peak(r.shape) <= budget
    assert r.next_shape == grid.shape(best + 1) and r.next_peak_bytes > budget
    assert r.base_peak_bytes == peak(grid.base) and r.evaluations < 20


def test_largest_fit_none_and_capped():
    grid = Grid(base=(1, 1, 8, 8), axes=(2, 3), multiples=(4, 4), max_dim=64)
    nothing = largest_fit("toy", lambda s: math.prod(s), grid, 10)
    assert nothing.shape is None and nothing.next_shape == (1, 1, 4, 4)
    everything = largest_fit("toy", lambda s: math.prod(s), grid, 10**9)
    assert everything.shape == (1, 1, 64, 64) and everything.capped


def test_grid_starts_at_the_smallest_accepted_shape():
    """Two poolings need 4 voxels per axis: sizes below are rejected, so the search never tries them."""
    net = nn.Sequential(nn.Conv3d(1, 2, 3, padding=1), nn.MaxPool3d(2), nn.Conv3d(2, 2, 3, padding=1),
                        nn.MaxPool3d(2))
    grid = make_grid(net, (1, 1, 12, 12, 12))
    assert grid.multiples == (1, 1, 1) and grid.min_n == 4 and grid.shape(grid.min_n) == (1, 1, 4, 4, 4)
    r = largest_fit("toy", lambda s: math.prod(s), grid, 10)
    assert r.shape is None and r.next_shape == (1, 1, 4, 4, 4)


def test_make_grid_errors():
    net = nn.Conv3d(1, 2, 3)
    with pytest.raises(MemplanError, match="axis 1 is the channel axis"):
        make_grid(net, (1, 1, 8, 8, 8), axis=1)
    with pytest.raises(MemplanError, match="--axis 7 is outside the input shape 1x1x8x8x8"):
        make_grid(net, (1, 1, 8, 8, 8), axis=7)
    with pytest.raises(MemplanError, match="does not accept the input shape 1x3x8x8x8"):
        make_grid(net, (1, 3, 8, 8, 8))


def small_net() -> nn.Module:
    return nn.Sequential(nn.Conv3d(1, 4, 3, padding=1, bias=False), nn.BatchNorm3d(4), nn.ReLU(),
                         nn.Conv3d(4, 4, 3, padding=1, bias=False), nn.BatchNorm3d(4), nn.ReLU(),
                         nn.MaxPool3d(2), nn.Conv3d(4, 2, 1))


def test_real_answers_fit_and_the_next_size_does_not():
    """Checked with the public simulator and planner at both shapes, independently of the search."""
    net, budget = small_net(), 3 * 2**20
    grid, (van, gcp) = fit(net, (1, 1, 12, 12, 8), budget, strategies=("vanilla", "GCP"))
    assert grid.multiples == (1, 1, 1) and van.shape is not None and gcp.shape is not None

    def meta(shape):
        return torch.empty(shape, device="meta")

    assert memplan.simulate_step(net, meta(van.shape)).peak_bytes == van.peak_bytes <= budget
    assert memplan.simulate_step(net, meta(van.next_shape)).peak_bytes > budget
    compiled = memplan.compile(net, meta(gcp.shape), budget=budget)
    assert memplan.simulate_step(compiled, meta(gcp.shape)).peak_bytes <= budget
    with pytest.raises(memplan.BudgetError):
        memplan.compile(net, meta(gcp.next_shape), budget=budget)
    assert math.prod(gcp.shape) >= math.prod(van.shape)      # recomputation never fits less
    assert van.shape[2] / van.shape[4] == pytest.approx(12 / 8, rel=0.25)   # aspect ratio kept


def test_axis_grows_only_that_axis():
    net, budget = small_net(), 2 * 2**20
    _, (van,) = fit(net, (1, 1, 12, 12, 8), budget, strategies=("vanilla",), axis=4)
    assert van.shape[:4] == (1, 1, 12, 12) and van.shape[4] > 8
    assert memplan.simulate_step(net, torch.empty(van.shape, device="meta")).peak_bytes <= budget
    assert memplan.simulate_step(net, torch.empty(van.next_shape, device="meta")).peak_bytes > budget
