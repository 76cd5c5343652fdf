"""REV eligibility and substitution on a torch.fx graph (FetusMapV2 section 3.1, steps 2 and 3).

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
    >>> done[0].new_module, done[0].original_param_count, done[0].new_param_count
    ('rev_3', 152, 80)
    >>> new_gm(torch.randn(2, 1, 8, 8)).shape
    torch.Size([2, 4, 8, 8])
"""
from __future__ import annotations

import copy
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn
from torch.autograd.graph import saved_tensors_hooks
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd
from torch.utils import _pytree as pytree

from .errors import MemplanError
from .reversible import ReversibleBlock, coupling_param_count, make_conv_bn_relu_coupling

__all__ = [
    "RevCandidate",
    "RevEligibilityError",
    "RevReplacement",
    "check_rev_candidate",
    "default_free_input",
    "find_rev_candidates",
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


@dataclass(frozen=True)
class RevReplacement:
    """What :func:`substitute_rev` did to one candidate (JSON-friendly via ``dataclasses.asdict``)."""

    candidate: str
    replaced_modules: tuple[str, ...]
    new_module: str
    original_param_count: int
    new_param_count: int
    free_input: bool


@dataclass(frozen=True)
class _Propagated:
    """Shapes and storage facts from one meta-tensor run of the graph, keyed by node name."""

    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, torch.dtype]
    out_storages: dict[str, tuple[int, ...]]   # storage ids of the node's output tensors
    saved_storages: dict[str, frozenset[int]]  # storage ids its backward saved
    owns_storage: dict[str, bool]              # the output spans its whole storage (not a view)


def find_rev_candidates(gm: fx.GraphModule, example_inputs: Any) -> list[RevCandidate]:
    """Every Conv-BN-ReLU layer of ``gm`` that a reversible block can replace, in graph order."""
    return [c for c in _analyse(gm, example_inputs).values() if isinstance(c, RevCandidate)]


def rev_ineligible_reasons(gm: fx.GraphModule, example_inputs: Any) -> dict[str, str]:
    """For each convolution node that is not a candidate, why not."""
    return {name: r for name, r in _analyse(gm, example_inputs).items() if isinstance(r, str)}


def check_rev_candidate(gm: fx.GraphModule, conv_node: str, example_inputs: Any) -> RevCandidate:
    """The candidate starting at ``conv_node``; RevEligibilityError naming the node and reason if none."""
    node = _node_by_name(gm.graph, conv_node)
    result = _match(gm, node, _propagate(gm, example_inputs))
    if isinstance(result, str):
        raise RevEligibilityError(f"node {conv_node!r} is not REV-eligible: {result}")
    return result


def _analyse(gm: fx.GraphModule, example_inputs: Any) -> dict[str, RevCandidate | str]:
    info = _propagate(gm, example_inputs)
    return {n.name: _match(gm, n, info) for n in gm.graph.nodes if _is_conv_node(gm, n)}


def _is_conv_node(gm: fx.GraphModule, node: fx.Node) -> bool:
    return node.op == "call_module" and isinstance(gm.get_submodule(node.target), _ConvNd)


def _node_by_name(graph: fx.Graph, name: str) -> fx.Node:
    for node in graph.nodes:
        if node.name == name:
            return node
    raise RevEligibilityError(f"no node named {name!r} in the graph; pass a node name from graph.nodes")


# ---------------------------------------------------------------------------------------------
# Shape and storage propagation on meta tensors
# ---------------------------------------------------------------------------------------------

def _propagate(gm: fx.GraphModule, example_inputs: Any) -> _Propagated:
    """Run ShapeProp on a meta copy of ``gm`` (no real compute, the original untouched)."""
    inputs = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    meta_inputs = [torch.empty_like(t, device="meta").requires_grad_(t.requires_grad)
                   if isinstance(t, torch.Tensor) else t for t in inputs]
    prop = _StorageProp(_meta_copy(gm))
    prop.propagate(*meta_inputs)
    return prop.result()


def _meta_copy(gm: fx.GraphModule) -> fx.GraphModule:
    """A deep copy whose parameters and buffers are meta tensors (no data is copied)."""
    memo: dict[int, Any] = {}
    for t in [*gm.parameters(), *gm.buffers()]:
        meta = torch.empty_like(t, device="meta")
        memo[id(t)] = nn.Parameter(meta, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else meta
    return copy.deepcopy(gm, memo)


class _StorageProp(ShapeProp):
    """ShapeProp that also records, per node, which storages its output uses and its backward saved."""

    def __init__(self, module: fx.GraphModule):
        super().__init__(module)
        self._keep: list[Any] = []  # strong references: storage ids stay unique during the run
        self._out: dict[str, tuple[int, ...]] = {}
        self._saved: dict[str, frozenset[int]] = {}
        self._owns: dict[str, bool] = {}

    def run_node(self, n: fx.Node) -> Any:
        saved: list[int] = []

        def pack(t: torch.Tensor) -> torch.Tensor:
            self._keep.append(t)
            saved.append(t.untyped_storage()._cdata)
            return t

        with torch.enable_grad(), saved_tensors_hooks(pack, lambda t: t):
            result = super().run_node(n)
        tensors = [t for t in pytree.tree_leaves(result) if isinstance(t, torch.Tensor)]
        self._keep.extend(tensors)
        self._out[n.name] = tuple(t.untyped_storage()._cdata for t in tensors)
        self._saved[n.name] = frozenset(saved)
        if len(tensors) == 1:
            t = tensors[0]
            self._owns[n.name] = (t._base is None and t.storage_offset() == 0
                                  and t.untyped_storage().nbytes() == t.numel() * t.element_size())
        return result

    def result(self) -> _Propagated:
        shapes, dtypes = {}, {}
        for node in self.module.graph.nodes:
            meta = node.meta.get("tensor_meta")
            if isinstance(meta, TensorMetadata):
                shapes[node.name], dtypes[node.name] = tuple(meta.shape), meta.dtype
        return _Propagated(shapes, dtypes, self._out, self._saved, self._owns)


# ---------------------------------------------------------------------------------------------
# Matching one Conv-BN-ReLU layer
# ---------------------------------------------------------------------------------------------

def _match(gm: fx.GraphModule, conv_node: fx.Node, info: _Propagated | None) -> RevCandidate | str:
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
        if inp.name not in info.shapes or relu_node.name not in info.shapes:
            return "shape propagation gave no tensor shape for the layer's input or output"
        shape, out_shape = info.shapes[inp.name], info.shapes[relu_node.name]
        if shape != out_shape:
            return f"input shape {shape} != output shape {out_shape}"
        if not info.dtypes[inp.name].is_floating_point:
            return f"dtype {info.dtypes[inp.name]} is not floating point"
        dtype = str(info.dtypes[inp.name])
        kept_by = _input_kept_by(gm.graph, inp, nodes, info)
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


def _input_kept_by(graph: fx.Graph, inp: fx.Node, chain: Sequence[fx.Node], info: _Propagated) -> tuple[str, ...]:
    """Nodes outside ``chain`` that still need the input's storage once the chain has run."""
    own = {n.name for n in chain}
    storages = set(info.out_storages.get(inp.name, ()))
    kept = {u.name for u in inp.users if u.name not in own}
    kept |= {name for name, ids in info.saved_storages.items() if name not in own and ids & storages}
    for node in graph.nodes:
        if node is inp or not storages & set(info.out_storages.get(node.name, ())):
            continue
        if not info.owns_storage.get(inp.name, False):
            kept.add(node.name)  # the input is a view: its base holds the storage
        kept |= {u.name for u in node.users if u is not inp and u.name not in own}  # alias readers
    return tuple(sorted(kept))


# ---------------------------------------------------------------------------------------------
# Substitution
# ---------------------------------------------------------------------------------------------

def substitute_rev(gm: fx.GraphModule, candidates: Sequence[RevCandidate], *, seed: int = 0,
                   free_input: Mapping[str, bool] | None = None,
                   example_inputs: Any = None) -> tuple[fx.GraphModule, list[RevReplacement]]:
    """A new GraphModule with each candidate replaced by a fresh ReversibleBlock; ``gm`` is untouched.

    Non-replaced submodules are shared with ``gm``. Each block's weights come from torch's default
    init under a seed derived from ``seed`` and the candidate's name (the global RNG is restored).
    ``free_input`` overrides the default decision per candidate name (see :func:`default_free_input`);
    with ``example_inputs`` the output shapes are checked against ``gm``'s.
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
        _check_same_output_shapes(gm, new_gm, example_inputs)
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
                 seed: int) -> RevReplacement:
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
    return RevReplacement(candidate=c.name, replaced_modules=c.modules, new_module=path,
                          original_param_count=c.original_param_count,
                          new_param_count=sum(p.numel() for p in block.parameters()), free_input=free)


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


def _check_same_output_shapes(gm: fx.GraphModule, new_gm: fx.GraphModule, example_inputs: Any) -> None:
    """Postcondition: the rewritten module's outputs have the original's shapes (on meta tensors)."""
    def output_shapes(module: fx.GraphModule) -> list[tuple[int, ...]]:
        info = _propagate(module, example_inputs)
        out = next(n for n in module.graph.nodes if n.op == "output")
        return [info.shapes.get(a.name) for a in pytree.tree_leaves(out.args) if isinstance(a, fx.Node)]

    before, after = output_shapes(gm), output_shapes(new_gm)
    if before != after:
        raise AssertionError(f"REV substitution changed output shapes {before} -> {after}")

