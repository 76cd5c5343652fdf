"""The one way a client trains through memplan: compile with the client's real loss, report the plan.

Every client builds its model, a ``planning_loss`` (output -> scalar, the loss it trains with, on
targets made to match the output's shapes) and calls :func:`compile_for_training`. Planning runs on
meta tensors, so it costs no compute at clinical sizes; the plan's summary line is what the
training commands print before the first step.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn

import memplan
from models.errors import ClientError

__all__ = ["Compiled", "compile_for_training", "plan_line", "resolve_device", "scratch_for"]


@dataclass(frozen=True, eq=False)
class Compiled:
    """The module to train (shares the model's parameters unless REV replaced passes) and its plan."""

    module: nn.Module
    plan: Any                        # memplan.Plan

    @property
    def summary(self) -> str:
        return plan_line(self.plan)


def plan_line(plan: Any) -> str:
    """One line: vanilla vs planned peak (simulated when available), recomputed FLOPs, budget.

    The vanilla peak is the unplanned step's; "planned" is what the compiled module needs.
    """
    vanilla = plan.simulated_vanilla_peak_bytes or plan.vanilla_peak_bytes
    planned = plan.simulated_peak_bytes or plan.predicted_peak_bytes
    kind = "simulated" if plan.simulated_peak_bytes else "cost model"
    budget = (f"{memplan.format_bytes(plan.budget_bytes, binary=False)} ({memplan.format_bytes(plan.budget_bytes)})"
              if plan.budget_bytes else "none (least memory)")
    rev = f", {len(plan.rev)} REV block(s)" if getattr(plan, "rev", ()) else ""
    amp = getattr(plan, "amp", None)
    kind += f", {amp} autocast" if amp else ""
    return (f"memplan: vanilla peak {memplan.format_bytes(vanilla)}, planned peak {memplan.format_bytes(planned)} "
            f"({planned / vanilla:.0%} of vanilla, {kind}), recompute {plan.predicted_overhead:.1%} of forward "
            f"FLOPs{rev}; budget {budget}")


def resolve_device(name: str) -> torch.device:
    """``torch.device(name)``, refused with the fix when it does not exist on this machine.

    >>> resolve_device("cpu").type
    'cpu'
    """
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as exc:
        raise ClientError(f"--device {name!r} is not a torch device ({exc}); use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ClientError(f"--device {name}: no CUDA GPU is visible on this machine "
                              f"(torch.cuda.is_available() is False, torch {torch.__version__}); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ClientError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) are visible; "
                              f"use cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
    elif device.type not in ("cpu", "meta"):
        raise ClientError(f"--device {name}: the clients run on cpu or cuda; use one of those")
    return device


def scratch_for(device: torch.device | str) -> str:
    """memplan's scratch model for a device: CPU convolution buffers on the CPU, tensors only on CUDA."""
    return "cpu" if torch.device(device).type == "cpu" else "none"


def compile_for_training(model: nn.Module, input_shapes: Sequence[int] | Sequence[Sequence[int]], *,
                         loss_fn: Callable[[Any], torch.Tensor], budget: str | int | None = None,
                         rev: bool = False, device: str | torch.device = "cpu", optimizer: str = "adam",
                         plan: Any = None, amp: str | None = None) -> Compiled:
    """``memplan.compile`` of ``model`` for inputs of ``input_shapes`` (one shape or a tuple of shapes),
    planned on meta tensors with the client's real ``loss_fn``; the result is moved to ``device``.
    ``amp`` (None, "bf16", "fp16"): the precision the client trains in (models.loop.Precision), planned
    for as memplan.compile(amp=) does; a saved ``plan`` must have been made for it.

    ``plan`` (a Plan or its JSON) rebuilds a saved plan instead of planning (how REV checkpoints reload).
    BudgetError propagates: the CLI turns it into exit 3 with the smallest feasible peak.
    """
    shapes = [tuple(input_shapes)] if isinstance(input_shapes[0], int) else [tuple(s) for s in input_shapes]
    example = tuple(torch.empty(s, device="meta") for s in shapes)
    example_inputs = example[0] if len(example) == 1 else example
    if plan is not None:
        module = memplan.compile(model, example_inputs, plan=plan, amp=amp)
    else:
        module = memplan.compile(model, example_inputs, budget=budget, optimizer=optimizer, rev=rev,
                                 loss_fn=loss_fn, scratch=scratch_for(device), amp=amp)
    return Compiled(module.to(device), module.memplan_plan)
