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
from .errors import PlanMismatchError
from .graph import MemGraph
from .plan import Plan, check_plan
from .planned import KeywordCall, PlannedModule, all_in_mode, keyword_call, training_flags, unwrap
from .trace import trace_module


def _segment_contexts(body: nn.Module):
    """checkpoint's context_fn: a recomputation runs on the buffers as the forward saw them."""
    snap = BufferSnapshot(list(body.buffers()))
    return snap.forward(), Reentrant(snap.recompute)


#: Substrings of the fx targets that draw random numbers (dropout, torch.rand*, bernoulli, in-place samplers).
_RANDOM_TARGETS = ("dropout", "bernoulli", "rand", "normal_", "uniform_", "multinomial", "exponential_")


def _draws_random(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    """Whether an fx node may draw random numbers: a dropout (sub)module with p > 0, a random function,
    or a leaf module from outside torch.nn (a registered leaf, whose forward memplan cannot see)."""
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        if not type(mod).__module__.startswith("torch.nn."):
            return True
        dropouts = [m for m in mod.modules() if isinstance(m, (nn.modules.dropout._DropoutNd, nn.AlphaDropout))]
        if dropouts:
            return any(m.p > 0 for m in dropouts)
        name = type(mod).__name__
    elif node.op in ("call_function", "call_method"):
        name = str(getattr(node.target, "__name__", node.target))
    else:
        return False
    return any(k in name.lower() for k in _RANDOM_TARGETS)


def compilable_by_dynamo(body: torch.fx.GraphModule) -> bool:
    """Whether torch.compile's own checkpoint may recompute ``body`` exactly: it holds no buffers (a
    BatchNorm statistic or counter its rerun would update again) and draws no random numbers (the
    eager backend recomputes without replaying the RNG)."""
    return not any(True for _ in body.buffers()) and not any(_draws_random(body, n) for n in body.graph.nodes)


@torch.compiler.disable
def _checkpoint_eagerly(module: nn.Module, function, *args):
    """Non-reentrant checkpoint with RNG and buffers restored for each recomputation; under torch.compile
    a graph break, so dynamo neither traces nor recomputes it (the buffer contexts must run)."""
    return checkpoint(function, *args, use_reentrant=False, preserve_rng_state=True,
                      context_fn=functools.partial(_segment_contexts, module))


class CheckpointSegment(nn.Module):
    """Runs ``body`` under non-reentrant checkpoint with RNG preserved; a recomputation reads and
    writes the buffers (BN statistics, counters) as they were in the forward, then restores them, so
    they are updated once. Without autograd it just runs ``body``. Under torch.compile a pure body is
    checkpointed by dynamo itself; one with buffers or random ops runs eagerly (a graph break)."""

    def __init__(self, body: torch.fx.GraphModule):
        super().__init__()
        self.body = body
        self.dynamo_recomputes = compilable_by_dynamo(body)

    def forward(self, *args):
        if not torch.is_grad_enabled():
            return self.body(*args)
        if self.dynamo_recomputes and torch.compiler.is_compiling():
            # dynamo turns this into its checkpoint operator; the backend recomputes the pure body
            return checkpoint(self.body, *args, use_reentrant=False, preserve_rng_state=True)
        return _checkpoint_eagerly(self.body, self.body, *args)


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
    for n in fx_nodes:                               # prelude: inputs, attributes and what only they make
        if n.op in ("placeholder", "get_attr") or (n.op != "output" and where.get(n.name) == -1):
            env[n] = new.node_copy(n, lambda a: env[a])
    recompute = {s.index for s in plan.segments if s.recompute}
    sources = rebuild_sources(graph, plan)          # remat rebuilds read these: their segments export them
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
        outputs = [n for n in members if any(b != seg.index for b in users_block[n.name]) or n.name in sources]
        name = f"memplan_segment_{seg.index}"
        if seg.rebuilt:                              # remat planner: some inputs are rebuilt, not held
            module, inputs = remat_segment(gm, members, inputs, outputs, seg, set(graph.order))
        else:
            module = CheckpointSegment(_segment_module(gm, members, inputs, outputs))
        setattr(root, name, module)
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


def compile_module(model: nn.Module, example_inputs: tuple, graph: MemGraph, plan: Plan,
                   example_kwargs: dict | None = None) -> PlannedModule:
    """The compiled module: ``plan`` applied to ``graph`` for the modes ``model`` is in, and the plain
    trace of the other mode (all train or all eval) when its graph differs (see memplan.planned).
    ``graph`` is the trace of ``keyword_call(model, example_inputs, example_kwargs)``."""
    model = unwrap(model)
    traced, inputs = keyword_call(model, example_inputs, example_kwargs)
    planned = rewrite(graph, plan)
    flags = training_flags(model)
    graphs = {flags: planned}
    other = not all(flags)
    with all_in_mode(model, other):
        other_flags = training_flags(model)
        if other_flags != flags:
            gm, _, _ = trace_module(traced, inputs)
            graphs[other_flags] = planned if gm.code == graph.original_gm.code else gm
    try:
        call = inspect.signature(model.forward).bind(*example_inputs, **(example_kwargs or {}))
        call.apply_defaults()
    except (TypeError, ValueError):
        call = None
    tensor_keywords = traced.tensor_names if isinstance(traced, KeywordCall) else ()
    return PlannedModule(model, graphs, plan, call, len(example_inputs), tensor_keywords)


class RematSegment(nn.Module):
    """A checkpoint segment that does not hold its rebuilt inputs: forward runs ``body`` on the live
    tensors; recomputation in backward runs ``recompute``, which first rebuilds them under no_grad from
    ``n_sources`` held sources (one fx graph, so each rebuilt tensor is freed after its last use).
    Autograd records the original graph, so gradients are bitwise the same.

    Called as ``segment(*held, *sources, *rebuilt)``; ``body`` takes ``(*held, *rebuilt)``,
    ``recompute`` takes ``(*held, *sources, requires_grad_flags)``.
    """

    def __init__(self, body: torch.fx.GraphModule, recompute: torch.fx.GraphModule, n_held: int, n_sources: int):
        super().__init__()
        self.body, self.recompute = body, recompute
        self.n_held, self.n_sources = n_held, n_sources

    def forward(self, *args):
        h, s = self.n_held, self.n_sources
        held, sources, live = args[:h], args[h:h + s], args[h + s:]
        if not torch.is_grad_enabled():
            return self.body(*held, *live)
        box = [tuple(live)]                      # the live tensors, for the first (forward) call only
        flags = tuple(t.requires_grad for t in live)

        def run(*kept):
            if box[0] is None:
                return self.recompute(*kept, flags)
            values, box[0] = box[0], None
            return self.body(*kept[:h], *values)

        return _checkpoint_eagerly(self, run, *held, *sources)   # its closure state is no graph for dynamo


class _Rebuilt(torch.autograd.Function):
    """Identity that makes a value require grad without autograd holding it (a leaf would be held by
    its AccumulateGrad node while any graph that reads it lives). Its backward never runs: checkpoint
    discards the recomputation's graph."""

    @staticmethod
    def forward(ctx, anchor, value):
        return value.view_as(value)

    @staticmethod
    def backward(ctx, grad):
        return None, None


def rebuilt_value(value: torch.Tensor, requires_grad: bool) -> torch.Tensor:
    """A value rebuilt under no_grad, requiring grad as the live tensor did (so recomputed ops save the
    same tensors), freed once the segment's ops stop reading it."""
    if not requires_grad:
        return value
    return _Rebuilt.apply(value.new_zeros((), requires_grad=True), value)


def recompute_module(gm: torch.fx.GraphModule, held: list[torch.fx.Node], sources: list[torch.fx.Node],
                     closure: list[torch.fx.Node], rebuilt: list[torch.fx.Node], members: list[torch.fx.Node],
                     outputs: list[torch.fx.Node]) -> torch.fx.GraphModule:
    """One graph: rebuild ``rebuilt`` from ``sources`` with grad off, detach them (requires_grad as in
    forward, from the last input), then run the segment's ``members`` on ``held`` and the rebuilt values."""
    g = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    for i, x in enumerate(held + sources):
        env[x] = g.placeholder(f"in_{i}_{x.name}")
    flags = g.placeholder("requires_grad_flags")

    def copy(n: torch.fx.Node) -> None:
        for a in n.all_input_nodes:
            if a not in env and a.op == "get_attr":
                env[a] = g.node_copy(a)
        env[n] = g.node_copy(n, lambda a: env[a])

    g.call_function(torch._C._set_grad_enabled, (False,))
    for n in closure:
        copy(n)
    g.call_function(torch._C._set_grad_enabled, (True,))
    for i, r in enumerate(rebuilt):
        flag = g.call_function(operator.getitem, (flags, i))
        env[r] = g.call_function(rebuilt_value, (env[r], flag))
    for n in members:
        copy(n)
    g.output(tuple(env[o] for o in outputs))
    module = torch.fx.GraphModule(gm, g, "memplan_recompute")
    module.graph.lint()
    return module


def rebuild_closure(rebuilt: list[torch.fx.Node], through: set[str],
                    tensor_nodes: set[str]) -> tuple[set[torch.fx.Node], list[torch.fx.Node]]:
    """(nodes to re-run, sources) that recompute ``rebuilt``, walking back through the ``tensor_nodes``
    named in ``through`` and any non-tensor helper node; the walk stops at other tensor nodes and
    placeholders (the sources, which the segment holds)."""
    closure: set[torch.fx.Node] = set()
    sources: list[torch.fx.Node] = []
    stack = list(rebuilt)
    while stack:
        n = stack.pop()
        if n in closure:
            continue
        closure.add(n)
        for a in n.all_input_nodes:
            if a.op == "get_attr" or a in closure:
                continue
            if a.op == "placeholder" or (a.name not in through and a.name in tensor_nodes):
                if a not in sources:
                    sources.append(a)
            else:
                stack.append(a)
    return closure, sources


def remat_segment(gm: torch.fx.GraphModule, members: list[torch.fx.Node], inputs: list[torch.fx.Node],
                  outputs: list[torch.fx.Node], seg, tensor_nodes: set[str]) -> tuple[RematSegment, list[torch.fx.Node]]:
    """The RematSegment for ``seg`` and the outer nodes it is called with (held, sources, rebuilt)."""
    rebuilt = [a for a in inputs if a.name in seg.rebuilt]
    if len(rebuilt) != len(seg.rebuilt):
        raise PlanMismatchError(f"segment {seg.index} rebuilds {list(seg.rebuilt)}, but its inputs are "
                                f"{[a.name for a in inputs]}; re-plan with memplan.plan(..., method='remat')")
    held = [a for a in inputs if a not in rebuilt]
    closure, sources = rebuild_closure(rebuilt, set(seg.rebuild), tensor_nodes)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    recompute = recompute_module(gm, held, sources, sorted(closure, key=order.__getitem__), rebuilt, members,
                                 outputs)
    body = _segment_module(gm, members, held + rebuilt, outputs)
    return RematSegment(body, recompute, len(held), len(sources)), held + sources + rebuilt


def rebuild_sources(graph: MemGraph, plan: Plan) -> set[str]:
    """Tensor nodes that some segment's rebuild reads (held by that segment, so exported by their own)."""
    out: set[str] = set()
    for seg in plan.segments:
        through = set(seg.rebuild)
        out |= {p for r in seg.rebuild for p in graph.dag.predecessors(r) if p not in through}
    return out
