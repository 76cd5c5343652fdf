"""Step times for ``memplan measure --real``: the median of alternating training steps per module."""
from __future__ import annotations

import contextlib
import statistics
import time

import torch

from ..measure import check_amp, default_loss, make_optimizer


def time_steps(modules: dict[str, torch.nn.Module], inputs: tuple, optimizer: str, repeat: int, *,
               amp: str | None = None) -> dict[str, float]:
    """Median seconds of one training step per module, after one warm-up step each, steps alternating;
    forward and loss under ``amp`` autocast (fp16 loss scaled by a GradScaler) as measure_step runs them."""
    opts = {k: make_optimizer(optimizer, list(m.parameters())) for k, m in modules.items()}
    cuda = any(t.is_cuda for t in inputs)
    device_type = "cuda" if cuda else "cpu"
    dtype = check_amp(amp)
    scalers = {k: torch.amp.GradScaler(device_type) if amp == "fp16" and opts[k] is not None else None
               for k in modules}
    samples: dict[str, list[float]] = {k: [] for k in modules}

    def step(name: str) -> float:
        module, opt = modules[name], opts[name]
        module.zero_grad(set_to_none=True)
        scaler = scalers[name]
        t0 = time.perf_counter()
        with torch.autocast(device_type, dtype=dtype) if dtype is not None else contextlib.nullcontext():
            loss = default_loss(module(*inputs))
        (loss if scaler is None else scaler.scale(loss)).backward()
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        elif opt is not None:
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
