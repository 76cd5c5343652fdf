"""REV eligibility and substitution on a torch.fx graph (FetusMapV2 section 3.1, steps 2 and 3).

Eligibility reads analyze's facts (a MemGraph: shapes, dtypes, storage aliases, what each backward
saved); substitution returns the plan's own record type, :class:`~memplan.plan.RevReplacementRecord`.

A candidate is one Conv -> BatchNorm -> ReLU layer that keeps its input's shape (C -> C channels,
stride 1, groups 1, dilation 1, "same" padding, even C) whose intermediate values have a single
user. :func:`substitute_rev` replaces chosen candidates by :class:`~memplan.reversible.ReversibleBlock`
s with fresh F/G weights (Conv-BN-ReLU on C/2 channels, same kernel and padding): the network
changes, and the new blocks must be trained. Parameters: C*C*K conv weights become C*C*K/2.

Example (a C -> C layer after a channel-changing one)::

    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
    ...                     nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU())
    >>> gm = torch.fx.symbolic_trace(net)
    >>> x = torch.empty(2, 1, 8, 8, device="meta")
    >>> [c.name for c in find_rev_candidates(gm, x)]
    ['3']
    >>> new_gm, done = substitute_rev(gm, find_rev_candidates(gm, x))
    >>> done[0].new_module, done[0].params_before, done[0].params_after, done[0].seed
    ('rev_3', 152, 80, 0)
    >>> new_gm(torch.randn(2, 1, 8, 8)).shape
    torch.Size([2, 4, 8, 8])
"""
from __future__ import annotations

import copy
import math
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from .._meta import as_tuple
from ..analyze import analyze
from ..errors import MemplanError
from ..graph import MemGraph
from ..plan import RevReplacementRecord
from .block import ReversibleBlock, coupling_param_count, make_conv_bn_relu_coupling

__all__ = [
    "RevCandidate",
    "RevEligibilityError",
    "check_rev_candidate",
    "default_free_input",
    "find_rev_candidates",
    "check_output_shapes",
    "rev_ineligible_reasons",
    "substitute_rev",
]

_RELU_FUNCTIONS = (torch.relu, torch.relu_, nn.functional.relu, nn.functional.relu_)
_GRAPH_INPUT_OPS = ("placeholder", "get_attr")


class RevEligibilityError(MemplanError):
    """A pass asked for REV substitution cannot be replaced by a reversible block."""


@dataclass(frozen=True)
class RevCandidate:
    """One REV-eligible Conv-BN-ReLU layer: node names, geometry and what its input's life depends on.

    ``input_kept_by`` names the nodes outside the layer that still need the input's storage after
    the layer ran: its other users, nodes whose backward saved it (e.g. the ReLU producing it) and
    users of aliases. The block may free its input only when that set is empty (or only holds the
    output of another replaced layer, whose reversible block refills it).
    """

    name: str
    conv_node: str
    bn_node: str
    relu_node: str
    input_node: str
    output_node: str
    modules: tuple[str, ...]
    channels: int
    kernel_size: tuple[int, ...]
    padding: tuple[int, ...]
    spatial_dims: int
    shape: tuple[int, ...]
    dtype: str
    original_param_count: int
    new_param_count: int
    input_has_other_users: bool
    input_is_graph_input: bool
    input_kept_by: tuple[str, ...]


def find_rev_candidates(graph: MemGraph | fx.GraphModule, example_inputs: Any = None) -> list[RevCandidate]:
    """Every Conv-BN-ReLU layer that a reversible block can replace, in graph order. ``graph`` is a
    MemGraph (analyze's facts are reused) or a GraphModule analysed on ``example_inputs``."""
    return [c for c in _analyse(_facts(graph, example_inputs)).values() if isinstance(c, RevCandidate)]


def rev_ineligible_reasons(graph: MemGraph | fx.GraphModule, example_inputs: Any = None) -> dict[str, str]:
    """For each convolution node that is not a candidate, why not."""
    return {name: r for name, r in _analyse(_facts(graph, example_inputs)).items() if isinstance(r, str)}


def check_rev_candidate(graph: MemGraph | fx.GraphModule, conv_node: str, example_inputs: Any = None) -> RevCandidate:
    """The candidate starting at ``conv_node``; RevEligibilityError naming the node and reason if none."""
    facts = _facts(graph, example_inputs)
    result = _match(facts.gm, _node_by_name(facts.gm.graph, conv_node), facts)
    if isinstance(result, str):
        raise RevEligibilityError(f"node {conv_node!r} is not REV-eligible: {result}")
    return result


def _facts(graph: MemGraph | fx.GraphModule, example_inputs: Any) -> MemGraph:
    """analyze's MemGraph: given, or computed from a GraphModule and its example inputs (meta tensors)."""
    if isinstance(graph, MemGraph):
        return graph
    if example_inputs is None:
        raise RevEligibilityError("finding REV candidates of a GraphModule needs example_inputs (or pass the "
                                  "MemGraph from memplan.trace)")
    return analyze(graph, as_tuple(example_inputs))


def _analyse(facts: MemGraph) -> dict[str, RevCandidate | str]:
    return {n.name: _match(facts.gm, n, facts) for n in facts.gm.graph.nodes if _is_conv_node(facts.gm, n)}


def _is_conv_node(gm: fx.GraphModule, node: fx.Node) -> bool:
    return node.op == "call_module" and isinstance(gm.get_submodule(node.target), _ConvNd)


def _node_by_name(graph: fx.Graph, name: str) -> fx.Node:
    for node in graph.nodes:
        if node.name == name:
            return node
    raise RevEligibilityError(f"no node named {name!r} in the graph; pass a node name from graph.nodes")


# ---------------------------------------------------------------------------------------------
# Matching one Conv-BN-ReLU layer
# ---------------------------------------------------------------------------------------------

def _match(gm: fx.GraphModule, conv_node: fx.Node, info: MemGraph | None) -> RevCandidate | str:
    """The candidate at ``conv_node``, or the reason it is not one. Without ``info``: structure only."""
    nodes = _match_chain(gm, conv_node)
    if isinstance(nodes, str):
        return nodes
    conv_node, bn_node, relu_node = nodes
    conv: _ConvNd = gm.get_submodule(conv_node.target)
    bn: _BatchNorm = gm.get_submodule(bn_node.target)
    reason = _conv_reason(conv, bn)
    if reason:
        return reason
    inp = conv_node.args[0]
    spatial_dims = len(conv.kernel_size)
    padding = _same_padding(conv)
    shape, dtype, kept_by = (), "", ()
    if info is not None:
        known = set(info.order)
        if relu_node.name not in known or conv_node.name not in known:
            return "the analysis gave no tensor for the layer's convolution or output"
        out_shape = info.info(relu_node.name).out_shapes[0]
        shape = info.info(inp.name).out_shapes[0] if inp.name in known else out_shape
        if shape != out_shape:
            return f"input shape {shape} != output shape {out_shape}"
        dtype = (info.info(inp.name) if inp.name in known else info.info(conv_node.name)).out_dtypes[0]
        if not getattr(torch, dtype.rsplit(".", 1)[-1], torch.int64).is_floating_point:
            return f"dtype {dtype} is not floating point"
        kept_by = _input_kept_by(info, inp, nodes)
    return RevCandidate(
        name=str(conv_node.target), conv_node=conv_node.name, bn_node=bn_node.name, relu_node=relu_node.name,
        input_node=inp.name, output_node=relu_node.name,
        modules=tuple(str(n.target) for n in nodes if n.op == "call_module"),
        channels=conv.in_channels, kernel_size=tuple(conv.kernel_size), padding=padding,
        spatial_dims=spatial_dims, shape=shape, dtype=dtype,
        original_param_count=sum(p.numel() for p in [*conv.parameters(), *bn.parameters()]),
        new_param_count=coupling_param_count(conv.in_channels, conv.kernel_size, affine=bn.affine),
        input_has_other_users=len(inp.users) > 1, input_is_graph_input=inp.op in _GRAPH_INPUT_OPS,
        input_kept_by=kept_by)


def _match_chain(gm: fx.GraphModule, conv_node: fx.Node) -> tuple[fx.Node, fx.Node, fx.Node] | str:
    """(conv, bn, relu) nodes of a single-user chain, or the reason the chain breaks."""
    if not _is_conv_node(gm, conv_node):
        return f"{conv_node.op} {conv_node.target} is not a call to a Conv1d/2d/3d module"
    if len([n for n in gm.graph.nodes if n.op == "call_module" and n.target == conv_node.target]) > 1:
        return f"module {conv_node.target!r} is called more than once (its weights are shared)"
    if len(conv_node.args) != 1 or conv_node.kwargs or not isinstance(conv_node.args[0], fx.Node):
        return "the convolution must take exactly one tensor argument"
    bn_node = _only_user(conv_node)
    if bn_node is None:
        return f"the convolution's output has {len(conv_node.users)} users; REV needs exactly one (a BatchNorm)"
    if bn_node.op != "call_module" or not isinstance(gm.get_submodule(bn_node.target), _BatchNorm):
        return f"the convolution is followed by {bn_node.op} {bn_node.target}, not a BatchNorm module"
    relu_node = _only_user(bn_node)
    if relu_node is None:
        return f"the BatchNorm's output has {len(bn_node.users)} users; REV needs exactly one (a ReLU)"
    if not _is_relu(gm, relu_node):
        return f"the BatchNorm is followed by {relu_node.op} {relu_node.target}, not a ReLU"
    return conv_node, bn_node, relu_node


def _only_user(node: fx.Node) -> fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _is_relu(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), nn.ReLU)
    if node.op == "call_function":
        return node.target in _RELU_FUNCTIONS
    return node.op == "call_method" and node.target in ("relu", "relu_")


def _conv_reason(conv: _ConvNd, bn: _BatchNorm) -> str:
    """Why this conv/BN pair cannot become a coupling, or '' when it can."""
    c = conv.in_channels
    checks = [
        (conv.transposed, "transposed convolution"),
        (any(s != 1 for s in conv.stride), f"stride {tuple(conv.stride)} is not 1"),
        (conv.groups != 1, f"groups {conv.groups} is not 1"),
        (any(d != 1 for d in conv.dilation), f"dilation {tuple(conv.dilation)} is not 1"),
        (conv.padding_mode != "zeros", f"padding_mode {conv.padding_mode!r} is not 'zeros'"),
        (conv.in_channels != conv.out_channels,
         f"channels change {conv.in_channels} -> {conv.out_channels}; REV needs C -> C"),
        (c % 2 == 1, f"odd channel count {c}; the coupling splits channels in two equal halves"),
        (_same_padding(conv) is None,
         f"padding {conv.padding} with kernel {tuple(conv.kernel_size)} changes the spatial shape"),
        (bn.num_features != conv.out_channels,
         f"BatchNorm has {bn.num_features} features for {conv.out_channels} channels"),
        (len(conv.kernel_size) + 2 != _bn_input_dims(bn), f"{type(bn).__name__} does not match {type(conv).__name__}"),
    ]
    return next((reason for failed, reason in checks if failed), "")


def _bn_input_dims(bn: _BatchNorm) -> int:
    for dims, cls in ((3, nn.BatchNorm1d), (4, nn.BatchNorm2d), (5, nn.BatchNorm3d)):
        if isinstance(bn, cls):
            return dims
    return -1


def _same_padding(conv: _ConvNd) -> tuple[int, ...] | None:
    """Per-dim padding if it keeps the spatial shape at stride 1 (2*p == k - 1), else None."""
    if conv.padding == "same":
        if any(k % 2 == 0 for k in conv.kernel_size):
            return None
        return tuple(k // 2 for k in conv.kernel_size)
    if isinstance(conv.padding, str):  # "valid"
        return None if any(k != 1 for k in conv.kernel_size) else (0,) * len(conv.kernel_size)
    if any(2 * p != k - 1 for p, k in zip(conv.padding, conv.kernel_size)):
        return None
    return tuple(conv.padding)



def _owns_storage(graph: MemGraph, name: str) -> bool:
    """The node's one output spans a storage of its own (not a view, not in place)."""
    info = graph.info(name)
    if info.alias_of is not None or len(info.out_shapes) != 1:
        return False
    itemsize = getattr(torch, info.out_dtypes[0].rsplit(".", 1)[-1], torch.float32).itemsize
    return info.out_bytes == math.prod(info.out_shapes[0]) * itemsize


def _input_kept_by(graph: MemGraph, inp: fx.Node, chain: Sequence[fx.Node]) -> tuple[str, ...]:
    """Nodes outside ``chain`` that still need the input's storage once the chain has run: its other
    readers, nodes whose backward saved that storage, and readers of its aliases (from analyze's facts)."""
    own = {n.name for n in chain}
    kept = {u.name for u in inp.users if u.name not in own}
    if inp.name not in graph.dag:
        return tuple(sorted(kept))                    # a graph input: never freed, its readers are enough
    root = graph.root(inp.name)
    kept |= {i.name for i in graph if i.name not in own and root in {graph.root(s) for s in i.saved_from
                                                                      if s in graph.dag}}
    owns = _owns_storage(graph, inp.name)
    fx_nodes = {n.name: n for n in graph.gm.graph.nodes}
    for other in graph.order:
        if other == inp.name or graph.root(other) != root:
            continue
        if not owns:
            kept.add(other)                           # the input is a view: its base holds the storage
        kept |= {u.name for u in fx_nodes[other].users if u is not inp and u.name not in own}   # alias readers
    return tuple(sorted(kept))


# ---------------------------------------------------------------------------------------------
# Substitution
# ---------------------------------------------------------------------------------------------

def substitute_rev(gm: fx.GraphModule, candidates: Sequence[RevCandidate], *, seed: int = 0,
                   free_input: Mapping[str, bool] | None = None,
                   example_inputs: Any = None) -> tuple[fx.GraphModule, list[RevReplacementRecord]]:
    """A new GraphModule with each candidate replaced by a fresh ReversibleBlock; ``gm`` is untouched.

    Non-replaced submodules are shared with ``gm``. Each block's weights come from torch's default
    init under a seed derived from ``seed`` and the candidate's name (the global RNG is restored).
    ``free_input`` overrides the default decision per candidate name (see :func:`default_free_input`);
    with ``example_inputs`` the output shapes are checked against ``gm``'s (:func:`check_output_shapes`
    does it on graphs already analysed).
    """
    _check_candidates(gm, candidates)
    decisions = _free_input_decisions(candidates, free_input or {})
    graph = copy.deepcopy(gm.graph)
    new_gm = fx.GraphModule(gm, graph)
    replacements = [_replace_one(gm, new_gm, c, decisions[c.name], seed) for c in candidates]
    new_gm.delete_all_unused_submodules()
    graph.lint()
    new_gm.recompile()
    if example_inputs is not None:
        inputs = as_tuple(example_inputs)
        check_output_shapes(analyze(gm, inputs), analyze(new_gm, inputs))
    return new_gm, replacements


def default_free_input(candidate: RevCandidate, replaced: Sequence[RevCandidate] = ()) -> bool:
    """Safe default: free the input iff it is no graph input and nothing but a replaced block needs it.

    A replaced block producing the input is fine: the block's backward reads it after this one
    refilled it.
    """
    refillers = {c.output_node for c in replaced}
    return (not candidate.input_is_graph_input and not candidate.input_has_other_users
            and set(candidate.input_kept_by) <= refillers)


def _free_input_decisions(candidates: Sequence[RevCandidate], overrides: Mapping[str, bool]) -> dict[str, bool]:
    names = {c.name for c in candidates}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise RevEligibilityError(f"free_input names {unknown}, which are not among the candidates {sorted(names)}")
    decisions = {}
    for c in candidates:
        decision = overrides.get(c.name, default_free_input(c, candidates))
        if decision and (c.input_is_graph_input or c.input_has_other_users):
            raise RevEligibilityError(
                f"free_input=True for {c.name!r} is unsafe: its input {c.input_node!r} is "
                f"{'a graph input' if c.input_is_graph_input else 'read by other nodes too'}; leave it False")
        decisions[c.name] = bool(decision)
    return decisions


def _check_candidates(gm: fx.GraphModule, candidates: Sequence[RevCandidate]) -> None:
    """Each candidate still matches ``gm`` (structure and geometry) and no two overlap."""
    seen: dict[str, str] = {}
    for c in candidates:
        if not isinstance(c, RevCandidate):
            raise RevEligibilityError(f"candidates must be RevCandidate records, got {type(c).__name__}")
        fresh = _match(gm, _node_by_name(gm.graph, c.conv_node), None)
        if isinstance(fresh, str):
            raise RevEligibilityError(f"node {c.conv_node!r} ({c.name}) is not REV-eligible: {fresh}")
        for field in ("name", "bn_node", "relu_node", "input_node", "channels", "kernel_size", "padding"):
            if getattr(fresh, field) != getattr(c, field):
                raise RevEligibilityError(
                    f"candidate {c.name!r} does not match the graph: {field} is {getattr(c, field)!r} in the "
                    f"candidate but {getattr(fresh, field)!r} in the graph; find candidates on this graph")
        for node in (c.conv_node, c.bn_node, c.relu_node):
            if node in seen:
                raise RevEligibilityError(f"candidates {seen[node]!r} and {c.name!r} both replace node {node!r}")
            seen[node] = c.name


def _replace_one(gm: fx.GraphModule, new_gm: fx.GraphModule, c: RevCandidate, free: bool,
                 seed: int) -> RevReplacementRecord:
    graph = new_gm.graph
    conv_node, bn_node, relu_node = (_node_by_name(graph, n) for n in (c.conv_node, c.bn_node, c.relu_node))
    block = _fresh_block(gm.get_submodule(conv_node.target), gm.get_submodule(bn_node.target), c, free, seed)
    path = _fresh_path(gm, new_gm, str(conv_node.target))
    new_gm.add_submodule(path, block)
    with graph.inserting_before(conv_node):
        new_node = graph.call_module(path, (conv_node.args[0],))
    new_node.meta.update({k: v for k, v in relu_node.meta.items() if k in ("tensor_meta", "val")})
    relu_node.replace_all_uses_with(new_node)
    for node in (relu_node, bn_node, conv_node):
        graph.erase_node(node)
    return RevReplacementRecord(name=c.name, replaced=c.modules, new_module=path,
                                params_before=c.original_param_count,
                                params_after=sum(p.numel() for p in block.parameters()), free_input=free, seed=seed)


def _fresh_block(conv: _ConvNd, bn: _BatchNorm, c: RevCandidate, free: bool, seed: int) -> ReversibleBlock:
    """F and G mirroring the layer's kernel, padding and BatchNorm settings, seeded per candidate."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed((seed * 1_000_003 + zlib.crc32(c.name.encode())) % 2 ** 63)
        f, g = make_conv_bn_relu_coupling(
            c.spatial_dims, c.channels, c.kernel_size, c.padding, track_running_stats=bn.track_running_stats,
            affine=bn.affine, eps=bn.eps, momentum=bn.momentum)
    block = ReversibleBlock(f, g, free_input=free)
    block.to(device=conv.weight.device, dtype=conv.weight.dtype)
    return block.train(conv.training)


def _fresh_path(gm: fx.GraphModule, new_gm: fx.GraphModule, conv_path: str) -> str:
    """``parent.rev_<conv leaf>``, suffixed until no module of either graph module uses it."""
    parent, _, leaf = conv_path.rpartition(".")
    base = f"{parent}.rev_{leaf}" if parent else f"rev_{leaf}"
    path, i = base, 1
    while _has_attr_path(gm, path) or _has_attr_path(new_gm, path):
        i += 1
        path = f"{base}_{i}"
    return path


def _has_attr_path(root: nn.Module, path: str) -> bool:
    obj: Any = root
    for part in path.split("."):
        if not hasattr(obj, part):
            return False
        obj = getattr(obj, part)
    return True


def check_output_shapes(before: MemGraph, after: MemGraph) -> None:
    """Postcondition of a substitution: the new graph's outputs have the original's shapes and dtypes."""
    def signature(g: MemGraph) -> list[tuple]:
        return [(g.info(n).out_shapes, g.info(n).out_dtypes) for n in g.outputs]

    if signature(before) != signature(after):
        raise AssertionError(f"REV substitution changed output shapes {signature(before)} -> {signature(after)}")
