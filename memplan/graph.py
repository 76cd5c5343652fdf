"""MemGraph: the forward tensors of a traced network as a DAG with exact memory figures.

Nodes are the fx nodes that produce activations (graph inputs, parameters and buffers are not
nodes; their bytes are recorded on the graph). Edges follow data flow. Every figure comes from
running the graph on meta tensors (memplan.analyze), so it is exact and costs no compute.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Mapping

import networkx as nx
import torch.fx

from .errors import MemplanError

#: Default bound on the number of lower sets the exact DP may iterate over.
DEFAULT_LOWER_SET_BOUND = 2000


@dataclass(frozen=True)
class NodeInfo:
    """What one forward node costs: bytes it allocates, bytes its backward keeps, its FLOPs.

    ``out_bytes`` counts only new storage (0 for views and in-place ops, whose storage belongs to
    ``alias_of``). ``saved_from`` names the nodes whose outputs autograd keeps for this node's
    backward (possibly itself); ``saved_extra_bytes`` are buffers the op creates only to save
    them (max-pool indices, BatchNorm mean/invstd, dropout masks).
    """

    name: str
    op: str
    target: str
    out_shapes: tuple[tuple[int, ...], ...]
    out_dtypes: tuple[str, ...]
    out_bytes: int
    alias_of: str | None
    saved_from: tuple[str, ...]
    saved_extra_bytes: int
    saved_input_bytes: int
    saved_param_bytes: int
    flops: int
    has_params: bool
    scratch_cpu_bytes: int = 0
    #: owners of the storages this node writes in place: node names, or "<param>", "<buffer>", "<input>"
    mutates: tuple[str, ...] = ()
    #: gradient bytes the node's backward makes for dtype casts inside it (autocast) beyond its inputs' gradients
    cast_grad_bytes: int = 0
    #: whether the node draws from the random generator (dropout, torch.rand, ...): its place in the draws matters
    draws_random: bool = False

    @property
    def saved_kinds(self) -> dict[str, int]:
        """Saved bytes by kind: output of this node, outputs of other nodes, new buffers, graph inputs."""
        return {"self": int(self.name in self.saved_from), "others": len(self.saved_from) - int(self.name in self.saved_from),
                "new_bytes": self.saved_extra_bytes, "graph_input_bytes": self.saved_input_bytes}


def alias_root(infos: Mapping[str, NodeInfo], name: str) -> str:
    """The node that owns ``name``'s storage: ``alias_of`` followed while it names a known node
    (views and in-place ops alias their root's storage)."""
    seen = set()
    while infos[name].alias_of in infos and name not in seen:
        seen.add(name)
        name = infos[name].alias_of
    return name


@dataclass
class MemGraph:
    """The traced network: a networkx DiGraph of NodeInfo plus the fx GraphModule it came from.

    ``order`` is the fx (topological) order of the nodes; ``outputs`` the nodes whose values the
    network returns. ``param_bytes``/``buffer_bytes``/``input_bytes`` are storages outside the DAG.
    """

    gm: torch.fx.GraphModule
    dag: nx.DiGraph
    order: list[str]
    outputs: tuple[str, ...]
    input_bytes: int
    param_bytes: int
    trainable_param_bytes: int
    buffer_bytes: int
    tracer: str
    trace_notes: tuple[str, ...] = ()
    #: nodes reading one graph input or parameter (groups of 3 or more); see order_compatible()
    shared_reads: tuple[tuple[str, ...], ...] = ()
    #: node groups an in-place write ties together: a plan puts each group in one segment
    together: tuple[tuple[str, ...], ...] = ()
    #: nodes that write into graph inputs or parameters (or read them before such a write): never recomputed
    pinned: frozenset[str] = frozenset()
    #: node groups a plan runs in fx order though no edge orders them: random draws, writers of one buffer
    ordered: tuple[tuple[str, ...], ...] = ()
    #: the traced module before in-place activations were made out-of-place (memplan.outofplace), if any
    source_gm: torch.fx.GraphModule | None = field(default=None, repr=False)
    #: what that rewrite changed: (node name, what it was) pairs
    out_of_place: tuple[tuple[str, str], ...] = ()
    #: the autocast precision the byte facts were analysed under: None (fp32), "bf16" or "fp16"
    amp: str | None = None
    #: meta twins of the example inputs, so the graph can be re-analysed at another precision
    example_inputs: tuple = field(default=(), repr=False, compare=False)
    #: the full-precision graph this one was re-analysed from (memplan.analyze.at_precision); it names the plan
    full_precision: "MemGraph | None" = field(default=None, repr=False, compare=False)
    _index: dict[str, int] = field(default_factory=dict, repr=False)
    _infos: dict[str, NodeInfo] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self._index = {name: i for i, name in enumerate(self.order)}
        self._together_masks = [sum(1 << self._index[n] for n in g) for g in self.together]

    @property
    def original_gm(self) -> torch.fx.GraphModule:
        """The module exactly as traced: what the user's own training step runs (the vanilla baseline)."""
        return self.source_gm if self.source_gm is not None else self.gm

    # -- node access -----------------------------------------------------------------------------
    def info(self, name: str) -> NodeInfo:
        return self.dag.nodes[name]["info"]

    def __len__(self) -> int:
        return len(self.order)

    def __iter__(self) -> Iterator[NodeInfo]:
        return (self.info(n) for n in self.order)

    def index(self, name: str) -> int:
        return self._index[name]

    def root(self, name: str) -> str:
        """The node owning ``name``'s storage (see :func:`alias_root`)."""
        if self._infos is None:
            self._infos = {n: self.info(n) for n in self.order}
        return alias_root(self._infos, name)

    @property
    def total_flops(self) -> int:
        return sum(i.flops for i in self)

    @property
    def activation_bytes(self) -> int:
        """Sum of every node's new output storage: what a forward allocates in all."""
        return sum(i.out_bytes for i in self)

    def fingerprint(self) -> str:
        """A hash of node names, ops, shapes and edges: equal graphs, equal fingerprints. A graph analysed
        under autocast has its full-precision graph's (the plan's fingerprint names the precision)."""
        if self.full_precision is not None:
            return self.full_precision.fingerprint()
        import hashlib
        h = hashlib.sha256()
        for info in self:
            h.update(f"{info.name}|{info.op}|{info.target}|{info.out_shapes}|{info.out_dtypes};".encode())
            h.update(",".join(sorted(self.dag.predecessors(info.name))).encode())
        h.update(repr(self.outputs).encode())
        return h.hexdigest()[:16]

    # -- lower sets ------------------------------------------------------------------------------
    def pred_masks(self) -> list[int]:
        """For node i (in ``order``), the bitmask of its direct predecessors."""
        masks = []
        for name in self.order:
            m = 0
            for p in self.dag.predecessors(name):
                m |= 1 << self._index[p]
            masks.append(m)
        return masks

    def ancestor_masks(self) -> list[int]:
        """For node i, the bitmask of i and all its ancestors (the approximate DP's lower sets)."""
        preds = self.pred_masks()
        masks: list[int] = []
        for i, pm in enumerate(preds):
            m = 1 << i
            j = pm
            while j:
                low = j & -j
                m |= masks[low.bit_length() - 1]
                j ^= low
            masks.append(m)
        return masks

    def lower_sets(self, bound: int = DEFAULT_LOWER_SET_BOUND) -> list[int] | None:
        """All lower sets (closed under predecessors) as bitmasks sorted by size; None past ``bound``.

        Enumerated breadth-first from the empty set by adding one node whose predecessors are all
        in; each set is visited once. A chain of n nodes has n + 1 lower sets; n parallel nodes 2**n.
        """
        preds = self.pred_masks()
        n = len(preds)
        seen = {0}
        frontier = [0]
        while frontier:
            nxt = []
            for s in frontier:
                for i in range(n):
                    bit = 1 << i
                    if not s & bit and preds[i] & s == preds[i]:
                        t = s | bit
                        if t not in seen:
                            seen.add(t)
                            if len(seen) > bound:
                                return None
                            nxt.append(t)
            frontier = nxt
        return sorted(seen, key=lambda m: (m.bit_count(), m))

    def consumer_groups(self) -> list[list[int]]:
        """Index lists (sorted) of node groups whose fx order a lower set keeps: the readers of each value
        read 3 or more times (by 2 or more nodes), and the ``ordered`` groups (random draws, buffer writers)."""
        groups = []
        for n in self.order:
            readers = sorted(self._index[s] for s in self.dag.successors(n))
            uses = sum(self.dag.edges[n, self.order[r]].get("uses", 1) for r in readers) + (n in self.outputs)
            if uses >= 3 and len(readers) >= 2:
                groups.append(readers)
        groups += [sorted(self._index[s] for s in g) for g in self.shared_reads + self.ordered]
        return groups

    def order_compatible(self, mask: int, groups: list[list[int]] | None = None) -> bool:
        """Whether running ``mask`` before the rest keeps every multi-reader value's readers in fx order.

        Autograd sums a value's gradient contributions in reverse creation order of its readers;
        with 3 or more readers a different order rounds differently, so a plan may only move a
        reader ahead of an earlier one if it wants bitwise-equal gradients. Nor may it move a random
        draw or a buffer write ahead of an earlier one (``ordered``): another dropout mask, another
        running mean. It must also keep every in-place group whole (``keeps_together``).
        """
        for g in self.consumer_groups() if groups is None else groups:
            inside = [(mask >> i) & 1 for i in g]
            if any(b and not a for a, b in zip(inside, inside[1:])):
                return False
        return self.keeps_together(mask)

    def keeps_together(self, mask: int) -> bool:
        """Whether lower set ``mask`` holds each in-place group (``together``) wholly or not at all."""
        return all(mask & t in (0, t) for t in self._together_masks)

    def count_lower_sets(self, bound: int = DEFAULT_LOWER_SET_BOUND) -> int | None:
        """Number of lower sets, or None when it exceeds ``bound``."""
        sets = self.lower_sets(bound)
        return None if sets is None else len(sets)

    def names_of(self, mask: int) -> list[str]:
        """The node names in a bitmask, in graph order."""
        return [self.order[i] for i in range(len(self.order)) if mask >> i & 1]

    def mask_of(self, names) -> int:
        m = 0
        for n in names:
            if n not in self._index:
                raise MemplanError(f"node {n!r} is not in this graph; nodes are fx node names, e.g. {self.order[:3]}")
            m |= 1 << self._index[n]
        return m

    def summary(self) -> str:
        """One line: nodes, edges, activation and parameter bytes, FLOPs."""
        from .units import format_bytes
        return (f"MemGraph({len(self)} nodes, {self.dag.number_of_edges()} edges, activations "
                f"{format_bytes(self.activation_bytes)}, params {format_bytes(self.param_bytes)}, "
                f"{self.total_flops / 1e9:.2f} GFLOP, traced by {self.tracer})")
