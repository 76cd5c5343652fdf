"""Plan: pure data saying which segments a compiled module checkpoints, and what that should cost.

``plan()`` traces the model, runs the Kusumoto DP (exact or approximate), turns the chain of lower
sets into segments, and checks the result with the one simulator every plan is rated by.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from .costmodel import CostArrays, block_cost, build_costs
from .errors import BudgetError, MemplanError, PlanMismatchError
from .graph import DEFAULT_LOWER_SET_BOUND, MemGraph
from .kusumoto import Family, least_time, min_budget
from .measure import OPTIMIZERS
from .units import format_bytes, parse_bytes

METHODS = ("auto", "exact", "approx")
PLAN_FORMAT = 1


@dataclass(frozen=True)
class Segment:
    """One block of the chain: its nodes, the outputs it keeps for later blocks, recomputed or not."""
    index: int
    nodes: tuple[str, ...]
    kept: tuple[str, ...]
    recompute: bool
    kept_bytes: int
    flops: int
    rebuilt: tuple[str, ...] = ()    # inputs the segment's checkpoint does not hold (remat planner)
    rebuild: tuple[str, ...] = ()    # nodes re-run under no_grad to rebuild them when it is recomputed


@dataclass(frozen=True)
class RevReplacementRecord:
    """A pass REV replaced: which modules, and parameter counts before and after."""
    name: str
    replaced: tuple[str, ...]
    new_module: str
    params_before: int
    params_after: int
    free_input: bool = False     # the block frees its input after forward (rebuilt in backward)
    seed: int = 0                # seed of the fresh F/G weights


@dataclass(frozen=True)
class Plan:
    """What to keep and what to recompute, with the predicted cost. Round-trips through JSON."""
    segments: tuple[Segment, ...]
    predicted_peak_bytes: int
    predicted_overhead: float            # recomputed FLOPs / forward FLOPs
    vanilla_peak_bytes: int              # cost-model peak of the unplanned step
    budget_bytes: int | None
    objective: str                       # "time-centric" (budget) or "memory-centric"
    method: str                          # "exact" or "approx"
    method_reason: str
    lower_set_count: int | None
    fingerprint: str
    optimizer: str
    static_bytes: int
    planning_time_s: float
    simulated_peak_bytes: int | None = None
    simulated_vanilla_peak_bytes: int | None = None
    rev: tuple[RevReplacementRecord, ...] = ()
    notes: tuple[str, ...] = ()
    format: int = PLAN_FORMAT

    # -- JSON -------------------------------------------------------------------------------------
    def to_json(self, path: str | Path | None = None) -> str:
        """The plan as JSON text; also written to ``path`` when given."""
        text = json.dumps(asdict(self), indent=1)
        if path is not None:
            Path(path).write_text(text)
        return text

    @staticmethod
    def from_json(text_or_path: str | Path) -> "Plan":
        """Read a plan from JSON text or a file path."""
        text = str(text_or_path)
        if not text.lstrip().startswith("{"):
            p = Path(text)
            if not p.is_file():
                raise MemplanError(f"plan file {p} does not exist; write one with Plan.to_json(path) "
                                   "or `memplan optimize ... --out plan.json`")
            text = p.read_text()
        try:
            d = json.loads(text)
        except json.JSONDecodeError as exc:
            raise MemplanError(f"plan is not valid JSON ({exc}); regenerate it with `memplan optimize --out`") from exc
        if d.get("format") != PLAN_FORMAT:
            raise MemplanError(f"plan format {d.get('format')!r} is not {PLAN_FORMAT}; regenerate the plan")
        d["segments"] = tuple(Segment(**{k: tuple(v) if isinstance(v, list) else v for k, v in s.items()})
                              for s in d["segments"])
        d["rev"] = tuple(RevReplacementRecord(**{**r, "replaced": tuple(r["replaced"])}) for r in d.get("rev", ()))
        d["notes"] = tuple(d.get("notes", ()))
        return Plan(**d)

    # -- reading ----------------------------------------------------------------------------------
    @property
    def recomputed_segments(self) -> tuple[Segment, ...]:
        return tuple(s for s in self.segments if s.recompute)

    def summary(self) -> str:
        """A readable table of the plan."""
        lines = [
            f"memplan plan ({self.objective}, {self.method} DP: {self.method_reason})",
            f"  lower sets: {self.lower_set_count if self.lower_set_count is not None else 'not enumerated'}"
            f"; graph {self.fingerprint}; optimizer {self.optimizer}; planned in {self.planning_time_s:.2f} s",
            f"  budget:          {format_bytes(self.budget_bytes) if self.budget_bytes else 'none (least memory)'}",
            f"  vanilla peak:    {format_bytes(self.vanilla_peak_bytes)} (cost model)",
            f"  planned peak:    {format_bytes(self.predicted_peak_bytes)} (cost model)",
        ]
        if self.simulated_peak_bytes is not None:
            err = (self.predicted_peak_bytes - self.simulated_peak_bytes) / self.simulated_peak_bytes
            lines.append(f"  simulated peak:  {format_bytes(self.simulated_peak_bytes)} "
                         f"(cost model {err:+.1%} vs simulation)")
        if self.simulated_vanilla_peak_bytes is not None:
            lines.append(f"  simulated vanilla: {format_bytes(self.simulated_vanilla_peak_bytes)}")
        lines.append(f"  overhead:        {self.predicted_overhead:.1%} of forward FLOPs recomputed")
        lines.append(f"  {'seg':>4} {'nodes':>5} {'mode':<10} {'kept':>10}  first .. last  (kept outputs)")
        for group in _runs_of_stores(self.segments):
            first, last = group[0], group[-1]
            nodes = sum(len(s.nodes) for s in group)
            kept_b = sum(s.kept_bytes for s in group)
            names = [k for s in group for k in s.kept]
            kept = ", ".join(names[:3]) + (f" +{len(names) - 3}" if len(names) > 3 else "")
            label = f"{first.index}" if len(group) == 1 else f"{first.index}-{last.index}"
            lines.append(f"  {label:>4} {nodes:>5} {'recompute' if first.recompute else 'store':<10} "
                         f"{format_bytes(kept_b):>10}  {first.nodes[0]} .. {last.nodes[-1]}  ({kept})")
        for r in self.rev:
            lines.append(f"  REV {r.name}: {', '.join(r.replaced)} -> {r.new_module} "
                         f"(params {r.params_before} -> {r.params_after})")
        for note in self.notes:
            lines.append(f"  note: {note}")
        return "\n".join(lines)


def _runs_of_stores(segments: tuple[Segment, ...]) -> list[list[Segment]]:
    """Segments grouped for display: each recomputed segment alone, consecutive stored ones together."""
    groups: list[list[Segment]] = []
    for s in segments:
        if groups and not s.recompute and not groups[-1][-1].recompute:
            groups[-1].append(s)
        else:
            groups.append([s])
    return groups


@dataclass(frozen=True)
class PlanOptions:
    """How to plan; validated on construction."""
    budget_bytes: int | None = None
    optimizer: str = "adam"
    method: str = "auto"
    lower_set_bound: int = DEFAULT_LOWER_SET_BOUND
    time_steps: int = 1000
    times: dict | None = field(default=None, hash=False)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise MemplanError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.optimizer not in OPTIMIZERS:
            raise MemplanError(f"unknown optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
        if self.budget_bytes is not None and self.budget_bytes <= 0:
            raise MemplanError(f"budget must be positive, got {self.budget_bytes} B")


def choose_family(graph: MemGraph, costs: CostArrays, opts: PlanOptions) -> tuple[Family, str, str, int | None]:
    """The lower-set family for the DP: (family, method, why, lower-set count or None)."""
    sets = None
    if opts.method in ("auto", "exact"):
        bound = opts.lower_set_bound if opts.method == "auto" else max(opts.lower_set_bound, 10**6)
        sets = graph.lower_sets(bound)
        if sets is None and opts.method == "exact":
            raise MemplanError(f"graph has more than {bound} lower sets; exact DP is unaffordable, use method='approx'")
    groups = graph.consumer_groups()
    if sets is not None:
        why = ("requested" if opts.method == "exact"
               else f"{len(sets)} lower sets <= bound {opts.lower_set_bound}")
        usable = [m for m in sets if graph.order_compatible(m, groups)]
        if len(usable) < len(sets):
            why += f"; {len(sets) - len(usable)} set(s) would reorder a 3-reader value's gradient sum"
        return Family(costs, usable), "exact", why, len(sets)
    full = (1 << len(graph)) - 1
    prefixes = [(1 << (i + 1)) - 1 for i in range(len(graph))]   # fx-order prefixes: the vanilla chain
    masks = [m for m in [0, full] + graph.ancestor_masks() + prefixes if graph.order_compatible(m, groups)]
    why = "requested" if opts.method == "approx" else f"more than {opts.lower_set_bound} lower sets"
    return Family(costs, masks), "approx", why, None


def chain_to_segments(graph: MemGraph, costs: CostArrays, chain: tuple[int, ...]) -> tuple[Segment, ...]:
    """Turn a chain of lower sets into Segments (graph order inside each)."""
    segments, prev = [], 0
    for i, cur in enumerate(chain):
        bc = block_cost(costs, prev, cur)
        block = cur & ~prev
        bnd = costs.boundary(cur) & block
        nodes = tuple(graph.names_of(block))
        segments.append(Segment(index=i, nodes=nodes, kept=tuple(graph.names_of(bnd)), recompute=bc.recompute,
                                kept_bytes=int(bc.keep_b), flops=int(sum(graph.info(n).flops for n in nodes))))
        prev = cur
    return tuple(segments)


def plan_graph(graph: MemGraph, opts: PlanOptions, *, scratch: dict[str, int] | None = None,
               pinned: frozenset[str] = frozenset()) -> Plan:
    """Plan a traced graph: time-centric under ``opts.budget_bytes``, else memory-centric.

    ``pinned`` nodes are never recomputed (each stays out of every checkpointed segment)."""
    t0 = time.perf_counter()
    costs = build_costs(graph, optimizer=opts.optimizer, scratch=scratch, times=opts.times, pinned=pinned)
    family, method, why, count = choose_family(graph, costs, opts)
    vanilla = least_time(family, float("inf"), time_steps=opts.time_steps)
    if vanilla is None:
        raise AssertionError(f"no chain at infinite budget for graph {graph.fingerprint()}")
    vanilla_chain = tuple((1 << (i + 1)) - 1 for i in range(len(graph)))  # one node per block, topological
    from .costmodel import chain_cost
    vanilla_peak = chain_cost(costs, list(vanilla_chain))[0]
    floor = min_budget(family)
    if opts.budget_bytes is None:
        budget, objective = floor, "memory-centric"
    else:
        budget, objective = float(opts.budget_bytes), "time-centric"
        if budget < floor:
            raise BudgetError(
                f"budget {format_bytes(budget)} is below the smallest feasible peak {format_bytes(floor)} "
                f"({method} DP, optimizer {opts.optimizer}); raise the budget to at least {format_bytes(floor)}, "
                "use a smaller input or batch, or a lighter optimizer",
                budget_bytes=int(budget), min_feasible_bytes=int(floor))
    result = least_time(family, budget, time_steps=opts.time_steps)
    if result is None:
        raise AssertionError(f"budget {budget} >= floor {floor} but the DP found no chain")
    fwd = float(costs.flops.sum()) or 1.0
    return Plan(
        segments=chain_to_segments(graph, costs, result.chain), predicted_peak_bytes=int(result.peak_bytes),
        predicted_overhead=result.time / fwd, vanilla_peak_bytes=int(vanilla_peak),
        budget_bytes=None if opts.budget_bytes is None else int(opts.budget_bytes), objective=objective,
        method=method, method_reason=why, lower_set_count=count, fingerprint=graph.fingerprint(),
        optimizer=opts.optimizer, static_bytes=costs.static_bytes, planning_time_s=time.perf_counter() - t0,
        notes=graph.trace_notes)


def check_plan(plan: Plan, graph: MemGraph) -> None:
    """Raise PlanMismatchError unless ``plan`` was made for ``graph`` and partitions its nodes."""
    fp = graph.fingerprint()
    if plan.fingerprint != fp:
        raise PlanMismatchError(
            f"plan was made for graph {plan.fingerprint} but this model traces to {fp} (a different network, "
            "input shape or dtype); re-plan with memplan.plan(model, example_inputs)")
    seen = [n for s in plan.segments for n in s.nodes]
    if sorted(seen) != sorted(graph.order):
        raise PlanMismatchError("plan segments do not partition the graph's nodes; re-plan")


def with_simulation(plan: Plan, simulated: int, vanilla: int | None = None) -> Plan:
    return replace(plan, simulated_peak_bytes=int(simulated),
                   simulated_vanilla_peak_bytes=None if vanilla is None else int(vanilla))


def resolve_budget(budget: Any) -> int | None:
    """None, bytes, or a string like '12GB' -> bytes."""
    return None if budget is None else parse_bytes(budget)

