"""REV planning: which Conv-BN-ReLU passes become reversible blocks, decided with the GCP plan.

FetusMapV2 §3.1: (1) a Kusumoto GCP plan of the network; (2) the REV-eligible passes; (3) for each
pass in graph order, replace it when the converted partition stays valid and the peak drops (the
pass leaves its segments, the block becomes a singleton segment). memplan then goes further: the DP
re-plans GCP on the substituted graph (REV nodes pinned, and unpinned: a block whose input is kept
anyway may be recomputed), and a joint search toggles each pass in or out with a DP re-plan each.
The best configuration wins; the plan's notes give every figure. Every configuration is rated by
one ruler: ``simulate_step`` of the rewritten module.

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
    >>> [(r.name, r.params_before, r.params_after) for r in plan.rev]
    [('1', 444, 224), ('4', 444, 224), ('7', 444, 224)]
    >>> plan.simulated_peak_bytes < plan.simulated_vanilla_peak_bytes
    True
"""
from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Callable

from torch import nn

from ._meta import as_tuple
from .analyze import analyze
from .api import _graph_scratch, _scratch_model, plan_for_graph
from .costmodel import build_costs, chain_cost
from .errors import BudgetError, PlanMismatchError
from .graph import DEFAULT_LOWER_SET_BOUND, MemGraph
from .measure import simulate_step
from .plan import Plan, RevReplacementRecord, chain_to_segments, resolve_budget
from .rev import RevCandidate, RevReplacement, find_rev_candidates, substitute_rev
from .reversible import is_reversible_leaf
from .rewrite import rewrite
from .trace import register_leaf, trace
from .units import format_bytes

__all__ = ["RevComparison", "RevOutcome", "chain_violation", "compare_rev", "convert_partition", "free_input_flags",
           "plan_with_rev", "rebuild_rev_graph", "rev_only_plan"]

register_leaf(is_reversible_leaf)  # a substituted network re-traced keeps each block as one node

#: Seed of the fresh F/G weights; recorded in the plan's notes so that a plan rebuilds the same network.
REV_SEED = 0
_SEED_NOTE = re.compile(r"^REV seed=(\d+)$")


@dataclass(frozen=True)
class RevOutcome:
    """One rated configuration: which passes are replaced, the plan of the substituted graph, its peak."""
    label: str
    names: tuple[str, ...]                 # candidate names substituted, graph order
    free_input: tuple[tuple[str, bool], ...]
    modules: tuple[tuple[str, str], ...]   # candidate name -> the new block's module path
    plan: Plan
    graph: MemGraph = dataclasses.field(repr=False, compare=False)
    simulated_peak_bytes: int
    overhead: float                        # (GCP recompute + REV rebuild FLOPs) / forward FLOPs


@dataclass(frozen=True)
class _Context:
    """What every trial shares: the traced original, its candidates, and how a step is simulated."""
    inputs: tuple
    graph: MemGraph
    candidates: tuple[RevCandidate, ...]
    optimizer: str
    loss_fn: Callable | None
    scratch: str
    seed: int

    def chosen(self, names: Sequence[str]) -> list[RevCandidate]:
        wanted = set(names)
        return [c for c in self.candidates if c.name in wanted]

    def substitute(self, names: Sequence[str], flags: Mapping[str, bool] | None = None
                   ) -> tuple[MemGraph, list[RevReplacement], dict[str, str]]:
        """The substituted graph (analysed), what was replaced, and candidate name -> REV node name."""
        cands = self.chosen(names)
        free = {c.name: bool((flags or {}).get(c.name, False)) for c in cands}
        gm, reps = substitute_rev(self.graph.gm, cands, seed=self.seed, free_input=free, example_inputs=self.inputs)
        graph = analyze(gm, self.inputs, tracer=self.graph.tracer, notes=self.graph.trace_notes)
        node_of = {str(n.target): n.name for n in gm.graph.nodes if n.op == "call_module"}
        return graph, reps, {r.candidate: node_of[r.new_module] for r in reps}

    def simulate(self, module: nn.Module) -> int:
        return simulate_step(module, self.inputs, loss_fn=self.loss_fn, optimizer=self.optimizer,
                             scratch=self.scratch).peak_bytes


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


# ---------------------------------------------------------------------------------------------
# Plans of a substituted graph
# ---------------------------------------------------------------------------------------------

def _plan_from_segments(ctx: _Context, graph: MemGraph, segments: Sequence[Sequence[str]], base: Plan,
                        pinned: frozenset[str]) -> Plan:
    """``base`` re-expressed on ``graph`` with the given node segments (costs from the cost model)."""
    costs = build_costs(graph, optimizer=ctx.optimizer, scratch=_graph_scratch(graph, ctx.scratch), pinned=pinned)
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
    """Substitute ``names``, lay ``segments`` on the result, decide free_input, simulate; or why not."""
    graph, reps, rev_node = ctx.substitute(names)
    pinned = frozenset(rev_node.values())
    segs = convert_partition(segments, ctx.graph.order, ctx.chosen(names), rev_node) if names else list(segments)
    why = chain_violation(graph, segs)
    if why:
        return why
    plan = _plan_from_segments(ctx, graph, segs, base, pinned)
    flags = free_input_flags(ctx.chosen(names), plan, rev_node)
    return _finish_outcome(ctx, label, names, flags, graph, plan, reps, rev_node, pinned)


def _finish_outcome(ctx: _Context, label: str, names: Sequence[str], flags: Mapping[str, bool], graph: MemGraph,
                    plan: Plan, reps: Sequence[RevReplacement], rev_node: Mapping[str, str],
                    pinned: frozenset[str]) -> RevOutcome:
    """Re-analyse with the free_input flags (when any is set) and simulate the rewritten module."""
    if any(flags.values()):
        graph, _, _ = ctx.substitute(names, flags)
        plan = _plan_from_segments(ctx, graph, [s.nodes for s in plan.segments], plan, pinned)
        again = free_input_flags(ctx.chosen(names), plan, rev_node)
        if again != dict(flags):
            raise AssertionError(f"free_input flags changed when the graph was re-analysed: {dict(flags)} -> {again}")
    sim = ctx.simulate(rewrite(graph, plan))
    return RevOutcome(label=label, names=tuple(names), free_input=tuple(sorted(flags.items())),
                      modules=tuple((r.candidate, r.new_module) for r in reps),
                      plan=dataclasses.replace(plan, simulated_peak_bytes=sim), graph=graph,
                      simulated_peak_bytes=sim, overhead=_overhead(graph, plan, list(rev_node.values())))


# ---------------------------------------------------------------------------------------------
# Step 3 (greedy) and the joint re-plan
# ---------------------------------------------------------------------------------------------

def _greedy(ctx: _Context, start: RevOutcome, label: str) -> tuple[RevOutcome, list[str]]:
    """FetusMapV2 step 3: each candidate in graph order, on top of those accepted, kept when the converted
    partition is valid and the simulated peak drops. Returns the result and a line per rejection."""
    best, log = start, []
    segments = [s.nodes for s in start.plan.segments]
    for c in ctx.candidates:
        trial = _rate(ctx, label, [*best.names, c.name], segments, start.plan)
        if isinstance(trial, str):
            log.append(f"REV {c.name} not replaced: the converted partition is invalid ({trial})")
        elif trial.simulated_peak_bytes < best.simulated_peak_bytes:
            best = trial
        else:
            log.append(f"REV {c.name} not replaced: the peak would not drop "
                       f"({format_bytes(best.simulated_peak_bytes)} -> {format_bytes(trial.simulated_peak_bytes)})")
    return best, log


def _joint(ctx: _Context, names: Sequence[str], budget: int | None, method: str, lower_set_bound: int,
           *, pin: bool = True, label: str = "joint re-plan") -> RevOutcome | str:
    """Re-plan GCP with the DP on the substituted graph, then set free_input from the plan. With ``pin``
    the REV nodes are never recomputed; without, a block the DP puts in a checkpointed segment keeps
    its input. The DP sees every input kept (no block frees), so its budget calibration is conservative."""
    graph, reps, rev_node = ctx.substitute(names)
    pinned = frozenset(rev_node.values()) if pin else frozenset()
    try:
        plan = plan_for_graph(graph, budget=budget, optimizer=ctx.optimizer, method=method, scratch=ctx.scratch,
                              loss_fn=ctx.loss_fn, example_inputs=ctx.inputs, simulate=budget is not None,
                              lower_set_bound=lower_set_bound, pinned=pinned)
    except BudgetError as err:
        return f"does not fit: {err}"
    flags = free_input_flags(ctx.chosen(names), plan, rev_node)
    return _finish_outcome(ctx, label, names, flags, graph, plan, reps, rev_node, pinned)


def _joint_stage(ctx: _Context, names: Sequence[str], budget: int | None, method: str, lower_set_bound: int,
                 search: bool) -> tuple[list[RevOutcome], list[str]]:
    """The heuristic's set re-planned by the DP with REV pinned, and unpinned; then (``search``) each
    candidate in graph order toggled in or out of the set, re-planned the better way, kept when it
    ranks better. Returns the outcomes and a note per figure."""
    rank = _ranking(budget)
    done: dict[bool, RevOutcome] = {}
    notes = []
    for pin in (True, False) if names else ():
        label = f"joint re-plan ({'REV pinned' if pin else 'REV may be recomputed'}, {len(names)} REV)"
        o = _joint(ctx, names, budget, method, lower_set_bound, pin=pin, label=label)
        notes.append(f"{label}: " + (f"simulated {_fmt(o)}" if isinstance(o, RevOutcome) else o))
        if isinstance(o, RevOutcome):
            done[pin] = o
    if not names:
        notes.append("joint re-plan: not run (the heuristic replaced nothing)")
    best = min(done.values(), key=rank, default=None)
    if search:
        pin = next((p for p, o in done.items() if o is best), False)
        found = _joint_search(ctx, names, best, budget, method, lower_set_bound, pin)
        if found is not best:
            notes.append(f"joint search (a DP re-plan per candidate toggled, REV {'pinned' if pin else 'unpinned'}, "
                         f"{len(found.names)} REV): simulated {_fmt(found)}")
            return [*done.values(), found], notes
        notes.append("joint search: no toggle ranked better")
    return list(done.values()), notes


def _joint_search(ctx: _Context, names: Sequence[str], best: RevOutcome | None, budget: int | None, method: str,
                  lower_set_bound: int, pin: bool) -> RevOutcome | None:
    """One pass over the candidates in graph order: toggle each in or out of the set, keep what ranks better."""
    rank = _ranking(budget)
    current = set(names)
    for c in ctx.candidates:
        trial = [d.name for d in ctx.chosen(current ^ {c.name})]
        if not trial:
            continue
        o = _joint(ctx, trial, budget, method, lower_set_bound, pin=pin, label=f"joint search ({len(trial)} REV)")
        if isinstance(o, RevOutcome) and (best is None or rank(o) < rank(best)):
            best, current = o, set(trial)
    return best


def _vanilla_outcome(ctx: _Context, base: Plan) -> RevOutcome:
    """The unplanned network as an outcome: every node its own stored segment."""
    segments = [(n,) for n in ctx.graph.order]
    plan = _plan_from_segments(ctx, ctx.graph, segments, base, frozenset())
    sim = ctx.simulate(ctx.graph.gm)
    return RevOutcome(label="vanilla", names=(), free_input=(), modules=(),
                      plan=dataclasses.replace(plan, simulated_peak_bytes=sim),
                      graph=ctx.graph, simulated_peak_bytes=sim, overhead=0.0)


def _gcp_outcome(ctx: _Context, plan: Plan) -> RevOutcome:
    return RevOutcome(label="GCP only", names=(), free_input=(), modules=(), plan=plan, graph=ctx.graph,
                      simulated_peak_bytes=int(plan.simulated_peak_bytes), overhead=_overhead(ctx.graph, plan, ()))


# ---------------------------------------------------------------------------------------------
# Public entry points
# ---------------------------------------------------------------------------------------------

def _context(model: nn.Module, example_inputs: Any, optimizer: str, loss_fn, scratch: str | None,
             seed: int) -> _Context:
    inputs = as_tuple(example_inputs)
    graph = trace(model, inputs)
    return _Context(inputs=inputs, graph=graph, candidates=tuple(find_rev_candidates(graph.gm, inputs)),
                    optimizer=optimizer, loss_fn=loss_fn, scratch=_scratch_model(model, inputs, scratch), seed=seed)


@dataclass(frozen=True)
class RevComparison:
    """Every configuration plan_with_rev rated, with the time each stage took."""
    gcp: RevOutcome                      # step 1: GCP only
    heuristic: RevOutcome                # steps 2-3: FetusMapV2's greedy on the GCP partition
    joint: tuple[RevOutcome, ...]        # DP re-plans of substituted graphs
    best: RevOutcome
    notes: tuple[str, ...]
    stage_time_s: tuple[tuple[str, float], ...]
    context: _Context = dataclasses.field(repr=False, compare=False)


def compare_rev(model: nn.Module, example_inputs: Any, *, budget: Any = None, optimizer: str = "adam",
                method: str = "auto", loss_fn=None, scratch: str | None = None,
                lower_set_bound: int = DEFAULT_LOWER_SET_BOUND, seed: int = REV_SEED,
                search: bool = True) -> RevComparison:
    """Run step 1, the heuristic and the joint stage; rank them (see :func:`plan_with_rev`)."""
    budget_b = resolve_budget(budget)
    times, t = [], time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal t
        times.append((stage, time.perf_counter() - t))
        t = time.perf_counter()

    ctx = _context(model, example_inputs, optimizer, loss_fn, scratch, seed)
    lap("trace and find candidates")
    gcp = _gcp_step(ctx, budget_b, method, lower_set_bound)
    lap("GCP plan")
    heuristic, log = _greedy(ctx, gcp, "FetusMapV2 heuristic")
    lap("heuristic")
    joint, joint_notes = _joint_stage(ctx, heuristic.names, budget_b, method, lower_set_bound, search)
    lap("joint re-plan")
    best = min([heuristic, *joint], key=_ranking(budget_b))
    notes = (f"step 1, GCP only ({gcp.plan.objective}): simulated {_fmt(gcp)}",
             f"FetusMapV2 heuristic (GCP partition kept, {len(heuristic.names)} REV): simulated {_fmt(heuristic)}",
             *joint_notes, f"chose: {best.label}", *log)
    return RevComparison(gcp=gcp, heuristic=heuristic, joint=tuple(joint), best=best, notes=notes,
                         stage_time_s=tuple(times), context=ctx)


def plan_with_rev(model: nn.Module, example_inputs: Any, *, budget: Any = None, optimizer: str = "adam",
                  method: str = "auto", loss_fn=None, scratch: str | None = None,
                  lower_set_bound: int = DEFAULT_LOWER_SET_BOUND, seed: int = REV_SEED,
                  search: bool = True) -> tuple[Plan, MemGraph]:
    """GCP + REV: the paper's heuristic and the joint re-plans, the best one as (plan, substituted graph).

    Without ``budget``: the lowest simulated peak (ties: less overhead). With one: the least overhead
    among those whose simulated step fits; BudgetError naming the best reach when none does.
    ``search`` adds the joint set search (one DP re-plan per candidate). ``rewrite(graph, plan)`` is the
    module to train; ``plan.rev`` lists what was replaced, ``plan.notes`` every figure compared.
    """
    t0 = time.perf_counter()
    budget_b = resolve_budget(budget)
    cmp = compare_rev(model, example_inputs, budget=budget_b, optimizer=optimizer, method=method,
                           loss_fn=loss_fn, scratch=scratch, lower_set_bound=lower_set_bound, seed=seed, search=search)
    best = cmp.best
    if budget_b is not None and best.simulated_peak_bytes > budget_b:
        reach = min(o.simulated_peak_bytes for o in (cmp.heuristic, *cmp.joint))
        raise BudgetError(
            f"no GCP+REV plan fits the budget {format_bytes(budget_b)}: the best simulates at {format_bytes(reach)} "
            f"({reach} B); raise the budget to at least {format_bytes(reach)} or use a smaller input",
            budget_bytes=int(budget_b), min_feasible_bytes=int(reach), rev_min_bytes=int(reach))
    plan = _final_plan(cmp.context, best, cmp.gcp.plan, cmp.notes, time.perf_counter() - t0)
    if budget_b is not None:   # the least overhead among the configurations that fit
        plan = dataclasses.replace(plan, budget_bytes=budget_b, objective="time-centric")
    return plan, best.graph


def _ranking(budget: int | None) -> Callable[[RevOutcome], tuple]:
    """Sort key: lowest peak (then overhead); under a budget, fitting plans first by least overhead."""
    if budget is None:
        return lambda o: (o.simulated_peak_bytes, o.overhead)
    return lambda o: (0, o.overhead, o.simulated_peak_bytes) if o.simulated_peak_bytes <= budget \
        else (1, o.simulated_peak_bytes, o.overhead)


def _fmt(o: RevOutcome) -> str:
    return f"{format_bytes(o.simulated_peak_bytes)} ({o.simulated_peak_bytes} B), overhead {o.overhead:.1%}"


def _gcp_step(ctx: _Context, budget: int | None, method: str, lower_set_bound: int) -> RevOutcome:
    """Step 1: the GCP plan of the original (time-centric under ``budget`` when it fits, else memory-centric)."""
    common = dict(optimizer=ctx.optimizer, method=method, scratch=ctx.scratch, loss_fn=ctx.loss_fn,
                  example_inputs=ctx.inputs, lower_set_bound=lower_set_bound)
    try:
        plan = plan_for_graph(ctx.graph, budget=budget, **common)
    except BudgetError:
        plan = plan_for_graph(ctx.graph, budget=None, **common)   # REV may still reach the budget
    return _gcp_outcome(ctx, plan)


def _final_plan(ctx: _Context, best: RevOutcome, original: Plan, notes: Sequence[str], elapsed_s: float) -> Plan:
    """The chosen plan, listing replacements and the original network's vanilla figures."""
    cands = {c.name: c for c in ctx.candidates}
    records = tuple(_record(cands[n], best, ctx.seed) for n in best.names)
    flags = dict(best.free_input)
    free_note = ", ".join(f"{n}={'free' if flags[n] else 'kept'}" for n in best.names)
    return dataclasses.replace(
        best.plan, rev=records, vanilla_peak_bytes=original.vanilla_peak_bytes,
        simulated_vanilla_peak_bytes=original.simulated_vanilla_peak_bytes,
        predicted_overhead=best.overhead, planning_time_s=elapsed_s,
        notes=(*ctx.graph.trace_notes, *notes, f"REV seed={ctx.seed}",
               *([f"REV inputs: {free_note}"] if best.names else [])))


def _record(c: RevCandidate, outcome: RevOutcome, seed: int) -> RevReplacementRecord:
    module = dict(outcome.modules)[c.name]
    params = sum(p.numel() for p in outcome.graph.gm.get_submodule(module).parameters())
    return RevReplacementRecord(name=c.name, replaced=c.modules, new_module=module,
                                params_before=c.original_param_count, params_after=params,
                                free_input=bool(dict(outcome.free_input).get(c.name, False)),
                                seed=seed)


def rev_only_plan(model: nn.Module, example_inputs: Any, *, optimizer: str = "adam", loss_fn=None,
                  scratch: str | None = None, seed: int = REV_SEED) -> tuple[Plan, MemGraph]:
    """REV without GCP (the paper's UREV): every eligible pass whose substitution lowers the simulated
    peak, in graph order; no checkpointed segment."""
    t0 = time.perf_counter()
    ctx = _context(model, example_inputs, optimizer, loss_fn, scratch, seed)
    base = plan_for_graph(ctx.graph, optimizer=optimizer, scratch=ctx.scratch, simulate=False, method="approx")
    vanilla = _vanilla_outcome(ctx, dataclasses.replace(base, objective="memory-centric (REV only)",
                                                         method_reason="REV only: no checkpointed segment"))
    best, log = _greedy(ctx, vanilla, "REV only")
    notes = [f"vanilla: simulated {_fmt(vanilla)}", f"REV only ({len(best.names)} REV): simulated {_fmt(best)}", *log]
    original = dataclasses.replace(base, simulated_vanilla_peak_bytes=vanilla.simulated_peak_bytes)
    return _final_plan(ctx, best, original, notes, time.perf_counter() - t0), best.graph


def rebuild_rev_graph(model: nn.Module, example_inputs: Any, plan: Plan) -> MemGraph:
    """The substituted graph a REV plan was made for: same candidates by name, same seed, free_input
    decided from the plan's segments by the same rule. PlanMismatchError if ``model`` does not fit it."""
    inputs = as_tuple(example_inputs)
    graph = trace(model, inputs)
    if not plan.rev:
        return graph
    seeds = [r.seed for r in plan.rev] or [int(m.group(1)) for m in map(_SEED_NOTE.match, plan.notes) if m]
    ctx = _Context(inputs=inputs, graph=graph, candidates=tuple(find_rev_candidates(graph.gm, inputs)),
                   optimizer=plan.optimizer, loss_fn=None, scratch="none", seed=seeds[0] if seeds else REV_SEED)
    names = [r.name for r in plan.rev]
    missing = sorted(set(names) - {c.name for c in ctx.candidates})
    if missing:
        raise PlanMismatchError(f"the plan replaces {missing}, which this model has no REV-eligible pass for "
                                "(a different network?); re-plan with memplan.plan(model, example_inputs, rev=True)")
    _, _, rev_node = ctx.substitute(names)        # the REV node names the plan's segments use
    flags = free_input_flags(ctx.chosen(names), plan, rev_node)
    rebuilt, reps, _ = ctx.substitute(names, flags)
    if rebuilt.fingerprint() != plan.fingerprint:
        raise PlanMismatchError(
            f"plan was made for graph {plan.fingerprint} but substituting {len(names)} REV blocks in this model gives "
            f"{rebuilt.fingerprint()} (a different network, input shape or dtype); re-plan with rev=True")
    got = {r.candidate: (r.new_module, r.new_param_count) for r in reps}
    for r in plan.rev:
        if got[r.name] != (r.new_module, r.params_after):
            raise PlanMismatchError(f"REV {r.name} rebuilds as {got[r.name]} but the plan says "
                                    f"{(r.new_module, r.params_after)}; re-plan with rev=True")
    return rebuilt
