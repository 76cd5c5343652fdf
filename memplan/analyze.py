"""Per-node memory analysis: run a GraphModule once on fake tensors and record, for each node,
the storage it allocates, what autograd saves for its backward (saved-tensor hooks), what it writes
in place (ATen schemas), and FLOPs. Under ``amp`` the run is autocast, as the training step's forward
is: half-precision outputs, and the casts autograd saves (each weight's copy, once) count as saved buffers."""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import networkx as nx
import torch
import torch.fx
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from ._meta import FakeWorld, home_device, storage_key, tensors_in, to_meta, written_args
from .errors import MemplanError
from .graph import MemGraph, NodeInfo, alias_root
from .measure import check_amp, conv_scratch_bytes
from .options import check_amp_mode

_PARAM, _BUFFER, _INPUT = "<param>", "<buffer>", "<input>"
#: owners of storages outside the DAG, as NodeInfo.mutates names them
OUTSIDE = (_PARAM, _BUFFER, _INPUT)


class _Recorder(torch.fx.Interpreter):
    """Runs a graph node by node, recording storages, saved tensors and FLOPs per node."""

    def __init__(self, gm: torch.fx.GraphModule):
        super().__init__(gm, garbage_collect_values=False)
        self.owner: dict[int, str] = {}        # storage key -> producing node name, or _PARAM / _INPUT
        self.infos: dict[str, NodeInfo] = {}
        self.saved_refs: list[torch.Tensor] = []  # keep saved tensors alive so storage keys stay unique
        self.extra_seen: set[int] = set()      # saved buffers already counted (autocast's cached weight casts)
        self.outside_writers: dict[int, list[str]] = {}   # parameter/buffer/input storage -> nodes writing it
        for t in gm.parameters():
            self.owner[storage_key(t)] = _PARAM
        for t in gm.buffers():
            self.owner.setdefault(storage_key(t), _BUFFER)

    def placeholder(self, target, args, kwargs):
        value = super().placeholder(target, args, kwargs)
        for t in tensors_in(value):
            self.owner.setdefault(storage_key(t), _INPUT)
        return value

    def get_attr(self, target, args, kwargs):
        value = super().get_attr(target, args, kwargs)
        for t in tensors_in(value):
            self.owner.setdefault(storage_key(t), _PARAM)
        return value

    def run_node(self, n: torch.fx.Node) -> Any:
        if n.op in ("placeholder", "get_attr", "output"):
            return super().run_node(n)
        packed: list[torch.Tensor] = []

        def pack(t: torch.Tensor) -> torch.Tensor:
            packed.append(t)
            return t

        flops = FlopCounterMode(display=False)
        scratch = _ScratchProbe()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), flops, scratch:
            value = super().run_node(n)
        self.saved_refs.extend(packed)
        info = self._info(n, value, packed, flops.get_total_flops())
        # storages that existed before this node and that it wrote into: in-place ops on others' values
        mutates = tuple(dict.fromkeys(self.owner[k] for k in scratch.written if k in self.owner
                                      and self.owner[k] != n.name))
        for k in dict.fromkeys(scratch.written):
            if self.owner.get(k) in OUTSIDE:
                self.outside_writers.setdefault(k, []).append(n.name)
        self.infos[n.name] = dataclasses.replace(info, scratch_cpu_bytes=scratch.peak, mutates=mutates,
                                                 cast_grad_bytes=self._cast_grads(scratch.casts, value),
                                                 draws_random=scratch.random)
        return value

    def _cast_grads(self, casts: list[tuple[torch.Tensor, torch.Tensor]], value: Any) -> int:
        """Gradient bytes a node's backward makes for the dtype casts inside it (autocast's) beyond the
        gradients of its inputs: a bf16 activation max-pooled in fp32 gets an fp32 gradient first (the
        difference counts), a weight's bf16 copy a bf16 gradient before the fp32 one (all of it)."""
        outs = _owned_keys(value)
        total = 0
        for src, copy in casts:
            if not src.requires_grad or storage_key(copy) in outs:
                continue
            who = self.owner.get(storage_key(src))
            cast = copy.numel() * copy.element_size()
            total += cast if who in OUTSIDE or who is None else max(0, cast - src.numel() * src.element_size())
        return total

    def _info(self, n: torch.fx.Node, value: Any, packed: list[torch.Tensor], flops: int) -> NodeInfo:
        outs = tensors_in(value)
        out_bytes, alias_of, seen = 0, None, set()
        for t in outs:
            key = storage_key(t)
            if key in seen:
                continue
            seen.add(key)
            if key in self.owner:
                alias_of = alias_of or self.owner[key]
            else:
                self.owner[key] = n.name
                out_bytes += t.untyped_storage().nbytes()
        saved_from: list[str] = []
        extra = inputs = params = 0
        saved_keys = set()
        for t in packed:
            key = storage_key(t)
            if key in saved_keys:
                continue
            saved_keys.add(key)
            who = self.owner.get(key)
            nbytes = t.untyped_storage().nbytes()
            if who is None:
                if key not in self.extra_seen:   # a shared weight's cast is made once per forward
                    extra += nbytes
                self.extra_seen.add(key)
            elif who in (_PARAM, _BUFFER):
                params += nbytes
            elif who == _INPUT:
                inputs += nbytes
            elif who not in saved_from:
                saved_from.append(who)
        has_params = bool(n.op == "call_module" and any(True for _ in self.module.get_submodule(n.target).parameters())) \
            or any(isinstance(a, torch.fx.Node) and a.op == "get_attr" for a in n.all_input_nodes)
        numel = sum(t.numel() for t in outs)
        return NodeInfo(
            name=n.name, op=n.op, target=_target_name(n),
            out_shapes=tuple(tuple(t.shape) for t in outs), out_dtypes=tuple(str(t.dtype) for t in outs),
            out_bytes=out_bytes, alias_of=None if alias_of in OUTSIDE else alias_of,
            saved_from=tuple(saved_from), saved_extra_bytes=extra, saved_input_bytes=inputs,
            saved_param_bytes=params, flops=int(max(flops, numel)), has_params=has_params)


def _owned_keys(tree: Any) -> set[int]:
    return {storage_key(t) for t in tensors_in(tree)}


class _ScratchProbe(TorchDispatchMode):
    """Largest CPU convolution scratch (forward or backward) among the ops one node dispatches, the
    storages those ops write into (their schemas' mutable arguments), and whether any of them draws
    from the random generator (ATen's ``nondeterministic_seeded`` tag: dropout, bernoulli_, rand, ...)."""

    def __init__(self):
        super().__init__()
        self.peak = 0
        self.random = False
        self.written: list[int] = []
        self.casts: list[tuple[torch.Tensor, torch.Tensor]] = []   # (source, copy) of dtype casts

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.written += [storage_key(t) for t in written_args(func, args, kwargs or {})]
        self.random = self.random or torch.Tag.nondeterministic_seeded in func.tags
        if str(func.overloadpacket) == "aten.convolution":
            x, w, stride, padding, transposed, groups = args[0], args[1], args[3], args[4], bool(args[6]), int(args[8])
            self.peak = max(self.peak, *(conv_scratch_bytes(x, w, stride, padding, transposed, groups, backward=b)
                                         for b in (False, True)))
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten._to_copy.default and isinstance(out, torch.Tensor) and out.dtype != args[0].dtype:
            self.casts.append((args[0], out))
        return out


def _use_counts(n: torch.fx.Node) -> dict[str, int]:
    """How many times node ``n`` reads each direct input (``x + x`` reads x twice)."""
    counts: dict[str, int] = {}

    def visit(a: torch.fx.Node) -> torch.fx.Node:
        counts[a.name] = counts.get(a.name, 0) + 1
        return a

    torch.fx.map_arg((n.args, n.kwargs), visit)
    return counts


def _sources(node: torch.fx.Node, keep: set[str]) -> set[str]:
    """Placeholder/get_attr names that ``node`` reads directly or through non-tensor nodes."""
    out, stack = set(), list(node.all_input_nodes)
    while stack:
        a = stack.pop()
        if a.op in ("placeholder", "get_attr"):
            out.add(a.name)
        elif a.name not in keep:
            stack.extend(a.all_input_nodes)
    return out


def _target_name(n: torch.fx.Node) -> str:
    t = n.target
    if isinstance(t, str):
        return t
    return getattr(t, "__name__", None) or str(t)


def analyze(gm: torch.fx.GraphModule, example_inputs: tuple, *, tracer: str = "fx",
            notes: tuple[str, ...] = (), amp: str | None = None) -> MemGraph:
    """Build the MemGraph of ``gm``: one fake-tensor forward with saved-tensor hooks and FLOP counting,
    under ``torch.autocast`` when ``amp`` is "bf16" or "fp16" (the graph itself is not changed).

    Nodes that produce no tensor (guards, asserts) are left out of the DAG; views and in-place ops
    stay in it with ``out_bytes == 0`` and ``alias_of`` set; in-place writes into other nodes' values
    become ``MemGraph.together`` groups, writes into inputs or parameters ``MemGraph.pinned`` nodes;
    random draws and the writers of one buffer become ``MemGraph.ordered`` groups (kept in fx order).
    """
    amp = None if amp is None else check_amp_mode(amp).value
    dtype = check_amp(amp)
    world = FakeWorld(home_device(gm, example_inputs))
    fgm = world.module(gm)
    inputs = world.inputs(example_inputs)
    rec = _Recorder(fgm)
    autocast = torch.autocast(world.device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
    with world.mode, torch.enable_grad(), autocast:
        result = rec.run(*inputs)
    infos = rec.infos
    dag = nx.DiGraph()
    order = [n.name for n in gm.graph.nodes if n.name in infos and infos[n.name].out_shapes]
    keep = set(order)
    for name in order:
        dag.add_node(name, info=infos[name])
    deps: dict[str, set[str]] = {}   # nearest tensor-producing ancestors, through non-tensor nodes
    for n in gm.graph.nodes:
        d: set[str] = set()
        for a in n.all_input_nodes:
            d |= {a.name} if a.name in keep else deps.get(a.name, set())
        deps[n.name] = d
        if n.name in keep:
            uses = _use_counts(n)
            for a in d:
                dag.add_edge(a, n.name, uses=uses.get(a, 1))
    output_node = next(n for n in gm.graph.nodes if n.op == "output")
    outputs = tuple(sorted(deps[output_node.name], key=order.index))
    shared = []   # readers of each graph input / parameter attribute, through non-tensor nodes
    readers_of: dict[str, list[str]] = {}
    fx_node = {n.name: n for n in gm.graph.nodes}
    for u in order:
        for src in _sources(fx_node[u], keep):
            readers_of.setdefault(src, []).append(u)
    for n in gm.graph.nodes:
        if n.op in ("placeholder", "get_attr"):
            readers = readers_of.get(n.name, [])
            if len(readers) >= 3:
                shared.append(tuple(readers))
    by_param: dict[int, list[str]] = {}   # a module called several times reads its weights each time
    for n in gm.graph.nodes:
        if n.op == "call_module" and n.name in keep:
            for p in gm.get_submodule(n.target).parameters():
                by_param.setdefault(id(p), []).append(n.name)
    shared += [tuple(dict.fromkeys(r)) for r in by_param.values() if len(dict.fromkeys(r)) >= 3]
    shared = list(dict.fromkeys(shared))
    params = dict(gm.named_parameters())
    param_bytes = sum(p.numel() * p.element_size() for p in params.values())
    trainable = sum(p.numel() * p.element_size() for p in params.values() if p.requires_grad)
    buffer_bytes = sum(b.numel() * b.element_size() for b in gm.buffers())
    input_bytes = sum(t.numel() * t.element_size() for t in tensors_in(example_inputs))
    del result
    together, pinned = _mutation_constraints(gm, dag, order, infos, keep)
    return MemGraph(gm=gm, dag=dag, order=order, outputs=outputs, input_bytes=input_bytes,
                    ordered=_effect_order(order, infos, rec.outside_writers),
                    param_bytes=param_bytes, trainable_param_bytes=trainable, buffer_bytes=buffer_bytes,
                    tracer=tracer, trace_notes=notes, shared_reads=tuple(shared), together=together,
                    pinned=pinned, amp=amp, example_inputs=to_meta(tuple(example_inputs)))


def at_precision(graph: MemGraph, amp: str | None) -> MemGraph:
    """``graph`` with its byte facts analysed for a step under ``amp`` autocast (None: fp32): the same
    module, re-run on fake tensors when the precision differs. Keeps the full-precision graph's
    fingerprint, out-of-place rewrite and trace notes, so a plan made on it names the traced network."""
    amp = None if amp is None else check_amp_mode(amp).value
    if graph.amp == amp:
        return graph
    base = graph.full_precision if graph.full_precision is not None else graph
    if base.amp == amp:
        return base
    if not base.example_inputs:
        raise MemplanError(f"this MemGraph records no example inputs, so it cannot be re-analysed for amp={amp!r}; "
                           "build it with memplan.trace(model, example_inputs)")
    new = analyze(base.gm, base.example_inputs, tracer=base.tracer, notes=base.trace_notes, amp=amp)
    return dataclasses.replace(new, source_gm=base.source_gm, out_of_place=base.out_of_place,
                               full_precision=base if base.amp is None else None)


def _effect_order(order: list[str], infos: dict[str, NodeInfo], outside_writers: dict[int, list[str]]
                  ) -> tuple[tuple[str, ...], ...]:
    """Node groups whose fx order a plan must keep although no data edge orders them: the nodes that
    draw random numbers (they share the generator, so a dropout run earlier draws another mask) and
    the nodes writing one parameter, buffer or input (a BatchNorm called twice updates its statistics
    in a fixed order)."""
    index = {name: i for i, name in enumerate(order)}
    groups = [tuple(n for n in order if infos[n].draws_random)]
    groups += [tuple(sorted(set(w) & index.keys(), key=index.__getitem__)) for w in outside_writers.values()]
    return tuple(dict.fromkeys(g for g in groups if len(g) >= 2))


def _mutation_constraints(gm: torch.fx.GraphModule, dag: nx.DiGraph, order: list[str], infos: dict[str, NodeInfo],
                          keep: set[str]) -> tuple[tuple[tuple[str, ...], ...], frozenset[str]]:
    """What in-place writes demand of a plan, so a recomputation never replays one on a changed value.

    A node writing into another node's storage must share a segment with that storage's producer and
    with every earlier reader of it (a recomputed segment then replays the same sequence); a node
    writing into a graph input or a parameter is never recomputed, nor are the earlier readers of
    that tensor. Buffer writes need neither: recomputation runs on the buffers as they were.
    """
    index = {name: i for i, name in enumerate(order)}
    fx_node = {n.name: n for n in gm.graph.nodes}
    together, pinned = [], set()
    for m in order:
        for owner in infos[m].mutates:
            earlier = order[:index[m]]
            if owner in index:
                root = alias_root(infos, owner)
                readers = [u for u in earlier
                           if any(alias_root(infos, p) == root for p in dag.predecessors(u))]
                together.append(tuple(sorted({root, m, *readers}, key=index.__getitem__)))
            elif owner in (_PARAM, _INPUT):
                mine = _sources(fx_node[m], keep)
                pinned |= {m} | {u for u in earlier if _sources(fx_node[u], keep) & mine}
    return tuple(dict.fromkeys(together)), frozenset(pinned)


class _Timer(torch.fx.Interpreter):
    """Runs a graph on real tensors and records each node's wall time (best of the repeats)."""

    def __init__(self, gm: torch.fx.GraphModule, sync):
        super().__init__(gm)
        self.sync = sync
        self.times: dict[str, float] = {}

    def run_node(self, n: torch.fx.Node) -> Any:
        import time
        self.sync()
        t0 = time.perf_counter()
        value = super().run_node(n)
        self.sync()
        dt = time.perf_counter() - t0
        self.times[n.name] = min(dt, self.times.get(n.name, float("inf")))
        return value


def measure_node_times(gm: torch.fx.GraphModule, example_inputs: tuple, *, device: str | torch.device = "cpu",
                       repeats: int = 3) -> dict[str, float]:
    """Seconds each node's forward takes on ``device`` (best of ``repeats``), on random inputs
    shaped like ``example_inputs``; the planner can use these instead of FLOPs as node times."""
    import copy
    device = torch.device(device)
    work = copy.deepcopy(gm).to(device)
    inputs = tuple(torch.randn(t.shape, dtype=t.dtype, device=device) if isinstance(t, torch.Tensor)
                   and t.is_floating_point() else t for t in example_inputs)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    timer = _Timer(work, sync)
    with torch.no_grad():
        for _ in range(max(1, repeats)):
            timer.run(*inputs)
    return timer.times
