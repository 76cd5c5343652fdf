"""The compiled module: the original network's own parameters, buffers and submodules around the
planned graphs, so that everything a training script does with a module sees the original.

``state_dict()`` has exactly the original's keys and loads both ways with ``strict=True``;
``parameters()`` are the original's, in its order; ``.to()``, ``.train()``/``.eval()``,
``copy.deepcopy`` and DistributedDataParallel work as on the original. A traced graph bakes the
train/eval branches it was traced in (torch.export bakes BatchNorm's mode, fx bakes ``if
self.training:``), so the module holds one graph per mode: the planned one for the mode it was
compiled in and the plain trace of the other, chosen by the modules' training flags at each call.
"""
from __future__ import annotations

import contextlib
import inspect
from typing import Any, Iterator

import torch
import torch.fx
from torch import nn

from .errors import MemplanError


def training_flags(model: nn.Module) -> tuple[bool, ...]:
    """The training flag of every submodule, in ``modules()`` order: the key a traced graph is valid for."""
    return tuple(m.training for m in model.modules())


@contextlib.contextmanager
def all_in_mode(model: nn.Module, training: bool) -> Iterator[None]:
    """Every submodule in one mode for the duration; each flag as it was afterwards."""
    saved = [(m, m.training) for m in model.modules()]
    try:
        for m, _ in saved:
            m.training = training
        yield
    finally:
        for m, flag in saved:
            m.training = flag


class KeywordCall(nn.Module):
    """``model`` called with its tensor keyword arguments as trailing positional inputs, so that a tracer
    makes them graph inputs: ``forward(*inputs, *tensors)`` is ``model(*inputs, **tensors, **fixed)``.

    >>> class Net(nn.Module):
    ...     def forward(self, x, *, mask, scale=1.0): return x * mask * scale
    >>> call = KeywordCall(Net(), 1, ("mask",), {"scale": 2.0})
    >>> call(torch.ones(2), torch.tensor([0.0, 1.0])).tolist()
    [0.0, 2.0]
    """

    def __init__(self, model: nn.Module, n_inputs: int, tensor_names: tuple[str, ...], fixed: dict[str, Any]):
        super().__init__()
        self.model = model
        self.n_inputs, self.tensor_names, self.fixed = n_inputs, tuple(tensor_names), dict(fixed)

    def forward(self, *args):
        n = self.n_inputs
        return self.model(*args[:n], **dict(zip(self.tensor_names, args[n:])), **self.fixed)


def keyword_call(model: nn.Module, inputs: tuple, kwargs: dict[str, Any] | None) -> tuple[nn.Module, tuple]:
    """What to trace for ``model(*inputs, **kwargs)``: ``(model, inputs)`` without keywords, else a
    KeywordCall and ``inputs`` followed by the tensor keyword values (non-tensor ones are fixed)."""
    if not kwargs:
        return model, inputs
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        raise MemplanError(f"example_kwargs must be a dict of keyword arguments by name, got {type(kwargs).__name__}")
    try:
        inspect.signature(model.forward).bind(*inputs, **kwargs)
    except TypeError as exc:
        raise MemplanError(f"{type(model).__name__}.forward does not take example inputs {len(inputs)} positional "
                           f"and keyword(s) {', '.join(kwargs)}: {exc}") from None
    nested = [k for k, v in kwargs.items() if not isinstance(v, torch.Tensor) and _holds_tensor(v)]
    if nested:
        raise MemplanError(f"keyword argument(s) {', '.join(nested)} hold tensors inside a container; memplan "
                           "takes a tensor keyword as one tensor. Fix: pass each tensor as its own keyword argument")
    tensor_names = tuple(k for k, v in kwargs.items() if isinstance(v, torch.Tensor))
    fixed = {k: v for k, v in kwargs.items() if k not in tensor_names}
    return KeywordCall(model, len(inputs), tensor_names, fixed), inputs + tuple(kwargs[k] for k in tensor_names)


def _holds_tensor(value: Any) -> bool:
    from torch.utils._pytree import tree_flatten
    return any(isinstance(t, torch.Tensor) for t in tree_flatten(value)[0])


def unwrap(model: Any) -> Any:
    """The original network behind a compiled module (planning a compiled module plans its original)."""
    while isinstance(model, PlannedModule):
        model = model.memplan_original
    return model


class PlannedModule(nn.Module):
    """A network compiled by memplan: trains exactly like ``original`` in less memory.

    It shares ``original``'s parameter, buffer and submodule dictionaries, so it *is* the original
    to optimizers, ``state_dict`` and ``.to()``; its forward runs the graph traced for the current
    train/eval flags. ``memplan_plan`` is the plan; ``memplan_original`` the network itself.
    """

    def __init__(self, original: nn.Module, graphs: dict[tuple[bool, ...], torch.fx.GraphModule], plan,
                 traced_call: inspect.BoundArguments | None = None, n_inputs: int = 0,
                 tensor_keywords: tuple[str, ...] = ()):
        super().__init__()
        # the original's registries, shared: keys, order, devices and modes are the original's
        self._parameters = original._parameters
        self._buffers = original._buffers
        self._modules = original._modules
        self.training = original.training
        object.__setattr__(self, "memplan_original", original)
        object.__setattr__(self, "_memplan_graphs", dict(graphs))
        object.__setattr__(self, "_memplan_call", traced_call)
        # the graphs take the first n_inputs positional arguments, then the tensor keyword arguments
        object.__setattr__(self, "_memplan_inputs", (n_inputs, tuple(tensor_keywords)))
        self.memplan_plan = plan

    def __repr__(self) -> str:
        return f"PlannedModule({type(self.memplan_original).__name__}, {len(self.memplan_plan.segments)} segments)"

    @property
    def graph_module(self) -> torch.fx.GraphModule:
        """The planned graph (for the mode it was compiled in)."""
        return next(iter(self._memplan_graphs.values()))

    def train(self, mode: bool = True) -> "PlannedModule":
        super().train(mode)
        self.memplan_original.training = mode
        return self

    def _apply(self, fn, recurse=True):
        """``.to()``/``.cuda()``/``.double()``: applied to the original, then every graph is pointed at
        the original's new tensors again (buffers are replaced, not updated, by ``Module._apply``)."""
        original = self.memplan_original
        old = list(original.named_parameters(remove_duplicate=False)) + list(
            original.named_buffers(remove_duplicate=False))      # held: their ids must stay unique
        names: dict[int, str] = {}
        for name, t in old:
            names.setdefault(id(t), name)
        super()._apply(fn, recurse)
        new = dict(original.named_parameters(remove_duplicate=False))
        new.update(original.named_buffers(remove_duplicate=False))
        current = {id(t) for t in new.values()}
        moved: dict[int, torch.Tensor] = {}
        for gm in self._memplan_graphs.values():
            for m in gm.modules():
                for registry in (m._parameters, m._buffers):
                    for key, t in list(registry.items()):
                        if t is None or id(t) in current:
                            continue
                        if id(t) in names:
                            registry[key] = new[names[id(t)]]
                        elif registry is m._buffers:      # a graph's own buffer (an exported constant)
                            registry[key] = moved.setdefault(id(t), fn(t))
        del old
        return self

    def _graph_inputs(self, args: tuple, kwargs: dict) -> tuple:
        """The graph's inputs for a call: the positional tensors, then the tensor keywords it was traced
        with. Refuses values the graph was not traced for (it bakes non-tensor and absent arguments)."""
        call = self._memplan_call
        if call is None:
            if kwargs:
                raise MemplanError(f"this compiled module takes its tensor inputs positionally; got keyword "
                                   f"argument(s) {', '.join(kwargs)}. Fix: pass them when compiling "
                                   "(memplan.compile(net, (x, ...))) or leave them at their defaults")
            return args
        try:
            bound = call.signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise MemplanError(f"{exc}; the compiled module takes the arguments it was compiled with") from None
        bound.apply_defaults()
        for name, value in bound.arguments.items():
            traced = call.arguments.get(name)
            if isinstance(value, torch.Tensor) and isinstance(traced, torch.Tensor):
                continue
            if isinstance(value, torch.Tensor) or isinstance(traced, torch.Tensor):
                now, then = ("a tensor", repr(traced)) if isinstance(value, torch.Tensor) else (repr(value), "a tensor")
                raise MemplanError(
                    f"argument {name} is {now} but was {then} when the graph was traced, and the traced graph "
                    f"bakes which arguments are tensors. Fix: compile with {name} as it is called (for a keyword "
                    f"tensor memplan.compile(net, x, example_kwargs={{{name!r}: t}})), or call it as compiled")
            if value != traced:
                raise MemplanError(
                    f"argument {name}={value!r} differs from the {traced!r} the graph was traced with, and the "
                    "traced graph bakes it in. Fix: compile once per value (memplan.compile(net, example_inputs) "
                    f"with {name}={value!r} in the call) or keep {name} at {traced!r}")
        n_inputs, tensor_keywords = self._memplan_inputs
        return tuple(bound.args[:n_inputs]) + tuple(bound.arguments[k] for k in tensor_keywords)

    def forward(self, *args, **kwargs):
        inputs = self._graph_inputs(args, kwargs)
        flags = training_flags(self.memplan_original)
        gm = self._memplan_graphs.get(flags)
        if gm is None:
            gm = self._memplan_graphs.get(tuple(self.training for _ in flags))
            if gm is None or len(set(flags)) > 1:
                mixed = [n for n, m in self.memplan_original.named_modules() if m.training != self.training]
                raise MemplanError(
                    f"submodule(s) {', '.join(mixed[:3]) or '?'} are in {'eval' if self.training else 'train'} mode "
                    f"while the network is in {'train' if self.training else 'eval'} mode; memplan traced the all-train "
                    "and all-eval networks. Fix: compile after setting the modes you train with")
        return gm(*inputs)
