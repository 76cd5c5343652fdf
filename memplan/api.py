"""The public entry points: ``plan`` (trace + DP + check) and ``compile`` (plan + rewrite)."""
from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._meta import as_tuple
from .errors import BudgetError, MemplanError
from .graph import DEFAULT_LOWER_SET_BOUND, MemGraph
from .measure import simulate_step
from .plan import Plan, PlanOptions, check_plan, plan_graph, resolve_budget, with_simulation
from .rewrite import rewrite
from .trace import trace
from .units import format_bytes

#: How many times plan() re-plans with a tighter internal budget when simulation exceeds the budget.
CALIBRATION_ROUNDS = 4


def _scratch_model(model: nn.Module, inputs: tuple, scratch: str | None) -> str:
    """'cpu' when the step would run on CPU (kernel scratch matters there), else 'none'."""
    if scratch is not None:
        return scratch
    tensors = [p for p in model.parameters()] + [t for t in inputs if isinstance(t, torch.Tensor)]
    devices = {t.device.type for t in tensors if not t.is_meta}
    return "none" if devices and devices != {"cpu"} else "cpu"


def _graph_scratch(graph: MemGraph, scratch: str) -> dict[str, int] | None:
    return {i.name: i.scratch_cpu_bytes for i in graph} if scratch == "cpu" else None


def plan_for_graph(graph: MemGraph, *, budget: Any = None, optimizer: str = "adam", method: str = "auto",
                   scratch: str = "cpu", loss_fn=None, example_inputs: tuple = (), simulate: bool = True,
                   lower_set_bound: int = DEFAULT_LOWER_SET_BOUND, times: dict | None = None,
                   pinned: frozenset[str] = frozenset()) -> Plan:
    """Plan an already traced graph; when ``simulate``, check the plan with simulate_step and
    tighten the DP's budget until the simulated step fits the requested budget.
    ``pinned`` nodes are never put in a recomputed segment."""
    if method == "remat":              # below the chain floor: memplan.remat (registry: "remat" -> plan_remat)
        from .remat import RematOptions, plan_remat
        return plan_remat(graph, RematOptions(budget_bytes=resolve_budget(budget), optimizer=optimizer, scratch=scratch,
                                              lower_set_bound=lower_set_bound, loss_fn=loss_fn,
                                              example_inputs=tuple(example_inputs) if simulate else ()))
    budget_b = resolve_budget(budget)
    opts = PlanOptions(budget_bytes=budget_b, optimizer=optimizer, method=method,
                       lower_set_bound=lower_set_bound, times=times)
    scr = _graph_scratch(graph, scratch)
    try:
        result = plan_graph(graph, opts, scratch=scr, pinned=pinned)
    except BudgetError as err:
        if not simulate:
            raise
        # The cost model is conservative: the least-memory plan may still fit once simulated.
        least = plan_graph(graph, dataclasses.replace(opts, budget_bytes=None), scratch=scr, pinned=pinned)
        sim = simulate_step(rewrite(graph, least), example_inputs, loss_fn=loss_fn, optimizer=optimizer,
                            scratch=scratch).peak_bytes
        if sim > budget_b:
            raise BudgetError(
                f"budget {format_bytes(budget_b)} is below the smallest feasible peak {format_bytes(sim)} "
                f"(the least-memory plan, simulated; optimizer {optimizer}); raise the budget to at least "
                f"{format_bytes(sim)}, use a smaller input or batch, or a lighter optimizer",
                budget_bytes=budget_b, min_feasible_bytes=sim) from None
        vanilla = simulate_step(graph.gm, example_inputs, loss_fn=loss_fn, optimizer=optimizer,
                                scratch=scratch).peak_bytes
        note = (f"budget is below the cost model's floor {format_bytes(err.min_feasible_bytes)}; "
                "the least-memory plan meets it in simulation")
        return with_simulation(dataclasses.replace(least, budget_bytes=budget_b, objective="time-centric",
                                                   notes=least.notes + (note,)), sim, vanilla)
    if not simulate:
        return result
    vanilla = simulate_step(graph.gm, example_inputs, loss_fn=loss_fn, optimizer=optimizer, scratch=scratch).peak_bytes

    def simulated(p: Plan) -> Plan:
        sim = simulate_step(rewrite(graph, p), example_inputs, loss_fn=loss_fn, optimizer=optimizer,
                            scratch=scratch).peak_bytes
        return with_simulation(dataclasses.replace(p, budget_bytes=budget_b), sim, vanilla)

    def plan_at(target: int) -> Plan:
        return plan_graph(graph, dataclasses.replace(opts, budget_bytes=max(int(target), 1)), scratch=scr,
                          pinned=pinned)

    if budget_b is None:
        return simulated(result)
    return _fit_to_budget(simulated(result), budget_b, simulated, plan_at)


def _fit_to_budget(first: Plan, budget_b: int, simulated, plan_at) -> Plan:
    """Move the DP's internal budget by the simulation's error: tighten until the simulated step fits
    the budget, then loosen while it still fits and recomputes less. Returns the best fitting plan."""
    result, target, best = first, budget_b, None
    for _ in range(CALIBRATION_ROUNDS):
        sim = result.simulated_peak_bytes
        if sim <= budget_b:
            if best is not None and result.predicted_overhead >= best.predicted_overhead:
                break                                   # loosening stopped paying
            best = result
            if budget_b - sim < 0.01 * budget_b:
                break                                   # within 1% of the budget: good enough
            target += budget_b - sim                    # the cost model was pessimistic by this much
        elif best is not None:
            break                                       # loosened past the budget: keep the last fit
        else:
            target -= sim - budget_b                    # the cost model was optimistic by this much
        try:
            nxt = plan_at(target)
        except BudgetError:
            break
        if nxt.segments == result.segments:
            break
        result = simulated(nxt)
    if best is None:
        raise BudgetError(
            f"budget {format_bytes(budget_b)} is below the smallest feasible peak found: the best plan simulates "
            f"at {format_bytes(result.simulated_peak_bytes)}; raise the budget to at least "
            f"{format_bytes(result.simulated_peak_bytes)}",
            budget_bytes=budget_b, min_feasible_bytes=int(result.simulated_peak_bytes))
    return best


def plan(model: nn.Module, example_inputs: Any, *, budget: Any = None, optimizer: str = "adam",
         method: str = "auto", rev: bool = False, loss_fn=None, scratch: str | None = None,
         lower_set_bound: int = DEFAULT_LOWER_SET_BOUND, simulate: bool = True,
         times: dict[str, float] | str | None = None) -> Plan:
    """Decide what to keep and what to recompute for training ``model`` on ``example_inputs``.

    With ``budget`` (bytes or "12GB"): the least recompute whose whole training step fits.
    Without: the smallest feasible peak, then the least recompute for it. Node times are FLOPs
    unless ``times`` is a dict (node name -> seconds) or "measured" (timed on the CPU here).
    """
    if rev:
        from .rev_plan import plan_with_rev
        return plan_with_rev(model, example_inputs, budget=budget, optimizer=optimizer, method=method,
                             loss_fn=loss_fn, scratch=scratch, lower_set_bound=lower_set_bound)[0]
    inputs = as_tuple(example_inputs)
    scr = _scratch_model(model, inputs, scratch)
    graph = trace(model, inputs)
    if isinstance(times, str):
        if times != "measured":
            raise MemplanError(f"times must be a dict of node seconds or 'measured', got {times!r}")
        from .analyze import measure_node_times
        times = measure_node_times(graph.gm, inputs)
    try:
        return plan_for_graph(graph, budget=budget, optimizer=optimizer, method=method, scratch=scr,
                              loss_fn=loss_fn, example_inputs=inputs, simulate=simulate,
                              lower_set_bound=lower_set_bound, times=times)
    except BudgetError as err:
        raise _with_rev_hint(err, model, inputs, optimizer, method, scr) from None


def _with_rev_hint(err: BudgetError, model, inputs, optimizer, method, scratch) -> BudgetError:
    """Add what REV substitution could reach to a BudgetError, when it can be computed."""
    try:
        from .rev_plan import plan_with_rev
        rev_plan = plan_with_rev(model, inputs, budget=None, optimizer=optimizer, method=method,
                                 scratch=scratch, search=False)[0]
    except Exception:  # noqa: BLE001 - the hint is optional; the original error stands
        return err
    reach = rev_plan.simulated_peak_bytes or rev_plan.predicted_peak_bytes
    if reach >= err.min_feasible_bytes:
        msg = f"{err}\nREV substitution would not go lower here."
    else:
        from .units import format_bytes
        msg = f"{err}\nREV would reach {format_bytes(reach)} (rev=True; replaces blocks with fresh weights)."
    return BudgetError(msg, budget_bytes=err.budget_bytes, min_feasible_bytes=err.min_feasible_bytes,
                       rev_min_bytes=int(reach))


def compile(model: nn.Module, example_inputs: Any, *, budget: Any = None, optimizer: str = "adam",
            method: str = "auto", rev: bool = False, plan: Plan | str | Path | None = None,
            loss_fn=None, scratch: str | None = None) -> torch.fx.GraphModule:
    """A module that trains like ``model`` in less memory; it carries its plan as ``.memplan_plan``.

    Gradient checkpointing never changes what the network computes; the result shares ``model``'s
    parameters and buffers, so ``model.state_dict()`` stays the checkpoint format.
    """
    inputs = as_tuple(example_inputs)
    if rev and plan is not None:
        raise MemplanError("compile(rev=True) plans REV itself; pass either rev=True or plan=, not both "
                           "(a saved plan that replaced passes rebuilds them by itself)")
    if plan is not None:
        the_plan = plan if isinstance(plan, Plan) else Plan.from_json(plan)
        if the_plan.rev:                           # rebuild the substituted network the plan was made for
            from .rev_plan import rebuild_rev_graph
            graph = rebuild_rev_graph(model, inputs, the_plan)
            warnings.warn(f"memplan plan replaces {len(the_plan.rev)} pass(es) with reversible blocks: the "
                          "network changes and the new blocks start from fresh weights", stacklevel=2)
        else:
            graph = trace(model, inputs)
        check_plan(the_plan, graph)
    elif rev:
        from .rev_plan import plan_with_rev
        the_plan, graph = plan_with_rev(model, inputs, budget=budget, optimizer=optimizer, method=method,
                                        loss_fn=loss_fn, scratch=scratch)
        warnings.warn("memplan REV substitution changed the network: its replaced blocks "
                      f"({len(the_plan.rev)}) start from fresh weights and must be trained", stacklevel=2)
    else:
        graph = trace(model, inputs)
        scr = _scratch_model(model, inputs, scratch)
        try:
            the_plan = plan_for_graph(graph, budget=budget, optimizer=optimizer, method=method, scratch=scr,
                                      loss_fn=loss_fn, example_inputs=inputs)
        except BudgetError as err:
            raise _with_rev_hint(err, model, inputs, optimizer, method, scr) from None
    module = rewrite(graph, the_plan)
    module.memplan_plan = the_plan
    return module
