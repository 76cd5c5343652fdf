"""Freeze BatchNorm running statistics while a forward pass is *re*-computed.

Recomputation (checkpoint recompute, reversible-block reconstruction) runs a module's forward a
second time in the same step; in training mode BatchNorm would then update ``running_mean``,
``running_var`` and ``num_batches_tracked`` twice. Inside :func:`frozen_batchnorm_stats` the
modules normalise with batch statistics exactly as before but leave their buffers untouched.
"""
from __future__ import annotations

import contextlib
from typing import Iterable, Iterator

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


def batchnorms(modules: Iterable[nn.Module]) -> list[_BatchNorm]:
    """Every BatchNorm module (with running statistics) inside ``modules``, each once."""
    seen: dict[int, _BatchNorm] = {}
    for root in modules:
        for m in root.modules():
            if isinstance(m, _BatchNorm) and m.track_running_stats:
                seen.setdefault(id(m), m)
    return list(seen.values())


@contextlib.contextmanager
def frozen_batchnorm_stats(modules: Iterable[nn.Module]) -> Iterator[None]:
    """Within the block, BatchNorms of ``modules`` compute as before but do not update their stats.

    >>> import torch
    >>> bn = nn.BatchNorm1d(2); x = torch.randn(4, 2)
    >>> y1 = bn(x); before = bn.running_mean.clone()
    >>> with frozen_batchnorm_stats([bn]): y2 = bn(x)
    >>> torch.equal(y1, y2), torch.equal(before, bn.running_mean), int(bn.num_batches_tracked)
    (True, True, 1)
    """
    frozen = [m for m in batchnorms(modules) if m.training]
    for m in frozen:
        m.track_running_stats = False  # training: batch stats, no buffer update (see _BatchNorm.forward)
    try:
        yield
    finally:
        for m in frozen:
            m.track_running_stats = True


@contextlib.contextmanager
def restored_buffers(module: nn.Module, *, parameters: bool = False) -> Iterator[None]:
    """On exit, every buffer of ``module`` holds again what it held on entry (copied back in place).

    Used around recomputation of exported graphs (whose BatchNorm is an ATen op that always
    updates its running statistics) and around trace validation, which must not change the model.
    """
    import torch
    tensors = list(module.buffers()) + (list(module.parameters()) if parameters else [])
    saved = [(b, b.detach().clone()) for b in tensors]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, old in saved:
                b.copy_(old)


class BufferSnapshot:
    """The buffers of one checkpointed segment as they were when its forward ran.

    ``forward()`` is entered around the segment's forward and records the buffers' values on entry;
    ``recompute()`` is entered around each recomputation: it loads those values, so the rerun reads
    and writes the same step counters, EMAs and BatchNorm statistics as the forward did, and on exit
    puts back what the buffers hold now. Both contexts are re-entrant (``retain_graph``, double backward).
    """

    def __init__(self, buffers: list):
        self.buffers = buffers
        self.at_forward: list | None = None

    def _copy_in(self, values: list) -> None:
        import torch
        with torch.no_grad():
            for b, v in zip(self.buffers, values):
                b.copy_(v)

    def _values(self) -> list:
        return [b.detach().clone() for b in self.buffers]

    @contextlib.contextmanager
    def forward(self) -> Iterator[None]:
        self.at_forward = self._values()
        yield

    @contextlib.contextmanager
    def recompute(self) -> Iterator[None]:
        if not self.buffers or self.at_forward is None:
            yield
            return
        now = self._values()
        self._copy_in(self.at_forward)
        try:
            yield
        finally:
            self._copy_in(now)


class Reentrant:
    """A context manager that may be entered again and again (each time a fresh ``factory()``):
    checkpoint enters its recompute context once per recomputation, and the same object is reused."""

    def __init__(self, factory):
        self.factory = factory
        self.stack: list = []

    def __enter__(self):
        cm = self.factory()
        self.stack.append(cm)
        return cm.__enter__()

    def __exit__(self, *exc):
        return self.stack.pop().__exit__(*exc)
