"""Kusumoto DP over lower sets: least recompute time under a memory budget, or least memory.

Exact DP iterates over every lower set of the graph; approximate DP over the sets {}, V,
"v plus its ancestors" for every v (Kusumoto's n + 2), and the n prefixes of the fx order (so the
unplanned, recompute-nothing chain is always available). Both use memplan.costmodel for block costs.
:func:`plan_kusumoto` is the registered planner ("auto", "exact", "approx"): the DP's plan, checked
and calibrated by simulation (memplan.calibrate) unless ``options.simulate`` is False.

The recurrence (state = lower set L and integer-scaled overhead t; value = least kept bytes):

    opt[{}][0] = 0
    opt[L'][t + dt(L, L')] = min(opt[L'][...], opt[L][t] + keep(L, L'))
        for every L < L' in the family with static + opt[L][t] + peak(L, L') <= budget

Keeping the least kept memory per (L, t) is exact because every later block's peak grows with it.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace

import numpy as np

from .calibrate import bytes_pair, fit_to_budget
from .costmodel import CostArrays, build_costs, chain_cost, node_scratch, pending_grads
from .errors import BudgetError, MemplanError
from .graph import MemGraph
from .options import DP, PlanOptions
from .plan import Plan, chain_to_segments
from .units import format_bytes

_INF = np.inf


@dataclass(frozen=True)
class Transitions:
    """All block costs from one lower set to its supersets in the family (vectorised)."""
    targets: np.ndarray    # indices of supersets
    keep_b: np.ndarray
    peak_b: np.ndarray
    time: np.ndarray
    recompute: np.ndarray


class Family:
    """A family of lower sets (bitmasks sorted by size) with their block costs, computed lazily."""

    def __init__(self, costs: CostArrays, masks: list[int]):
        self.c = costs
        self.masks = sorted(set(masks), key=lambda m: (m.bit_count(), m))
        if self.masks[0] != 0:
            raise AssertionError("a lower-set family must contain the empty set")
        n = costs.n
        bits = np.array([[(m >> i) & 1 for i in range(n)] for m in self.masks], dtype=bool).reshape(len(self.masks), n)
        self.bits = bits
        self.bnd = np.array([[(b >> i) & 1 for i in range(n)] for b in map(costs.boundary, self.masks)],
                            dtype=bool).reshape(len(self.masks), n)
        self.pending = np.array([pending_grads(costs, b) for b in map(costs.boundary, self.masks)])
        self.sizes = bits.sum(axis=1)
        self.self_owned = np.array(costs.grad_owner) == np.arange(n)
        self._cache: dict[int, Transitions] = {}

    def __len__(self) -> int:
        return len(self.masks)

    def transitions(self, a: int) -> Transitions:
        """Block costs from set ``a`` to every strict superset in the family."""
        if a in self._cache:
            return self._cache[a]
        t = block_terms(self, a)
        recompute_time = np.where(t.recompute, t.v.astype(np.float64) @ self.c.flops, 0.0)
        tr = Transitions(targets=t.targets, keep_b=t.keep_b, peak_b=block_peaks(self, t, t.per_node_b, t.keep_b),
                         time=recompute_time, recompute=t.recompute)
        self._cache[a] = tr
        return tr


@dataclass(frozen=True)
class BlockTerms:
    """The terms of the block costs from one lower set to each strict superset (rows), before the peak."""
    targets: np.ndarray      # indices of the supersets
    v: np.ndarray            # bool (targets x n): the block
    interior: np.ndarray     # bool: block nodes with no successor outside the superset
    own: np.ndarray          # bool: block boundary nodes whose gradient buffer dies inside the block
    recompute: np.ndarray    # bool per target
    keep_b: np.ndarray       # bytes the block keeps
    per_node_b: np.ndarray   # bytes that become alive during the block's backward, by the node at which they do


def block_terms(family: Family, a: int, dropped: np.ndarray | None = None,
                saved_b: np.ndarray | None = None) -> BlockTerms:
    """Kusumoto's block terms from set ``a`` (memplan.costmodel's docstring), shared by Family and the remat
    planner: ``dropped`` (bool per node) are kept by nobody, so a block that holds or reads one recomputes
    and rebuilds it; ``saved_b`` gives their true saved bytes (``family.c.needed_b`` zeroes them)."""
    c = family.c
    dropped = np.zeros(c.n, dtype=bool) if dropped is None else dropped
    saved_b = c.needed_b if saved_b is None else saved_b
    la = family.bits[a]
    is_super = ~(la[None, :] & ~family.bits).any(axis=1) & (family.sizes > family.sizes[a])
    targets = np.nonzero(is_super)[0]
    v = family.bits[targets] & ~la[None, :]
    b = family.bnd[targets]
    interior = v & ~b
    recompute = interior.any(axis=1)
    if dropped.any():
        reads = np.zeros(len(targets), dtype=bool)
        for u in np.nonzero(family.bnd[a] & dropped)[0]:
            reads |= v[:, list(c.succ_lists[u])].any(axis=1)
        recompute = recompute | (v & dropped[None, :]).any(axis=1) | reads
    vf = v.astype(np.float64)
    extra = vf @ c.extra_b
    keep = (v & b).astype(np.float64) @ c.needed_b + np.where(recompute, 0.0, extra)
    held = np.zeros(len(targets))                 # unsaved inputs a checkpoint holds
    for u in np.nonzero(family.bnd[a] & (c.needed_b == 0) & ~dropped)[0]:
        succ = list(c.succ_lists[u])
        if succ:
            held += np.where(v[:, succ].any(axis=1), c.out_b[u], 0.0)
    keep = keep + np.where(recompute, held, 0.0)
    per_node = v * c.extra_b[None, :]
    rebuilt = interior | (v & b & dropped[None, :])
    np.add.at(per_node, (slice(None), c.first_saver), rebuilt * saved_b[None, :])
    per_node = per_node * recompute[:, None]
    own = v & b & family.self_owned[None, :]             # outputs of V whose gradient dies inside V
    per_node = per_node + own * c.out_b[None, :]
    return BlockTerms(targets=targets, v=v, interior=interior, own=own, recompute=recompute, keep_b=keep,
                      per_node_b=per_node)


def block_peaks(family: Family, t: BlockTerms, per_node_b: np.ndarray, keep_b: np.ndarray,
                start_b: np.ndarray | None = None) -> np.ndarray:
    """Peak bytes above static and the kept bytes before, per target of ``t``: the largest working set of a
    node's backward in the block (graph order = fx order), or ``start_b`` (plus V's own output gradients)
    where given; infinite where a recomputed block holds a pinned node."""
    c = family.c
    rebuilt_at = np.cumsum(per_node_b, axis=1)
    here = rebuilt_at + t.interior * c.out_b[None, :] + c.work_b[None, :] + c.scratch_b[None, :]
    inner = np.where(t.v, here, -np.inf).max(axis=1) if len(t.targets) else np.zeros(0)
    own_b = t.own.astype(np.float64) @ c.out_b
    if start_b is not None:
        inner = np.maximum(inner, start_b + own_b)
    peak = keep_b + family.pending[t.targets] - own_b + inner
    return np.where(t.recompute & (t.v & c.pinned[None, :]).any(axis=1), np.inf, peak)


@dataclass(frozen=True)
class DPResult:
    """A chain of lower sets (bitmasks, the empty set excluded) and what the cost model says of it."""
    chain: tuple[int, ...]
    peak_bytes: float
    time: float


def min_kept(family: Family, budget: float) -> np.ndarray:
    """Least kept bytes to reach each set with every block peak within ``budget`` (inf: cannot)."""
    f = np.full(len(family), _INF)
    f[0] = 0.0
    room = budget - family.c.static_bytes
    for a in range(len(family)):
        if not np.isfinite(f[a]):
            continue
        tr = family.transitions(a)
        ok = f[a] + tr.peak_b <= room
        cand = np.where(ok, f[a] + tr.keep_b, _INF)
        np.minimum.at(f, tr.targets, cand)
    return f


def feasible(family: Family, budget: float) -> bool:
    """Whether some chain in the family keeps every block's peak within ``budget``."""
    return bool(np.isfinite(min_kept(family, budget)[-1]))


def min_budget(family: Family, *, lo: float | None = None, hi: float | None = None) -> float:
    """Smallest integer budget (bytes) for which a chain exists: binary search on ``feasible``."""
    c = family.c
    lo = float(c.static_bytes) if lo is None else lo
    if hi is None:
        hi = float(c.static_bytes + 2 * c.out_b.sum() + c.extra_b.sum() + c.work_b.max(initial=0)
                   + c.scratch_b.max(initial=0)) + 1.0
        while not feasible(family, hi):
            hi *= 2
    lo_i, hi_i = int(math.floor(lo)), int(math.ceil(hi))
    while lo_i < hi_i:
        mid = (lo_i + hi_i) // 2
        if feasible(family, mid):
            hi_i = mid
        else:
            lo_i = mid + 1
    return float(hi_i)


def least_time(family: Family, budget: float, *, time_steps: int = 1000) -> DPResult | None:
    """The chain of least recompute time whose every block fits ``budget``; None if none fits.

    Times are scaled to integers: unit = total time / time_steps (unit 1 when times are small
    integers already), each block's overhead rounded up, so the DP is exact in those units.
    """
    c = family.c
    total = float(c.flops.sum())
    unit = 1.0 if total <= time_steps and np.all(c.flops == np.round(c.flops)) else total / time_steps
    tmax = int(math.ceil(total / unit)) + c.n + 1
    S = len(family)
    opt = np.full((S, tmax + 1), _INF)
    par_set = np.full((S, tmax + 1), -1, dtype=np.int64)
    par_t = np.full((S, tmax + 1), -1, dtype=np.int64)
    opt[0, 0] = 0.0
    room = budget - c.static_bytes
    for a in range(S):
        row = opt[a]
        live = np.nonzero(np.isfinite(row))[0]
        if live.size == 0:
            continue
        tr = family.transitions(a)
        dts = np.ceil(tr.time / unit - 1e-9).astype(np.int64)
        for j, b in enumerate(tr.targets):
            ok = live[row[live] + tr.peak_b[j] <= room]
            if ok.size == 0:
                continue
            new_t = ok + dts[j]
            keep_ok = new_t <= tmax
            ok, new_t = ok[keep_ok], new_t[keep_ok]
            cand = row[ok] + tr.keep_b[j]
            better = cand < opt[b, new_t]
            opt[b, new_t[better]] = cand[better]
            par_set[b, new_t[better]] = a
            par_t[b, new_t[better]] = ok[better]
    final = np.nonzero(np.isfinite(opt[S - 1]))[0]
    if final.size == 0:
        return None
    t = int(final[0])
    chain, s = [], S - 1
    while s != 0:
        chain.append(family.masks[s])
        s, t = int(par_set[s, t]), int(par_t[s, t])
    chain.reverse()
    peak, recompute_time = chain_cost(c, chain)
    return DPResult(chain=tuple(chain), peak_bytes=peak, time=recompute_time)


# ---------------------------------------------------------------------------------------------
# The planner
# ---------------------------------------------------------------------------------------------

def choose_family(graph: MemGraph, costs: CostArrays, opts: PlanOptions) -> tuple[Family, str, str, int | None]:
    """The lower-set family for the DP: (family, method, why, lower-set count or None)."""
    sets = None
    if opts.dp in (DP.AUTO, DP.EXACT):
        bound = opts.lower_set_bound if opts.dp is DP.AUTO else max(opts.lower_set_bound, 10**6)
        sets = graph.lower_sets(bound)
        if sets is None and opts.dp is DP.EXACT:
            raise MemplanError(f"graph has more than {bound} lower sets; exact DP is unaffordable, use method='approx'")
    groups = graph.consumer_groups()
    if sets is not None:
        why = ("requested" if opts.dp is DP.EXACT
               else f"{len(sets)} lower sets <= bound {opts.lower_set_bound}")
        usable = [m for m in sets if graph.order_compatible(m, groups)]
        if len(usable) < len(sets):
            why += f"; {len(sets) - len(usable)} set(s) would reorder a 3-reader value's gradient sum"
        return Family(costs, usable), "exact", why, len(sets)
    full = (1 << len(graph)) - 1
    prefixes = [(1 << (i + 1)) - 1 for i in range(len(graph))]   # fx-order prefixes: the vanilla chain
    masks = [m for m in [0, full] + graph.ancestor_masks() + prefixes if graph.order_compatible(m, groups)]
    why = "requested" if opts.dp is DP.APPROX else f"more than {opts.lower_set_bound} lower sets"
    return Family(costs, masks), "approx", why, None


def dp_plan(graph: MemGraph, opts: PlanOptions) -> Plan:
    """The DP's plan by the cost model alone: time-centric under ``opts.budget_bytes``, else memory-centric.
    ``opts.pinned`` nodes are never recomputed; BudgetError below the cost model's floor."""
    t0 = time.perf_counter()
    costs = build_costs(graph, optimizer=opts.optimizer.value, scratch=node_scratch(graph, opts.scratch.value),
                        times=opts.times, pinned=opts.pinned)
    family, method, why, count = choose_family(graph, costs, opts)
    vanilla_chain = [(1 << (i + 1)) - 1 for i in range(len(graph))]   # one node per block, topological
    vanilla_peak = chain_cost(costs, vanilla_chain)[0]
    floor = min_budget(family)
    if opts.budget_bytes is None:
        budget = floor
    else:
        budget = float(opts.budget_bytes)
        if budget < floor:
            b_text, f_text = bytes_pair(int(budget), int(floor))
            raise BudgetError(
                f"budget {b_text} is below the smallest feasible peak {f_text} ({method} DP, cost model, optimizer "
                f"{opts.optimizer.value}); raise the budget to at least {format_bytes(floor)}, use a smaller input "
                "or batch, or a lighter optimizer",
                budget_bytes=int(budget), min_feasible_bytes=int(floor))
    result = least_time(family, budget, time_steps=opts.time_steps)
    if result is None:
        raise AssertionError(f"budget {budget} >= floor {floor} but the DP found no chain")
    fwd = float(costs.flops.sum()) or 1.0
    return Plan(
        segments=chain_to_segments(graph, costs, result.chain), predicted_peak_bytes=int(result.peak_bytes),
        predicted_overhead=result.time / fwd, vanilla_peak_bytes=int(vanilla_peak),
        budget_bytes=opts.budget_bytes, objective=opts.objective.value,
        method=method, method_reason=why, lower_set_count=count, fingerprint=graph.fingerprint(),
        optimizer=opts.optimizer.value, static_bytes=costs.static_bytes,
        planning_time_s=time.perf_counter() - t0, notes=graph.trace_notes)


def plan_kusumoto(graph: MemGraph, options: PlanOptions) -> Plan:
    """Registered as "auto", "exact" and "approx": :func:`dp_plan`, checked and calibrated by simulation
    (memplan.calibrate.fit_to_budget) unless ``options.simulate`` is False."""
    t0 = time.perf_counter()
    plan = fit_to_budget(dp_plan, graph, options) if options.simulate else dp_plan(graph, options)
    return replace(plan, planning_time_s=time.perf_counter() - t0)
