"""Trace any network into a MemGraph: torch.fx first, torch.export (non-strict) as the fallback.

A trace is accepted only when it is validated against eager execution on the example inputs:
same output structure, shapes and dtypes, the same multiset of ATen ops dispatched (this catches
a branch that a Python check on a Proxy silently dropped, even on meta tensors), and, for real
inputs, the same values.
"""
from __future__ import annotations

import collections
import contextlib
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
from torch.utils._pytree import tree_flatten

from ._meta import as_tuple, is_meta, meta_copy, to_meta
from .analyze import analyze
from .bnfreeze import restored_buffers
from .errors import TraceError
from .graph import MemGraph

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


class _OpCounter(TorchDispatchMode):
    """Counts the ATen ops dispatched, with their output shapes."""

    def __init__(self):
        super().__init__()
        self.ops: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        shapes = tuple(tuple(t.shape) for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor))
        self.ops[(str(func.overloadpacket), shapes)] += 1
        return out


def _run_counted(fn: Callable, inputs: tuple) -> tuple[Any, collections.Counter]:
    counter = _OpCounter()
    with counter:
        out = fn(*inputs)
    return out, counter.ops


def fx_trace(model: nn.Module) -> torch.fx.GraphModule:
    """Symbolically trace ``model`` with memplan's leaf rules; the GraphModule shares its parameters."""
    tracer = _Tracer()
    graph = tracer.trace(model)
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
    """Non-strict torch.export, unlifted to a GraphModule that shares ``model``'s parameters."""
    with _quiet_torch_logs():
        ep = torch.export.export(model, inputs, strict=False)
    gm = ep.module()
    # point the unlifted module's parameters and buffers back at the model's own tensors
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


def _compare(eager_out: Any, traced_out: Any, real: bool) -> str:
    """'' when the outputs agree, else the first disagreement in words."""
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


def _validate(model: nn.Module, gm: nn.Module, inputs: tuple, check_ops: bool) -> str:
    """'' when ``gm`` reproduces ``model`` on ``inputs``; else why not."""
    real = not is_meta(inputs)
    if real:
        m, g, x = model, gm, inputs
    else:
        m, g, x = meta_copy(model), meta_copy(gm), to_meta(inputs)
    rng = torch.get_rng_state()
    with torch.no_grad(), restored_buffers(model):   # validation must leave BN statistics as they were
        eager_out, eager_ops = _run_counted(m, x)
        torch.set_rng_state(rng)
        traced_out, traced_ops = _run_counted(g, x)
    torch.set_rng_state(rng)
    why = _compare(eager_out, traced_out, real)
    if why or not check_ops or eager_ops == traced_ops:
        return why
    missing = eager_ops - traced_ops
    extra = traced_ops - eager_ops
    first = next(iter(missing or extra))
    return (f"the traced graph runs different operations than eager ({sum(missing.values())} missing, "
            f"{sum(extra.values())} extra, e.g. {'missing' if missing else 'extra'} {first[0]} -> {first[1]}); "
            "a Python check on a traced value probably took the wrong branch")


def trace_module(model: nn.Module, example_inputs: Any, *, validate: bool = True
                 ) -> tuple[torch.fx.GraphModule, str, tuple[TraceAttempt, ...]]:
    """Trace ``model`` into a validated GraphModule: (module, tracer name, every attempt)."""
    inputs = as_tuple(example_inputs)
    attempts: list[TraceAttempt] = []
    for name, make in (("fx", lambda: fx_trace(model)), ("export", lambda: export_trace(model, inputs))):
        try:
            gm = make()
        except Exception as exc:  # noqa: BLE001 - any tracer failure means: try the next one
            attempts.append(TraceAttempt(name, False, f"{type(exc).__name__}: {_first_line(exc)}"))
            continue
        why = ""
        if validate:
            try:
                why = _validate(model, gm, inputs, check_ops=(name == "fx"))
            except Exception as exc:  # noqa: BLE001 - a graph that cannot run is a failed trace
                why = f"running the traced graph failed: {type(exc).__name__}: {_first_line(exc)}"
        if not why:
            attempts.append(TraceAttempt(name, True))
            return gm, name, tuple(attempts)
        attempts.append(TraceAttempt(name, False, f"traced, but {why}"))
    raise TraceError(_trace_error_message(model, attempts))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else ""


def _trace_error_message(model: nn.Module, attempts: list[TraceAttempt]) -> str:
    lines = [f"memplan could not trace {type(model).__name__} into a graph that matches its eager outputs:"]
    lines += [f"  - torch.{a.tracer}: {a.reason}" for a in attempts]
    lines.append("Fix: make forward() free of Python control flow that depends on tensor *values* "
                 "(use torch.where, or move the decision into __init__), or wrap the offending part "
                 "in a submodule and call memplan.register_leaf(lambda m: isinstance(m, ThatModule)) "
                 "so it becomes one opaque node.")
    return "\n".join(lines)


def trace(model: nn.Module, example_inputs: Any, *, validate: bool = True) -> MemGraph:
    """Trace ``model`` on ``example_inputs`` (real or meta tensors) into a MemGraph.

    >>> g = trace(torch.nn.Sequential(torch.nn.Conv3d(1, 2, 3), torch.nn.ReLU()),
    ...           torch.empty(1, 1, 8, 8, 8, device="meta"))
    >>> len(g), g.info(g.order[0]).out_bytes, g.tracer
    (2, 1728, 'fx')
    """
    gm, tracer, attempts = trace_module(model, example_inputs, validate=validate)
    notes = tuple(f"{a.tracer}: {a.reason}" for a in attempts if not a.ok)
    return analyze(gm, as_tuple(example_inputs), tracer=tracer, notes=notes)
