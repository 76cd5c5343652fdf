"""Rewrite: a Plan applied to the traced fx graph gives a GraphModule whose recompute segments run
under non-reentrant checkpoint. Parameters and buffers are the original module's own tensors."""
from __future__ import annotations

import inspect
import functools
import operator
import torch
import torch.fx
from torch import nn
from torch.utils.checkpoint import checkpoint

from .bnfreeze import BufferSnapshot, Reentrant
from .graph import MemGraph
from .plan import Plan, check_plan
from .planned import PlannedModule, all_in_mode, training_flags, unwrap
from .trace import trace_module


def _segment_contexts(body: nn.Module):
    """checkpoint's context_fn: a recomputation runs on the buffers as the forward saw them."""
    snap = BufferSnapshot(list(body.buffers()))
    return snap.forward(), Reentrant(snap.recompute)


class CheckpointSegment(nn.Module):
    """Runs ``body`` under non-reentrant checkpoint with RNG preserved; a recomputation reads and
    writes the buffers (BN statistics, counters) as they were in the forward, then restores them, so
    they are updated once. Without autograd it just runs ``body``."""

    def __init__(self, body: torch.fx.GraphModule):
        super().__init__()
        self.body = body

    def forward(self, *args):
        if not torch.is_grad_enabled():
            return self.body(*args)
        if torch.compiler.is_compiling():
            # torch.compile functionalizes buffer writes and recomputes inside its own backward graph,
            # which never replays them: the buffer contexts are neither needed nor supported there
            return checkpoint(self.body, *args, use_reentrant=False, preserve_rng_state=True)
        return checkpoint(self.body, *args, use_reentrant=False, preserve_rng_state=True,
                          context_fn=functools.partial(_segment_contexts, self.body))


def _assign_blocks(gm: torch.fx.GraphModule, graph: MemGraph, plan: Plan) -> dict[str, int]:
    """Block index of every fx node: -1 for inputs and attributes, the plan's for tensor nodes, and
    for nodes outside the MemGraph (sizes, guards) the latest block among their inputs."""
    block = {name: seg.index for seg in plan.segments for name in seg.nodes}
    out: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.op in ("placeholder", "get_attr"):
            out[n.name] = -1
        elif n.op == "output":
            continue
        elif n.name in block:
            out[n.name] = block[n.name]
        else:
            out[n.name] = max([out[a.name] for a in n.all_input_nodes], default=-1)
    return out


def _segment_module(gm: torch.fx.GraphModule, nodes: list[torch.fx.Node], inputs: list[torch.fx.Node],
                    outputs: list[torch.fx.Node]) -> torch.fx.GraphModule:
    """A GraphModule computing ``outputs`` from ``inputs`` with ``nodes`` (shares gm's submodules)."""
    g = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    for i, x in enumerate(inputs):
        env[x] = g.placeholder(f"in_{i}_{x.name}")
    for n in nodes:
        for a in n.all_input_nodes:
            if a not in env and a.op == "get_attr":
                env[a] = g.node_copy(a)
        env[n] = g.node_copy(n, lambda a: env[a])
    g.output(tuple(env[o] for o in outputs))
    body = torch.fx.GraphModule(gm, g, "memplan_segment")
    body.graph.lint()
    return body


def rewrite(graph: MemGraph, plan: Plan) -> torch.fx.GraphModule:
    """Apply ``plan`` to ``graph.gm``: recompute segments become checkpointed submodules.

    The result computes exactly what ``graph.gm`` computes (same ops in a dependency-respecting
    order) and its parameters and buffers are ``graph.gm``'s own tensors.
    """
    check_plan(plan, graph)
    gm = graph.gm
    where = _assign_blocks(gm, graph, plan)
    fx_nodes = list(gm.graph.nodes)
    users_block = {n.name: [where.get(u.name, 10**9) if u.op != "output" else 10**9 for u in n.users]
                   for n in fx_nodes}
    new = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    root = nn.Module()
    for n in fx_nodes:                               # prelude: inputs and attributes
        if n.op in ("placeholder", "get_attr"):
            env[n] = new.node_copy(n, lambda a: env[a])
    recompute = {s.index for s in plan.segments if s.recompute}
    for seg in plan.segments:
        members = [n for n in fx_nodes if where.get(n.name) == seg.index and n.op not in ("placeholder", "get_attr")]
        if not members:
            continue
        if seg.index not in recompute:
            for n in members:
                env[n] = new.node_copy(n, lambda a: env[a])
            continue
        member_set = set(members)
        inputs = []
        for n in members:
            for a in n.all_input_nodes:
                if a not in member_set and a.op != "get_attr" and a not in inputs:
                    inputs.append(a)
        outputs = [n for n in members if any(b != seg.index for b in users_block[n.name])]
        body = _segment_module(gm, members, inputs, outputs)
        name = f"memplan_segment_{seg.index}"
        setattr(root, name, CheckpointSegment(body))
        call = new.call_module(name, tuple(env[a] for a in inputs))
        for j, o in enumerate(outputs):
            env[o] = new.call_function(operator.getitem, (call, j))
    out_node = next(n for n in fx_nodes if n.op == "output")
    new.output(torch.fx.map_arg(out_node.args[0], lambda a: env[a]))
    new.set_codegen(gm.graph._codegen)    # exported graphs (un)flatten pytrees
    # the new module owns gm's submodules and attributes (shared objects) plus the segments
    for name, child in gm.named_children():
        setattr(root, name, child)
    for name, p in gm.named_parameters(recurse=False):
        root.register_parameter(name, p)
    for name, b in gm.named_buffers(recurse=False):
        root.register_buffer(name, b)
    for n in fx_nodes:
        if n.op == "get_attr" and "." not in n.target and not hasattr(root, n.target):
            setattr(root, n.target, getattr(gm, n.target))
    out = torch.fx.GraphModule(root, new, type(gm).__name__ + "Planned")
    out.graph.lint()
    return out


def compile_module(model: nn.Module, example_inputs: tuple, graph: MemGraph, plan: Plan) -> PlannedModule:
    """The compiled module: ``plan`` applied to ``graph`` for the modes ``model`` is in, and the plain
    trace of the other mode (all train or all eval) when its graph differs (see memplan.planned)."""
    model = unwrap(model)
    planned = rewrite(graph, plan)
    flags = training_flags(model)
    graphs = {flags: planned}
    other = not all(flags)
    with all_in_mode(model, other):
        other_flags = training_flags(model)
        if other_flags != flags:
            gm, _, _ = trace_module(model, example_inputs)
            graphs[other_flags] = planned if gm.code == graph.original_gm.code else gm
    try:
        call = inspect.signature(model.forward).bind(*example_inputs)
        call.apply_defaults()
    except (TypeError, ValueError):
        call = None
    return PlannedModule(model, graphs, plan, call)
