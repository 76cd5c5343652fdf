"""The floor of a training step, so peak / floor says how much room a method leaves.

Floor = parameters + gradients + optimizer state (+ buffers and the input) + the largest single-op
working set: one op's input and output tensors (plus its kernel scratch under the CPU scratch model),
the least any schedule holds while it runs that op forward, or its backward (where the output's
gradient stands in for the output). Graph inputs count once, in the static part; an op that returns
a view or writes in place allocates no output. A reference, not a proven bound: with
zero_grad(set_to_none) not every gradient exists while the largest op runs. Unplanned network.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from memplan.costmodel import OPTIMIZER_STATE_FACTOR
from memplan.graph import MemGraph

__all__ = ["Floor", "floor_of"]


@dataclass(frozen=True)
class Floor:
    """The floor's parts in bytes and the op whose working set is the largest."""
    parameter_bytes: int
    gradient_bytes: int
    optimizer_state_bytes: int
    other_static_bytes: int          # buffers and the input
    working_set_bytes: int
    working_set_op: str

    @property
    def total_bytes(self) -> int:
        return (self.parameter_bytes + self.gradient_bytes + self.optimizer_state_bytes + self.other_static_bytes
                + self.working_set_bytes)

    def as_dict(self) -> dict:
        return {**asdict(self), "total_bytes": self.total_bytes}


def _nominal_bytes(shapes, dtypes) -> int:
    """Bytes of a node's outputs as tensors (views counted at their own size)."""
    total = 0
    for shape, dtype in zip(shapes, dtypes):
        dt = getattr(torch, str(dtype).rsplit(".", 1)[-1], torch.float32)
        numel = 1
        for s in shape:
            numel *= int(s)
        total += numel * (dt.itemsize if isinstance(dt, torch.dtype) else 4)
    return total


def floor_of(graph: MemGraph, *, optimizer: str = "adam", scratch: str = "none") -> Floor:
    """The floor of one training step of ``graph`` with ``optimizer`` under a scratch model.

    >>> import memplan
    >>> g = memplan.trace(torch.nn.Linear(10, 10, bias=False), torch.empty(4, 10, device="meta"))
    >>> f = floor_of(g, optimizer="sgd")      # 400 B weight + 400 B grad + 160 B input + 160 B output
    >>> f.parameter_bytes, f.gradient_bytes, f.working_set_bytes, f.total_bytes
    (400, 400, 160, 1120)
    """
    size = {info.name: _nominal_bytes(info.out_shapes, info.out_dtypes) for info in graph}
    best, best_op = 0, ""
    for info in graph:
        inputs = sum(size[p] for p in graph.dag.predecessors(info.name))
        ws = inputs + (0 if info.alias_of is not None else size[info.name])
        if scratch == "cpu":
            ws += info.scratch_cpu_bytes
        if ws > best:
            best, best_op = ws, info.name
    trainable = graph.trainable_param_bytes
    return Floor(parameter_bytes=graph.param_bytes, gradient_bytes=trainable,
                 optimizer_state_bytes=trainable * OPTIMIZER_STATE_FACTOR[optimizer],
                 other_static_bytes=graph.buffer_bytes + graph.input_bytes, working_set_bytes=best,
                 working_set_op=best_op)
