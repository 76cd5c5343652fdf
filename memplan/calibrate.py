"""Plan, simulate, calibrate: the one ruler (simulate_step of the rewritten module) checks a
cost-model planner's plan and, under a budget, moves the planner's internal budget by the
simulation's error until the simulated step fits.

Feasibility is monotone in the budget: whenever tightening fails, the least-memory plan is tried
(and, where the cost model misjudged it, the plan that recomputes nothing), so every budget at or
above the lower of their simulated peaks is accepted.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable

from torch import nn

from .errors import BudgetError, MemplanError
from .graph import MemGraph
from .measure import simulate_step
from .options import Objective, PlanOptions
from .plan import Plan, with_simulation
from .rewrite import rewrite
from .units import format_bytes

#: How many times the internal budget moves (tighter or looser) before the best fitting plan is kept.
CALIBRATION_ROUNDS = 4

CostPlanner = Callable[[MemGraph, PlanOptions], Plan]


def bytes_pair(a: int, b: int) -> tuple[str, str]:
    """Two byte counts for one message; exact bytes when they would read the same.

    >>> bytes_pair(258047, 258048)
    ('252 KiB (258,047 B)', '252 KiB (258,048 B)')
    >>> bytes_pair(1000, 2**20)
    ('1000 B', '1.00 MiB')
    """
    fa, fb = format_bytes(a), format_bytes(b)
    return (fa, fb) if fa != fb else (f"{fa} ({int(a):,} B)", f"{fb} ({int(b):,} B)")


def simulated_peak(module: nn.Module, options: PlanOptions) -> int:
    """Peak bytes of one training step of ``module`` on ``options.example_inputs`` (meta tensors), with
    the options' optimizer, scratch model, precision, output lifetime and thread count."""
    if not options.example_inputs:
        raise MemplanError("simulating a plan needs example inputs: build PlanOptions(example_inputs=(x,)) "
                           "or pass simulate=False")
    return simulate_step(module, options.example_inputs, **options.step_kwargs()).peak_bytes


def vanilla_peak(graph: MemGraph, options: PlanOptions) -> int:
    """Simulated peak of the unplanned network's step; MemplanError when that step itself cannot run
    backward (an in-place op overwrote a tensor autograd saved), which no plan could change."""
    try:
        return simulated_peak(graph.original_gm, options)
    except RuntimeError as err:
        if "modified by an inplace operation" not in str(err):
            raise
        raise MemplanError(f"the network cannot train as written: its own backward fails in autograd's "
                           f"version check ({str(err).split('. Hint')[0]}); an in-place op (e.g. an "
                           "nn.ReLU(inplace=True) right after an op that saves its result, such as tanh, "
                           "sigmoid or another in-place activation) overwrites a tensor backward needs.\n"
                           "Fix: make that op out-of-place (inplace=False); the plain model raises the same "
                           "error in a training loop") from None


def rated(graph: MemGraph, plan: Plan, options: PlanOptions, vanilla: int | None) -> Plan:
    """``plan`` with its simulated peak (and the unplanned network's) filled in."""
    return with_simulation(plan, simulated_peak(rewrite(graph, plan), options), vanilla)


def fit_to_budget(planner: CostPlanner, graph: MemGraph, options: PlanOptions) -> Plan:
    """The planner's plan checked by simulation; under ``options.budget_bytes`` the least recompute whose
    simulated step fits, else BudgetError naming the least-memory plan's simulated peak."""
    vanilla = vanilla_peak(graph, options)
    budget = options.budget_bytes
    if budget is None:
        return rated(graph, planner(graph, options), options, vanilla)

    def at(target: int) -> Plan:
        return planner(graph, dataclasses.replace(options, budget_bytes=max(int(target), 1)))

    def simulated(p: Plan) -> Plan:
        return dataclasses.replace(rated(graph, p, options, vanilla), budget_bytes=budget)

    try:
        first = simulated(at(budget))
    except BudgetError:
        first = None                                    # below the cost model's floor: only the least plan may fit
    best = _calibrated(first, budget, simulated, at) if first is not None else None
    if best is not None:
        return best
    least = rated(graph, planner(graph, dataclasses.replace(options, budget_bytes=None)), options, vanilla)
    fallbacks = [least]
    if least.simulated_peak_bytes > budget:      # the cost model can be wrong the other way: recompute nothing
        try:
            fallbacks.append(rated(graph, at(least.vanilla_peak_bytes), options, vanilla))
        except BudgetError:
            pass
    fitting = [p for p in fallbacks if p.simulated_peak_bytes <= budget]
    if not fitting:
        sim = min(int(p.simulated_peak_bytes) for p in fallbacks)
        b_text, f_text = bytes_pair(budget, sim)
        raise BudgetError(
            f"budget {b_text} is below the smallest feasible peak {f_text} (the least-memory plan, simulated; "
            f"optimizer {options.optimizer.value}); raise the budget to at least {format_bytes(sim)} ({sim} B), "
            "use a smaller input or batch, or a lighter optimizer",
            budget_bytes=budget, min_feasible_bytes=sim)
    chosen = min(fitting, key=lambda p: p.predicted_overhead)
    note = (f"budget {format_bytes(budget)} is met by the {'least-memory' if chosen is least else 'recompute-nothing'} "
            f"plan (simulated {format_bytes(chosen.simulated_peak_bytes)}); tighter time-centric plans did not fit")
    return dataclasses.replace(chosen, budget_bytes=budget, objective=Objective.TIME.value,
                               notes=chosen.notes + (note,))


def _calibrated(first: Plan, budget: int, simulated: Callable[[Plan], Plan],
                at: Callable[[int], Plan]) -> Plan | None:
    """Move the internal budget by the simulation's error: tighten until the simulated step fits the
    budget, then loosen while it still fits and recomputes less. The best fitting plan, or None."""
    result, target, best = first, budget, None
    for _ in range(CALIBRATION_ROUNDS):
        sim = result.simulated_peak_bytes
        if sim <= budget:
            if best is not None and result.predicted_overhead >= best.predicted_overhead:
                break                                   # loosening stopped paying
            best = result
            if budget - sim < 0.01 * budget:
                break                                   # within 1% of the budget: good enough
            target += budget - sim                      # the cost model was pessimistic by this much
        elif best is not None:
            break                                       # loosened past the budget: keep the last fit
        else:
            target -= sim - budget                      # the cost model was optimistic by this much
        try:
            nxt = at(target)
        except BudgetError:
            break                                       # below the cost model's floor
        if nxt.segments == result.segments:
            break
        result = simulated(nxt)
    if result.simulated_peak_bytes <= budget and (best is None or result.predicted_overhead < best.predicted_overhead):
        best = result                                   # the last round's plan was not looked at in the loop
    return best
