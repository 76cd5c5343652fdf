"""What users would otherwise do, as runnable modules: checkpointing by hand, Chen's sqrt(n) over
single-tensor cuts, and torch.compile's activation memory budget.

By-hand checkpointing wraps modules in ``torch.utils.checkpoint`` (non-reentrant); Chen's plan is a
chain of lower sets run by memplan's own rewrite, so one simulator rates it like memplan's plans.
"""
from __future__ import annotations

import copy
import types
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.fx
from torch import nn
from torch.utils.checkpoint import checkpoint

from memplan import baselines as memplan_baselines
from memplan.graph import MemGraph
from memplan.options import PlanOptions
from memplan.plan import Plan

__all__ = ["Checkpointed", "checkpoint_modules", "block_checkpointed", "fetusmap_rule_names", "fetusmap_rule",
           "recomputed_fraction", "articulation_points", "chen_chain", "chen_plan", "compiled_with_budget",
           "CompiledStep"]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_PASS_TAIL = (nn.modules.batchnorm._BatchNorm, nn.ReLU, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.GELU)


class Checkpointed(nn.Module):
    """``inner`` run under non-reentrant ``torch.utils.checkpoint`` while autograd records."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, *args):
        if not torch.is_grad_enabled():
            return self.inner(*args)
        return checkpoint(self.inner, *args, use_reentrant=False)


def checkpoint_modules(model: nn.Module, names: list[str] | tuple[str, ...]) -> nn.Module:
    """A deep copy of ``model`` with each named submodule wrapped in :class:`Checkpointed`.

    >>> net = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    >>> type(checkpoint_modules(net, ["0"])[0]).__name__
    'Checkpointed'
    """
    out = copy.deepcopy(model)
    known = dict(out.named_modules())
    for name in names:
        if name not in known or not name:
            raise ValueError(f"module {name!r} is not in {type(model).__name__}; names look like "
                             f"{[n for n in known if n][:4]}")
        parent_name, _, child = name.rpartition(".")
        parent = out.get_submodule(parent_name) if parent_name else out
        setattr(parent, child, Checkpointed(getattr(parent, child)))
    return out


def block_checkpointed(model: nn.Module, blocks: tuple[str, ...]) -> nn.Module:
    """Checkpoint around every encoder/decoder block, as users write it."""
    return checkpoint_modules(model, list(blocks))


def _pass_of(gm: torch.fx.GraphModule, conv: torch.fx.Node) -> list[torch.fx.Node]:
    """The conv node and the norm/activation modules that follow it one to one (Conv-BN-ReLU)."""
    chain = [conv]
    while len(chain[-1].users) == 1:
        nxt = next(iter(chain[-1].users))
        if nxt.op != "call_module" or not isinstance(gm.get_submodule(nxt.target), _PASS_TAIL):
            break
        chain.append(nxt)
    return chain


def _feeds_cat(node: torch.fx.Node) -> bool:
    return any(u.op in ("call_function", "call_method") and getattr(u.target, "__name__", u.target) in ("cat", "concat")
               for u in node.users)


def fetusmap_rule_names(model: nn.Module) -> list[str]:
    """FetusMap's rule: the modules of every conv pass (Conv[-BN][-ReLU]) whose output does not feed a
    concatenation. A pass that is exactly a Sequential's children is wrapped whole, else its conv."""
    gm = torch.fx.symbolic_trace(model)
    names = []
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(gm.get_submodule(node.target), _CONVS):
            continue
        chain = _pass_of(gm, node)
        if _feeds_cat(chain[-1]):
            continue
        parent = node.target.rpartition(".")[0]
        whole = bool(parent) and isinstance(model.get_submodule(parent), nn.Sequential) and [
            f"{parent}.{c}" for c, _ in gm.get_submodule(parent).named_children()] == [n.target for n in chain]
        names.append(parent if whole else node.target)
    return list(dict.fromkeys(names))


def fetusmap_rule(model: nn.Module) -> nn.Module:
    return checkpoint_modules(model, fetusmap_rule_names(model))


def recomputed_fraction(graph: MemGraph, names: list[str] | tuple[str, ...]) -> float:
    """Forward FLOPs of the module calls inside the named (checkpointed) modules / all forward FLOPs:
    what their backward re-runs. Function calls inside them (an attention's softmax) are not counted.

    >>> import memplan
    >>> net = nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)))
    >>> round(recomputed_fraction(memplan.trace(net, torch.empty(1, 4, device="meta")), ["1"]), 3)
    0.667
    """
    inside = [i.flops for i in graph if i.op == "call_module"
              and any(i.target == n or str(i.target).startswith(n + ".") for n in names)]
    return sum(inside) / (graph.total_flops or 1)


# -- Chen et al. 2016: sqrt(n) segments over articulation points (memplan.baselines, the "chen" planner) -------

def articulation_points(graph: MemGraph, optimizer: str = "adam") -> list[int]:
    """Graph-order indices of single-tensor cuts (see memplan.baselines.articulation_points)."""
    return memplan_baselines.articulation_points(graph, optimizer)


def chen_chain(graph: MemGraph, cuts: list[int]) -> list[int]:
    """Chen's sqrt(n) chain (see memplan.baselines.chen_chain).

    >>> import torch
    >>> import memplan
    >>> net = torch.nn.Sequential(*[torch.nn.Tanh() for _ in range(9)])
    >>> g = memplan.trace(net, torch.empty(2, 3, device="meta"))
    >>> [bin(m).count("1") for m in chen_chain(g, articulation_points(g))]
    [3, 6, 7, 8, 9]
    """
    return memplan_baselines.chen_chain(graph, cuts)


def chen_plan(graph: MemGraph, *, optimizer: str = "adam", scratch: dict[str, int] | None = None) -> Plan:
    """Chen's sqrt(n) plan as a memplan Plan: the registered "chen" planner, cost model only (the caller
    simulates). ``scratch`` (per-node CPU scratch, or None) picks the scratch model."""
    options = PlanOptions(method="chen", optimizer=optimizer, scratch="cpu" if scratch else "none", simulate=False)
    return memplan_baselines.plan_chen(graph, options)


# -- torch.compile with an activation memory budget ------------------------------------------------

@dataclass
class CompiledStep:
    """A torch.compile'd forward whose every call runs with ``activation_memory_budget`` set (the
    partitioner reads it when it compiles, at the first call). ``module`` holds the parameters."""
    module: nn.Module
    forward: Callable[..., Any]
    budget: float

    def __call__(self, *args):
        import torch._functorch.config as functorch_config
        with functorch_config.patch(activation_memory_budget=self.budget):
            return self.forward(*args)


def _own_code(module: nn.Module) -> Callable[..., Any]:
    """``module(*args)`` behind a function with a code object of its own. Dynamo caches compiled graphs
    on the code object of the frame it compiles, with guards a twin network of the same class passes:
    without this, a second compiled copy would silently reuse the first one's partition (and budget)."""
    def forward(*args):
        return module(*args)
    return types.FunctionType(forward.__code__.replace(), forward.__globals__, "forward", None, forward.__closure__)


def compiled_with_budget(model: nn.Module, budget: float, backend: str = "aot_eager") -> CompiledStep:
    """A deep copy of ``model`` whose forward is compiled with ``backend`` under an activation memory budget."""
    module = copy.deepcopy(model)
    return CompiledStep(module, torch.compile(_own_code(module), backend=backend), budget)
