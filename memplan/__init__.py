"""memplan: a graph-level memory planner for training PyTorch networks on large 3D volumes."""
from .errors import BudgetError, MemplanError, PlanMismatchError, TraceError
from .units import format_bytes, parse_bytes

__version__ = "0.1.0"

__all__ = [
    "BudgetError", "MemplanError", "PlanMismatchError", "TraceError",
    "format_bytes", "parse_bytes",
]
