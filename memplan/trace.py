"""Trace any network into a MemGraph: torch.fx first, torch.export (non-strict) as the fallback.

Everything runs on fake tensors (``FakeTensorMode``, what torch.export and torch.compile trace with):
shapes, dtypes and devices without data, so a clinical-size volume costs no memory. Before any
tracer, the model runs eagerly on the example inputs, so a wrong shape, dtype or device is reported
as such. A trace is accepted only when it is validated against eager execution: the same output
structure, shapes and dtypes and, for fx, the same *dataflow* - every output and every buffer is
hashed from the ops that computed it, in-place ops counted as their out-of-place twins (fx turns
``out += x`` into ``out + x``), so a branch that a Python check on a Proxy silently dropped, or an
aliasing write the rewrite lost, is caught even without data. Real inputs are compared by value too.
"""
from __future__ import annotations

import collections
import dataclasses
import contextlib
import inspect
import logging
import os
import sys
import tempfile
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.fx
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

from ._meta import FakeWorld, as_tuple, functional_name, home_device, is_meta, storage_key, tensors_in, written_args
from .analyze import analyze
from .bnfreeze import restored_buffers
from .errors import MemplanError, TraceError
from .graph import MemGraph
from .inputs import DATA_DEPENDENT as _DATA_DEPENDENT, check_inputs, input_failure, user_frame
from .outofplace import rewrite_out_of_place
from .planned import unwrap

#: Modules the fx tracer keeps whole (their forward is opaque to planning), e.g. reversible blocks.
_LEAF_PREDICATES: list[Callable[[nn.Module], bool]] = []


def register_leaf(predicate: Callable[[nn.Module], bool]) -> None:
    """Make the fx tracer treat every module for which ``predicate`` holds as one graph node."""
    _LEAF_PREDICATES.append(predicate)


class _Tracer(torch.fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return any(p(m) for p in _LEAF_PREDICATES) or super().is_leaf_module(m, qualname)


@dataclass(frozen=True)
class TraceAttempt:
    """One tracer's outcome: ok, or the reason it was rejected."""
    tracer: str
    ok: bool
    reason: str = ""
    where: str = ""         # the model's own file:line the failure points at, when known
    fix: str = ""


# -- dataflow hashing ------------------------------------------------------------------------------
class _Dataflow(TorchDispatchMode):
    """Hashes every storage's content from the ops that wrote it, so two runs can be compared.

    A tensor's value id is (content of its storage, shape, strides, offset); an op's result content
    is the hash of its functional name and its arguments' value ids, whether it wrote in place or
    allocated. Views share their base's content. Seeds name the storages both runs start from.
    """

    def __init__(self, seeds: dict[int, int]):
        super().__init__()
        self.content: dict[int, int] = dict(seeds)
        self.ops: collections.Counter = collections.Counter()

    def value_id(self, t: torch.Tensor) -> int:
        key = storage_key(t)
        c = self.content.setdefault(key, hash(("unseen", key)))
        return hash((c, tuple(t.shape), tuple(t.stride()), t.storage_offset(), str(t.dtype)))

    def _sig(self, x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            return ("T", self.value_id(x))
        if isinstance(x, (list, tuple)):
            return tuple(self._sig(v) for v in x)
        if isinstance(x, dict):
            return tuple((k, self._sig(v)) for k, v in sorted(x.items()))
        return repr(x)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = functional_name(func)
        # grad mode is part of what an op computes: fx drops `with torch.no_grad():`, torch.export keeps it
        sig = hash((name, self._sig(args), self._sig(kwargs), torch.is_grad_enabled()))
        in_keys = {storage_key(t) for t in tensors_in((args, kwargs))}
        written = {storage_key(t) for t in written_args(func, args, kwargs)}
        out = func(*args, **kwargs)
        for i, t in enumerate(tensors_in(out)):
            key = storage_key(t)
            if key in written or key not in in_keys:     # a write, or a fresh result: new content
                self.content[key] = hash((sig, i))
        for key in written - {storage_key(t) for t in tensors_in(out)}:
            self.content[key] = hash((sig, "w"))
        shapes = tuple(tuple(t.shape) for t in tensors_in(out))
        self.ops[(name if torch.is_grad_enabled() else f"{name} (no grad)", shapes)] += 1
        return out


@dataclass(frozen=True)
class _Run:
    """What one validation run produced: outputs, their value ids, buffer contents, op counts."""
    out: Any
    out_ids: tuple[int, ...]
    buffers: dict[int, int]
    ops: collections.Counter


def _fake_run(module: nn.Module, world: FakeWorld, fake_inputs: tuple) -> _Run:
    """Run a fake twin of ``module`` on ``fake_inputs`` under the dataflow hasher."""
    twin = world.module(module)
    seeds = {storage_key(t): hash(("origin", world.origin.get(storage_key(t), storage_key(t))))
             for t in list(twin.parameters()) + list(twin.buffers()) + tensors_in(fake_inputs)}
    rng = torch.get_rng_state()
    try:
        with world.mode, torch.enable_grad():
            flow = _Dataflow(seeds)
            with flow:
                out = twin(*fake_inputs)
            ids = tuple(flow.value_id(t) for t in tensors_in(out))
    finally:
        torch.set_rng_state(rng)
    buffers = {world.origin.get(storage_key(b), storage_key(b)): flow.content.get(storage_key(b), 0)
               for b in twin.buffers()}
    return _Run(out, ids, buffers, flow.ops)


# -- tracers ---------------------------------------------------------------------------------------
def fx_trace(model: nn.Module, n_inputs: int | None = None) -> torch.fx.GraphModule:
    """Symbolically trace ``model`` with memplan's leaf rules; the GraphModule shares its parameters.
    A ``forward(self, *args)`` gets one placeholder per input (``n_inputs`` of them)."""
    tracer = _Tracer()
    params = list(inspect.signature(model.forward).parameters.values())
    varargs = len(params) == 1 and params[0].kind is inspect.Parameter.VAR_POSITIONAL
    graph = tracer.trace(model, concrete_args=(torch.fx.PH,) * n_inputs if varargs and n_inputs else None)
    name = model.__class__.__name__
    return torch.fx.GraphModule(tracer.root, graph, name)


@contextlib.contextmanager
def _quiet_torch_logs() -> Iterator[None]:
    """Silence torch's own warnings while a tracer is *tried*: its failure is reported by TraceError."""
    previous = logging.root.manager.disable
    logging.disable(logging.ERROR)
    sys.stderr.flush()
    saved_fd = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)  # export writes graph dumps straight to fd 2 on failure
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                yield
        finally:
            sys.stderr.flush()
            os.dup2(saved_fd, 2)
            os.close(saved_fd)
            logging.disable(previous)


def export_trace(model: nn.Module, inputs: tuple) -> torch.fx.GraphModule:
    """Non-strict torch.export on fake twins of ``inputs`` (placed on the model's device), unlifted to a
    GraphModule that shares ``model``'s parameters and buffers."""
    world = FakeWorld(home_device(model, inputs))
    fake_inputs = world.inputs(inputs)
    with _quiet_torch_logs(), restored_buffers(model):
        ep = torch.export.export(model, fake_inputs, strict=False)
    gm = ep.module()
    own = dict(model.named_parameters(remove_duplicate=False))
    own_buffers = dict(model.named_buffers(remove_duplicate=False))
    for name, _ in list(gm.named_parameters(remove_duplicate=False)):
        if name in own:
            _set_attr(gm, name, own[name])
    for name, _ in list(gm.named_buffers(remove_duplicate=False)):
        if name in own_buffers:
            _set_attr(gm, name, own_buffers[name], buffer=True)
    return gm


def _set_attr(root: nn.Module, dotted: str, value: torch.Tensor, buffer: bool = False) -> None:
    *path, leaf = dotted.split(".")
    mod = root
    for p in path:
        mod = getattr(mod, p)
    if buffer:
        mod._buffers[leaf] = value
    else:
        mod._parameters[leaf] = value


# -- validation ------------------------------------------------------------------------------------
def _compare(eager_out: Any, traced_out: Any, real: bool) -> str:
    """'' when the outputs agree in structure, shape, dtype (and value, for real ones), else why not."""
    e_leaves, e_spec = tree_flatten(eager_out)
    t_leaves, t_spec = tree_flatten(traced_out)
    if len(e_leaves) != len(t_leaves):
        return f"it returns {len(t_leaves)} values where eager returns {len(e_leaves)}"
    for i, (e, t) in enumerate(zip(e_leaves, t_leaves)):
        if isinstance(e, torch.Tensor) != isinstance(t, torch.Tensor):
            return f"output {i} is a {type(t).__name__} where eager gives a {type(e).__name__}"
        if not isinstance(e, torch.Tensor):
            continue
        if e.shape != t.shape or e.dtype != t.dtype:
            return f"output {i} is {tuple(t.shape)} {t.dtype} where eager gives {tuple(e.shape)} {e.dtype}"
        if real and not torch.allclose(e.detach(), t.detach(), rtol=1e-4, atol=1e-5, equal_nan=True):
            diff = (e.detach() - t.detach()).abs().max().item()
            return f"output {i} differs from eager by up to {diff:.3g}"
    return ""


def _dataflow_difference(eager: _Run, traced: _Run) -> str:
    """'' when every output and buffer of ``traced`` is computed as in ``eager``, else what differs."""
    bad_out = [i for i, (a, b) in enumerate(zip(eager.out_ids, traced.out_ids)) if a != b]
    bad_buf = [k for k in eager.buffers.keys() & traced.buffers.keys() if eager.buffers[k] != traced.buffers[k]]
    if not bad_out and not bad_buf:
        return ""
    what = f"output {bad_out[0]}" if bad_out else f"{len(bad_buf)} buffer update(s)"
    missing, extra = eager.ops - traced.ops, traced.ops - eager.ops
    if missing or extra:
        first = next(iter(missing or extra))
        hint = (f" ({sum(missing.values())} op(s) missing, {sum(extra.values())} extra, e.g. "
                f"{'missing' if missing else 'extra'} aten.{first[0]} -> {first[1]}); a Python check on a "
                "traced value probably took the wrong branch")
    else:
        hint = " (the same ops on different values: an in-place write on an alias was probably lost)"
    return f"the traced graph computes {what} differently from eager{hint}"


def _validate(model: nn.Module, gm: nn.Module, inputs: tuple, eager: _Run, world: FakeWorld, fake_inputs: tuple,
              check_dataflow: bool) -> str:
    """'' when ``gm`` reproduces ``model`` on ``inputs`` (fake run; real values too when given), else why."""
    traced = _fake_run(gm, world, fake_inputs)
    why = _compare(eager.out, traced.out, real=False)
    if not why and check_dataflow:
        why = _dataflow_difference(eager, traced)
    if why or is_meta(inputs) or not tensors_in(inputs):
        return why
    rng = torch.get_rng_state()
    with torch.no_grad():        # each run from the same buffers and inputs; the model's left as it was
        with restored_buffers(model):
            eager_out = model(*_clones(inputs))
        torch.set_rng_state(rng)
        with restored_buffers(model):
            traced_out = gm(*_clones(inputs))
    torch.set_rng_state(rng)
    return _compare(eager_out, traced_out, real=True)


def _clones(inputs: tuple) -> tuple:
    return tuple(tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, inputs))


# -- errors ----------------------------------------------------------------------------------------
def fix_for(exc: BaseException, where: str) -> str:
    """A fix that fits the construct behind ``exc``."""
    text = f"{type(exc).__name__}: {exc}"
    at = f" at {where}" if where else ""
    if any(k in text for k in _DATA_DEPENDENT):
        return (f"forward reads a tensor's values{at} (.item(), .tolist(), a Python `if` on a tensor): memplan "
                "plans without data. Decide from shapes or __init__ arguments, use torch.where, or wrap that part "
                "in a submodule and call memplan.register_leaf(lambda m: isinstance(m, ThatModule))")
    if "Proxy" in text or "symbolically traced" in text:
        return (f"forward uses a traced value in Python control flow{at} (iterating it, `if`, len()); use tensor "
                "ops or decide from __init__ arguments, or wrap that part in a submodule and call "
                "memplan.register_leaf(lambda m: isinstance(m, ThatModule))")
    return (f"wrap the part of forward{at} in a submodule and call memplan.register_leaf(lambda m: "
            "isinstance(m, ThatModule)) so it becomes one opaque node")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else ""


def _attempt_failed(name: str, exc: BaseException, prefix: str = "") -> TraceAttempt:
    where = user_frame(exc)
    reason = f"{prefix}{type(exc).__name__}: {_first_line(exc)}" + (f" (at {where})" if where else "")
    return TraceAttempt(name, False, reason, where, fix_for(exc, where))


def _trace_error_message(model: nn.Module, attempts: list[TraceAttempt]) -> str:
    lines = [f"memplan could not trace {type(model).__name__} into a graph that matches its eager outputs:"]
    lines += [f"  - torch.{a.tracer}: {a.reason}" for a in attempts]
    fixes = [a.fix for a in reversed(attempts) if a.fix]
    lines.append("Fix: " + (fixes[0] if fixes else
                            "make forward() free of Python control flow that depends on tensor values (use "
                            "torch.where, or move the decision into __init__), or wrap the offending part in a "
                            "submodule and call memplan.register_leaf(lambda m: isinstance(m, ThatModule)) so it "
                            "becomes one opaque node."))
    return "\n".join(lines)


def _eager_run(model: nn.Module, inputs: tuple, world: FakeWorld, fake_inputs: tuple) -> _Run:
    """Run the model itself on fake inputs; a failure here is the input's or the model's, not a tracer's."""
    fake_log = logging.getLogger("torch._subclasses.fake_tensor")
    level = fake_log.level
    fake_log.setLevel(logging.CRITICAL)       # it logs a traceback for a shape error we report ourselves
    try:
        return _fake_run(model, world, fake_inputs)
    except Exception as exc:  # noqa: BLE001 - reported with the model's own frame and the inputs
        where = user_frame(exc)
        at = f" at {where}" if where else ""
        if any(k in f"{type(exc).__name__}: {exc}" for k in _DATA_DEPENDENT):
            raise TraceError(f"{type(model).__name__} cannot run without data: {type(exc).__name__}: "
                             f"{_first_line(exc)}{at}.\nFix: {fix_for(exc, where)}") from exc
        raise input_failure(model, inputs, exc) from exc
    finally:
        fake_log.setLevel(level)


def trace_module(model: nn.Module, example_inputs: Any, *, validate: bool = True
                 ) -> tuple[torch.fx.GraphModule, str, tuple[TraceAttempt, ...]]:
    """Trace ``model`` into a validated GraphModule: (module, tracer name, every attempt)."""
    inputs = as_tuple(example_inputs)
    model = unwrap(model)                     # planning a compiled module plans its original
    check_inputs(model, inputs)
    world = FakeWorld(home_device(model, inputs))
    fake_inputs = world.inputs(inputs)
    eager = _eager_run(model, inputs, world, fake_inputs) if validate else None
    attempts: list[TraceAttempt] = []
    for name, make in (("fx", lambda: fx_trace(model, len(inputs))), ("export", lambda: export_trace(model, inputs))):
        try:
            with restored_buffers(model, parameters=True):   # fx runs writes on real tensors for real
                gm = make()
        except Exception as exc:  # noqa: BLE001 - any tracer failure means: try the next one
            attempts.append(_attempt_failed(name, exc))
            continue
        why = ""
        if validate:
            try:
                why = _validate(model, gm, inputs, eager, world, fake_inputs, check_dataflow=(name == "fx"))
            except Exception as exc:  # noqa: BLE001 - a graph that cannot run is a failed trace
                attempts.append(_attempt_failed(name, exc, "traced, but running the traced graph failed: "))
                continue
        if not why:
            attempts.append(TraceAttempt(name, True))
            return gm, name, tuple(attempts)
        attempts.append(TraceAttempt(name, False, f"traced, but {why}"))
    raise TraceError(_trace_error_message(model, attempts))


def trace(model: nn.Module, example_inputs: Any, *, validate: bool = True) -> MemGraph:
    """Trace ``model`` on ``example_inputs`` (real, meta or fake tensors) into a MemGraph.

    >>> g = trace(torch.nn.Sequential(torch.nn.Conv3d(1, 2, 3), torch.nn.ReLU()),
    ...           torch.empty(1, 1, 8, 8, 8, device="meta"))
    >>> len(g), g.info(g.order[0]).out_bytes, g.tracer
    (2, 1728, 'fx')
    """
    gm, tracer, attempts = trace_module(model, example_inputs, validate=validate)
    notes = tuple(f"{a.tracer}: {a.reason}" for a in attempts if not a.ok)
    graph = analyze(gm, as_tuple(example_inputs), tracer=tracer, notes=notes)
    if not any(i.mutates for i in graph):
        return graph
    functional, done = rewrite_out_of_place(gm, {i.name: i for i in graph}, graph.order)
    if not done:
        return graph
    note = f"{len(done)} in-place activation(s) run out-of-place (bitwise the same): " + ", ".join(
        sorted({d.was for d in done}))
    graph = analyze(functional, as_tuple(example_inputs), tracer=tracer, notes=notes + (note,))
    return dataclasses.replace(graph, source_gm=gm, out_of_place=tuple((d.node, d.was) for d in done))
