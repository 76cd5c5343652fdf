"""memplan: a graph-level memory planner for training PyTorch networks on large 3D volumes.

trace -> plan -> rewrite -> measure:

>>> import torch, memplan
>>> net = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.ReLU())
>>> g = memplan.trace(net, torch.empty(1, 1, 32, 32, 32, device="meta"))
>>> len(g), memplan.format_bytes(g.activation_bytes)
(2, '1.00 MiB')
"""
from . import planners  # noqa: F401 - fills the planner registry (memplan.registry.PLANNERS)
from .api import compile, plan
from .errors import BudgetError, MemplanError, PlanFileError, PlanMismatchError, TraceError
from .graph import MemGraph, NodeInfo
from .measure import MemoryReport, measure_step, simulate_step
from .options import PlanOptions
from .plan import Plan, RevReplacementRecord, Segment
from .planners import plan_graph
from .rev.block import ReversibleBlock, is_reversible_leaf
from .trace import register_leaf, trace
from .units import format_bytes, parse_bytes

register_leaf(is_reversible_leaf)   # a reversible block is one node of the graph, never inlined

__version__ = "0.1.0"

__all__ = [
    "BudgetError", "MemplanError", "PlanFileError", "PlanMismatchError", "TraceError",
    "MemGraph", "NodeInfo", "MemoryReport",
    "Plan", "PlanOptions", "Segment", "RevReplacementRecord", "ReversibleBlock", "plan", "compile", "plan_graph",
    "trace", "register_leaf", "simulate_step", "measure_step",
    "format_bytes", "parse_bytes",
]
