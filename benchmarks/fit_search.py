"""The largest input whose training step fits a budget, on FetusMapV2's grid of input sizes.

FetusMapV2 grows 176x112x112 one axis at a time by 16 voxels, depth, then width, then height:
192x112x112, 192x112x128 (its UGCP answer), 192x128x128 (UREV), 208x128x128, 208x128x144
(UGCPREV), ... Step k of that sequence is :func:`grid_shape`. Peaks grow with the voxel count
almost linearly, so :func:`largest_fits` guesses from a line through the peaks it has and checks
the answer on both sides (the largest shape that fits and the next one, which does not).

>>> [grid_shape((1, 1, 176, 112, 112), k)[2:] for k in (-1, 0, 2, 3, 5)]
[(176, 96, 112), (176, 112, 112), (192, 112, 128), (192, 128, 128), (208, 128, 144)]
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

__all__ = ["grid_shape", "voxels", "FitAnswer", "largest_fits", "AXIS_ORDER"]

#: Spatial axes in the order FetusMapV2 grows them: depth, width, height.
AXIS_ORDER = (0, 2, 1)


def grid_shape(base: tuple[int, ...], k: int, multiple: int = 16, order: tuple[int, ...] = AXIS_ORDER
               ) -> tuple[int, ...]:
    """Step ``k`` (negative: shrink) of the one-axis-at-a-time grid from ``base`` (batch, channels, sizes)."""
    out = list(base)
    for j, axis in enumerate(order):
        out[2 + axis] += multiple * math.floor((k - j + len(order) - 1) / len(order))
    return tuple(out)


def voxels(shape: tuple[int, ...]) -> int:
    return math.prod(shape[2:])


@dataclass(frozen=True)
class FitAnswer:
    """One budget's answer: the largest grid shape that fits and the next one up, with their peaks."""
    budget_bytes: int
    shape: tuple[int, ...] | None
    peak_bytes: int | None
    next_shape: tuple[int, ...] | None
    next_peak_bytes: int | None
    capped: bool


def _guess(points: dict[int, int], budget: int, static_bytes: int, base: tuple[int, ...], multiple: int,
           k_range: range) -> int:
    """The largest k whose voxel count a line through the known peaks puts at or under ``budget``."""
    ks = sorted(points, key=lambda k: abs(points[k] - budget))[:2]
    (k1, p1), pts = (ks[0], points[ks[0]]), [(voxels(grid_shape(base, k, multiple)), points[k]) for k in ks]
    if len(pts) == 2 and pts[0][0] != pts[1][0]:
        slope = (pts[1][1] - pts[0][1]) / (pts[1][0] - pts[0][0])
        intercept = pts[0][1] - slope * pts[0][0]
    else:
        v1 = voxels(grid_shape(base, k1, multiple))
        slope, intercept = max(p1 - static_bytes, 1) / v1, static_bytes
    if slope <= 0:
        return k1 + 1
    target = (budget - intercept) / slope
    fitting = [k for k in k_range if voxels(grid_shape(base, k, multiple)) <= target]
    return max(fitting) if fitting else k_range.start


def largest_fits(peak_of: Callable[[tuple[int, ...]], int], base: tuple[int, ...], budgets: list[int], *,
                 static_bytes: int, multiple: int = 16, max_scale: float = 16.0,
                 on_eval: Callable[[tuple[int, ...], int], None] | None = None) -> tuple[list[FitAnswer], int]:
    """Per budget, the largest grid shape whose ``peak_of`` fits, and the number of peaks evaluated.

    Peaks are assumed to grow with k; ``static_bytes`` (parameters and optimizer state) anchors the first
    guess. The grid runs from sides of one ``multiple`` up to ``max_scale`` x the base voxel count.
    """
    k_min = -3 * max(0, min(base[2:]) // multiple - 1)
    k_max = 0
    while voxels(grid_shape(base, k_max + 1, multiple)) <= max_scale * voxels(base):
        k_max += 1
    k_range = range(k_min, k_max + 1)
    cache: dict[int, int] = {}

    def peak(k: int) -> int:
        if k not in cache:
            shape = grid_shape(base, k, multiple)
            cache[k] = int(peak_of(shape))
            if on_eval is not None:
                on_eval(shape, cache[k])
        return cache[k]

    peak(0)
    answers = []
    for budget in budgets:
        while True:
            lo = max((k for k, p in cache.items() if p <= budget), default=k_min - 1)
            hi = min((k for k, p in cache.items() if p > budget), default=k_max + 1)
            if hi - lo <= 1:
                break
            peak(min(max(_guess(cache, budget, static_bytes, base, multiple, k_range), lo + 1), hi - 1))
        fits = lo >= k_min
        nxt = hi if hi <= k_max else None
        answers.append(FitAnswer(
            budget_bytes=budget, shape=grid_shape(base, lo, multiple) if fits else None,
            peak_bytes=cache[lo] if fits else None, next_shape=None if nxt is None else grid_shape(base, nxt, multiple),
            next_peak_bytes=None if nxt is None else cache[nxt], capped=nxt is None))
    return answers, len(cache)
