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
