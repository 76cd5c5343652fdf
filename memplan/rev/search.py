"""REV planning: which Conv-BN-ReLU passes become reversible blocks, decided with the GCP plan.

FetusMapV2 §3.1: (1) a Kusumoto GCP plan of the network; (2) the REV-eligible passes; (3) for each
pass in graph order, replace it when the converted partition stays valid and the peak drops (the
pass leaves its segments, the block becomes a singleton segment). memplan then goes further: the DP
re-plans GCP on the substituted graph (REV nodes pinned, and unpinned: a block whose input is kept
anyway may be recomputed), and a joint search toggles each pass in or out with a DP re-plan each.

Every configuration is first rated by the cost model (a block that frees its input keeps nothing of
it; its backward's F and G need working memory); only the best ``FINALISTS`` are simulated, and the
one ruler (``simulate_step`` of the rewritten module) decides. Where the ruler shows REV paying, one
more toggle search runs rated by simulation (the cost model misplaces some peaks). REV changes the network, so it is taken only when it lowers the simulated peak
(or, under a budget, the recompute) by at least ``options.rev_min_gain`` (1%); otherwise the plan is the GCP plan
and its notes say what REV would have reached.

A block frees its input only when nothing else reads that storage before the block's backward
refills it: no graph input, no other user, the block not inside a checkpointed segment, and every
op that saved the input for backward is recomputed (inside a checkpointed segment) or is another
replaced block (:func:`free_input_flags`).

Example (a chain of C -> C layers after a stem; each block frees its input, so REV-only holds one
activation however deep; a layer's parameters go from C*C*K + 3C to C*C*K/2 + 2C)::

    >>> import torch
    >>> from torch import nn
    >>> cbr = lambda: [nn.Conv3d(4, 4, 3, padding=1), nn.BatchNorm3d(4), nn.ReLU()]
    >>> net = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), *cbr(), *cbr(), *cbr())
    >>> plan, graph = rev_only_plan(net, torch.empty(2, 1, 16, 16, 16, device="meta"), scratch="none")
    >>> [(r.name, r.params_before, r.params_after, r.seed) for r in plan.rev]
    [('1', 444, 224, 0), ('4', 444, 224, 0), ('7', 444, 224, 0)]
    >>> plan.simulated_peak_bytes < plan.simulated_vanilla_peak_bytes
    True
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
from torch import nn

from .._meta import as_tuple
from ..analyze import analyze, at_precision
from ..calibrate import bytes_pair, simulated_peak
from ..costmodel import CostArrays, build_costs, chain_cost, node_scratch
from ..errors import BudgetError, PlanMismatchError
from ..graph import DEFAULT_LOWER_SET_BOUND, MemGraph
from ..kusumoto import dp_plan, plan_kusumoto
from ..options import Objective, PlanOptions, plan_options
from ..plan import Plan, RevReplacementRecord, chain_to_segments, graph_part, stamped
from ..rewrite import rewrite
from ..trace import register_leaf, trace
from ..units import format_bytes
from .block import is_reversible_leaf
from .substitution import RevCandidate, check_output_shapes, find_rev_candidates, substitute_rev

__all__ = ["FINALISTS", "REV_MIN_GAIN", "REV_SEED", "RevComparison", "RevOutcome", "chain_violation", "compare_rev",
           "convert_partition", "estimate_rev_reach", "free_input_flags", "plan_rev", "plan_rev_only", "plan_with_rev", "rebuild_rev_graph",
           "rev_only_plan"]

register_leaf(is_reversible_leaf)  # a substituted network re-traced keeps each block as one node

#: Default seed of the fresh F/G weights; each RevReplacementRecord carries the one used.
REV_SEED = 0
#: REV changes the network: by default it is taken only for at least this gain (fraction of the GCP
#: peak, or of forward FLOPs recomputed under a budget); PlanOptions.rev_min_gain.
REV_MIN_GAIN = PlanOptions.rev_min_gain
#: How many configurations, best by the cost model first, are simulated.
FINALISTS = 3


@dataclass(frozen=True)
class RevOutcome:
    """One rated configuration: which passes are replaced, the plan of the substituted graph, its peaks."""
    label: str
    names: tuple[str, ...]                 # candidate names substituted, graph order
    free_input: tuple[tuple[str, bool], ...]
    modules: tuple[tuple[str, str], ...]   # candidate name -> the new block's module path
    plan: Plan
    graph: MemGraph = dataclasses.field(repr=False, compare=False)
    predicted_peak_bytes: int              # cost model
    simulated_peak_bytes: int | None       # the ruler; None until simulated
    overhead: float                        # (GCP recompute + REV rebuild FLOPs) / forward FLOPs
    replanned: bool = False                # a DP re-plan (calibrated again under a budget when simulated)
    pinned: bool = True                    # REV nodes kept out of checkpointed segments by that re-plan

    @property
    def peak_bytes(self) -> int:
        """The simulated peak once known, else the cost model's."""
        return self.predicted_peak_bytes if self.simulated_peak_bytes is None else self.simulated_peak_bytes


@dataclass(frozen=True)
class _Context:
    """What every trial shares: the traced original, its candidates, and the options."""
    graph: MemGraph
    candidates: tuple[RevCandidate, ...]
    options: PlanOptions

    def chosen(self, names: Sequence[str]) -> list[RevCandidate]:
        wanted = set(names)
        return [c for c in self.candidates if c.name in wanted]

    def substitute(self, names: Sequence[str], flags: Mapping[str, bool] | None = None
                   ) -> tuple[MemGraph, list[RevReplacementRecord], dict[str, str]]:
        """The substituted graph (analysed), what was replaced, and candidate name -> REV node name."""
        cands = self.chosen(names)
        free = {c.name: bool((flags or {}).get(c.name, False)) for c in cands}
        gm, reps = substitute_rev(self.graph.gm, cands, seed=self.options.rev_seed, free_input=free)
        graph = analyze(gm, self.options.example_inputs, tracer=self.graph.tracer, notes=self.graph.trace_notes,
                        amp=self.graph.amp)       # at the precision of the facts the context plans on
        check_output_shapes(self.graph, graph)
        node_of = {str(n.target): n.name for n in gm.graph.nodes if n.op == "call_module"}
        return graph, reps, {r.name: node_of[r.new_module] for r in reps}

    def costs(self, graph: MemGraph, pinned: frozenset[str], freed: frozenset[str] = frozenset(),
              rev_nodes: frozenset[str] = frozenset()) -> CostArrays:
        """Cost vectors of a substituted graph. A storage a block frees after forward is kept by nobody;
        a block's backward re-runs F and G with autograd on C/2 channels: at their BatchNorm backward the
        conv and ReLU outputs and two gradients are alive, four halves of the block's output, so twice its
        output's bytes of working memory on top of the cost model's."""
        o = self.options
        costs = build_costs(graph, optimizer=o.optimizer.value, scratch=node_scratch(graph, o.scratch.value),
                            times=o.times, pinned=pinned)
        freed_mask = np.array([name in freed for name in graph.order], dtype=bool)
        rev_mask = np.array([name in rev_nodes for name in graph.order], dtype=bool)
        return dataclasses.replace(costs, needed_b=np.where(freed_mask, 0.0, costs.needed_b),
                                   scratch_b=costs.scratch_b + np.where(rev_mask, 2 * costs.out_b, 0.0))

    def simulate(self, module: nn.Module) -> int:
        return simulated_peak(module, self.options)


# ---------------------------------------------------------------------------------------------
# The paper's conversion G_S -> G'_S and the free-input rule
# ---------------------------------------------------------------------------------------------

def convert_partition(segments: Sequence[Sequence[str]], order: Sequence[str], candidates: Sequence[RevCandidate],
                      rev_node: Mapping[str, str]) -> list[tuple[str, ...]]:
    """FetusMapV2's G'_S: each candidate's nodes leave their segments and its REV node becomes a singleton
    segment. The segment holding the candidate's ReLU splits where the block sits in ``order`` (the
    original graph's fx order; the block takes its conv's place): the nodes before it, the block, the
    rest. Every prefix stays a lower set and the split segment keeps fx order.

    >>> c = type("C", (), {"name": "p", "conv_node": "conv", "bn_node": "bn", "relu_node": "relu"})
    >>> convert_partition([("a",), ("d", "conv", "bn", "c", "relu", "b")], ["a", "d", "conv", "bn", "c", "relu", "b"],
    ...                   [c], {"p": "rev"})
    [('a',), ('d',), ('rev',), ('c', 'b')]
    """
    position = {name: i for i, name in enumerate(order)}
    segs = [list(s) for s in segments]
    for c in candidates:
        removed = {c.conv_node, c.bn_node, c.relu_node}
        k = next(i for i, s in enumerate(segs) if c.relu_node in s)
        at = position[c.conv_node]
        kept = [n for n in segs[k] if n not in removed]
        pre = [n for n in kept if n in position and position[n] < at]
        post = [n for n in kept if n not in position or position[n] > at]
        segs = [[n for n in s if n not in removed] for s in segs[:k]] + [pre, [rev_node[c.name]], post] + segs[k + 1:]
    return [tuple(s) for s in segs if s]


def chain_violation(graph: MemGraph, segments: Sequence[Sequence[str]]) -> str:
    """'' when the segments partition ``graph``, every prefix is a lower set, and no prefix reorders the
    readers of a value read 3 or more times (their gradient sum would round differently); else why not."""
    seen: set[str] = set()
    groups = graph.consumer_groups()
    for i, seg in enumerate(segments):
        seen |= set(seg)
        for name in seg:
            missing = [p for p in graph.dag.predecessors(name) if p not in seen]
            if missing:
                return f"segment {i} runs {name} before its input {missing[0]}"
        if seen <= set(graph.order) and not graph.order_compatible(graph.mask_of(seen), groups):
            return f"segment {i} would reorder the gradient sum of a value read 3 or more times"
    if seen != set(graph.order) or sum(map(len, segments)) != len(graph):
        return "the segments do not partition the graph's nodes"
    return ""


def free_input_flags(candidates: Sequence[RevCandidate], plan: Plan,
                     rev_nodes: Mapping[str, str] | None = None) -> dict[str, bool]:
    """Per substituted candidate: may its block free its input under ``plan``?

    Yes when the input is no graph input, has no other user, and every node that keeps it (saved it
    for backward) runs inside a recomputed segment (its saved copy is rebuilt by the checkpoint) or
    is another substituted block (which reads it after this block refilled it). Never when the block
    itself (``rev_nodes``: candidate name -> REV node name) runs inside a recomputed segment.
    """
    recomputed = {n for s in plan.segments if s.recompute for n in s.nodes}
    refillers = {c.output_node for c in candidates}
    inside = {name for name, node in (rev_nodes or {}).items() if node in recomputed}
    return {c.name: (c.name not in inside and not c.input_is_graph_input and not c.input_has_other_users
                     and all(k in refillers or k in recomputed for k in c.input_kept_by))
            for c in candidates}


def _freed_nodes(candidates: Sequence[RevCandidate], flags: Mapping[str, bool], rev_node: Mapping[str, str]
                 ) -> frozenset[str]:
    """Nodes of the substituted graph whose storage a block frees after forward (an input that is
    another replaced pass's output is that pass's REV node)."""
    by_output = {c.output_node: rev_node[c.name] for c in candidates}
    return frozenset(by_output.get(c.input_node, c.input_node) for c in candidates if flags.get(c.name))


# ---------------------------------------------------------------------------------------------
# Rating configurations by the cost model
# ---------------------------------------------------------------------------------------------

def _plan_from_segments(ctx: _Context, graph: MemGraph, segments: Sequence[Sequence[str]], base: Plan,
                        costs: CostArrays) -> Plan:
    """``base`` re-expressed on ``graph`` with the given node segments (cost-model figures)."""
    chain, acc = [], 0
    for seg in segments:
        acc |= graph.mask_of(seg)
        chain.append(acc)
    peak, recompute_flops = chain_cost(costs, chain)
    return dataclasses.replace(
        base, segments=chain_to_segments(graph, costs, tuple(chain)), predicted_peak_bytes=int(peak),
        predicted_overhead=recompute_flops / (float(costs.flops.sum()) or 1.0), fingerprint=graph.fingerprint(),
        static_bytes=costs.static_bytes, simulated_peak_bytes=None)


def _overhead(graph: MemGraph, plan: Plan, rev_nodes: Sequence[str]) -> float:
    """Recomputed FLOPs (checkpointed segments, plus one F and G evaluation per REV block) / forward FLOPs."""
    recomputed = sum(s.flops for s in plan.segments if s.recompute)
    rebuilt = sum(graph.info(n).flops for n in rev_nodes)
    return (recomputed + rebuilt) / (graph.total_flops or 1)


def _rate(ctx: _Context, label: str, names: Sequence[str], segments: Sequence[Sequence[str]], base: Plan
          ) -> RevOutcome | str:
    """Substitute ``names``, lay ``segments`` on the result, decide free_input, rate by the cost model; or why not."""
    graph, reps, rev_node = ctx.substitute(names)
    pinned = frozenset(rev_node.values())
    segs = convert_partition(segments, ctx.graph.order, ctx.chosen(names), rev_node) if names else list(segments)
    why = chain_violation(graph, segs)
    if why:
        return why
    plan = _plan_from_segments(ctx, graph, segs, base, ctx.costs(graph, pinned, rev_nodes=frozenset(rev_node.values())))
    flags = free_input_flags(ctx.chosen(names), plan, rev_node)
    return _finish(ctx, label, names, flags, graph, plan, reps, rev_node, pinned)


def _finish(ctx: _Context, label: str, names: Sequence[str], flags: Mapping[str, bool], graph: MemGraph,
            plan: Plan, reps: Sequence[RevReplacementRecord], rev_node: Mapping[str, str], pinned: frozenset[str],
            *, replanned: bool = False, pin: bool = True) -> RevOutcome:
    """Re-analyse with the free_input flags (when any is set) and rate the result by the cost model."""
    if any(flags.values()):
        graph, _, _ = ctx.substitute(names, flags)
    freed = _freed_nodes(ctx.chosen(names), flags, rev_node)
    plan = _plan_from_segments(ctx, graph, [s.nodes for s in plan.segments], plan,
                               ctx.costs(graph, pinned, freed, frozenset(rev_node.values())))
    if any(flags.values()):
        again = free_input_flags(ctx.chosen(names), plan, rev_node)
        if again != dict(flags):
            raise AssertionError(f"free_input flags changed when the graph was re-analysed: {dict(flags)} -> {again}")
    return RevOutcome(label=label, names=tuple(names), free_input=tuple(sorted(flags.items())),
                      modules=tuple((r.name, r.new_module) for r in reps), plan=plan, graph=graph,
                      predicted_peak_bytes=int(plan.predicted_peak_bytes), simulated_peak_bytes=None,
                      overhead=_overhead(graph, plan, list(rev_node.values())), replanned=replanned, pinned=pin)


def _greedy(ctx: _Context, start: RevOutcome, label: str) -> tuple[RevOutcome, list[str]]:
    """FetusMapV2 step 3 by the cost model: each candidate in graph order, on top of those accepted, kept
    when the converted partition is valid and the predicted peak does not rise. The result and a line
    per rejection."""
    best, log = start, []
    segments = [s.nodes for s in start.plan.segments]
    base = start.plan
    for c in ctx.candidates:
        trial = _rate(ctx, label, [*best.names, c.name], segments, base)
        if isinstance(trial, str):
            log.append(f"REV {c.name} not replaced: the converted partition is invalid ({trial})")
        elif trial.predicted_peak_bytes <= best.predicted_peak_bytes:
            best = trial                     # ties too: a chain of blocks pays off only together
        else:
            log.append(f"REV {c.name} not replaced: the cost model's peak would not drop "
                       f"({format_bytes(best.predicted_peak_bytes)} -> {format_bytes(trial.predicted_peak_bytes)})")
    return best, log


def _joint(ctx: _Context, names: Sequence[str], *, pin: bool, calibrate: bool, label: str) -> RevOutcome | str:
    """Re-plan GCP with the DP on the substituted graph, then set free_input from the plan. With ``pin``
    the REV nodes are never recomputed; without, a block the DP puts in a checkpointed segment keeps
    its input. The DP sees every input kept (no block frees), so it is conservative. ``calibrate``: under
    a budget, the DP's budget is calibrated by simulation (memplan.calibrate)."""
    graph, reps, rev_node = ctx.substitute(names)
    pinned = frozenset(rev_node.values()) if pin else frozenset()
    opts = dataclasses.replace(ctx.options, method=ctx.options.dp.value, pinned=pinned, simulate=calibrate)
    try:
        plan = plan_kusumoto(graph, opts)
    except BudgetError as err:
        if calibrate:
            return f"does not fit: {str(err).splitlines()[0]}"
        plan = dp_plan(graph, dataclasses.replace(opts, budget_bytes=None))   # freeing inputs may still fit
    flags = free_input_flags(ctx.chosen(names), plan, rev_node)
    return _finish(ctx, label, names, flags, graph, plan, reps, rev_node, pinned, replanned=True, pin=pin)


def _ranking(budget: int | None) -> Callable[[RevOutcome], tuple]:
    """Sort key: lowest peak (then overhead); under a budget, fitting plans first by least overhead."""
    if budget is None:
        return lambda o: (o.peak_bytes, o.overhead)
    return lambda o: (0, o.overhead, o.peak_bytes) if o.peak_bytes <= budget else (1, o.peak_bytes, o.overhead)


def _better(ctx: _Context, o: RevOutcome, than: RevOutcome) -> bool:
    """Whether ``o`` rates better than ``than`` by more than the cost model's noise: a tenth of the gain REV
    must bring (``rev_min_gain``) in peak, or under a budget that both meet, in recompute."""
    eps, budget = ctx.options.rev_min_gain / 10, ctx.options.budget_bytes
    if budget is not None and o.peak_bytes <= budget and than.peak_bytes <= budget:
        return o.overhead < than.overhead - eps
    if budget is not None and (o.peak_bytes <= budget) != (than.peak_bytes <= budget):
        return o.peak_bytes <= budget
    return o.peak_bytes < (1 - eps) * than.peak_bytes


def _fmt(o: RevOutcome) -> str:
    if o.simulated_peak_bytes is None:
        return f"cost model {format_bytes(o.predicted_peak_bytes)}, overhead {o.overhead:.1%}"
    return (f"simulated {format_bytes(o.simulated_peak_bytes)} ({o.simulated_peak_bytes} B; cost model "
            f"{format_bytes(o.predicted_peak_bytes)}), overhead {o.overhead:.1%}")


def _joint_stage(ctx: _Context, heuristic: RevOutcome) -> tuple[list[RevOutcome], list[str]]:
    """The heuristic's set re-planned by the DP with REV pinned, and unpinned; then (``rev_search``) each
    candidate in graph order toggled in or out of the set, re-planned the better way, kept when it
    rates better than the best so far (the heuristic's at first). All by the cost model. The outcomes
    and a note per figure."""
    rank = _ranking(ctx.options.budget_bytes)
    names = heuristic.names
    done: dict[bool, RevOutcome] = {}
    notes = []
    for pin in (True, False) if names else ():
        label = f"joint re-plan ({'REV pinned' if pin else 'REV may be recomputed'}, {len(names)} REV)"
        o = _joint(ctx, names, pin=pin, calibrate=False, label=label)
        notes.append(f"{label}: " + (_fmt(o) if isinstance(o, RevOutcome) else o))
        if isinstance(o, RevOutcome):
            done[pin] = o
    if not names:
        notes.append("joint re-plan: not run (the heuristic replaced nothing)")
    best = min([heuristic, *done.values()], key=rank)
    found = list(done.values())
    if ctx.options.rev_search:
        pin = best.pinned
        current = set(names)
        for c in ctx.candidates:
            trial = [d.name for d in ctx.chosen(current ^ {c.name})]
            if not trial:
                continue
            o = _joint(ctx, trial, pin=pin, calibrate=False, label=f"joint search ({len(trial)} REV)")
            if isinstance(o, RevOutcome) and _better(ctx, o, best):
                best, current = o, set(trial)
                found.append(o)
        notes.append(f"joint search (a DP re-plan per candidate toggled): {len(found) - len(done)} improvement(s)"
                     + (f", best {len(best.names)} REV: {_fmt(best)}" if best in found[len(done):] else ""))
    return found, notes


# ---------------------------------------------------------------------------------------------
# Finalists: simulated, and REV taken only for a real gain
# ---------------------------------------------------------------------------------------------

def _simulated(ctx: _Context, o: RevOutcome) -> RevOutcome | str:
    """``o`` rated by the ruler; a DP re-plan under a budget is calibrated first."""
    if o.replanned and ctx.options.budget_bytes is not None:
        again = _joint(ctx, o.names, pin=o.pinned, calibrate=True, label=o.label)
        if isinstance(again, str):
            return again
        o = again
    sim = ctx.simulate(rewrite(o.graph, o.plan))
    return dataclasses.replace(o, simulated_peak_bytes=sim, plan=dataclasses.replace(o.plan, simulated_peak_bytes=sim))


def _finalists(ctx: _Context, outcomes: Sequence[RevOutcome]) -> tuple[list[RevOutcome], list[str]]:
    """The ``FINALISTS`` best distinct configurations by the cost model, simulated."""
    rank = _ranking(ctx.options.budget_bytes)
    seen, picked = set(), []
    for o in sorted((o for o in outcomes if o.names), key=rank):
        key = (o.names, tuple((s.nodes, s.recompute) for s in o.plan.segments), o.free_input)
        if key not in seen and len(picked) < FINALISTS:
            seen.add(key)
            picked.append(o)
    done, notes = [], []
    for o in picked:
        s = _simulated(ctx, o)
        notes.append(f"finalist {o.label}: " + (_fmt(s) if isinstance(s, RevOutcome) else s))
        if isinstance(s, RevOutcome):
            done.append(s)
    return done, notes


def _refined(ctx: _Context, start: RevOutcome) -> tuple[RevOutcome, list[str]]:
    """Where the ruler shows REV paying: one more pass over the candidates in graph order, each toggled in
    or out of ``start``'s set with a DP re-plan, rated by simulation, kept when it ranks better."""
    rank = _ranking(ctx.options.budget_bytes)
    best, tried = start, 0
    for c in ctx.candidates:
        names = [d.name for d in ctx.chosen(set(best.names) ^ {c.name})]
        if not names:
            continue
        o = _joint(ctx, names, pin=best.pinned if best.replanned else True, calibrate=False,
                   label=f"simulated search ({len(names)} REV)")
        o = _simulated(ctx, o) if isinstance(o, RevOutcome) else o
        tried += 1
        if isinstance(o, RevOutcome) and rank(o) < rank(best):
            best = o
    note = (f"simulated search ({tried} toggles of {start.label}): "
            + (_fmt(best) if best is not start else "no toggle ranked better"))
    return best, [note]


def _worth_it(ctx: _Context, rev: RevOutcome, gcp: RevOutcome) -> bool:
    """Whether REV's gain over GCP justifies changing the network (``options.rev_min_gain``)."""
    budget, gain = ctx.options.budget_bytes, ctx.options.rev_min_gain
    if budget is None:
        return rev.peak_bytes <= (1 - gain) * gcp.peak_bytes
    if rev.peak_bytes > budget:
        return False
    return gcp.peak_bytes > budget or rev.overhead <= gcp.overhead - gain


@dataclass(frozen=True)
class RevComparison:
    """Every configuration the REV planner rated, with the time each stage took."""
    gcp: RevOutcome                      # step 1: GCP only (simulated)
    heuristic: RevOutcome                # steps 2-3: FetusMapV2's greedy on the GCP partition
    joint: tuple[RevOutcome, ...]        # DP re-plans of substituted graphs
    finalists: tuple[RevOutcome, ...]    # the best of those by the cost model, simulated
    best: RevOutcome
    notes: tuple[str, ...]
    stage_time_s: tuple[tuple[str, float], ...]
    context: _Context = dataclasses.field(repr=False, compare=False)


def _context(graph: MemGraph, options: PlanOptions) -> _Context:
    return _Context(graph=graph, candidates=tuple(find_rev_candidates(graph)), options=options)


def _gcp_step(ctx: _Context) -> RevOutcome:
    """Step 1: the GCP plan of the original (time-centric under the budget when it fits, else memory-centric)."""
    opts = dataclasses.replace(ctx.options, method=ctx.options.dp.value, simulate=True, pinned=frozenset())
    try:
        plan = plan_kusumoto(ctx.graph, opts)
    except BudgetError:
        plan = plan_kusumoto(ctx.graph, dataclasses.replace(opts, budget_bytes=None))   # REV may still reach it
    return RevOutcome(label="GCP only", names=(), free_input=(), modules=(), plan=plan, graph=ctx.graph,
                      predicted_peak_bytes=int(plan.predicted_peak_bytes),
                      simulated_peak_bytes=int(plan.simulated_peak_bytes), overhead=_overhead(ctx.graph, plan, ()))


def compare_graph(graph: MemGraph, options: PlanOptions) -> RevComparison:
    """Step 1, the heuristic and the joint stage by the cost model, the finalists by the ruler; on byte
    facts at the step's precision."""
    graph = at_precision(graph, options.amp)
    times, t = [], time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal t
        times.append((stage, time.perf_counter() - t))
        t = time.perf_counter()

    ctx = _context(graph, options)
    gcp = _gcp_step(ctx)
    lap("GCP plan")
    start = dataclasses.replace(gcp, plan=_plan_from_segments(ctx, graph, [s.nodes for s in gcp.plan.segments],
                                                              gcp.plan, ctx.costs(graph, frozenset())),
                                simulated_peak_bytes=None)
    heuristic, log = _greedy(ctx, start, "FetusMapV2 heuristic")
    lap("heuristic (cost model)")
    joint, joint_notes = _joint_stage(ctx, heuristic)
    every = [c.name for c in ctx.candidates]
    unplanned = dataclasses.replace(gcp.plan, segments=(), objective="memory-centric (REV only)")
    wholes = [o for o in (_rate(ctx, "every pass, GCP partition", every, [s.nodes for s in gcp.plan.segments],
                                gcp.plan),
                          _rate(ctx, "every pass, no checkpoint (REV only)", every, [(n,) for n in graph.order],
                                unplanned)) if every and isinstance(o, RevOutcome)]
    joint_notes += [f"{o.label} ({len(o.names)} REV): {_fmt(o)}" for o in wholes]
    lap("joint re-plan (cost model)")
    finalists, final_notes = _finalists(ctx, [heuristic, *joint, *wholes])
    lap("finalists (simulated)")
    rank = _ranking(options.budget_bytes)
    best = min([gcp, *finalists], key=rank)
    if best is not gcp and options.rev_search and _worth_it(ctx, best, gcp):
        refined, refine_notes = _refined(ctx, best)
        final_notes += refine_notes
        if refined is not best:
            finalists, best = [*finalists, refined], refined
        lap("simulated search")
    choice = f"chose: {best.label}"
    if best is not gcp and not _worth_it(ctx, best, gcp):
        gain = gcp.peak_bytes - best.peak_bytes
        choice = (f"chose: GCP only; REV's best ({best.label}, {_fmt(best)}) gains {format_bytes(gain)} "
                  f"({gain / gcp.peak_bytes:.2%}) over GCP's {format_bytes(gcp.peak_bytes)}, less than "
                  f"{options.rev_min_gain:.0%}: the network is left unchanged")
        best = gcp
    elif best is gcp:
        choice = "chose: GCP only; no REV configuration simulated lower" + (
            "" if finalists else " (none was a finalist: the cost model saw no gain)")
    notes = (f"step 1, GCP only ({gcp.plan.objective}): {_fmt(gcp)}",
             f"FetusMapV2 heuristic (GCP partition kept, {len(heuristic.names)} REV): {_fmt(heuristic)}",
             *joint_notes, *final_notes, choice, *log)
    return RevComparison(gcp=gcp, heuristic=heuristic, joint=tuple(joint), finalists=tuple(finalists), best=best,
                         notes=notes, stage_time_s=tuple(times), context=ctx)


def _record(c: RevCandidate, outcome: RevOutcome, seed: int) -> RevReplacementRecord:
    module = dict(outcome.modules)[c.name]
    params = sum(p.numel() for p in outcome.graph.gm.get_submodule(module).parameters())
    return RevReplacementRecord(name=c.name, replaced=c.modules, new_module=module,
                                params_before=c.original_param_count, params_after=params,
                                free_input=bool(dict(outcome.free_input).get(c.name, False)), seed=seed)


def _final_plan(ctx: _Context, best: RevOutcome, original: Plan, notes: Sequence[str], elapsed_s: float) -> Plan:
    """The chosen plan, listing replacements and the original network's vanilla figures."""
    cands = {c.name: c for c in ctx.candidates}
    records = tuple(_record(cands[n], best, ctx.options.rev_seed) for n in best.names)
    flags = dict(best.free_input)
    free_note = ", ".join(f"{n}={'free' if flags[n] else 'kept'}" for n in best.names)
    plan = dataclasses.replace(
        best.plan, rev=records, vanilla_peak_bytes=original.vanilla_peak_bytes,
        simulated_vanilla_peak_bytes=original.simulated_vanilla_peak_bytes,
        predicted_overhead=best.overhead, planning_time_s=elapsed_s,
        notes=(*ctx.graph.trace_notes, *notes, *([f"REV inputs: {free_note}"] if best.names else [])))
    if ctx.options.budget_bytes is not None:   # the least overhead among the configurations that fit
        plan = dataclasses.replace(plan, budget_bytes=ctx.options.budget_bytes, objective=Objective.TIME.value)
    return stamped(plan, ctx.options)


def _plan_rev(graph: MemGraph, options: PlanOptions) -> tuple[Plan, MemGraph]:
    """GCP + REV: (plan, the substituted graph it was made for)."""
    t0 = time.perf_counter()
    cmp = compare_graph(graph, options)
    budget, best = options.budget_bytes, cmp.best
    if budget is not None and best.peak_bytes > budget:
        reach = min(o.peak_bytes for o in (cmp.gcp, *cmp.finalists))
        b_text, r_text = bytes_pair(budget, reach)
        raise BudgetError(
            f"no GCP+REV plan fits the budget {b_text}: the best simulates at {r_text}; raise the budget to at "
            f"least {format_bytes(reach)} ({reach} B) or use a smaller input",
            budget_bytes=int(budget), min_feasible_bytes=int(reach), rev_min_bytes=int(reach))
    return _final_plan(cmp.context, best, cmp.gcp.plan, cmp.notes, time.perf_counter() - t0), best.graph


def plan_rev(graph: MemGraph, options: PlanOptions) -> Plan:
    """Registered as "rev": GCP + REV (the paper's heuristic and the joint re-plans, ``options.dp`` DP).

    Without a budget: the lowest simulated peak; with one: the least overhead among those whose simulated
    step fits, BudgetError naming the best reach when none does. ``plan.rev`` lists what was replaced
    (:func:`rebuild_rev_graph` rebuilds the substituted graph); ``plan.notes`` every figure compared."""
    return _plan_rev(graph, options)[0]


def plan_rev_only(graph: MemGraph, options: PlanOptions) -> Plan:
    """Registered as "rev-only": REV without GCP (the paper's UREV): every eligible pass whose substitution
    lowers the cost model's peak, in graph order, no checkpointed segment; simulated, and kept only when
    it beats the unplanned network by ``options.rev_min_gain``."""
    return _plan_rev_only(graph, options)[0]


def _plan_rev_only(graph: MemGraph, options: PlanOptions) -> tuple[Plan, MemGraph]:
    t0 = time.perf_counter()
    ctx = _context(graph, options)
    base = dp_plan(graph, dataclasses.replace(options, method="approx", dp="approx", budget_bytes=None,
                                              simulate=False))
    base = dataclasses.replace(base, objective="memory-centric (REV only)",
                               method_reason="REV only: no checkpointed segment")
    plan = _plan_from_segments(ctx, graph, [(n,) for n in graph.order], base, ctx.costs(graph, frozenset()))
    vanilla_sim = ctx.simulate(graph.original_gm)
    vanilla = RevOutcome(label="vanilla", names=(), free_input=(), modules=(),
                         plan=dataclasses.replace(plan, simulated_peak_bytes=vanilla_sim), graph=graph,
                         predicted_peak_bytes=int(plan.predicted_peak_bytes), simulated_peak_bytes=vanilla_sim,
                         overhead=0.0)
    best, log = _greedy(ctx, dataclasses.replace(vanilla, simulated_peak_bytes=None), "REV only")
    chosen, notes = vanilla, [f"vanilla: {_fmt(vanilla)}"]
    if best.names:
        best = _simulated(ctx, best)
        notes.append(f"REV only ({len(best.names)} REV): {_fmt(best)}")
        if best.simulated_peak_bytes <= (1 - options.rev_min_gain) * vanilla_sim:
            chosen = best
        else:
            notes.append(f"REV only gains less than {options.rev_min_gain:.0%} over vanilla: the network is left "
                         "unchanged")
    else:
        notes.append("REV only: no pass lowers the cost model's peak")
    original = dataclasses.replace(base, simulated_vanilla_peak_bytes=vanilla_sim)
    return _final_plan(ctx, chosen, original, [*notes, *log], time.perf_counter() - t0), chosen.graph


def estimate_rev_reach(graph: MemGraph, options: PlanOptions, floor_bytes: int) -> int | None:
    """What GCP+REV would reach, cheaply: FetusMapV2's heuristic and one pinned DP re-plan on the
    least-memory GCP plan, and REV only on the unplanned network, rated by the cost model only (no
    search, no simulation); the best predicted
    peak relative to the GCP plan's, times ``floor_bytes`` (GCP's simulated floor). None without a candidate."""
    opts = dataclasses.replace(options, method=options.dp.value, budget_bytes=None, simulate=False,
                               pinned=frozenset(), rev_search=False)
    ctx = _context(at_precision(graph, opts.amp), opts)
    if not ctx.candidates or not opts.example_inputs:
        return None
    gcp = dp_plan(graph, opts)
    start = RevOutcome(label="GCP only", names=(), free_input=(), modules=(), graph=graph, simulated_peak_bytes=None,
                       plan=_plan_from_segments(ctx, graph, [s.nodes for s in gcp.segments], gcp,
                                                ctx.costs(graph, frozenset())),
                       predicted_peak_bytes=int(gcp.predicted_peak_bytes), overhead=0.0)
    heuristic, _ = _greedy(ctx, start, "estimate")
    outcomes = [heuristic]
    if heuristic.names:
        joint = _joint(ctx, heuristic.names, pin=True, calibrate=False, label="estimate")
        outcomes += [joint] if isinstance(joint, RevOutcome) else []
    unplanned = _plan_from_segments(ctx, graph, [(n,) for n in graph.order], gcp, ctx.costs(graph, frozenset()))
    rev_only, _ = _greedy(ctx, dataclasses.replace(start, plan=unplanned,
                                                   predicted_peak_bytes=int(unplanned.predicted_peak_bytes)), "estimate")
    outcomes += [rev_only] if rev_only.names else []
    best = min(o.predicted_peak_bytes for o in outcomes)
    return int(floor_bytes * best / max(start.predicted_peak_bytes, 1))


def rebuild_rev_graph(model: nn.Module | MemGraph, example_inputs: Any, plan: Plan) -> MemGraph:
    """The substituted graph a REV plan was made for: same candidates by name, same seed, free_input
    decided from the plan's segments by the same rule. PlanMismatchError if ``model`` (a module, or its
    traced MemGraph) does not fit it."""
    inputs = as_tuple(example_inputs)
    graph = model if isinstance(model, MemGraph) else trace(model, inputs)
    if not plan.rev:
        return graph
    seeds = {r.seed for r in plan.rev}
    if len(seeds) != 1:
        raise PlanMismatchError(f"the plan's REV records carry different seeds {sorted(seeds)}; one substitution "
                                "uses one seed: re-plan with rev=True")
    options = PlanOptions(method="rev", optimizer=plan.optimizer, scratch="none", rev_seed=seeds.pop(),
                          amp=plan.amp, example_inputs=inputs, simulate=False)
    ctx = _context(graph, options)
    names = [r.name for r in plan.rev]
    missing = sorted(set(names) - {c.name for c in ctx.candidates})
    if missing:
        raise PlanMismatchError(f"the plan replaces {missing}, which this model has no REV-eligible pass for "
                                "(a different network?); re-plan with memplan.plan(model, example_inputs, rev=True)")
    _, _, rev_node = ctx.substitute(names)        # the REV node names the plan's segments use
    flags = free_input_flags(ctx.chosen(names), plan, rev_node)
    rebuilt, reps, _ = ctx.substitute(names, flags)
    if rebuilt.fingerprint() != graph_part(plan.fingerprint):
        raise PlanMismatchError(
            f"plan was made for graph {plan.fingerprint} but substituting {len(names)} REV blocks in this model gives "
            f"{rebuilt.fingerprint()} (a different network, input shape or dtype); re-plan with rev=True")
    got = {r.name: (r.new_module, r.params_after) for r in reps}
    for r in plan.rev:
        if got[r.name] != (r.new_module, r.params_after):
            raise PlanMismatchError(f"REV {r.name} rebuilds as {got[r.name]} but the plan says "
                                    f"{(r.new_module, r.params_after)}; re-plan with rev=True")
    return rebuilt


# ---------------------------------------------------------------------------------------------
# Entry points from a model (the names benchmarks/, fit and the CLI call)
# ---------------------------------------------------------------------------------------------

def _traced(model: nn.Module, example_inputs: Any, **kwargs: Any) -> tuple[MemGraph, PlanOptions]:
    inputs = as_tuple(example_inputs)
    return trace(model, inputs), plan_options(model, inputs, **kwargs)


def compare_rev(model: nn.Module, example_inputs: Any, *, budget: Any = None, optimizer: str = "adam",
                method: str = "auto", loss_fn=None, scratch: str | None = None,
                lower_set_bound: int = DEFAULT_LOWER_SET_BOUND, seed: int = REV_SEED,
                search: bool = True, amp: str | None = None, keep_output: bool = True,
                threads: int | None = None) -> RevComparison:
    """Trace ``model`` and run :func:`compare_graph` (every configuration the REV planner rates)."""
    graph, options = _traced(model, example_inputs, budget=budget, optimizer=optimizer, method=method, rev=True,
                             loss_fn=loss_fn, scratch=scratch, lower_set_bound=lower_set_bound, rev_seed=seed,
                             rev_search=search, amp=amp, keep_output=keep_output, threads=threads)
    return compare_graph(graph, options)


def plan_with_rev(model: nn.Module, example_inputs: Any, *, budget: Any = None, optimizer: str = "adam",
                  method: str = "auto", loss_fn=None, scratch: str | None = None,
                  lower_set_bound: int = DEFAULT_LOWER_SET_BOUND, seed: int = REV_SEED,
                  search: bool = True, amp: str | None = None, keep_output: bool = True,
                  threads: int | None = None) -> tuple[Plan, MemGraph]:
    """:func:`plan_rev` of the traced ``model``, as (plan, substituted graph); ``rewrite(graph, plan)`` trains.
    ``amp``, ``keep_output``, ``threads``: the simulated step, as in memplan.plan."""
    graph, options = _traced(model, example_inputs, budget=budget, optimizer=optimizer, method=method, rev=True,
                             loss_fn=loss_fn, scratch=scratch, lower_set_bound=lower_set_bound, rev_seed=seed,
                             rev_search=search, amp=amp, keep_output=keep_output, threads=threads)
    return _plan_rev(graph, options)


def rev_only_plan(model: nn.Module, example_inputs: Any, *, optimizer: str = "adam", loss_fn=None,
                  scratch: str | None = None, seed: int = REV_SEED, amp: str | None = None,
                  keep_output: bool = True, threads: int | None = None) -> tuple[Plan, MemGraph]:
    """:func:`plan_rev_only` of the traced ``model``, as (plan, substituted graph)."""
    graph, options = _traced(model, example_inputs, optimizer=optimizer, method="rev-only", loss_fn=loss_fn,
                             scratch=scratch, rev_seed=seed, amp=amp, keep_output=keep_output, threads=threads)
    return _plan_rev_only(graph, options)
