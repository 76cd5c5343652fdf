"""Train a compiled module beside the original and demand bitwise equality (float64, CPU)."""
from __future__ import annotations

import copy
from typing import Callable

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

import memplan


def tensors(tree) -> list[torch.Tensor]:
    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]


def weighted_loss(out) -> torch.Tensor:
    """A loss whose gradient differs per element (a plain sum would hide permuted gradients)."""
    total = torch.zeros((), dtype=torch.float64)
    for t in tensors(out):
        if t.is_floating_point():
            total = total + (t * torch.linspace(-1, 1, t.numel(), dtype=t.dtype).view_as(t)).sum()
    return total


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equal, NaNs in the same places counting as equal."""
    return torch.equal(a, b) or (a.shape == b.shape and torch.equal(torch.isnan(a), torch.isnan(b))
                                 and torch.equal(a.nan_to_num(0.0), b.nan_to_num(0.0)))


def first_difference(compiled: nn.Module, original: nn.Module, twin: nn.Module, x: torch.Tensor, *, steps: int = 3,
                     lr: float = 0.01, seed: int = 0, loss: Callable = weighted_loss,
                     kwargs: Callable[[int], dict] | None = None) -> str:
    """Train ``compiled`` (which shares ``original``'s parameters) and ``twin`` (a deep copy of ``original``
    taken before compiling) side by side with SGD; '' when outputs, input and parameter gradients and
    buffers are bitwise equal at every step, else the first difference. ``kwargs(step)``: the keyword
    arguments of that step's call (the same objects go to both)."""
    opt_a = torch.optim.SGD([p for p in original.parameters() if p.requires_grad], lr=lr)
    opt_b = torch.optim.SGD([p for p in twin.parameters() if p.requires_grad], lr=lr)
    for step in range(steps):
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        kw = kwargs(step) if kwargs is not None else {}
        torch.manual_seed(seed + step)
        ya = compiled(xa, **kw)
        torch.manual_seed(seed + step)
        yb = twin(xb, **kw)
        for i, (a, b) in enumerate(zip(tensors(ya), tensors(yb), strict=True)):
            if not same(a, b):
                return f"step {step}: output {i} differs by {(a - b).abs().max().item():.3g}"
        loss(ya).backward()
        loss(yb).backward()
        if not same(xa.grad, xb.grad):
            return f"step {step}: input gradient differs by {(xa.grad - xb.grad).abs().max().item():.3g}"
        for (name, p), (_, q) in zip(original.named_parameters(), twin.named_parameters(), strict=True):
            if (p.grad is None) != (q.grad is None):
                return f"step {step}: parameter {name} has a gradient in only one of them"
            if p.grad is not None and not same(p.grad, q.grad):
                return f"step {step}: gradient of {name} differs by {(p.grad - q.grad).abs().max().item():.3g}"
        for (name, a), (_, b) in zip(original.named_buffers(), twin.named_buffers(), strict=True):
            if not same(a, b):
                return f"step {step}: buffer {name} differs"
        opt_a.step(); opt_b.step()
        opt_a.zero_grad(set_to_none=True); opt_b.zero_grad(set_to_none=True)
    return ""


def compile_and_compare(make: Callable[[], nn.Module], x: torch.Tensor, *, budget=None, steps: int = 3,
                        train: bool = True, require_recompute: bool = True) -> memplan.Plan:
    """Compile a float64 network (least memory unless ``budget``) and check it trains bitwise like itself."""
    torch.manual_seed(0)
    net = make().double().train(train)
    twin = copy.deepcopy(net)
    compiled = memplan.compile(net, x, budget=budget, scratch="none")
    plan = compiled.memplan_plan
    if require_recompute:
        assert plan.recomputed_segments, f"the plan recomputes nothing, so the test would prove nothing:\n{plan.summary()}"
    why = first_difference(compiled, net, twin, x, steps=steps)
    assert not why, f"{type(net).__name__} ({compiled.memplan_plan.notes[:1]}): {why}"
    return plan
