"""Meta-device copies: plan and predict at clinical sizes without allocating real memory."""
from __future__ import annotations

import copy
import warnings
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map


def as_tuple(example_inputs: Any) -> tuple:
    """Normalise ``example_inputs`` (a tensor, or a tuple/list of them) to a tuple."""
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    return (example_inputs,)


def meta_like(t: torch.Tensor) -> torch.Tensor:
    """A meta tensor with ``t``'s shape, strides, dtype and requires_grad."""
    out = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")
    return out.requires_grad_(t.requires_grad) if t.is_floating_point() or t.is_complex() else out


def to_meta(tree: Any) -> Any:
    """Every tensor in a pytree replaced by its meta twin (non-tensors kept)."""
    return tree_map(lambda x: meta_like(x) if isinstance(x, torch.Tensor) else x, tree)


def meta_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` whose parameters and buffers live on ``meta`` (no data is copied).

    Parameters shared inside ``module`` stay shared in the copy.
    """
    memo: dict[int, Any] = {}
    for p in module.parameters(recurse=True):
        if id(p) not in memo:
            memo[id(p)] = nn.Parameter(meta_like(p.detach()), requires_grad=p.requires_grad)
    for b in module.buffers(recurse=True):
        if id(b) not in memo:
            memo[id(b)] = meta_like(b)
    # tensors held as plain attributes (constants of fx graphs) become meta too
    for m in module.modules():
        for value in vars(m).values():
            if isinstance(value, torch.Tensor) and id(value) not in memo:
                memo[id(value)] = meta_like(value.detach())
    with warnings.catch_warnings():   # deepcopy of exported modules trips a pytree deprecation notice
        warnings.simplefilter("ignore", FutureWarning)
        return copy.deepcopy(module, memo)


def is_meta(tree: Any) -> bool:
    """True when every tensor in the pytree is on the meta device."""
    leaves = [x for x in tree_flatten(tree)[0] if isinstance(x, torch.Tensor)]
    return bool(leaves) and all(x.is_meta for x in leaves)


def storage_key(t: torch.Tensor) -> int:
    """An identity for ``t``'s storage, equal for all views and aliases of it."""
    return t.untyped_storage()._cdata


def tensors_in(tree: Any) -> list[torch.Tensor]:
    """The tensors of a pytree, in flatten order."""
    return [x for x in tree_flatten(tree)[0] if isinstance(x, torch.Tensor)]


# -- fake tensors ----------------------------------------------------------------------------------
def home_device(module: nn.Module | None, inputs: Any = ()) -> torch.device:
    """The device a step of ``module`` on ``inputs`` runs on: its first non-meta parameter, buffer or
    input; the CPU when everything is on ``meta`` (a meta model plans as a CPU one)."""
    tensors = [] if module is None else list(module.parameters()) + list(module.buffers())
    tensors += [t for t in tree_flatten(inputs)[0] if isinstance(t, torch.Tensor)]
    for t in tensors:
        if not t.is_meta:
            return t.device
    return torch.device("cpu")


class FakeWorld:
    """One ``FakeTensorMode`` with fake twins of real or meta tensors on one home device.

    Fake tensors carry shape, dtype, strides and device but no data, like meta tensors, yet code that
    creates tensors inside forward (``torch.zeros(3)``), holds CPU constants, reads ``.item()`` of a
    scalar buffer or places tensors relative to a device runs as it does for real: what torch.export
    and torch.compile trace with. ``origin`` maps each fake storage to the real tensor it twins.
    """

    def __init__(self, device: torch.device | str | None = None):
        self.mode = _fake_mode_class()(allow_non_fake_inputs=True)   # real tensors a loss closes over
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.origin: dict[int, int] = {}        # fake storage key -> storage key of the tensor it twins

    def tensor(self, t: torch.Tensor) -> torch.Tensor:
        """The fake twin of ``t`` (meta tensors move to the home device); scalars keep their value."""
        t = t.detach()
        if t.is_meta:
            with self.mode:
                out = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=self.device)
        elif t.numel() <= 1:                    # .item() / float() of a step counter must work
            out = self.mode.fake_tensor_converter.from_real_tensor(self.mode, t.clone(), make_constant=True)
        else:
            out = self.mode.from_tensor(t)
        self.origin[storage_key(out)] = storage_key(t)
        return out

    def inputs(self, tree: Any) -> Any:
        """Every tensor of a pytree replaced by its fake twin (requires_grad kept)."""
        def one(x):
            if not isinstance(x, torch.Tensor):
                return x
            f = self.tensor(x)
            return f.requires_grad_(x.requires_grad) if f.is_floating_point() or f.is_complex() else f
        return tree_map(one, tree)

    def module(self, module: nn.Module) -> nn.Module:
        """A deep copy of ``module`` whose parameters, buffers and tensor attributes are fake twins;
        parameters shared inside ``module`` stay shared. The original is not touched."""
        memo: dict[int, Any] = {}
        for p in module.parameters(recurse=True):
            if id(p) not in memo:
                memo[id(p)] = nn.Parameter(self.tensor(p), requires_grad=p.requires_grad)
        for b in module.buffers(recurse=True):
            if id(b) not in memo:
                memo[id(b)] = self.tensor(b)
        for m in module.modules():              # constants of fx / exported graphs
            for value in vars(m).values():
                if isinstance(value, torch.Tensor) and id(value) not in memo:
                    memo[id(value)] = self.tensor(value)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            return copy.deepcopy(module, memo)


_FAKE_MODE: type | None = None


def _fake_mode_class() -> type:
    """FakeTensorMode whose dispatch cache skips ops with storage arguments (``Tensor.set_``): a cache
    key would hold the storage strongly and keep a freed activation alive in the live-storage count."""
    global _FAKE_MODE
    if _FAKE_MODE is None:
        from torch._subclasses.fake_tensor import FakeTensorMode

        class _Mode(FakeTensorMode):
            def _cached_dispatch_impl(self, func, types, args, kwargs):
                if any(isinstance(a, torch.UntypedStorage) for a in tree_flatten((args, kwargs))[0]):
                    return self._dispatch_impl(func, types, args, kwargs)
                return super()._cached_dispatch_impl(func, types, args, kwargs)
        _FAKE_MODE = _Mode
    return _FAKE_MODE


def is_fake(t: Any) -> bool:
    """True for a FakeTensor."""
    from torch._subclasses.fake_tensor import FakeTensor
    return isinstance(t, FakeTensor)


# -- ATen schemas ----------------------------------------------------------------------------------
def functional_name(func) -> str:
    """An ATen op's name with in-place and out-of-place variants equal: add_ -> add, __iand__ -> __and__."""
    name = func.overloadpacket.__name__
    if name.startswith("__i") and name.endswith("__"):
        return "__" + name[3:]
    return name[:-1] if name.endswith("_") and not name.endswith("__") else name


def written_args(func, args: tuple, kwargs: dict) -> list[torch.Tensor]:
    """The tensor arguments an ATen op writes into (from its schema's alias annotations)."""
    out = []
    for i, arg in enumerate(func._schema.arguments):
        if arg.alias_info is None or not arg.alias_info.is_write:
            continue
        value = args[i] if i < len(args) else kwargs.get(arg.name)
        out += tensors_in(value)
    return out
