"""The remat planner: Kusumoto's chain of lower sets, plus tensors that nobody keeps after forward.

A chain keeps every boundary tensor until its block's backward, so a U-Net's long skips stay resident
through the whole decoder (the "chain floor"). Here a set D of *dropped* tensors is kept by no one:
the blocks that produce or read a dropped tensor run under checkpoint, and a block that reads one
rebuilds it, under no_grad, from tensors that are alive anyway (boundaries of its lower set that are
not dropped, or the graph inputs) when it is recomputed in backward (rewrite.RematSegment). Autograd
records the original graph, so outputs and gradients stay bitwise equal.

Why this solver (and not a Checkmate MILP): a MILP schedule may recompute any node at any stage,
but autograd runs backward in its own order and checkpoint re-runs whole segments, so most MILP
schedules cannot be realised bitwise; and the MILP at 100 nodes x 200 stages is slow and has no
clean fallback. Keeping the chain (so every plan is a set of checkpoint segments) and searching D
greedily keeps the exact DP inside: for a fixed D, the best chain is Kusumoto's DP over the same
lower sets with these block costs (V = L' minus L, R = dropped boundaries of L that V reads):

  recompute(V) = V has an interior node, or meets D, or R is not empty
  keep(V)      = Kusumoto's keep with need(D) = 0, minus held dropped inputs, plus the sources of
                 R's rebuild that are not alive boundaries of L (charged in full: an upper bound)
  time(V)      = flops(V) + flops(rebuild(R))          where rebuild(u) walks back from u through
                 ancestors until B(L) minus D (alive), a graph input, or a tensor at least
                 SOURCE_SHRINK times smaller than u; it fails on dropout (RNG) and in-place ops
  peak(V)      = Kusumoto's peak, with dropped nodes of V rebuilt like interior ones, dropped
                 inputs alive until their first saver in V, the rebuild's own peak at the start
                 (its ops in order under no_grad, each value freed after its last reader), less the
                 gradients of parameters read only inside L: zero_grad(set_to_none) leaves none, and
                 backward reaches L's blocks after V's (costmodel.param_gradients)

D grows greedily under a time limit: each round drops one kept tensor, or one with the same-resolution
ancestors its rebuild re-runs (a skip alone only moves the keeping to its producer), or takes one back,
scored by the DP's optimum and then by the bytes the chain keeps (to cross plateaus where several
blocks tie at the peak). The block costs count the output the loop holds through backward (static,
when the step keeps it), PReLU's per-element weight-gradient buffer, and a view's saved storage once
(at its root). They still err by a few percent (not every overlap of one block's recompute with the
next block's backward is seen), and a greedy is a heuristic: the exact model's path can stop at a
local optimum that a coarser model's path (none of those three terms) walks past. So, given example
inputs, the greedy runs on both models; the coarse path's candidates are re-solved under the exact
model, and the chains each path accepts and the best ones it did not are rated by simulate_step, the
one simulator: the best simulated plan wins. Without a budget, the best chains are also split further
(split_chain) where that lowers their blocks' peaks, counted per chain (RematFamily.chain_peaks): the DP,
seeing one set at a time, charges a rebuild source that an earlier block keeps as held again, and stops
at the model's one peak block although the simulator's may be another. D = {} is Kusumoto's chain under these block costs: the
fallback when nothing beats it. Under a budget, the DP's budget is first calibrated by simulating that
chain, as memplan.plan does, and the least recompute that simulates within the budget wins.

Limits: the rebuild stops at dropout (not replayed outside checkpoint's RNG handling) and in-place
ops; a rebuild source that is not an alive boundary is charged as held for the whole block (an upper
bound); the greedy is a heuristic (tests check the DP against brute force for every D on a small graph).
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from .costmodel import CostArrays, build_costs, param_gradients
from .errors import BudgetError, MemplanError
from .graph import DEFAULT_LOWER_SET_BOUND, MemGraph
from .kusumoto import Family, Transitions, block_peaks, block_terms, feasible, least_time, min_kept
from .measure import OPTIMIZERS, SCRATCH_MODELS, simulate_step
from .plan import Plan, Segment, with_simulation
from .rewrite import rewrite
from .units import format_bytes

#: Rebuilt FLOPs may make a plan's recompute time exceed one forward; the DP's time axis covers this many
#: forwards (at Kusumoto's resolution: time_steps per forward), so D = {} gives exactly Kusumoto's chain.
TIME_HEADROOM = 4
#: A rebuild walks back from a dropped tensor until an alive boundary, a graph input, or a tensor this
#: many times smaller (a downsampled level: cheap to hold, and it stops the walk from re-running the net).
SOURCE_SHRINK = 2.0
#: Under a budget, D = {} and the greedy's last D are also solved at these multiples of the DP's budget
#: and rated by simulation (a chain just above the model's budget may simulate within the real one).
LOOSER_BUDGETS = (1.005, 1.01, 1.02)
_INPLACE_OPERATORS = frozenset({"iadd", "isub", "imul", "itruediv", "ifloordiv", "imod", "ipow", "iand", "ior",
                                "ixor", "ilshift", "irshift", "imatmul"})
_RANDOM_TARGETS = ("dropout", "bernoulli", "rand", "normal_", "uniform_", "multinomial")


@dataclass(frozen=True)
class RematOptions:
    """How the remat planner runs; validated on construction.

    ``example_inputs`` (meta tensors are fine) let it rate its candidates with simulate_step; without
    them it trusts the cost model.
    """
    budget_bytes: int | None = None
    optimizer: str = "adam"
    scratch: str = "none"
    lower_set_bound: int = DEFAULT_LOWER_SET_BOUND
    time_steps: int = 1000
    time_limit_s: float = 18.0
    max_rounds: int = 12
    candidates_per_round: int = 6
    extra_rated: int = 6             # best-scoring candidates the greedy did not accept, also simulated
    example_inputs: tuple = field(default=(), compare=False, hash=False)
    loss_fn: Callable | None = field(default=None, compare=False, hash=False)
    amp: str | None = None           # the simulated step's autocast, output lifetime and threads (simulate_step)
    keep_output: bool = True
    threads: int | None = None

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise MemplanError(f"unknown optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
        if self.scratch not in SCRATCH_MODELS:
            raise MemplanError(f"unknown scratch model {self.scratch!r}; choose one of {SCRATCH_MODELS}")
        if self.budget_bytes is not None and self.budget_bytes <= 0:
            raise MemplanError(f"budget must be positive, got {self.budget_bytes} B")
        if self.time_limit_s <= 0 or self.max_rounds < 0 or self.candidates_per_round < 1:
            raise MemplanError(f"time_limit_s must be > 0, max_rounds >= 0, candidates_per_round >= 1; got "
                               f"{self.time_limit_s}, {self.max_rounds}, {self.candidates_per_round}")


def impure_nodes(graph: MemGraph) -> frozenset[str]:
    """Nodes a no_grad rebuild must not re-run: random ops (dropout with p > 0; their RNG is not
    replayed there) and in-place ops (re-running one would write into a tensor that is still in use)."""
    out = set()
    for node in graph.gm.graph.nodes:
        if node.name not in graph.dag:
            continue
        target = graph.info(node.name).target.lower()
        random = any(k in target for k in _RANDOM_TARGETS) and float(node.kwargs.get("p", 0.5) or 0.0) > 0
        inplace = (bool(node.kwargs.get("inplace", False)) or target in _INPLACE_OPERATORS
                   or (target.endswith("_") and not target.startswith("_")))
        if node.op == "call_module":
            mod = graph.gm.get_submodule(node.target)
            random = isinstance(mod, (nn.modules.dropout._DropoutNd, nn.AlphaDropout)) and mod.p > 0
            inplace = bool(getattr(mod, "inplace", False))
        if random or inplace or graph.info(node.name).draws_random:
            out.add(node.name)
    return frozenset(out)


def droppable_nodes(graph: MemGraph) -> frozenset[str]:
    """Nodes that may be dropped: pure, own their storage, not written in place later (a rebuild would
    give the value before the write), read by someone, not a graph output."""
    bad = impure_nodes(graph)
    written = {graph.root(n) for n in bad if graph.info(n).alias_of is not None}
    return frozenset(n for n in graph.order if n not in bad and n not in written and n not in graph.outputs
                     and graph.dag.out_degree(n) > 0 and graph.info(n).alias_of is None
                     and graph.info(n).out_bytes > 0)


def held_outputs(graph: MemGraph, costs: CostArrays) -> CostArrays:
    """``costs`` for the step simulate_step runs: the loop holds the network's output through the whole
    backward (``out = model(x); loss = loss_fn(out)``), so its storage counts as static, not as kept by
    the last block until that block's backward."""
    idx = {n: i for i, n in enumerate(graph.order)}
    roots = {idx.get(graph.root(o), idx[o]) for o in graph.outputs if o in idx}
    held = np.zeros(costs.n, dtype=bool)
    held[list(roots | {i for i in range(costs.n) if graph.order[i] in graph.outputs})] = True
    return dataclasses.replace(costs, needed_b=np.where(held, 0.0, costs.needed_b),
                               static_bytes=costs.static_bytes + int(sum(costs.out_b[r] for r in roots)))


def backward_extra_bytes(graph: MemGraph, own_b: np.ndarray) -> np.ndarray:
    """Per node: bytes its backward allocates beyond the input gradients (Kusumoto's work term). PReLU's
    kernel writes its weight gradient per element, a buffer of the input's size, before summing it."""
    idx = {n: i for i, n in enumerate(graph.order)}
    out = np.zeros(len(graph.order))
    for node in graph.gm.graph.nodes:
        if node.name not in idx:
            continue
        if node.op == "call_module":
            mod = graph.gm.get_submodule(node.target)
            prelu = isinstance(mod, nn.PReLU) and mod.weight.requires_grad
        else:
            prelu = "prelu" in graph.info(node.name).target.lower()
        if prelu:
            out[idx[node.name]] = sum(own_b[idx[graph.root(p)]] for p in graph.dag.predecessors(node.name))
    return out


@dataclass(frozen=True)
class Rebuild:
    """How one block rebuilds its dropped inputs: the inputs, the nodes re-run, their FLOPs and working set."""
    inputs: tuple[int, ...]
    nodes: int                     # bitmask
    flops: float
    work_b: float                  # peak of the no_grad rebuild (the rebuilt inputs included)
    hold_b: float                  # sources the block must hold because nobody else keeps them
    held: tuple[int, ...] = ()     # the sources that are not alive boundaries (charged in full in hold_b)


class RematFamily(Family):
    """Kusumoto's lower-set family with block costs for a set of dropped nodes (module docstring).

    ``c`` (what the DP functions read) has need(D) = 0 and FLOPs scaled by TIME_HEADROOM, so rebuilt
    FLOPs fit on the DP's time axis; ``base`` holds the true cost arrays.
    """

    def __init__(self, costs: CostArrays, masks: list[int], graph: MemGraph, dropped: frozenset[int],
                 impure: frozenset[int], like: RematFamily | None = None, *, keep_output: bool = True,
                 exact: bool = True):
        """``like``: a family of the same graph, costs, masks and model whose D-independent arrays are reused.
        ``keep_output``: the step holds the output through backward (counted as static). ``exact`` False:
        the coarser model (no PReLU buffer, a view's saved storage counted again, the output not held),
        a second heuristic path for the greedy; the simulator rates what either finds."""
        self.dropped = frozenset(dropped)
        self.dmask = np.zeros(costs.n, dtype=bool)
        self.dmask[list(self.dropped)] = True
        self.exact = exact
        if exact and keep_output:
            costs = held_outputs(graph, costs)
        zeroed = dataclasses.replace(costs, needed_b=np.where(self.dmask, 0.0, costs.needed_b))
        if like is None:
            super().__init__(zeroed, masks)
            self._graph_parts(graph, costs)
        else:
            for name in ("masks", "bits", "bnd", "pending", "sizes", "self_owned", "preds", "root", "own_b",
                         "savers", "absent_grads_b", "backward_extra_b", "saved_once_b"):
                setattr(self, name, getattr(like, name))
            self._cache = {}
        costs = dataclasses.replace(costs, work_b=costs.work_b + self.backward_extra_b)
        zeroed = dataclasses.replace(zeroed, work_b=costs.work_b)
        self.base, self.cz = costs, zeroed
        self.c = dataclasses.replace(zeroed, flops=costs.flops * TIME_HEADROOM)
        self.impure = impure
        self._closures: dict[tuple[int, int], tuple[int, tuple[int, ...]] | None] = {}
        self._unions: dict[tuple[int, tuple[int, ...]], tuple | None] = {}

    def _graph_parts(self, graph: MemGraph, costs: CostArrays) -> None:
        """The arrays that depend on the graph only: predecessors, storage roots, own bytes, savers,
        and per set the parameter gradients that do not exist yet while a block above it runs backward."""
        idx = {n: i for i, n in enumerate(graph.order)}
        self.preds = [tuple(idx[p] for p in graph.dag.predecessors(nm)) for nm in graph.order]
        self.root = [idx.get(graph.root(nm), i) for i, nm in enumerate(graph.order)]
        self.own_b = np.array([float(graph.info(nm).out_bytes) for nm in graph.order])
        self.savers: list[list[int]] = [[] for _ in graph.order]
        for i, nm in enumerate(graph.order):
            for s in graph.info(nm).saved_from:
                if s in idx:
                    self.savers[self.root[idx[s]]].append(i)
        self.backward_extra_b = backward_extra_bytes(graph, self.own_b) if self.exact else np.zeros(costs.n)
        # a view's saved storage is its root's: counted once, where the root is rebuilt, kept or held
        self.saved_once_b = (np.where([graph.info(nm).alias_of is None for nm in graph.order], costs.needed_b, 0.0)
                             if self.exact else costs.needed_b)
        grads = param_gradients(graph)
        self.absent_grads_b = np.array([float(sum(b for r, b in grads if not r & ~m)) for m in self.masks])

    def closure(self, a: int, u: int) -> tuple[int, tuple[int, ...]] | None:
        """(nodes re-run, sources) that rebuild dropped node ``u`` from what is alive at set ``a``; None if
        the walk meets an impure node."""
        if (a, u) in self._closures:
            return self._closures[a, u]
        alive = self.bnd[a] & ~self.dmask
        small = (self.base.out_b * SOURCE_SHRINK <= self.base.out_b[u]) & ~self.dmask
        nodes, sources, stack = 0, set(), [u]
        while stack:
            w = stack.pop()
            if nodes >> w & 1:
                continue
            if w in self.impure:
                self._closures[a, u] = None
                return None
            nodes |= 1 << w
            for p in self.preds[w]:
                if alive[p] or (small[p] and p not in self.impure):
                    sources.add(p)
                elif not nodes >> p & 1:
                    stack.append(p)
        self._closures[a, u] = (nodes, tuple(sorted(sources)))
        return self._closures[a, u]

    def rebuild_peak(self, members: list[int], inputs: tuple[int, ...]) -> float:
        """Peak bytes of re-running ``members`` (graph order) under no_grad, as the fx code of the recompute
        does: each op's output is allocated while its inputs live, a value is freed after its last reader
        among the members, the rebuilt ``inputs`` stay."""
        inside = set(members)
        keep = {self.root[u] for u in inputs}
        last: dict[int, int] = {}
        for w in members:
            for p in self.preds[w]:
                if p in inside and self.root[p] not in keep:
                    last[self.root[p]] = w
        live = peak = 0.0
        for w in members:
            live += self.own_b[w]
            peak = max(peak, live)
            for r in {self.root[p] for p in self.preds[w] if p in inside}:
                if last.get(r) == w:
                    live -= self.own_b[r]
        return peak

    def rebuild(self, a: int, inputs: tuple[int, ...], block: np.ndarray) -> Rebuild | None:
        """The rebuild of dropped ``inputs`` (boundary nodes of set ``a``) for a block (bool vector)."""
        c = self.base
        key = (a, inputs)
        if key not in self._unions:
            nodes, sources = 0, set()
            for u in inputs:
                got = self.closure(a, u)
                if got is None:
                    self._unions[key] = None
                    return None
                nodes |= got[0]
                sources |= set(got[1])
            members = [w for w in range(c.n) if nodes >> w & 1]
            work = self.rebuild_peak(members, inputs)
            alive = self.bnd[a]
            always = float(sum(c.out_b[s] for s in sources if not alive[s]))     # held by this block alone
            unless_read = [(list(c.succ_lists[s]), float(c.out_b[s])) for s in sorted(sources)
                           if alive[s] and self.cz.needed_b[s] == 0]             # held unless the block reads it
            held = tuple(sorted(s for s in sources if not alive[s]))
            self._unions[key] = (nodes, float(c.flops[members].sum()), float(work), always, unless_read, held)
        if self._unions[key] is None:
            return None
        nodes, flops, work, always, unless_read, held = self._unions[key]
        hold = always + sum(b for succ, b in unless_read if not block[succ].any())
        return Rebuild(inputs=inputs, nodes=nodes, flops=flops, work_b=work, hold_b=hold, held=held)

    def dropped_inputs(self, a: int, v: np.ndarray) -> list[tuple[int, ...]]:
        """Per target block (rows of ``v``): the dropped boundary nodes of set ``a`` it reads."""
        c = self.base
        din = np.nonzero(self.bnd[a] & self.dmask)[0]
        if not len(din):
            return [()] * v.shape[0]
        reads = np.stack([v[:, list(c.succ_lists[u])].any(axis=1) for u in din], axis=1)
        return [tuple(int(u) for u in din[row]) for row in reads]

    def transitions(self, a: int) -> Transitions:
        """Block costs from set ``a`` to every strict superset (kusumoto.block_terms with the dropped nodes,
        plus each block's rebuild)."""
        if a in self._cache:
            return self._cache[a]
        c = self.base
        t = block_terms(self, a, self.dmask, saved_b=self.saved_once_b)
        v = t.v
        reads = self.dropped_inputs(a, v)
        keep, per_node = t.keep_b.copy(), t.per_node_b.copy()
        time_ = np.where(t.recompute, v.astype(np.float64) @ c.flops, 0.0)
        start = np.full(len(t.targets), -np.inf)            # working set when the rebuild runs
        infeasible = np.zeros(len(t.targets), dtype=bool)
        for k, inputs in enumerate(reads):
            if not inputs:
                continue
            rb = self.rebuild(a, inputs, v[k])
            if rb is None:
                infeasible[k] = True
                continue
            keep[k] += rb.hold_b
            time_[k] += rb.flops
            start[k] = rb.work_b
            for u in inputs:                                # alive until its first saver in V has run
                savers = [s for s in self.savers[u] if v[k, s]]
                if savers:
                    per_node[k, min(savers)] += c.out_b[u]
        peak = block_peaks(self, t, per_node, keep, start_b=start) - self.absent_grads_b[a]
        peak = np.where(infeasible, np.inf, peak)
        tr = Transitions(targets=t.targets, keep_b=keep, peak_b=peak, time=time_, recompute=t.recompute)
        self._cache[a] = tr
        return tr

    def chain_cost(self, chain: tuple[int, ...]) -> tuple[float, float]:
        """(peak bytes, recompute time) of a chain under these block costs."""
        pos = {m: i for i, m in enumerate(self.masks)}
        kept = peak = total = 0.0
        a = 0
        for m in chain:
            tr = self.transitions(a)
            j = int(np.nonzero(tr.targets == pos[m])[0][0])
            peak = max(peak, self.c.static_bytes + kept + tr.peak_b[j])
            kept += tr.keep_b[j]
            total += tr.time[j]
            a = pos[m]
        return peak, total

    def _walk(self, chain: tuple[int, ...]):
        """Per block of ``chain``: (mask, its transitions, the target index, the block's node mask and
        bool row, the dropped inputs it reads, their Rebuild or None)."""
        pos = {m: i for i, m in enumerate(self.masks)}
        a, prev = 0, 0
        for m in chain:
            tr = self.transitions(a)
            j = int(np.nonzero(tr.targets == pos[m])[0][0])
            block = m & ~prev
            vb = np.array([(block >> x) & 1 for x in range(self.base.n)], dtype=bool)
            inputs = self.dropped_inputs(a, vb[None, :])[0]
            yield m, tr, j, block, inputs, self.rebuild(a, inputs, vb) if inputs else None
            a, prev = pos[m], m

    def chain_peaks(self, chain: tuple[int, ...]) -> list[float]:
        """Peak bytes of each block of a chain, with what the DP cannot see from one set: a rebuild source
        that an earlier block of this chain keeps (for a backward that runs after this block's) is alive
        anyway, so this block does not hold it again."""
        kept_nodes: set[int] = set()
        out, kept = [], 0.0
        for m, tr, j, block, _, rb in self._walk(chain):
            twice = 0.0 if rb is None else float(sum(self.base.out_b[s] for s in rb.held if s in kept_nodes))
            out.append(self.c.static_bytes + kept + tr.peak_b[j] - twice)
            kept += tr.keep_b[j] - twice
            bnd = self.base.boundary(m) & block
            kept_nodes |= {x for x in range(self.base.n) if bnd >> x & 1 and self.cz.needed_b[x] > 0}
        return out

    def segments(self, graph: MemGraph, chain: tuple[int, ...]) -> tuple[Segment, ...]:
        """The chain as plan segments; a block reading dropped nodes names them and its rebuild."""
        out = []
        for i, (m, tr, j, block, inputs, rebuild) in enumerate(self._walk(chain)):
            bnd = self.base.boundary(m) & block
            kept = [x for x in range(self.base.n) if bnd >> x & 1 and not self.dmask[x]]
            nodes = tuple(graph.names_of(block))
            out.append(Segment(index=i, nodes=nodes, kept=tuple(graph.order[x] for x in kept),
                               recompute=bool(tr.recompute[j]), kept_bytes=int(tr.keep_b[j]),
                               flops=int(sum(graph.info(n).flops for n in nodes)),
                               rebuilt=tuple(graph.order[u] for u in inputs),
                               rebuild=() if rebuild is None else tuple(graph.names_of(rebuild.nodes))))
        return tuple(out)


@dataclass(frozen=True)
class Candidate:
    """One solved D: its chain and what the cost model (and, once rated, the simulator) says of it."""
    dropped: frozenset[int]
    chain: tuple[int, ...]
    peak_b: float
    time: float
    budget_b: float
    simulated_b: int | None = None


def lower_set_masks(graph: MemGraph, bound: int) -> tuple[list[int], str, str, int | None]:
    """The DP's family as in plan.choose_family: every order-compatible lower set, or the approximate sets."""
    sets = graph.lower_sets(bound)
    groups = graph.consumer_groups()
    if sets is not None:
        usable = [m for m in sets if graph.order_compatible(m, groups)]
        return usable, "exact", f"{len(sets)} lower sets <= bound {bound}", len(sets)
    full = (1 << len(graph)) - 1
    prefixes = [(1 << (i + 1)) - 1 for i in range(len(graph))]
    masks = [m for m in [0, full] + graph.ancestor_masks() + prefixes if graph.order_compatible(m, groups)]
    return masks, "approx", f"more than {bound} lower sets", None


def split_chain(fam: RematFamily, chain: tuple[int, ...], rounds: int = 8,
                deadline: float = math.inf) -> tuple[int, ...]:
    """``chain`` with blocks split where that lowers its block peaks (RematFamily.chain_peaks, sorted from
    the highest, compared in turn): a split the DP rejects because it charges a rebuild source twice, or
    one that lowers a block below the model's peak (the simulator may put the real peak there)."""
    def score(ch: tuple[int, ...]) -> tuple[float, ...]:
        return tuple(sorted((_sig(p) for p in fam.chain_peaks(ch)), reverse=True))

    best, best_score = tuple(chain), score(tuple(chain))
    for _ in range(rounds):
        found = None
        prev = 0
        for i, m in enumerate(best):
            for mid in fam.masks:
                if time.perf_counter() > deadline:
                    return best
                if mid in (prev, m) or mid & prev != prev or mid & ~m:
                    continue
                ch = best[:i] + (mid,) + best[i:]
                sc = score(ch)
                if sc < (best_score if found is None else found[0]):
                    found = (sc, ch)
            prev = m
        if found is None:
            break
        best_score, best = found
    return best


def least_budget(family: Family, rel_tol: float = 1e-3, below: float | None = None) -> float:
    """The smallest feasible budget to within ``rel_tol`` (binary search on kusumoto.feasible); coarser
    than kusumoto.min_budget's byte-exact search, so the greedy's many solves stay cheap. With ``below``:
    inf at once when no chain fits it (a greedy move that cannot improve costs one DP pass)."""
    c = family.c
    lo = float(c.static_bytes)
    if below is not None:
        if not feasible(family, below):
            return float("inf")
        hi = float(below)
        while hi - lo > rel_tol * hi:
            mid = (lo + hi) / 2
            lo, hi = (lo, mid) if feasible(family, mid) else (mid, hi)
        return float(math.ceil(hi))
    hi = float(c.static_bytes + 2 * c.out_b.sum() + c.extra_b.sum() + c.work_b.max(initial=0)
               + c.scratch_b.max(initial=0)) + 1.0
    for _ in range(64):
        if feasible(family, hi):
            break
        hi *= 2
    else:
        return float("inf")
    while hi - lo > rel_tol * hi:
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if feasible(family, mid) else (mid, hi)
    return float(math.ceil(hi))


def solve(family: RematFamily, budget_b: float | None, time_steps: int) -> Candidate | None:
    """The DP for one D: least memory (budget None), or least time within ``budget_b``; None if infeasible."""
    budget = least_budget(family) if budget_b is None else float(budget_b)
    result = least_time(family, budget, time_steps=time_steps * TIME_HEADROOM)
    if result is None:
        return None
    peak, t = family.chain_cost(result.chain)
    return Candidate(dropped=family.dropped, chain=result.chain, peak_b=peak, time=t, budget_b=budget)


def _sig(x: float) -> float:
    """``x`` to 4 significant digits: scores that differ by less are ties."""
    return float(f"{x:.4g}")


def _score(x: Candidate, fam_kept_b: float, memory_centric: bool) -> tuple[float, float, float]:
    """Greedy order: least memory first (budget, then the bytes the chain keeps, to cross plateaus where
    several blocks tie at the peak), or least time under a budget."""
    if memory_centric:
        return (_sig(x.budget_b), _sig(fam_kept_b), x.time)
    return (x.time, _sig(x.budget_b), _sig(fam_kept_b))


def greedy(graph: MemGraph, costs: CostArrays, masks: list[int], opts: RematOptions,
           deadline: float, exact: bool = True) -> tuple[list[Candidate], list[Candidate], str]:
    """Candidates the greedy accepts (the first is D = {}, Kusumoto's chain), then the ``extra_rated``
    best-scoring ones it did not (the cost model can misjudge a plateau), and why it stopped.

    Each round tries to drop one kept tensor, or one with the same-resolution ancestors its rebuild
    re-runs (dropping a skip alone only moves the keeping to its producer), or to take back one
    tensor the last move dropped, and makes the move that scores best (``_score``); it stops when none improves.
    """
    impure = frozenset(graph.index(n) for n in impure_nodes(graph))
    droppable = {graph.index(n) for n in droppable_nodes(graph)}
    memory_centric = opts.budget_bytes is None
    seen: dict[frozenset[int], tuple | None] = {}
    fams: dict[frozenset[int], RematFamily] = {}
    floors: dict[frozenset[int], float] = {}
    found: dict[frozenset[int], Candidate] = {}
    template = RematFamily(costs, masks, graph, frozenset(), impure, keep_output=opts.keep_output, exact=exact)

    def run(dropped: frozenset[int]):
        """The score of a D. Least memory: (DP floor, least kept bytes at it) straight from min_kept, no
        time DP (the chain is solved only for the candidates kept); under a budget: the least time."""
        if dropped in seen:
            return seen[dropped]
        fam = fams[dropped] = RematFamily(costs, masks, graph, dropped, impure, like=template,
                                          keep_output=opts.keep_output, exact=exact)
        if memory_centric:
            bound = floors[cur] * (1 + 1e-3) if cur in floors and np.isfinite(floors[cur]) else None
            floor = floors[dropped] = least_budget(fam, below=bound)
            kept = float(min_kept(fam, floor)[-1]) if np.isfinite(floor) else np.inf
            seen[dropped] = (_sig(floor), _sig(kept)) if np.isfinite(kept) else None
            return seen[dropped]
        cand = solve(fam, opts.budget_bytes, opts.time_steps)
        seen[dropped] = None if cand is None else _score(cand, sum(_kept_bytes(fam, cand.chain)), False)
        if cand is not None:
            found[dropped] = cand
        return seen[dropped]

    def candidate(dropped: frozenset[int]) -> Candidate | None:
        if dropped not in found:
            fam = fams[dropped]
            found[dropped] = solve(fam, floors[dropped], opts.time_steps)
        return found[dropped]

    cur = frozenset()
    if run(frozenset()) is None:       # plan_remat answers this with the least-memory plan
        raise BudgetError(f"no chain fits the DP budget {format_bytes(opts.budget_bytes or 0)}",
                          budget_bytes=int(opts.budget_bytes or 0), min_feasible_bytes=0)
    cur, recent = frozenset(), frozenset()     # recent: dropped by the last move, tried back next round
    accepted, why = [candidate(cur)], f"{opts.max_rounds} rounds done"
    for _ in range(opts.max_rounds):
        fam = RematFamily(costs, masks, graph, cur, impure, like=template, keep_output=opts.keep_output, exact=exact)
        kept = _kept_nodes(fam, candidate(cur).chain)
        adds = sorted((u for u in kept if u in droppable and u not in cur),
                      key=lambda u: -costs.out_b[u])[:opts.candidates_per_round]
        groups = []
        for u in adds:                       # u with the same-resolution ancestors its rebuild re-runs
            walk = fam.closure(0, u)
            group = frozenset(w for w in range(costs.n) if walk is not None and walk[0] >> w & 1) & droppable
            if len(group) > 1:
                groups.append(cur | group)
        moves = list(dict.fromkeys([cur | {u} for u in adds] + groups + [cur - {u} for u in sorted(recent)]))
        scored = []
        for d in moves:
            if time.perf_counter() > deadline:
                why = "time limit"
                break
            sc = run(d)
            if sc is not None and sc < seen[cur]:
                scored.append((sc, d))
        best = None
        for _, d in sorted(scored, key=lambda t: t[0]):   # the best move whose chain the time DP can represent
            if candidate(d) is not None:
                best = d
                break
            seen[d] = None
        if best is None:
            why = why if why == "time limit" else "no move improves the plan"
            break
        recent = (best - cur) | (recent & best)
        cur = best
        accepted.append(candidate(cur))
        if why == "time limit":
            break
    taken = {c.dropped for c in accepted}
    ranked = sorted((d for d in seen if seen[d] is not None and d not in taken), key=lambda d: seen[d])
    extras = [c for c in (candidate(d) for d in ranked[:opts.extra_rated]) if c is not None]
    return accepted, extras, why


def _kept_bytes(fam: RematFamily, chain: tuple[int, ...]) -> list[float]:
    """Bytes each block of the chain keeps."""
    pos = {m: i for i, m in enumerate(fam.masks)}
    out, a = [], 0
    for m in chain:
        tr = fam.transitions(a)
        out.append(float(tr.keep_b[int(np.nonzero(tr.targets == pos[m])[0][0])]))
        a = pos[m]
    return out


def _kept_nodes(fam: RematFamily, chain: tuple[int, ...]) -> list[int]:
    """Nodes the chain keeps (boundaries some backward needs, not dropped)."""
    out, prev = [], 0
    for m in chain:
        bnd = fam.base.boundary(m) & m & ~prev
        out += [x for x in range(fam.base.n) if bnd >> x & 1 and fam.cz.needed_b[x] > 0]
        prev = m
    return out


def calibrated_budget(graph: MemGraph, costs: CostArrays, masks: list[int], opts: RematOptions,
                      rounds: int = 4) -> int:
    """The DP budget whose Kusumoto chain simulates closest under ``opts.budget_bytes`` (the cost model is
    pessimistic by a few percent): moved by the simulation's error, as memplan.plan calibrates."""
    budget = int(opts.budget_bytes)
    fam = RematFamily(costs, masks, graph, frozenset(), frozenset(),     # D = {}: Kusumoto's chain, remat's costs
                      keep_output=opts.keep_output)
    target, best, best_time, last = budget, None, float("inf"), None
    for _ in range(rounds):
        result = least_time(fam, float(target), time_steps=opts.time_steps * TIME_HEADROOM)
        if result is None or result.chain == last:
            break
        last = result.chain
        plan = Plan(segments=fam.segments(graph, result.chain), predicted_peak_bytes=0, predicted_overhead=0.0,
                    vanilla_peak_bytes=0, budget_bytes=budget, objective="time-centric", method="remat",
                    method_reason="calibration", lower_set_count=None, fingerprint=graph.fingerprint(),
                    optimizer=opts.optimizer, static_bytes=costs.static_bytes, planning_time_s=0.0)
        sim = simulate_step(rewrite(graph, plan), opts.example_inputs, loss_fn=opts.loss_fn, optimizer=opts.optimizer,
                            scratch=opts.scratch, amp=opts.amp, keep_output=opts.keep_output,
                            threads=opts.threads).peak_bytes
        if sim <= budget:
            if best is not None and result.time >= best_time:
                break                                   # loosening stopped paying
            best, best_time = target, result.time
            if budget - sim < 0.01 * budget:
                break
            target += budget - sim
        elif best is not None:
            break
        else:
            target -= sim - budget
    return int(best if best is not None else budget)


def plan_for_dropped(graph: MemGraph, dropped, options: RematOptions) -> Plan:
    """The DP's best chain for a given set of dropped node names (no search, no simulation): for
    hand-made schedules and for checking the planner.

    >>> import torch, memplan
    >>> net = torch.nn.Sequential(torch.nn.Conv1d(1, 2, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv1d(2, 1, 1))
    >>> g = memplan.trace(net, torch.empty(1, 1, 64, device="meta"))
    >>> p = plan_for_dropped(g, ["_1"], RematOptions(optimizer="sgd", keep_output=False))
    >>> [(s.nodes, s.recompute, s.kept, s.rebuilt) for s in p.segments]   # _1 is never kept: rebuilt for _2
    [(('_0', '_1'), True, (), ()), (('_2',), True, ('_2',), ('_1',))]
    >>> p = plan_for_dropped(g, ["_1"], RematOptions(optimizer="sgd"))   # output held: one segment is cheaper
    >>> [(s.nodes, s.recompute, s.kept, s.rebuilt) for s in p.segments]
    [(('_0', '_1', '_2'), True, ('_2',), ())]
    """
    names = list(dropped)
    allowed = droppable_nodes(graph)
    bad = [n for n in names if n not in allowed]
    if bad:
        raise MemplanError(f"nodes {bad} cannot be dropped (not in the graph, a graph output, a view, in place, "
                           f"random or unread); droppable nodes are e.g. {sorted(allowed)[:5]}")
    costs = build_costs(graph, optimizer=options.optimizer,
                        scratch={i.name: i.scratch_cpu_bytes for i in graph} if options.scratch == "cpu" else None)
    masks, kind, why, count = lower_set_masks(graph, options.lower_set_bound)
    impure = frozenset(graph.index(n) for n in impure_nodes(graph))
    fam = RematFamily(costs, masks, graph, frozenset(graph.index(n) for n in names), impure,
                      keep_output=options.keep_output)
    cand = solve(fam, options.budget_bytes, options.time_steps)
    if cand is None:
        raise BudgetError(f"no chain with dropped {names} fits {format_bytes(options.budget_bytes or 0)}; "
                          "raise the budget or drop other nodes", budget_bytes=int(options.budget_bytes or 0),
                          min_feasible_bytes=int(least_budget(fam)))
    fwd = float(costs.flops.sum()) or 1.0
    return Plan(segments=fam.segments(graph, cand.chain), predicted_peak_bytes=int(cand.peak_b),
                predicted_overhead=cand.time / fwd, vanilla_peak_bytes=0, budget_bytes=options.budget_bytes,
                objective="memory-centric" if options.budget_bytes is None else "time-centric", method="remat",
                method_reason=f"given dropped nodes {names}; Kusumoto DP ({kind}, {why})", lower_set_count=count,
                fingerprint=graph.fingerprint(), optimizer=options.optimizer, static_bytes=costs.static_bytes,
                planning_time_s=0.0, notes=graph.trace_notes)


def rebuild_notes(graph: MemGraph, segments: tuple[Segment, ...]) -> tuple[str, ...]:
    """One line per segment that rebuilds inputs: what, from which held tensors, how many nodes re-run."""
    out = []
    for s in segments:
        if s.rebuilt:
            inside = set(s.rebuild)
            sources = sorted({p for r in s.rebuild for p in graph.dag.predecessors(r) if p not in inside}
                             | ({"the graph input"} if any(graph.dag.in_degree(r) == 0 for r in s.rebuild) else set()))
            out.append(f"segment {s.index} does not hold {', '.join(s.rebuilt)}: rebuilt in backward from "
                       f"{', '.join(sources)} ({len(s.rebuild)} nodes re-run under no_grad)")
    return tuple(out)


def least_memory_within(graph: MemGraph, options: RematOptions) -> Plan:
    """When the cost model finds no chain under the budget: of the least-memory search's candidates, the
    least recompute that simulates within it (the cost model is pessimistic), else a BudgetError."""
    least = plan_remat(graph, dataclasses.replace(options, budget_bytes=None), fit_bytes=options.budget_bytes)
    reach = least.simulated_peak_bytes if least.simulated_peak_bytes is not None else least.predicted_peak_bytes
    if reach > options.budget_bytes:
        raise BudgetError(
            f"budget {format_bytes(options.budget_bytes)} is below the smallest peak the remat planner reaches, "
            f"{format_bytes(reach)} (optimizer {options.optimizer}); raise the budget to at least "
            f"{format_bytes(reach)}, use a smaller input or batch, or a lighter optimizer",
            budget_bytes=int(options.budget_bytes), min_feasible_bytes=int(reach))
    return dataclasses.replace(least, budget_bytes=options.budget_bytes, objective="time-centric",
                               notes=least.notes + ("budget below the cost model's floor; the least-memory "
                                                    "remat plan meets it in simulation",))


def plan_remat(graph: MemGraph, options: RematOptions, *, fit_bytes: int | None = None) -> Plan:
    """Plan ``graph`` with dropped tensors: least memory without a budget, else least recompute under it.

    Every accepted candidate is rated by simulate_step when ``options.example_inputs`` are given;
    the plan's method_reason says which candidate won and why (or that Kusumoto's chain did). With
    ``fit_bytes`` (and no budget), the least-recompute candidate simulating within it wins instead.
    """
    t0 = time.perf_counter()
    scratch = {i.name: i.scratch_cpu_bytes for i in graph} if options.scratch == "cpu" else None
    costs = build_costs(graph, optimizer=options.optimizer, scratch=scratch)
    masks, family_kind, family_why, count = lower_set_masks(graph, options.lower_set_bound)
    impure = frozenset(graph.index(n) for n in impure_nodes(graph))
    internal = options
    if options.budget_bytes is not None and options.example_inputs:
        internal = dataclasses.replace(options, budget_bytes=calibrated_budget(graph, costs, masks, options))
    try:
        accepted, extras, stop = greedy(graph, costs, masks, internal,
                                        t0 + (0.45 if options.example_inputs else 0.7) * options.time_limit_s)
    except BudgetError:
        if options.budget_bytes is None:
            raise
        return least_memory_within(graph, options)
    coarse: list[Candidate] = []
    coarse_stop = "not run (no example inputs to rate it, or no time left)"
    if options.example_inputs and time.perf_counter() < t0 + 0.5 * options.time_limit_s:
        # the greedy is a heuristic: the coarser model's path can reach a D the exact one's never tries;
        # its candidates are re-solved under the exact model and the simulator rates both
        try:
            got, got_extras, coarse_stop = greedy(graph, costs, masks, internal, t0 + 0.6 * options.time_limit_s,
                                                  exact=False)
        except BudgetError:
            got, got_extras, coarse_stop = [], [], "no chain fits the budget"
        for c in got[1:][::-1] + got_extras:
            fam = RematFamily(costs, masks, graph, c.dropped, impure, keep_output=options.keep_output)
            coarse.append(solve(fam, internal.budget_bytes, options.time_steps) or c)
    looser: list[Candidate] = []
    if options.budget_bytes is not None and options.example_inputs:
        # the model errs by tenths of a percent near the budget: chains solved a little above the DP's
        # budget (for D = {} and the greedy's last D) may still simulate within it, with less recompute
        for d in dict.fromkeys([frozenset(), accepted[-1].dropped]):
            fam = RematFamily(costs, masks, graph, d, impure, keep_output=options.keep_output)
            looser += [c for f in LOOSER_BUDGETS if (c := solve(fam, internal.budget_bytes * f, options.time_steps))]
    split: list[Candidate] = []
    if options.budget_bytes is None:
        # the DP charges a rebuild source twice when an earlier block keeps it, and sees one peak only:
        # the best chains split further where that lowers their blocks' peaks (rated like the rest)
        for c in list({c.dropped: c for c in coarse[:1] + accepted[-1:]}.values())[::-1]:
            fam = RematFamily(costs, masks, graph, c.dropped, impure, keep_output=options.keep_output)
            ch = split_chain(fam, c.chain, deadline=max(t0 + 0.7 * options.time_limit_s,
                                                            time.perf_counter() + 0.1 * options.time_limit_s))
            if ch != c.chain:
                split.append(Candidate(dropped=c.dropped, chain=ch, peak_b=max(fam.chain_peaks(ch)),
                                       time=fam.chain_cost(ch)[1], budget_b=c.budget_b))
    vanilla_chain = tuple((1 << (i + 1)) - 1 for i in range(len(graph)))
    from .costmodel import chain_cost
    vanilla_peak = chain_cost(costs, list(vanilla_chain))[0]

    def to_plan(cand: Candidate) -> Plan:
        fam = RematFamily(costs, masks, graph, cand.dropped, impure, keep_output=options.keep_output)
        fwd = float(costs.flops.sum()) or 1.0
        segments = fam.segments(graph, cand.chain)
        t = fam.chain_cost(cand.chain)[1]
        peak = max(fam.chain_peaks(cand.chain))
        return Plan(segments=segments, predicted_peak_bytes=int(peak),
                    predicted_overhead=t / fwd, vanilla_peak_bytes=int(vanilla_peak),
                    budget_bytes=options.budget_bytes,
                    objective="memory-centric" if options.budget_bytes is None else "time-centric",
                    method="remat", method_reason="", lower_set_count=count, fingerprint=graph.fingerprint(),
                    optimizer=options.optimizer, static_bytes=costs.static_bytes, planning_time_s=0.0,
                    notes=graph.trace_notes + rebuild_notes(graph, segments))

    vanilla_sim = None
    if options.example_inputs:
        def sim(c: Candidate) -> int:
            return simulate_step(rewrite(graph, to_plan(c)), options.example_inputs, loss_fn=options.loss_fn,
                                 optimizer=options.optimizer, scratch=options.scratch, amp=options.amp,
                                 keep_output=options.keep_output, threads=options.threads).peak_bytes

        # rated first: D = {} and the greedy's last accepted (always), its chain split further, the coarser
        # path's last; then the latest accepted first, then the extras: all but the first three while one more
        # simulation fits in the time limit (a loaded machine plans longer by at most three simulations)
        first = ([accepted[0], accepted[-1]] if len(accepted) > 1 else accepted[:1]) + split + coarse[:1]
        rest = looser + accepted[1:-1][::-1] + extras + coarse[1:]
        unique = list({(c.dropped, c.chain): c for c in first + rest}.values())   # first occurrence wins
        n_first = len({(c.dropped, c.chain) for c in first})
        rated_first, rest = unique[:n_first], unique[n_first:]
        t_sim = time.perf_counter()
        vanilla_sim = simulate_step(graph.original_gm, options.example_inputs, loss_fn=options.loss_fn,
                                    optimizer=options.optimizer, scratch=options.scratch, amp=options.amp,
                                    keep_output=options.keep_output, threads=options.threads).peak_bytes
        longest = time.perf_counter() - t_sim
        sims = []
        always = min(2 + len(split[:1]), len(rated_first))
        for i, c in enumerate(rated_first + rest):
            if i >= always and time.perf_counter() + longest > t0 + options.time_limit_s:
                break
            t_sim = time.perf_counter()
            sims.append(sim(c))
            longest = max(longest, time.perf_counter() - t_sim)
        accepted = (rated_first + rest)[:len(sims)]
        plans = [to_plan(c) for c in accepted]
        plans = [with_simulation(p, s, vanilla_sim) for p, s in zip(plans, sims)]
        limit = options.budget_bytes if options.budget_bytes is not None else fit_bytes
        fits = [i for i in range(len(plans)) if limit is not None and sims[i] <= limit]
        if not fits:
            pick = min(range(len(plans)), key=lambda i: (sims[i], plans[i].predicted_overhead))
        else:
            pick = min(fits, key=lambda i: plans[i].predicted_overhead) if fits else 0
        rated = "simulated"
    else:
        accepted = accepted + split[-1:]           # the split of the greedy's last chain: lower block peaks
        plans = [to_plan(c) for c in accepted]
        pick, rated = len(plans) - 1, "cost model"
    chosen = accepted[pick]
    names = [graph.order[u] for u in sorted(chosen.dropped)]
    if not chosen.dropped:
        why = (f"remat planner fell back to Kusumoto's chain (no dropped tensor helped, {rated}"
               f"{'' if pick == 0 else '; solved at a looser DP budget, within the budget in simulation'}; "
               f"greedy stopped: {stop}; coarser model's path: {coarse_stop})")
    else:
        why = (f"remat: Kusumoto DP ({family_kind}, {family_why}) with {len(names)} dropped tensor(s) "
               f"({', '.join(names[:4])}{' ...' if len(names) > 4 else ''}), best of {len(plans)} "
               f"greedy candidates by {rated} peak; greedy stopped: {stop}; coarser model's path: {coarse_stop}")
    if any(chosen is c for c in split):
        why += f"; chain split further where that lowers block peaks ({len(chosen.chain)} blocks)"
    return dataclasses.replace(plans[pick], method_reason=why, planning_time_s=time.perf_counter() - t0)
