"""The planner's cost model: what a chain of lower sets keeps, recomputes and peaks at.

Kusumoto et al. (NeurIPS 2019) with memplan's refinements from measured autograd behaviour.
A strategy is a chain of lower sets 0 = L0 < L1 < ... < Lk = V; block Vi = Li minus L(i-1);
boundary B(L) = nodes of L with a successor outside L (graph outputs count as having one).
For block V = L' minus L with interior I = V minus B(L'):

  recompute(V) = I is not empty (the block runs under checkpoint and is re-run in backward)
  keep(V)      = sum need(B(L') & V)                                       # outputs some backward saves
                 + (extra(V) if not recompute(V))                          # buffers saved for backward
                 + [recompute] sum out(u in B(L), need(u) = 0, succ(u) meets V)  # checkpoint inputs
  time(V)      = flops(V) if recompute(V) else 0                           # what checkpoint re-runs
  peak(V)      = static + kept_before + keep(V)
                 + grads(B(L') minus O)                                    # gradients pending past V
                 + max over v in V of (                                    # while v's backward runs:
                     [recompute] (sum over u in I with first_saver(u) <= v of need(u)   # still rebuilt
                                  + sum over u in V, u <= v of extra(u))
                     + sum over b in O, b <= v of out(b)                   # V's outputs' gradients
                     + [v in I] out(v) + sum out(pred v)                   # its gradient in and out
                     + scratch(v))                                         # kernel scratch
  where O = nodes of B(L') & V that own their gradient buffer.

``grads(B)`` sums the gradient buffers of B's nodes: a node read by a concatenation outside L'
receives a slice of the concatenation's gradient, which keeps that whole buffer alive (counted once).
Backward visits V in reverse graph order; a rebuilt value is freed once the earliest node that
saved it (``first_saver``, in graph order) has run its backward.

``out`` counts a node's storage (a view or in-place op counts its root's); ``need`` is ``out`` when
some node's backward saves that storage (measured with saved-tensor hooks: a BatchNorm output read
only by a ReLU is not saved, the ReLU saves its own output) or it is a graph output, else 0; a
checkpointed block holds its inputs, so unsaved inputs of a recomputed block count there. ``extra``
the buffers an op creates only to save them (max-pool indices, BN mean/invstd). ``static`` =
parameters, gradients, optimizer state, inputs and buffers.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .graph import MemGraph

_CONCAT_TARGETS = {"cat", "concat", "concatenate", "cat.default", "concat.default"}
OPTIMIZER_STATE_FACTOR = {"adam": 2, "sgd-momentum": 1, "sgd": 0, "none": 0}


@dataclass(frozen=True)
class CostArrays:
    """Per-node vectors (graph order) the DP reads; bitmask helpers for the lower-set algebra."""

    out_b: np.ndarray          # storage bytes a node's output keeps alive (root's bytes for aliases)
    needed_b: np.ndarray       # out_b where some node's backward saves it, else 0
    extra_b: np.ndarray        # buffers saved only for backward
    work_b: np.ndarray         # sum out(pred v): the gradients one node's backward produces
    scratch_b: np.ndarray      # kernel scratch of the node's forward/backward
    flops: np.ndarray
    succ_masks: tuple[int, ...]  # bitmask of successors (bit n = "outside": graph output)
    succ_lists: tuple[tuple[int, ...], ...]  # successor indices
    pinned: np.ndarray         # nodes that must not be recomputed (e.g. reversible blocks that free their input)
    first_saver: np.ndarray    # index of the earliest node whose backward needs a node's output (itself if none)
    grad_owner: tuple[int, ...]  # node whose gradient buffer holds this node's gradient (a reading cat, or itself)
    static_bytes: int
    n: int

    def boundary(self, mask: int) -> int:
        """B(L): nodes of L with a successor outside L (graph outputs always count)."""
        outside = ~mask
        b = 0
        for i in range(self.n):
            if mask >> i & 1 and self.succ_masks[i] & outside:
                b |= 1 << i
        return b


def node_scratch(graph: MemGraph, scratch: str) -> dict[str, int] | None:
    """Per-node kernel scratch bytes under a scratch model: CPU convolution scratch for "cpu", none else."""
    return {i.name: i.scratch_cpu_bytes for i in graph} if str(scratch) == "cpu" else None


def _to_bool(mask: int, n: int) -> np.ndarray:
    return np.array([(mask >> i) & 1 for i in range(n)], dtype=bool)


def build_costs(graph: MemGraph, *, optimizer: str = "adam", scratch: dict[str, int] | None = None,
                times: dict[str, float] | None = None, pinned: frozenset[str] = frozenset()) -> CostArrays:
    """Cost vectors of ``graph``: FLOPs as node time unless ``times`` (name -> seconds) is given.

    Blocks that would recompute a ``pinned`` node are infeasible (their peak is infinite)."""
    n = len(graph)
    order = graph.order
    idx = {name: i for i, name in enumerate(order)}
    root = []
    for name in order:
        r, seen = name, set()
        while graph.info(r).alias_of is not None and graph.info(r).alias_of in idx and r not in seen:
            seen.add(r)
            r = graph.info(r).alias_of
        root.append(idx[r])
    own = np.array([graph.info(nm).out_bytes for nm in order], dtype=np.float64)
    out_b = own[root]
    saved_roots: set[int] = set()
    for name in order:
        for s in graph.info(name).saved_from:
            if s in idx:
                saved_roots.add(root[idx[s]])
    outputs = set(graph.outputs)
    first_saver = np.arange(n)
    savers: dict[int, list[int]] = {}
    for i, name in enumerate(order):
        for s in graph.info(name).saved_from:
            if s in idx:
                savers.setdefault(root[idx[s]], []).append(i)
    for i in range(n):
        cands = [w for w in savers.get(root[i], []) if w >= i]
        if cands:
            first_saver[i] = min(cands)
    grad_owner = list(range(n))
    for i, name in enumerate(order):
        cats = [idx[x] for x in graph.dag.successors(name) if graph.info(x).target in _CONCAT_TARGETS]
        if cats:
            grad_owner[i] = min(cats, key=lambda j: out_b[j])
    # a dead node (no reader, not an output) is cut from autograd's graph at once: nothing of it is kept
    dead = [graph.dag.out_degree(nm) == 0 and nm not in outputs for nm in order]
    needed_b = np.array([out_b[i] if (root[i] in saved_roots or order[i] in outputs) and not dead[i] else 0.0
                         for i in range(n)])
    extra_b = np.array([0 if dead[i] else graph.info(nm).saved_extra_bytes for i, nm in enumerate(order)],
                       dtype=np.float64)
    work_b = np.array([float(graph.info(nm).cast_grad_bytes) for nm in order])   # autocast's cast gradients
    for name in order:
        for p in graph.dag.predecessors(name):
            work_b[idx[name]] += out_b[idx[p]]
    scratch_b = np.array([(scratch or {}).get(nm, 0) for nm in order], dtype=np.float64)
    if times is not None:
        flops = np.array([float(times.get(nm, 0.0)) for nm in order])
    else:
        flops = np.array([float(graph.info(nm).flops) for nm in order])
    succ = []
    for name in order:
        m = 0
        for s in graph.dag.successors(name):
            m |= 1 << idx[s]
        if name in outputs or graph.dag.out_degree(name) == 0:   # outputs and dead nodes: always boundary
            m |= 1 << n
        succ.append(m)
    factor = OPTIMIZER_STATE_FACTOR[optimizer]
    static = (graph.param_bytes + graph.buffer_bytes + graph.input_bytes
              + graph.trainable_param_bytes * (1 + factor))
    succ_lists = tuple(tuple(idx[x] for x in graph.dag.successors(name)) for name in order)
    return CostArrays(out_b=out_b, needed_b=needed_b, extra_b=extra_b, work_b=work_b, scratch_b=scratch_b,
                      flops=flops, succ_masks=tuple(succ), succ_lists=succ_lists,
                      pinned=np.array([nm in pinned or nm in graph.pinned for nm in order], dtype=bool), first_saver=first_saver,
                      grad_owner=tuple(grad_owner),
                      static_bytes=int(static), n=n)


def param_gradients(graph: MemGraph) -> list[tuple[int, int]]:
    """(reader bitmask over graph order, gradient bytes) per trainable parameter. Backward runs the chain's
    blocks in reverse and zero_grad(set_to_none) leaves no gradient before it, so while a block above lower
    set L runs backward, the gradients of parameters read only inside L do not exist yet. A parameter read
    by a node outside the DAG gets the mask of every node (its gradient counts as always there)."""
    idx = {name: i for i, name in enumerate(graph.order)}
    everyone = (1 << len(graph.order)) - 1
    found: dict[int, list] = {}
    for node in graph.gm.graph.nodes:
        if node.op == "call_module":
            params, readers = list(graph.gm.get_submodule(node.target).parameters()), [node]
        elif node.op == "get_attr":
            attr = graph.gm
            for part in str(node.target).split("."):
                attr = getattr(attr, part, None)
            params, readers = ([attr] if isinstance(attr, torch.nn.Parameter) else []), list(node.users)
        else:
            continue
        mask = 0
        for r in readers:
            mask |= 1 << idx[r.name] if r.name in idx else everyone
        for p in params:
            if p.requires_grad:
                entry = found.setdefault(id(p), [0, p.numel() * p.element_size()])
                entry[0] |= mask
    counted = sum(b for _, b in found.values())
    out = [(m, b) for m, b in found.values()]
    if counted < graph.trainable_param_bytes:                 # parameters no node was seen reading
        out.append((everyone, graph.trainable_param_bytes - counted))
    return out


@dataclass(frozen=True)
class BlockCost:
    """Cost of one block L -> L' (see module docstring)."""
    keep_b: float
    time: float
    peak_b: float          # peak minus static minus kept_before
    recompute: bool


def block_cost(c: CostArrays, lower: int, upper: int) -> BlockCost:
    """The cost of block ``upper`` minus ``lower`` (both lower sets, ``lower`` strictly inside ``upper``)."""
    n = c.n
    v = _to_bool(upper & ~lower, n)
    b_upper = _to_bool(c.boundary(upper), n)
    interior = v & ~b_upper
    recompute = bool(interior.any())
    keep = float(c.needed_b[v & b_upper].sum()) + (0.0 if recompute else float(c.extra_b[v].sum()))
    if recompute:
        keep += unneeded_inputs(c, lower, upper & ~lower)
    own = v & b_upper & (np.array(c.grad_owner) == np.arange(n))
    pending = pending_grads(c, c.boundary(upper)) - float(c.out_b[own].sum())
    rebuilt_from_outputs = np.where(own, c.out_b, 0.0)
    rebuilt_from = np.zeros(n)         # rebuilt bytes that stay alive until node j's backward
    if recompute:
        for u in np.nonzero(interior)[0]:
            rebuilt_from[c.first_saver[u]] += c.needed_b[u]
        rebuilt_from += np.where(v, c.extra_b, 0.0)
    inner, rebuilt = 0.0, 0.0
    for i in range(n):                 # graph order
        rebuilt += rebuilt_from[i] + rebuilt_from_outputs[i]
        if v[i]:
            here = rebuilt + (c.out_b[i] if interior[i] else 0.0) + c.work_b[i] + c.scratch_b[i]
            inner = max(inner, float(here))
    t = float(c.flops[v].sum()) if recompute else 0.0
    peak = keep + pending + inner
    if recompute and c.pinned[v].any():
        peak = float("inf")
    return BlockCost(keep_b=keep, time=t, peak_b=peak, recompute=recompute)


def pending_grads(c: CostArrays, boundary: int) -> float:
    """Bytes of the gradient buffers of the boundary nodes (a cat's buffer once for all its inputs)."""
    owners = set()
    for u in range(c.n):
        if boundary >> u & 1:
            g = c.grad_owner[u]
            owners.add(g if not (boundary >> g & 1) or g == u else u)
    return float(sum(c.out_b[g] for g in owners))


def unneeded_inputs(c: CostArrays, lower: int, block: int) -> float:
    """Bytes of boundary nodes of ``lower`` that no backward saves but a node of ``block`` reads
    (a checkpoint keeps its inputs alive until its backward)."""
    total = 0.0
    b = c.boundary(lower)
    for u in range(c.n):
        if b >> u & 1 and c.needed_b[u] == 0 and any(block >> s & 1 for s in c.succ_lists[u]):
            total += float(c.out_b[u])
    return total


def chain_cost(c: CostArrays, chain: list[int]) -> tuple[float, float]:
    """(peak bytes, recompute time) of a chain of lower sets [L1, ..., V] (L0 = 0 implied)."""
    kept = 0.0
    peak = 0.0
    total_t = 0.0
    prev = 0
    for cur in chain:
        bc = block_cost(c, prev, cur)
        peak = max(peak, c.static_bytes + kept + bc.peak_b)
        kept += bc.keep_b
        total_t += bc.time
        prev = cur
    return peak, total_t
