"""Baseline planners, registered beside the DP so that one simulator rates them like memplan's plans:
Chen et al. 2016 ("chen": sqrt(n) segments over single-tensor cuts) and checkpointing by hand
("hand": every module named in ``options.checkpoint_modules`` becomes one recomputed segment, as
wrapping it in ``torch.utils.checkpoint`` would).

>>> import torch, memplan
>>> from memplan.options import PlanOptions
>>> net = torch.nn.Sequential(*[torch.nn.Tanh() for _ in range(9)])
>>> g = memplan.trace(net, torch.empty(2, 3, device="meta"))
>>> [len(s.nodes) for s in plan_chen(g, PlanOptions(method="chen", simulate=False)).segments]
[3, 3, 1, 1, 1]
>>> block = torch.nn.Sequential(*[torch.nn.Tanh() for _ in range(3)])
>>> g = memplan.trace(torch.nn.Sequential(torch.nn.Tanh(), block, torch.nn.Tanh()), torch.empty(2, 3, device="meta"))
>>> p = plan_hand(g, PlanOptions(method="hand", checkpoint_modules=("1",), simulate=False))
>>> [(s.nodes, s.recompute) for s in p.segments]
[(('_0',), False), (('_1_0', '_1_1', '_1_2'), True), (('_2',), False)]
"""
from __future__ import annotations

import math
import time
from dataclasses import replace

from .calibrate import bytes_pair, rated, simulated_peak, vanilla_peak
from .costmodel import build_costs, chain_cost, node_scratch
from .errors import BudgetError, MemplanError
from .graph import MemGraph
from .options import PlanOptions
from .plan import Plan, chain_to_segments

__all__ = ["articulation_points", "chen_chain", "plan_chen", "plan_hand", "module_segments"]


def articulation_points(graph: MemGraph, optimizer: str = "adam") -> list[int]:
    """Graph-order indices of single-tensor cuts: nodes v whose ancestors-and-self lower set has
    boundary {v} (every later node reads only v or nodes after it)."""
    costs = build_costs(graph, optimizer=str(optimizer))
    return [i for i, mask in enumerate(graph.ancestor_masks()) if costs.boundary(mask) == 1 << i]


def chen_chain(graph: MemGraph, cuts: list[int]) -> list[int]:
    """Chen's sqrt(n) chain: a cut every ceil(sqrt(n)) nodes or more (recomputed segments between
    chosen cuts), then one node per block after the last cut (the last segment is stored)."""
    n = len(graph)
    step = math.ceil(math.sqrt(n))
    anc = graph.ancestor_masks()
    chosen, last = [], -1
    for i in cuts:
        if i - last >= step and i < n - 1:
            chosen.append(anc[i])
            last = i
    chain = list(chosen)
    base = chain[-1] if chain else 0
    for j in range(n):
        m = base | ((1 << (j + 1)) - 1)
        if not chain or m & ~chain[-1]:
            chain.append(m)
    return chain


def _chain_plan(graph: MemGraph, options: PlanOptions, chain: list[int], *, objective: str, method: str,
                why: str, t0: float) -> Plan:
    """A chain of lower sets as a Plan (cost-model figures), simulated when ``options.simulate``; a
    BudgetError when the simulated step exceeds ``options.budget_bytes`` (these planners have no knob)."""
    costs = build_costs(graph, optimizer=options.optimizer.value, scratch=node_scratch(graph, options.scratch.value),
                        times=options.times)
    peak, recompute_flops = chain_cost(costs, chain)
    vanilla = chain_cost(costs, [(1 << (i + 1)) - 1 for i in range(len(graph))])[0]
    segments = chain_to_segments(graph, costs, tuple(chain))
    why += f", {sum(s.recompute for s in segments)} recomputed segment(s)"
    plan = Plan(segments=segments, predicted_peak_bytes=int(peak),
                predicted_overhead=recompute_flops / (float(costs.flops.sum()) or 1.0), vanilla_peak_bytes=int(vanilla),
                budget_bytes=options.budget_bytes, objective=objective, method=method, method_reason=why,
                lower_set_count=None, fingerprint=graph.fingerprint(), optimizer=options.optimizer.value,
                static_bytes=costs.static_bytes, planning_time_s=0.0, notes=graph.trace_notes)
    if options.simulate:
        plan = rated(graph, plan, options, vanilla_peak(graph, options))
    reach = plan.simulated_peak_bytes if plan.simulated_peak_bytes is not None else plan.predicted_peak_bytes
    if options.budget_bytes is not None and reach > options.budget_bytes:
        b_text, f_text = bytes_pair(options.budget_bytes, reach)
        raise BudgetError(f"budget {b_text} is below the peak of the {method} plan {f_text}; it has no budget to "
                          "trade: raise the budget or use method='auto'",
                          budget_bytes=options.budget_bytes, min_feasible_bytes=int(reach))
    return replace(plan, planning_time_s=time.perf_counter() - t0)


def plan_chen(graph: MemGraph, options: PlanOptions) -> Plan:
    """Registered as "chen": Chen's sqrt(n) plan over ``graph``'s articulation points."""
    t0 = time.perf_counter()
    cuts = articulation_points(graph, options.optimizer.value)
    chain = chen_chain(graph, cuts)
    why = f"{len(cuts)} articulation points, segment length >= {math.ceil(math.sqrt(len(graph)))}"
    return _chain_plan(graph, options, chain, objective="Chen sqrt(n)", method="chen", why=why, t0=t0)


def module_segments(graph: MemGraph, names: tuple[str, ...]) -> list[tuple[str, ...]]:
    """Consecutive graph nodes run inside each named module (by fx's ``nn_module_stack``, else the call's
    target path) as one group each; every other node alone. MemplanError for a name no node runs in."""
    def owner(node_name: str) -> str | None:
        fx_node = nodes.get(node_name)
        paths = list((fx_node.meta.get("nn_module_stack") or {}).values()) if fx_node is not None else []
        paths = [p[0] if isinstance(p, tuple) else str(p) for p in paths]
        target = graph.info(node_name).target if graph.info(node_name).op == "call_module" else None
        paths += [target] if target else []
        return next((m for m in names for p in paths if p == m or p.startswith(m + ".")), None)

    nodes = {n.name: n for n in graph.gm.graph.nodes} if graph.gm is not None else {}
    groups: list[tuple[str | None, list[str]]] = []
    for name in graph.order:
        m = owner(name)
        if m is not None and groups and groups[-1][0] == m:
            groups[-1][1].append(name)
        else:
            groups.append((m, [name]))
    missing = sorted(set(names) - {m for m, _ in groups if m is not None})
    if missing:
        raise MemplanError(f"checkpoint_modules names {missing}, which no node of the graph runs in; names are "
                           f"module paths such as {sorted({n.rsplit('.', 1)[0] for n in _module_paths(graph)})[:4]}")
    return [tuple(g) for _, g in groups]


def _module_paths(graph: MemGraph) -> list[str]:
    return [graph.info(n).target for n in graph.order if graph.info(n).op == "call_module"]


def plan_hand(graph: MemGraph, options: PlanOptions) -> Plan:
    """Registered as "hand": each module of ``options.checkpoint_modules`` one recomputed segment, every
    other node stored (what wrapping those modules in torch.utils.checkpoint does)."""
    t0 = time.perf_counter()
    if not options.checkpoint_modules:
        raise MemplanError("method 'hand' checkpoints the modules in checkpoint_modules, which is empty; name "
                           "them, e.g. checkpoint_modules=('encoders.0', 'encoders.1')")
    chain, acc = [], 0
    for group in module_segments(graph, options.checkpoint_modules):
        acc |= graph.mask_of(group)
        chain.append(acc)
    why = f"{len(options.checkpoint_modules)} module(s) checkpointed by hand"
    return _chain_plan(graph, options, chain, objective="by hand", method="hand", why=why, t0=t0)
