"""Real training steps: the peak of one steady-state step (CPU profiler allocator events, or CUDA
max_memory_allocated) and step times taken in interleaved rounds, so every method of a model is
timed under the same machine load.

A step is zero_grad(set_to_none) -> forward -> sum of outputs -> backward -> Adam step, as in
memplan.measure. Each runner takes one warm-up step first (it creates Adam's state and compiles
torch.compile'd code), so the measured step is the steady state that simulate_step's peak is.
"""
from __future__ import annotations

import contextlib
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from memplan._meta import storage_key, tensors_in
from memplan.measure import default_loss, make_optimizer

__all__ = ["Runner", "make_runner", "train_step", "live_bytes", "cpu_step_peak", "cuda_step_peak", "step_peak",
           "interleaved_times"]


@dataclass
class Runner:
    """One method's training state: the callable, its parameters' module, the optimizer, the input."""
    key: str
    call: Callable[..., Any]
    module: nn.Module
    optimizer: torch.optim.Optimizer | None
    x: torch.Tensor
    warmup_s: float = 0.0
    times_s: list[float] = field(default_factory=list)


def make_runner(key: str, call: Callable[..., Any], module: nn.Module, x: torch.Tensor,
                optimizer: str = "adam") -> Runner:
    """A runner with a fresh optimizer over ``module``'s parameters, after one timed warm-up step."""
    r = Runner(key=key, call=call, module=module, optimizer=make_optimizer(optimizer, list(module.parameters())), x=x)
    t0 = time.perf_counter()
    with _allocations_recorded(x):
        train_step(r)
    _sync(x)
    r.warmup_s = time.perf_counter() - t0
    return r


@contextlib.contextmanager
def _allocations_recorded(x: torch.Tensor):
    """On CPU, run under the memory profiler: the allocator reports a later free only for blocks it saw
    allocated while profiling, so the gradients and optimizer state the warm-up creates must be seen."""
    if x.device.type != "cpu":
        yield
        return
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True):
        yield


def train_step(r: Runner) -> None:
    if r.optimizer is not None:
        r.optimizer.zero_grad(set_to_none=True)
    else:
        r.module.zero_grad(set_to_none=True)
    loss = default_loss(r.call(r.x))
    loss.backward()
    del loss
    if r.optimizer is not None:
        r.optimizer.step()


def live_bytes(r: Runner) -> int:
    """Bytes of the tensors alive between steps: parameters, gradients, buffers, optimizer state, input."""
    tensors = list(r.module.parameters()) + list(r.module.buffers()) + [r.x]
    tensors += [p.grad for p in r.module.parameters() if p.grad is not None]
    if r.optimizer is not None:
        for st in r.optimizer.state.values():
            tensors += tensors_in(list(st.values()))
    seen = {storage_key(t): t.untyped_storage().nbytes() for t in tensors if t.device == r.x.device}
    return sum(seen.values())


def cpu_step_peak(r: Runner) -> int:
    """Peak bytes of one step on CPU: live bytes before it plus the largest running sum of the
    profiler's allocator events (frees of tensors allocated before the step count too)."""
    from memplan.measure import allocator_events, running_peak
    base = live_bytes(r)
    _, deltas = allocator_events(lambda: train_step(r))
    return base + running_peak(deltas)[0]


def cuda_step_peak(r: Runner) -> int:
    """Peak bytes of one step on CUDA: ``torch.cuda.max_memory_allocated`` (FetusMapV2's figure), less
    what the other runners alive in this process hold."""
    torch.cuda.synchronize(r.x.device)
    others = torch.cuda.memory_allocated(r.x.device) - live_bytes(r)
    torch.cuda.reset_peak_memory_stats(r.x.device)
    train_step(r)
    torch.cuda.synchronize(r.x.device)
    return int(torch.cuda.max_memory_allocated(r.x.device)) - others


def step_peak(r: Runner) -> int:
    return cuda_step_peak(r) if r.x.device.type == "cuda" else cpu_step_peak(r)


def _sync(x: torch.Tensor) -> None:
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)


def interleaved_times(runners: list[Runner], reps: int, on_step: Callable[[Runner], None] | None = None
                      ) -> dict[str, float]:
    """Median step time per runner over ``reps`` rounds; round i starts at runner i (rotated order),
    so slow drifts of machine load spread over all methods."""
    for i in range(reps):
        for r in runners[i % len(runners):] + runners[:i % len(runners)]:
            _sync(r.x)
            t0 = time.perf_counter()
            train_step(r)
            _sync(r.x)
            r.times_s.append(time.perf_counter() - t0)
            if on_step is not None:
                on_step(r)
    return {r.key: statistics.median(r.times_s) for r in runners if r.times_s}
