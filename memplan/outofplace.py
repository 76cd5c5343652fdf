"""Out-of-place rewriting of in-place activations, where it provably changes nothing.

``ReLU(inplace=True)`` writing into a BatchNorm or InstanceNorm output costs a planner dearly: the
write ties the activation to the value it overwrites, and autograd's in-place-on-a-view machinery
allocates base-sized gradient copies in backward. Its out-of-place twin computes the same values
and, for the ops in ``_TWINS``, the same gradients bitwise: their in-place and out-of-place
backward formulas read equal quantities (``relu``: the result in both; ``leaky_relu`` with a slope
>= 0 and ``hardtanh``: a mask that is the same on the input and on the result). ``elu`` is not
here: its in-place backward uses the result, its out-of-place one exp(input), which round apart.

A node is rewritten only when nothing can tell: the overwritten value is an activation (no graph
input, parameter or buffer), no alias of it is read after the write except through the written
node (readers of the very value it overwrote are pointed at the result instead), no earlier node
saved it for backward (then the original fails in backward, and so must the copy), and it is not
returned.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from .graph import NodeInfo, alias_root

#: module type -> (functional twin, extra positional args read from the module)
_MODULE_TWINS = {
    nn.ReLU: (F.relu, ()),
    nn.LeakyReLU: (F.leaky_relu, ("negative_slope",)),
    nn.Hardtanh: (F.hardtanh, ("min_val", "max_val")),
    nn.ReLU6: (F.hardtanh, ("min_val", "max_val")),
}
#: in-place callables (fx call_function targets) -> out-of-place twins
_FUNCTION_TWINS = {
    torch.relu_: torch.relu, F.relu_: F.relu, torch.ops.aten.relu_.default: torch.ops.aten.relu.default,
    torch.ops.aten.leaky_relu_.default: torch.ops.aten.leaky_relu.default,
    torch.ops.aten.hardtanh_.default: torch.ops.aten.hardtanh.default,
}
#: functions with an ``inplace`` keyword whose out-of-place form is a twin
_INPLACE_KW = {F.relu, F.leaky_relu, F.hardtanh, F.relu6}
_METHOD_TWINS = {"relu_": "relu"}


@dataclass(frozen=True)
class OutOfPlace:
    """One rewritten node: its name and what it was."""
    node: str
    was: str


def _negative_slope(node: torch.fx.Node, gm: torch.fx.GraphModule) -> float:
    if node.op == "call_module":
        return float(getattr(gm.get_submodule(node.target), "negative_slope", 0.0))
    if node.target in (F.leaky_relu, torch.ops.aten.leaky_relu_.default):
        slope = node.kwargs.get("negative_slope", node.args[1] if len(node.args) > 1 else 0.01)
        return float(slope) if isinstance(slope, (int, float)) else -1.0
    return 0.0


def _twin(node: torch.fx.Node, gm: torch.fx.GraphModule):
    """(target, args, kwargs, description) of the out-of-place twin of an in-place node, or None."""
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        entry = _MODULE_TWINS.get(type(mod))
        if entry is None or not getattr(mod, "inplace", False) or len(node.args) != 1 or node.kwargs:
            return None
        fn, attrs = entry
        return fn, (node.args[0], *(getattr(mod, a) for a in attrs)), {}, f"{type(mod).__name__}(inplace=True)"
    if node.op == "call_function":
        if node.target in _FUNCTION_TWINS:
            return _FUNCTION_TWINS[node.target], node.args, dict(node.kwargs), str(getattr(node.target, "__name__", node.target))
        if node.target in _INPLACE_KW and node.kwargs.get("inplace") is True:
            return node.target, node.args, {**node.kwargs, "inplace": False}, f"{node.target.__name__}(inplace=True)"
    if node.op == "call_method" and node.target in _METHOD_TWINS and not node.kwargs:
        return _METHOD_TWINS[node.target], node.args, {}, f"Tensor.{node.target}"
    return None


def rewrite_out_of_place(gm: torch.fx.GraphModule, infos: dict[str, NodeInfo], order: list[str]
                         ) -> tuple[torch.fx.GraphModule, tuple[OutOfPlace, ...]]:
    """A copy of ``gm`` with every provably equivalent in-place activation made out-of-place.

    ``infos``/``order`` are ``gm``'s analysis (memplan.analyze). The copy shares ``gm``'s submodules,
    parameters and buffers; ``gm`` itself is not changed. Returns the copy and what was rewritten.
    """
    index = {n: i for i, n in enumerate(order)}

    def root(name: str) -> str:
        return alias_root(infos, name)

    nodes = {n.name: n for n in gm.graph.nodes}
    output_args = {a.name for a in next(n for n in gm.graph.nodes if n.op == "output").all_input_nodes}
    plan: list[tuple[str, tuple]] = []
    for name in order:
        node, info = nodes[name], infos[name]
        twin = _twin(node, gm)
        if twin is None or len(info.mutates) != 1 or info.mutates[0] not in index:
            continue
        if node.target in (F.leaky_relu, torch.ops.aten.leaky_relu_.default) or (
                node.op == "call_module" and isinstance(gm.get_submodule(node.target), nn.LeakyReLU)):
            if _negative_slope(node, gm) < 0:
                continue
        target = node.args[0] if node.args else None
        if not isinstance(target, torch.fx.Node) or target.name not in index:
            continue
        r = root(target.name)
        aliases = {n for n in order if root(n) == r} - {name}
        if any(u for a in aliases - {target.name} for u in nodes[a].users
               if u.name in index and index[u.name] > index[name]):
            continue                                   # another alias is read after the write
        if aliases & output_args:
            continue
        if any(r in infos[n].saved_from for n in order[:index[name]]):
            continue                                   # the original fails in backward; so must we
        plan.append((name, twin))
    if not plan:
        return gm, ()
    graph = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    redirect: dict[str, str] = {}                      # overwritten value -> the node that overwrote it
    chosen = dict(plan)
    done = []
    for n in gm.graph.nodes:
        def remap(a: torch.fx.Node) -> torch.fx.Node:
            src = nodes[redirect[a.name]] if a.name in redirect and a.name != n.name else a
            return env[src]
        if n.name in chosen:
            fn, args, kwargs, was = chosen[n.name]
            new_args = torch.fx.map_arg(args, lambda a: env[a])
            new_kwargs = torch.fx.map_arg(kwargs, lambda a: env[a])
            op = "call_method" if isinstance(fn, str) else "call_function"
            env[n] = graph.create_node(op, fn, new_args, new_kwargs, name=n.name)
            env[n].meta = dict(n.meta)
            redirect[n.args[0].name] = n.name
            done.append(OutOfPlace(n.name, was))
            continue
        env[n] = graph.node_copy(n, remap)
    out = torch.fx.GraphModule(gm, graph, type(gm).__name__)
    out.graph.lint()
    assert [n.name for n in out.graph.nodes] == [n.name for n in gm.graph.nodes], "node names must survive"
    return out, tuple(done)


