"""The largest input whose training step fits a memory budget, for vanilla, GCP, REV and GCP+REV.

Input shapes lie on a grid: the grown axes scale together from the given shape (keeping its aspect
ratio) and are rounded down to the multiple the network accepts (16 for four poolings), found by
running the network on meta tensors. Each strategy's peak at a shape is the smallest simulated
peak it reaches there; a search over the grid finds the largest shape at or under the budget and
rates the next one up, so the answer is checked on both sides.

>>> grid = Grid(base=(1, 1, 176, 112, 112), axes=(2, 3, 4), multiples=(16, 16, 16))
>>> grid.start, grid.shape(grid.start), grid.shape(13)
(11, (1, 1, 176, 112, 112), (1, 1, 208, 128, 128))
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ._meta import meta_copy
from .errors import MemplanError
from .modelfile import rejection, shape_text

STRATEGIES = ("vanilla", "GCP", "REV", "GCP+REV")
#: Powers of two tried as an axis's size multiple; a network needing more is grown unrounded.
MAX_MULTIPLE = 256
#: No grown axis goes beyond this size (the search reports ``capped`` when the budget allows more).
MAX_DIM = 8192

PeakFn = Callable[[tuple[int, ...]], int]


@dataclass(frozen=True)
class Grid:
    """Input shapes indexed by n = 1, 2, ...: the lead axis (the largest grown one) is n * its multiple,
    the other grown axes follow in proportion, rounded down to their multiples (at least one multiple)."""
    base: tuple[int, ...]
    axes: tuple[int, ...]
    multiples: tuple[int, ...]
    max_dim: int = MAX_DIM
    min_n: int = 1                       # the smallest n the network accepts (pooling needs some size)

    @property
    def lead(self) -> int:
        """Position in ``axes`` of the largest grown axis."""
        return max(range(len(self.axes)), key=lambda i: self.base[self.axes[i]])

    @property
    def start(self) -> int:
        """The n whose lead size is the base's, rounded down to its multiple (at least 1)."""
        return max(1, self.base[self.axes[self.lead]] // self.multiples[self.lead])

    @property
    def max_n(self) -> int:
        return max(1, self.max_dim // self.multiples[self.lead])

    def shape(self, n: int) -> tuple[int, ...]:
        lead_size = n * self.multiples[self.lead]
        scale = lead_size / self.base[self.axes[self.lead]]
        out = list(self.base)
        for axis, mult in zip(self.axes, self.multiples):
            out[axis] = max(mult, int(self.base[axis] * scale + 1e-9) // mult * mult)
        out[self.axes[self.lead]] = lead_size
        return tuple(out)


@dataclass(frozen=True)
class FitResult:
    """One strategy's answer: the largest grid shape at or under the budget, and the next one up."""
    strategy: str
    base_peak_bytes: int                 # the peak at the given input shape
    shape: tuple[int, ...] | None        # None when even the smallest grid shape does not fit
    peak_bytes: int | None
    next_shape: tuple[int, ...] | None   # None when the search hit the size cap
    next_peak_bytes: int | None
    evaluations: int

    @property
    def capped(self) -> bool:
        return self.shape is not None and self.next_shape is None


def detect_multiple(model: nn.Module, base: tuple[int, ...], axis: int, *, meta_model: nn.Module | None = None) -> int:
    """The smallest power of two p such that the network accepts ``base`` with ``axis`` set to an odd
    multiple of p (a network with k poolings needs p = 2**k); 1 when no power up to MAX_MULTIPLE works."""
    net = meta_model if meta_model is not None else meta_copy(model)
    p = 1
    while p <= MAX_MULTIPLE:
        odd = max(1, base[axis] // p)
        odd -= 1 - odd % 2            # round down to odd
        size = p * max(odd, 1)
        probe = base[:axis] + (size,) + base[axis + 1:]
        if not rejection(model, (torch.empty(probe, device="meta"),), meta_model=net):
            return p
        p *= 2
    return 1


def make_grid(model: nn.Module, base: tuple[int, ...], *, axis: int | None = None, max_dim: int = MAX_DIM) -> Grid:
    """The grid of shapes to search: all spatial axes (2..) together, or only ``axis``."""
    if len(base) < 3 and axis is None:
        raise MemplanError(f"input shape {shape_text(base)} has no spatial axes (expected batch, channels, "
                           "sizes...); pass --axis to grow one axis")
    if axis is not None:
        if not -len(base) <= axis < len(base):
            raise MemplanError(f"--axis {axis} is outside the input shape {shape_text(base)} "
                               f"(axes 0..{len(base) - 1}; 0 is the batch, 2.. the spatial sizes)")
        axis %= len(base)
        if axis == 1:
            raise MemplanError("--axis 1 is the channel axis, which the network fixes; grow a spatial axis "
                               f"(2..{len(base) - 1}) or the batch (0)")
    axes = (axis,) if axis is not None else tuple(range(2, len(base)))
    net = meta_copy(model)
    why = rejection(model, (torch.empty(base, device="meta"),), meta_model=net)
    if why:
        raise MemplanError(f"the network does not accept the input shape {shape_text(base)}: {why}; "
                           "pass an --input-shape it accepts")
    multiples = tuple(detect_multiple(model, base, a, meta_model=net) for a in axes)
    grid = Grid(base=base, axes=axes, multiples=multiples, max_dim=max_dim)
    return dataclasses.replace(grid, min_n=_smallest_accepted(model, grid, net))


def _smallest_accepted(model: nn.Module, grid: Grid, net: nn.Module) -> int:
    """Bisect for the smallest n whose shape the network runs on (acceptance assumed monotone in n)."""
    def ok(n: int) -> bool:
        return not rejection(model, (torch.empty(grid.shape(n), device="meta"),), meta_model=net)

    lo, hi = 0, grid.start                 # not ok(lo) by convention; ok(hi) unless the base is off-grid
    if not ok(hi):
        return hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if ok(mid) else (mid, hi)
    return hi


def largest_fit(strategy: str, peak_of: PeakFn, grid: Grid, budget_bytes: int, *, start: int | None = None
                ) -> FitResult:
    """Search ``grid`` for the largest n whose peak fits: grow (+1, +2, +4, ...) or shrink (/2) from ``start``
    until the answer is bracketed, then bisect; peaks are assumed to grow with n."""
    cache: dict[tuple[int, ...], int] = {}

    def peak(shape: tuple[int, ...]) -> int:
        if shape not in cache:
            cache[shape] = int(peak_of(shape))
        return cache[shape]

    def fits(n: int) -> bool:
        return peak(grid.shape(n)) <= budget_bytes

    lo, hi = _bracket(fits, min(max(grid.min_n, start or grid.start), grid.max_n), grid.min_n, grid.max_n)
    while lo is not None and hi is not None and hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    shape, next_shape = (None if lo is None else grid.shape(lo)), (None if hi is None else grid.shape(hi))
    return FitResult(strategy=strategy, base_peak_bytes=peak(grid.base), shape=shape,
                     peak_bytes=None if shape is None else cache[shape], next_shape=next_shape,
                     next_peak_bytes=None if next_shape is None else cache[next_shape], evaluations=len(cache))


def _bracket(fits: Callable[[int], bool], n: int, min_n: int, max_n: int) -> tuple[int | None, int | None]:
    """(lo, hi) with fits(lo) and not fits(hi); lo None when min_n fails, hi None when max_n fits."""
    if fits(n):
        lo, step = n, 1
        while lo < max_n:                  # +1, +2, +4, ...: cheap when the answer is near the start
            nxt = min(max_n, lo + step)
            if not fits(nxt):
                return lo, nxt
            lo, step = nxt, step * 2
        return lo, None
    hi = n
    while hi > min_n:
        nxt = max(min_n, hi // 2)
        if fits(nxt):
            return nxt, hi
        hi = nxt
    return None, hi


def peak_function(model: nn.Module, strategy: str, *, optimizer: str = "adam", method: str = "auto",
                  scratch: str = "cpu", dtype: torch.dtype = torch.float32, amp: str | None = None,
                  threads: int | None = None, split_concat: bool = False) -> PeakFn:
    """shape -> the smallest simulated step peak ``strategy`` reaches at that input (meta tensors), the
    step under ``amp`` autocast at ``threads`` OpenMP threads (as memplan.plan takes them); the GCP
    strategies with ``split_concat`` split convolutions over concatenations first (not bitwise)."""
    import memplan

    def inputs(shape):
        return torch.empty(shape, dtype=dtype, device="meta")

    if strategy == "vanilla":
        return lambda s: memplan.simulate_step(model, inputs(s), optimizer=optimizer, scratch=scratch,
                                                       amp=amp, threads=threads).peak_bytes
    if strategy == "GCP":
        return lambda s: _simulated(memplan.plan(model, inputs(s), optimizer=optimizer, method=method, scratch=scratch,
                                                 amp=amp, threads=threads, split_concat=split_concat))
    if strategy == "GCP+REV":
        return lambda s: _simulated(memplan.plan(model, inputs(s), optimizer=optimizer, method=method, scratch=scratch,
                                                 rev=True, amp=amp, threads=threads, split_concat=split_concat))
    if strategy == "REV":
        from .rev_plan import rev_only_plan
        return lambda s: _simulated(rev_only_plan(model, inputs(s), optimizer=optimizer, scratch=scratch, amp=amp,
                                                  threads=threads)[0])
    raise MemplanError(f"unknown strategy {strategy!r}; choose from {', '.join(STRATEGIES)}")


def _simulated(plan) -> int:
    return int(plan.simulated_peak_bytes if plan.simulated_peak_bytes is not None else plan.predicted_peak_bytes)


def fit(model: nn.Module, base: tuple[int, ...], budget_bytes: int, *, strategies=("vanilla", "GCP"),
        axis: int | None = None, optimizer: str = "adam", method: str = "auto", scratch: str = "cpu",
        dtype: torch.dtype = torch.float32, on_result: Callable[[FitResult], None] | None = None,
        peak_wrapper: Callable[[str, PeakFn], PeakFn] | None = None, amp: str | None = None,
        threads: int | None = None, split_concat: bool = False) -> tuple[Grid, list[FitResult]]:
    """The largest input per strategy; later strategies start where the ones they include stopped.
    ``amp``/``threads``: the simulated step's autocast and OpenMP threads; ``split_concat`` as in memplan.plan.

    ``peak_wrapper(strategy, fn)`` may wrap each peak function (progress reports); ``on_result`` sees each answer.
    """
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown:
        raise MemplanError(f"unknown strategy {unknown[0]!r}; choose from {', '.join(STRATEGIES)}")
    grid = make_grid(model, tuple(base), axis=axis)
    results: dict[str, FitResult] = {}
    # GCP and REV each reach at least what vanilla does; GCP+REV at least what either does.
    below = {"GCP": ("vanilla",), "REV": ("vanilla",), "GCP+REV": ("GCP", "REV", "vanilla")}
    for strategy in strategies:
        fn = peak_function(model, strategy, optimizer=optimizer, method=method, scratch=scratch, dtype=dtype,
                           amp=amp, threads=threads, split_concat=split_concat)
        if peak_wrapper is not None:
            fn = peak_wrapper(strategy, fn)
        starts = [_index(grid, results[s].shape) for s in below.get(strategy, ()) if s in results]
        start = max([s for s in starts if s is not None], default=None)
        results[strategy] = largest_fit(strategy, fn, grid, budget_bytes, start=start)
        if on_result is not None:
            on_result(results[strategy])
    return grid, [results[s] for s in strategies]


def _index(grid: Grid, shape: tuple[int, ...] | None) -> int | None:
    """The n of a grid shape (None for None)."""
    if shape is None:
        return None
    return shape[grid.axes[grid.lead]] // grid.multiples[grid.lead]
