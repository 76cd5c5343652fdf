"""The one training loop of the clients: epochs of steps, a per-case progress bar with ETA, NaN guard.

A client supplies ``step(batch) -> {"loss": float, ...terms}`` (forward, loss, backward, update) and
``batches(epoch)``; the loop averages every term per epoch, stops with a clear error when a loss is
not finite, and calls ``on_epoch(epoch, means)`` (where the client saves its checkpoint).
"""
from __future__ import annotations

import contextlib
import math
import sys
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import torch
from tqdm import tqdm

from models.errors import ClientError

__all__ = ["run_epochs", "batch_ids", "Precision", "AMP_MODES"]

#: ``--amp`` values and their autocast dtypes (None: full precision)
AMP_MODES = {None: None, "bf16": torch.bfloat16, "fp16": torch.float16}


class Precision:
    """Mixed precision of a client's step, as memplan simulates it (memplan.measure.run_steps): forward
    and loss under torch.autocast(device type, dtype), backward outside it; "fp16" scales the loss with
    a torch.amp.GradScaler (which skips a step whose gradients overflowed). ``amp`` None: fp32, no-ops.

    >>> p = Precision("bf16", "cpu")
    >>> with p.autocast():
    ...     y = torch.nn.functional.linear(torch.ones(1, 2), torch.ones(3, 2))
    >>> y.dtype
    torch.bfloat16
    """

    def __init__(self, amp: str | None, device: str | torch.device):
        if amp not in AMP_MODES:
            raise ClientError(f"--amp {amp!r} is not a precision the clients train in; use bf16, fp16 or leave it "
                              "out (fp32)")
        self.amp, self.dtype = amp, AMP_MODES[amp]
        self.device_type = torch.device(device).type
        self.scaler = torch.amp.GradScaler(self.device_type) if amp == "fp16" else None

    def autocast(self) -> contextlib.AbstractContextManager:
        """The forward-and-loss context: autocast in ``amp``'s dtype, nothing for fp32."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor, *optimizers: torch.optim.Optimizer) -> None:
        """``loss.backward()`` then each optimizer's step; scaled (and unscaled before the step) under fp16."""
        if self.scaler is None:
            loss.backward()
            for opt in optimizers:
                opt.step()
            return
        self.scaler.scale(loss).backward()
        for opt in optimizers:
            self.scaler.step(opt)
        self.scaler.update()


def batch_ids(batch: Any) -> str:
    """The case id(s) of a batch (a dict with "id", or a list of such), for messages."""
    if isinstance(batch, Mapping) and "id" in batch:
        ids = batch["id"]
        return ", ".join(ids) if isinstance(ids, (list, tuple)) else str(ids)
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], Mapping):
        return ", ".join(str(b.get("id", "?")) for b in batch)
    return "?"


def run_epochs(step: Callable[[Any], Mapping[str, float]], batches: Callable[[int], Iterable[Any]], *,
               epochs: int, steps_per_epoch: int, desc: str, progress: bool = True, start_epoch: int = 0,
               on_epoch: Callable[[int, dict[str, float]], None] | None = None) -> list[dict[str, float]]:
    """Run epochs ``start_epoch .. epochs - 1``; returns the per-epoch means of every term ``step`` reports.

    The bar (stderr) counts cases over the whole run, so its ETA is the run's; ``progress=False`` hides it.
    """
    if epochs < 1 or steps_per_epoch < 1:
        raise ClientError(f"need epochs >= 1 and at least one batch per epoch, got epochs={epochs}, "
                          f"batches={steps_per_epoch}; add cases or lower --batch-size")
    history: list[dict[str, float]] = []
    bar = tqdm(total=(epochs - start_epoch) * steps_per_epoch, desc=desc, unit="step", file=sys.stderr,
               disable=not progress, dynamic_ncols=True)
    try:
        for epoch in range(start_epoch, epochs):
            sums: dict[str, list[float]] = {}
            for batch in batches(epoch):
                terms = step(batch)
                loss = float(terms["loss"])
                if not math.isfinite(loss):
                    raise ClientError(f"the training loss became {loss} at epoch {epoch + 1}, case(s) "
                                      f"{batch_ids(batch)}; the inputs are finite (checked on load), so the "
                                      f"step diverged: lower --lr")
                for k, v in terms.items():
                    sums.setdefault(k, []).append(float(v))
                bar.update(1)
                bar.set_postfix_str(f"epoch {epoch + 1}/{epochs} loss {loss:.4g}")
            means = {k: float(np.mean(v)) for k, v in sums.items()}
            history.append(means)
            if on_epoch is not None:
                on_epoch(epoch, means)
    finally:
        bar.close()
    return history
