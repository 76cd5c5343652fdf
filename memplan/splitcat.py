"""Split a convolution over a channel concatenation into one convolution per part (opt-in: it rounds
differently from the original).

``conv(cat([a, b], 1), W) == conv(a, W[:, :Ca]) + conv(b, W[:, Ca:])`` in exact arithmetic. The left
side stores the concatenation (the sum of its parts' bytes) beside its parts, and its backward holds
the saved concatenation, the output gradient and the concatenation's gradient at once: at a U-Net's
last decoder level that working set is the step's floor for any bitwise schedule. The right side
never builds the concatenation and computes each part's gradient by its own convolution. Values
and gradients then differ from the original by rounding (a sum of partial convolutions instead of
one reduction), so memplan does this only when asked (``split_concat=True``) and the plan lists every
convolution it split (:class:`~memplan.plan.ConcatSplit`).

Only what can be split exactly in exact arithmetic is: an ungrouped, untransposed convolution (an
``nn.ConvNd`` module with plain forward, ``F.conv1d/2d/3d``, ``aten.conv1d/2d/3d`` or ``aten.convolution``) with numeric
padding, whose input is a ``torch.cat`` along the channel dimension read by nothing else.
"""
from __future__ import annotations

import copy
import dataclasses
import operator

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from .analyze import analyze
from .errors import MemplanError, PlanMismatchError
from .graph import MemGraph
from .plan import ConcatSplit, Plan

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CATS = (torch.cat, torch.concat, torch.concatenate, torch.ops.aten.cat.default)
#: convolution functions with F.conv3d's signature (input, weight, bias, stride, padding, dilation, groups) -> rank
_CONV_FUNCTIONS = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3, torch.ops.aten.conv1d.default: 1,
                   torch.ops.aten.conv2d.default: 2, torch.ops.aten.conv3d.default: 3}


@dataclasses.dataclass(frozen=True)
class _Conv:
    """One convolution node as the split needs it: input node, weight and bias (nodes or module names)."""
    node: torch.fx.Node
    x: torch.fx.Node
    weight: object            # an fx node, or the qualified name of a module's weight
    bias: object              # an fx node, the qualified name of a module's bias, or None
    stride: tuple
    padding: tuple
    dilation: tuple


def _plain_conv_module(mod: nn.Module) -> bool:
    from torch.nn.utils import parametrize
    return (type(mod).forward in (nn.Conv1d.forward, nn.Conv2d.forward, nn.Conv3d.forward)
            and mod.padding_mode == "zeros" and not isinstance(mod.padding, str) and mod.groups == 1
            and not parametrize.is_parametrized(mod) and not mod._forward_hooks and not mod._forward_pre_hooks)


def _as_conv(gm: torch.fx.GraphModule, n: torch.fx.Node) -> _Conv | None:
    """``n`` as a splittable convolution, or None."""
    if n.op == "call_module" and len(n.args) == 1 and not n.kwargs:
        mod = gm.get_submodule(n.target)
        if _plain_conv_module(mod) and isinstance(n.args[0], torch.fx.Node):
            return _Conv(n, n.args[0], f"{n.target}.weight", f"{n.target}.bias" if mod.bias is not None else None,
                         tuple(mod.stride), tuple(mod.padding), tuple(mod.dilation))
        return None
    if n.op != "call_function":
        return None
    if n.target in _CONV_FUNCTIONS:
        names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
        defaults = (None, None, None, 1, 0, 1, 1)
        a = dict(zip(names, defaults))
        a.update(zip(names, n.args))
        a.update(n.kwargs)
        if a["groups"] != 1 or isinstance(a["padding"], str):
            return None
        rank = _CONV_FUNCTIONS[n.target]
        tup = lambda v: tuple(v) if isinstance(v, (tuple, list)) else (v,) * rank  # noqa: E731
        x = a["input"]
        return _Conv(n, x, a["weight"], a["bias"], tup(a["stride"]), tup(a["padding"]), tup(a["dilation"])) \
            if isinstance(x, torch.fx.Node) else None
    if n.target is torch.ops.aten.convolution.default and len(n.args) == 9 and not n.kwargs:
        x, w, b, stride, padding, dilation, transposed, _, groups = n.args
        if transposed or groups != 1 or not isinstance(x, torch.fx.Node):
            return None
        return _Conv(n, x, w, b, tuple(stride), tuple(padding), tuple(dilation))
    return None


def _concat_parts(graph: MemGraph, cat: torch.fx.Node) -> list[torch.fx.Node] | None:
    """The parts of a channel concatenation, or None when ``cat`` is not one (or a part is not a tensor node)."""
    if cat.op != "call_function" or cat.target not in _CATS:
        return None
    parts = cat.args[0] if cat.args else cat.kwargs.get("tensors")
    dim = cat.kwargs.get("dim", cat.args[1] if len(cat.args) > 1 else 0)
    if not isinstance(parts, (list, tuple)) or len(parts) < 2 or not isinstance(dim, int):
        return None
    if not all(isinstance(p, torch.fx.Node) and p.name in graph.dag for p in parts):
        return None
    rank = len(graph.info(parts[0].name).out_shapes[0])
    return list(parts) if dim % rank == 1 else None


def concat_convolutions(graph: MemGraph) -> list[tuple[_Conv, torch.fx.Node, list[torch.fx.Node]]]:
    """(convolution, concatenation, parts) for every convolution the split applies to, in fx order."""
    out = []
    for n in graph.gm.graph.nodes:
        conv = _as_conv(graph.gm, n)
        if conv is None or len(conv.x.users) != 1:
            continue
        parts = _concat_parts(graph, conv.x)
        if parts is not None:
            out.append((conv, conv.x, parts))
    return out


def _operand(g: torch.fx.Graph, nodes: dict[str, torch.fx.Node], ref: object) -> object:
    """A weight or bias in the copied graph: a new get_attr for an attribute path, the copy of a node, else as is."""
    if isinstance(ref, str):
        return g.get_attr(ref)
    return nodes[ref.name] if isinstance(ref, torch.fx.Node) else ref


def split_concat(graph: MemGraph) -> tuple[MemGraph, tuple[ConcatSplit, ...]]:
    """``graph`` with every splittable convolution over a concatenation split (analysed anew at the
    graph's precision; ``original_gm`` stays the network as traced), and what was split."""
    found = concat_convolutions(graph)
    if not found:
        return graph, ()
    if not graph.example_inputs:
        raise MemplanError("split_concat needs the graph's example inputs (trace it with memplan.trace)")
    gm = torch.fx.GraphModule(graph.gm, copy.deepcopy(graph.gm.graph), type(graph.gm).__name__)
    nodes = {n.name: n for n in gm.graph.nodes}
    records = []
    for conv, cat, parts in found:
        node = nodes[conv.node.name]
        channels = [graph.info(p.name).out_shapes[0][1] for p in parts]
        rank = len(graph.info(parts[0].name).out_shapes[0]) - 2
        made = []
        with gm.graph.inserting_before(node):
            weight = _operand(gm.graph, nodes, conv.weight)
            bias = _operand(gm.graph, nodes, conv.bias)
            total, start = None, 0
            for i, (part, c) in enumerate(zip(parts, channels)):
                w_i = gm.graph.call_function(operator.getitem, (weight, (slice(None), slice(start, start + c))))
                y_i = gm.graph.call_function(_CONV[rank], (nodes[part.name], w_i, bias if i == 0 else None,
                                                           conv.stride, conv.padding, conv.dilation, 1))
                made.append(y_i.name)
                total = y_i if total is None else gm.graph.call_function(operator.add, (total, y_i))
                start += c
        node.replace_all_uses_with(total)
        gm.graph.erase_node(node)
        gm.graph.erase_node(nodes[cat.name])
        records.append(ConcatSplit(conv=conv.node.name, concat=cat.name, channels=tuple(channels),
                                   convs=tuple(made), output=total.name))
    gm.graph.lint()
    gm.recompile()
    new = analyze(gm, graph.example_inputs, tracer=graph.tracer, notes=graph.trace_notes, amp=graph.amp)
    new = dataclasses.replace(new, source_gm=graph.original_gm, out_of_place=graph.out_of_place)
    return new, tuple(records)


def rebuild_split_graph(graph: MemGraph, plan: Plan) -> MemGraph:
    """The split graph ``plan`` was made for; PlanMismatchError when this graph splits differently."""
    if not plan.split_concat:
        return graph
    split, records = split_concat(graph)
    if records != plan.split_concat:
        got = [r.conv for r in records]
        raise PlanMismatchError(f"the plan splits the convolutions over concatenations {[r.conv for r in plan.split_concat]}, "
                                f"but this network has {got} (a different network?); re-plan with split_concat=True")
    return split
