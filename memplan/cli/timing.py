"""Step times for ``memplan measure --real``: the median of alternating training steps per module."""
from __future__ import annotations

import statistics
import time

import torch

from ..measure import default_loss, make_optimizer


def time_steps(modules: dict[str, torch.nn.Module], inputs: tuple, optimizer: str, repeat: int) -> dict[str, float]:
    """Median seconds of one training step per module, after one warm-up step each, steps alternating."""
    opts = {k: make_optimizer(optimizer, list(m.parameters())) for k, m in modules.items()}
    cuda = any(t.is_cuda for t in inputs)
    samples: dict[str, list[float]] = {k: [] for k in modules}

    def step(name: str) -> float:
        module, opt = modules[name], opts[name]
        module.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        default_loss(module(*inputs)).backward()
        if opt is not None:
            opt.step()
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    for name in modules:
        step(name)
    for _ in range(repeat):
        for name in modules:
            samples[name].append(step(name))
    return {k: statistics.median(v) for k, v in samples.items()}
