"""The public entry points: ``plan`` (trace + a registered planner) and ``compile`` (plan + rewrite).

Keyword arguments build one :class:`~memplan.options.PlanOptions`; the planner it names
(memplan.planners) does the rest. A BudgetError says what REV would reach when that is worth it.
"""
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
from .options import PlanOptions, check_amp_mode, plan_options
from .plan import Plan, check_plan
from .planners import plan_graph
from .rev.search import estimate_rev_reach, rebuild_rev_graph
from .inputs import check_inputs
from .planned import keyword_call, unwrap
from .rewrite import compile_module, rewrite
from .splitcat import rebuild_split_graph
from .trace import trace
from .units import format_bytes, parse_bytes


def plan_for_graph(graph: MemGraph, *, budget: Any = None, optimizer: str = "adam", method: str = "auto",
                   scratch: str = "cpu", loss_fn=None, example_inputs: tuple = (), simulate: bool = True,
                   lower_set_bound: int = DEFAULT_LOWER_SET_BOUND, times: dict | None = None,
                   pinned: frozenset[str] = frozenset(), amp: str | None = None, keep_output: bool = True,
                   threads: int | None = None) -> Plan:
    """Plan an already traced graph with keyword options (the older spelling of
    ``plan_graph(graph, PlanOptions(...))``)."""
    options = PlanOptions(method=method, budget_bytes=None if budget is None else parse_bytes(budget),
                          optimizer=optimizer, scratch=scratch, lower_set_bound=lower_set_bound, times=times,
                          pinned=pinned, simulate=simulate, amp=amp, keep_output=keep_output, threads=threads,
                          example_inputs=as_tuple(example_inputs), loss_fn=loss_fn)
    return plan_graph(graph, options)


def plan(model: nn.Module, example_inputs: Any, *, budget: Any = None, optimizer: str = "adam",
         method: str = "auto", rev: bool = False, loss_fn=None, scratch: str | None = None,
         lower_set_bound: int = DEFAULT_LOWER_SET_BOUND, simulate: bool = True,
         times: dict[str, float] | str | None = None, example_kwargs: dict | None = None, amp: str | None = None,
         keep_output: bool = True, threads: int | None = None, split_concat: bool = False) -> Plan:
    """Decide what to keep and what to recompute for training ``model`` on ``example_inputs``.

    With ``budget`` (bytes or "12GB"): the least recompute whose whole training step fits.
    Without: the smallest feasible peak, then the least recompute for it. Node times are FLOPs
    unless ``times`` is a dict (node name -> seconds) or "measured" (timed on the CPU here).
    ``method`` names a registered planner (memplan.planners); ``rev=True`` adds REV to the DP.
    ``example_kwargs``: keyword arguments of the call; tensors among them become graph inputs.
    The step planned for: ``amp`` None (fp32), "bf16" or "fp16" autocast (fp16 with a GradScaler),
    ``keep_output`` the loop holding the output through backward, ``threads`` the CPU's OpenMP threads
    (default torch.get_num_threads()); the plan records all three. ``split_concat=True`` (opt-in, not
    bitwise) first splits each convolution over a channel concatenation into per-part convolutions
    (memplan.splitcat), which lowers a U-Net's floor; the plan lists every split.
    """
    inputs = as_tuple(example_inputs)
    check_inputs(model, inputs)
    model, inputs = keyword_call(unwrap(model), inputs, example_kwargs)
    if isinstance(times, str) and times != "measured":
        raise MemplanError(f"times must be a dict of node seconds or 'measured', got {times!r}")
    options = plan_options(model, inputs, budget=budget, optimizer=optimizer, method=method, rev=rev,
                           loss_fn=loss_fn, scratch=scratch, lower_set_bound=lower_set_bound, simulate=simulate,
                           amp=amp, keep_output=keep_output, threads=threads, split_concat=split_concat)
    graph = trace(model, inputs)
    if times == "measured":
        from .analyze import measure_node_times
        times = measure_node_times(graph.gm, inputs)
    if times is not None:
        options = dataclasses.replace(options, times=times)
    return _planned(graph, options)


def _planned(graph: MemGraph, options: PlanOptions) -> Plan:
    """The planner's plan; a BudgetError gains REV's estimated reach when it is worth it."""
    try:
        return plan_graph(graph, options)
    except BudgetError as err:
        raise _with_rev_hint(err, graph, options) from None


def _with_rev_hint(err: BudgetError, graph: MemGraph, options: PlanOptions) -> BudgetError:
    """``err`` plus what REV substitution would reach, estimated by the cost model (no search, no
    simulation), when that is at least ``options.rev_min_gain`` below the smallest feasible peak."""
    if options.method in ("rev", "rev-only") or not options.rev_hint or err.rev_min_bytes is not None:
        return err
    reach = estimate_rev_reach(graph, options, err.min_feasible_bytes)
    if reach is None or reach > (1 - options.rev_min_gain) * err.min_feasible_bytes:
        return err
    msg = (f"{err}\nREV would reach about {format_bytes(reach)} (cost-model estimate; rev=True replaces blocks "
           "with fresh weights).")
    return BudgetError(msg, budget_bytes=err.budget_bytes, min_feasible_bytes=err.min_feasible_bytes,
                       rev_min_bytes=int(reach))


def _split_for(graph: MemGraph, the_plan: Plan) -> MemGraph:
    """The graph ``the_plan`` runs: its convolutions over concatenations split as the plan says (with a
    warning: the split rounds differently from the original)."""
    if not the_plan.split_concat:
        return graph
    split = rebuild_split_graph(graph, the_plan)
    warnings.warn(f"memplan splits {len(the_plan.split_concat)} convolution(s) over concatenations "
                  "(split_concat=True): values and gradients round differently from the original", stacklevel=3)
    return split


def compile(model: nn.Module, example_inputs: Any, *, budget: Any = None, optimizer: str = "adam",
            method: str = "auto", rev: bool = False, plan: Plan | str | Path | None = None,
            loss_fn=None, scratch: str | None = None, example_kwargs: dict | None = None, amp: str | None = None,
            keep_output: bool = True, threads: int | None = None, split_concat: bool = False) -> nn.Module:
    """A module that trains like ``model`` in less memory; it carries its plan as ``.memplan_plan``.

    Gradient checkpointing never changes what the network computes; the result shares ``model``'s
    parameters and buffers, so ``model.state_dict()`` stays the checkpoint format. ``example_kwargs``:
    keyword arguments of the call; tensors among them are graph inputs, other values are fixed (checked).
    ``amp``, ``keep_output``, ``threads`` as in :func:`plan`; a saved ``plan`` must have been made for
    ``amp`` (PlanMismatchError naming both precisions). The result runs under torch.autocast like ``model``.
    ``split_concat`` as in :func:`plan` (a saved plan that split convolutions splits them again).
    """
    call_inputs = as_tuple(example_inputs)
    check_inputs(model, call_inputs)
    model = unwrap(model)
    check_amp_mode(amp)
    traced, inputs = keyword_call(model, call_inputs, example_kwargs)
    rev_kwargs = MemplanError("example_kwargs with REV substitution is not supported (the substituted network is "
                              "called positionally); compile without rev or without keyword arguments")
    if example_kwargs and rev:
        raise rev_kwargs
    if rev and plan is not None:
        raise MemplanError("compile(rev=True) plans REV itself; pass either rev=True or plan=, not both "
                           "(a saved plan that replaced passes rebuilds them by itself)")
    if plan is not None:
        the_plan = plan if isinstance(plan, Plan) else Plan.from_json(plan)
        graph = trace(traced, inputs)
        graph = _split_for(graph, the_plan)
        if the_plan.rev:                           # rebuild the substituted network the plan was made for
            graph = rebuild_rev_graph(graph, inputs, the_plan)
            warnings.warn(f"memplan plan replaces {len(the_plan.rev)} pass(es) with reversible blocks: the "
                          "network changes and the new blocks start from fresh weights", stacklevel=2)
        check_plan(the_plan, graph, amp=amp)
    else:
        options = plan_options(traced, inputs, budget=budget, optimizer=optimizer, method=method, rev=rev,
                               loss_fn=loss_fn, scratch=scratch, amp=amp, keep_output=keep_output, threads=threads,
                               split_concat=split_concat)
        graph = trace(traced, inputs)
        the_plan = _planned(graph, options)
        graph = _split_for(graph, the_plan)
        if the_plan.rev:
            graph = rebuild_rev_graph(graph, inputs, the_plan)
            warnings.warn("memplan REV substitution changed the network: its replaced blocks "
                          f"({len(the_plan.rev)}) start from fresh weights and must be trained", stacklevel=2)
    if the_plan.rev:                  # a changed network: its own parameters, not the original's
        if example_kwargs:
            raise rev_kwargs
        module = rewrite(graph, the_plan)
        module.memplan_plan = the_plan
        return module
    return compile_module(model, call_inputs, graph, the_plan, example_kwargs)
