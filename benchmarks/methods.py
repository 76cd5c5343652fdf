"""The benchmark's rows: each method predicted on meta tensors (a picklable task a worker process
runs) and built as a trainable module for the measured columns.

Every prediction is ``memplan.simulate_step`` of the module the method trains (memplan's plans carry
that figure already), so one ruler rates every row. torch.compile cannot be predicted: the dispatch
mode the simulator needs makes compiled code run eagerly.
"""
from __future__ import annotations

import copy
import importlib.util
import time
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

import memplan
from memplan.errors import BudgetError
from memplan.plan import Plan
from memplan.rewrite import rewrite

from benchmarks import baselines
from benchmarks.clients import ModelSpec, quick_specs, specs
from benchmarks.floor import floor_of

__all__ = ["METHODS", "LABELS", "PAPER_GCPREV_RATIO", "Task", "run_task", "spec_for", "build_module",
           "rockmate_skip_reason"]

#: FetusMapV2 Table 4: UGCPREV's peak is 57% of the vanilla UNet's at 176x112x112.
PAPER_GCPREV_RATIO = 0.57
COMPILE_BUDGETS = {"compile-0.5": 0.5, "compile-0.0": 0.0}

METHODS = ("vanilla", "blocks", "fetusmap-rule", "chen", "compile-0.5", "compile-0.0", "memplan-gcp",
           "memplan-0.57", "memplan-rev", "memplan-gcp+rev", "rockmate")
LABELS = {
    "vanilla": "vanilla autograd",
    "blocks": "by hand: checkpoint every encoder/decoder block",
    "fetusmap-rule": "by hand: FetusMap rule (every conv not feeding a cat)",
    "chen": "Chen sqrt(n) over articulation points",
    "compile-0.5": "torch.compile, activation_memory_budget=0.5",
    "compile-0.0": "torch.compile, activation_memory_budget=0.0",
    "memplan-gcp": "memplan GCP (memory-centric)",
    "memplan-0.57": "memplan GCP, budget 0.57 x vanilla",
    "memplan-rev": "memplan REV only",
    "memplan-gcp+rev": "memplan GCP+REV",
    "rockmate": "Rockmate",
}
_NO_SIMULATION = "n/a: compiled code cannot be simulated (a dispatch mode makes it run eagerly)"


def rockmate_skip_reason() -> str:
    """Why the Rockmate row is skipped ('' when it can run)."""
    if importlib.util.find_spec("rockmate") is None:
        return "skipped: rockmate is not importable (pip install rockmate; it needs CUDA)"
    if not torch.cuda.is_available():
        return "skipped: rockmate is installed but needs a CUDA device, and none is present"
    return ""


@dataclass(frozen=True)
class Task:
    """One prediction: a method on a model at one size and scratch model (picklable for a worker)."""
    model: str
    size: str            # "paper" or "reduced"
    method: str
    scratch: str
    quick: bool = False
    rev_search: bool = False


def spec_for(key: str, quick: bool) -> ModelSpec:
    if quick:
        return next(s for s in quick_specs() if s.key == key)
    return specs((key,))[0][0]


def _model_and_shape(task: Task) -> tuple[nn.Module, tuple[int, ...]]:
    spec = spec_for(task.model, task.quick)
    torch.manual_seed(0)
    if task.size == "paper":
        return spec.build(), spec.paper_shape
    return spec.build_reduced(), spec.reduced_shape


def run_task(task: Task) -> dict[str, Any]:
    """Predict one row's peak (and recompute overhead, planning time, plan) on meta tensors."""
    torch.set_num_threads(1)   # the CPU scratch model depends on the thread count; the run uses one thread
    model, shape = _model_and_shape(task)
    x = torch.empty(shape, device="meta")
    t0 = time.perf_counter()
    try:
        out = _PREDICTORS[task.method](model, x, task)
    except Exception as exc:   # noqa: BLE001 - a failing row is reported in the table, the others still run
        out = {"peak_bytes": None, "note": f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
    out["wall_s"] = time.perf_counter() - t0
    return out


def _sim(module: nn.Module, x: torch.Tensor, scratch: str) -> int:
    return memplan.simulate_step(module, x, optimizer="adam", scratch=scratch).peak_bytes


def _vanilla(model, x, task):
    graph = memplan.trace(model, x)
    floor = floor_of(graph, optimizer="adam", scratch=task.scratch)
    return {"peak_bytes": _sim(model, x, task.scratch), "overhead": 0.0, "floor": floor.as_dict(),
            "params": sum(p.numel() for p in model.parameters())}


def _blocks(model, x, task):
    spec = spec_for(task.model, task.quick)
    return {"peak_bytes": _sim(baselines.block_checkpointed(model, spec.blocks), x, task.scratch),
            "overhead": baselines.recomputed_fraction(memplan.trace(model, x), spec.blocks),
            "note": f"{len(spec.blocks)} blocks"}


def _rule(model, x, task):
    names = baselines.fetusmap_rule_names(model)
    return {"peak_bytes": _sim(baselines.checkpoint_modules(model, names), x, task.scratch),
            "overhead": baselines.recomputed_fraction(memplan.trace(model, x), names),
            "note": f"{len(names)} passes checkpointed"}


def _chen(model, x, task):
    t0 = time.perf_counter()
    graph = memplan.trace(model, x)
    plan = baselines.chen_plan(graph, scratch={i.name: i.scratch_cpu_bytes for i in graph}
                               if task.scratch == "cpu" else None)
    return {"peak_bytes": _sim(rewrite(graph, plan), x, task.scratch), "overhead": plan.predicted_overhead,
            "planning_time_s": time.perf_counter() - t0, "note": plan.method_reason}


def _compiled(model, x, task):
    return {"peak_bytes": None, "note": _NO_SIMULATION}


def _timed(fn, *args, **kwargs):
    """(result, seconds): planning time is the whole call (trace, DP, the simulations that check it)."""
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


def _plan_out(plan: Plan, seconds: float, note: str = "") -> dict[str, Any]:
    return {"peak_bytes": int(plan.simulated_peak_bytes), "overhead": plan.predicted_overhead,
            "planning_time_s": seconds, "plan_json": plan.to_json(), "note": note, "rev_blocks": len(plan.rev)}


def _gcp(model, x, task):
    plan, seconds = _timed(memplan.plan, model, x, optimizer="adam", scratch=task.scratch)
    return _plan_out(plan, seconds, f"{len(plan.recomputed_segments)} recomputed segments ({plan.method} DP)")


def _budgeted(model, x, task):
    vanilla = _sim(model, x, task.scratch)
    budget = int(PAPER_GCPREV_RATIO * vanilla)
    try:
        plan, seconds = _timed(memplan.plan, model, x, budget=budget, optimizer="adam", scratch=task.scratch)
    except BudgetError as err:
        return {"peak_bytes": None, "budget_bytes": budget,
                "note": f"infeasible: no GCP plan fits {memplan.format_bytes(budget)} (least "
                        f"{memplan.format_bytes(err.min_feasible_bytes)})"}
    out = _plan_out(plan, seconds, f"budget {memplan.format_bytes(budget)}, "
                                   f"{len(plan.recomputed_segments)} recomputed segments")
    out["budget_bytes"] = budget
    return out


def _rev_only(model, x, task):
    from memplan.rev_plan import rev_only_plan
    (plan, graph), seconds = _timed(rev_only_plan, model, x, optimizer="adam", scratch=task.scratch)
    return _plan_out(plan, seconds, f"{len(plan.rev)} REV blocks, "
                                    f"{sum(p.numel() for p in graph.gm.parameters()) / 1e6:.2f} M params")


def _gcp_rev(model, x, task):
    from memplan.rev_plan import plan_with_rev
    (plan, graph), seconds = _timed(plan_with_rev, model, x, optimizer="adam", scratch=task.scratch,
                                    search=task.rev_search)
    return _plan_out(plan, seconds, f"{len(plan.rev)} REV blocks, {len(plan.recomputed_segments)} recomputed "
                                    f"segments, {sum(p.numel() for p in graph.gm.parameters()) / 1e6:.2f} M params")


def _rockmate(model, x, task):
    return {"peak_bytes": None, "note": rockmate_skip_reason() or "n/a: Rockmate plans on the device, measured only"}


_PREDICTORS = {"vanilla": _vanilla, "blocks": _blocks, "fetusmap-rule": _rule, "chen": _chen,
               "compile-0.5": _compiled, "compile-0.0": _compiled, "memplan-gcp": _gcp, "memplan-0.57": _budgeted,
               "memplan-rev": _rev_only, "memplan-gcp+rev": _gcp_rev, "rockmate": _rockmate}


# -- trainable modules for the measured columns ------------------------------------------------------

def build_module(method: str, model: nn.Module, x: torch.Tensor, spec: ModelSpec, predicted: dict[str, Any]
                 ) -> tuple[Any, nn.Module] | None:
    """(callable, module holding its parameters) training ``method`` on ``x``, or None when the row has
    nothing to run (infeasible budget, skipped Rockmate). Each gets its own copy of ``model``."""
    own = copy.deepcopy(model)
    if method == "vanilla":
        return own, own
    if method == "blocks":
        m = baselines.block_checkpointed(own, spec.blocks)
        return m, m
    if method == "fetusmap-rule":
        m = baselines.fetusmap_rule(own)
        return m, m
    if method == "chen":
        graph = memplan.trace(own, x)
        m = rewrite(graph, baselines.chen_plan(graph))
        return m, m
    if method in COMPILE_BUDGETS:
        c = baselines.compiled_with_budget(own, COMPILE_BUDGETS[method])
        return c, c.module
    if method == "rockmate":
        return _rockmate_module(own, x)
    plan_json = predicted.get("plan_json")
    if not plan_json:
        return None
    with warnings.catch_warnings():       # REV plans warn that the network changes: the row says so
        warnings.simplefilter("ignore", UserWarning)
        m = memplan.compile(own, x, plan=Plan.from_json(plan_json))
    return m, m


def _rockmate_module(model: nn.Module, x: torch.Tensor):
    """Rockmate's module under 0.57 x the vanilla peak, when it is installed and CUDA is present (untested here)."""
    if rockmate_skip_reason() or x.device.type != "cuda":
        return None
    from rockmate import Rockmate   # pragma: no cover - not installed on the development machine
    budget = int(PAPER_GCPREV_RATIO * memplan.simulate_step(model, x, scratch="none").peak_bytes)
    m = Rockmate(model.to(x.device), x, budget)
    return m, m


# -- the largest input under a budget (FetusMapV2's grid) --------------------------------------------

#: FetusMapV2 Table 1/4: the largest input of each scheme under its 8 GB limit.
PAPER_FIT_8GB = {"vanilla": (176, 112, 112), "GCP": (192, 112, 128), "REV": (192, 128, 128),
                 "GCP+REV": (208, 128, 144)}
FIT_STRATEGIES = tuple(PAPER_FIT_8GB)


@dataclass(frozen=True)
class FitTask:
    """The largest input per budget for one strategy (picklable). Budgets are byte strings ("8GiB")
    or multiples of the vanilla peak at the base shape ("1.5x")."""
    model: str
    strategy: str
    budgets: tuple[str, ...]
    scratch: str = "none"
    quick: bool = False
    rev_search: bool = False


def _peak_function(model: nn.Module, strategy: str, scratch: str, rev_search: bool):
    """input shape -> the simulated peak ``strategy`` reaches there (memory-centric: its least peak)."""
    def x_of(shape):
        return torch.empty(shape, device="meta")
    if strategy == "vanilla":
        return lambda s: _sim(model, x_of(s), scratch)
    if strategy == "GCP":
        return lambda s: memplan.plan(model, x_of(s), scratch=scratch).simulated_peak_bytes
    from memplan.rev_plan import plan_with_rev, rev_only_plan
    if strategy == "REV":
        return lambda s: rev_only_plan(model, x_of(s), scratch=scratch)[0].simulated_peak_bytes
    return lambda s: plan_with_rev(model, x_of(s), scratch=scratch, search=rev_search)[0].simulated_peak_bytes


def resolve_budgets(budgets: tuple[str, ...], vanilla_bytes: int) -> list[int]:
    """Byte strings, or "<k>x" for k times the vanilla peak.

    >>> resolve_budgets(("8GiB", "1.5x"), 1000)
    [8589934592, 1500]
    """
    out = []
    for b in budgets:
        text = b.strip()
        out.append(int(float(text[:-1]) * vanilla_bytes) if text.lower().endswith("x") else memplan.parse_bytes(text))
    return out


def run_fit(task: FitTask) -> dict[str, Any]:
    """Search FetusMapV2's grid for the largest input under each budget with one strategy."""
    from benchmarks.fit_search import largest_fits
    torch.set_num_threads(1)
    spec = spec_for(task.model, task.quick)
    torch.manual_seed(0)
    model = spec.build()
    t0 = time.perf_counter()
    base = spec.paper_shape
    graph = memplan.trace(model, torch.empty(base, device="meta"))
    f = floor_of(graph)
    budgets = resolve_budgets(task.budgets, _sim(model, torch.empty(base, device="meta"), task.scratch))
    peak_of = _peak_function(model, task.strategy, task.scratch, task.rev_search)
    try:
        answers, evaluations = largest_fits(peak_of, base, budgets, static_bytes=f.parameter_bytes + f.gradient_bytes
                                            + f.optimizer_state_bytes + f.other_static_bytes)
    except Exception as exc:  # noqa: BLE001 - reported in the table
        return {"strategy": task.strategy, "note": f"error: {type(exc).__name__}: {exc}"[:300], "answers": [],
                "wall_s": time.perf_counter() - t0}
    return {"strategy": task.strategy, "evaluations": evaluations, "wall_s": time.perf_counter() - t0,
            "answers": [a.__dict__ for a in answers], "note": ""}
