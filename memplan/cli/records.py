"""The ``--json`` records of the ``memplan`` commands, and the one printed when a command fails.

Every record is plain JSON data; :func:`to_json` lays it out one key per line with short lists of
plain values (shapes, node names) on one line.
"""
from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any

from ..errors import BudgetError
from ..segtable import segment_rows


def to_json(obj: Any, level: int = 0) -> str:
    """JSON with one key per line and lists of plain values on one line (shapes, node names).

    >>> print(to_json({"shape": [1, 2], "rows": [{"a": None}]}))
    {
     "shape": [1, 2],
     "rows": [
      {
       "a": null
      }
     ]
    }
    """
    pad, inner = " " * level, " " * (level + 1)
    if isinstance(obj, dict) and obj:
        items = [f"{inner}{json.dumps(str(k))}: {to_json(v, level + 1)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + f"\n{pad}}}"
    if isinstance(obj, (list, tuple)) and any(isinstance(v, (dict, list, tuple)) for v in obj):
        return "[\n" + ",\n".join(f"{inner}{to_json(v, level + 1)}" for v in obj) + f"\n{pad}]"
    return json.dumps(obj)


def error_record(exc: BaseException, exit_code: int, message: str | None = None) -> dict:
    """``{"error": {"type", "message", "exit_code", ...}}`` (``message`` defaults to the exception's text);
    a BudgetError adds its byte figures.

    >>> error_record(ValueError("bad"), 2)
    {'error': {'type': 'ValueError', 'message': 'bad', 'exit_code': 2}}
    """
    err: dict[str, Any] = {"type": type(exc).__name__, "message": str(exc) if message is None else message,
                          "exit_code": int(exit_code)}
    if isinstance(exc, BudgetError):
        err.update(budget_bytes=exc.budget_bytes, min_feasible_bytes=exc.min_feasible_bytes,
                   rev_min_bytes=exc.rev_min_bytes)
    return {"error": err}


def optimize_record(loaded, plan, *, scratch: str, out: str | None, plot: str | None,
                    precision_peaks: dict[str, dict[str, int]] | None = None) -> dict:
    """The machine-readable summary of ``memplan optimize`` (the full plan under "plan"); "precision_peaks"
    holds the simulated vanilla and planned peaks in fp32 and in mixed precision, side by side."""
    sim_v, sim_p = plan.simulated_vanilla_peak_bytes, plan.simulated_peak_bytes
    return {
        "model": loaded.model_source, "input_shapes": [list(s) for s in loaded.input_shapes],
        "dtype": str(loaded.inputs[0].dtype).removeprefix("torch."), "input_source": loaded.input_source,
        "graph_nodes": sum(len(s.nodes) for s in plan.segments), "lower_sets": plan.lower_set_count,
        "method": plan.method, "method_reason": plan.method_reason, "objective": plan.objective,
        "optimizer": plan.optimizer, "scratch": scratch, "amp": plan.amp, "threads": plan.threads,
        "budget_bytes": plan.budget_bytes, "vanilla_peak_bytes": sim_v, "planned_peak_bytes": sim_p,
        "precision_peaks": precision_peaks or {},
        "vanilla_cost_model_bytes": plan.vanilla_peak_bytes, "planned_cost_model_bytes": plan.predicted_peak_bytes,
        "peak_ratio": None if not sim_v or sim_p is None else sim_p / sim_v,
        "overhead": plan.predicted_overhead, "planning_time_s": plan.planning_time_s,
        "segments": [r.as_dict() for r in segment_rows(plan.segments, plan.rev, merge=False)],
        "rev": [asdict(r) for r in plan.rev], "split_concat": [asdict(r) for r in plan.split_concat],
        "notes": list(plan.notes), "plan_file": out, "plot_file": plot, "plan": json.loads(plan.to_json()),
    }


def fit_record(loaded, grid, results, budget_bytes: int, *, optimizer: str, scratch: str, amp: str | None = None,
               threads: int | None = None, peaks_by_precision: dict[str, dict[str, int]] | None = None) -> dict:
    """The machine-readable answer of ``memplan fit``: the grid and one result per strategy;
    "peaks_at_given" maps precision -> strategy -> simulated peak at the given input."""
    def shape(s):
        return None if s is None else list(s)
    return {
        "model": loaded.model_source, "budget_bytes": budget_bytes, "base_shape": list(grid.base),
        "axes": list(grid.axes), "multiples": list(grid.multiples), "optimizer": optimizer, "scratch": scratch,
        "amp": amp, "threads": threads, "peaks_at_given": peaks_by_precision or {},
        "results": [{**{k: v for k, v in asdict(r).items() if k not in ("shape", "next_shape")},
                     "shape": shape(r.shape), "next_shape": shape(r.next_shape), "capped": r.capped}
                    for r in results],
    }


def measure_record(loaded, plan, rows: dict[str, dict], *, optimizer: str, scratch: str,
                   device: str | None, amp: str | None = None, threads: int | None = None) -> dict:
    """The machine-readable comparison of ``memplan measure``; ``device`` is None without --real."""
    v, p = rows["vanilla"], rows["planned"]
    real = device is not None
    return {
        "model": loaded.model_source, "input_shapes": [list(s) for s in loaded.input_shapes],
        "budget_bytes": plan.budget_bytes, "optimizer": optimizer, "scratch": scratch, "amp": amp,
        "threads": threads, "rev": bool(plan.rev), "split_concat": bool(plan.split_concat),
        "device": device, "vanilla": v, "planned": p,
        "simulated_ratio": p["simulated_peak_bytes"] / v["simulated_peak_bytes"],
        "measured_ratio": (p["measured_peak_bytes"] / v["measured_peak_bytes"]) if real else None,
        "step_time_ratio": (p["step_time_s"] / v["step_time_s"]) if real else None,
        "overhead": plan.predicted_overhead,
    }
