"""The planner registry: every planner is ``plan_x(graph: MemGraph, options: PlanOptions) -> Plan``,
chosen by name (``PlanOptions.method``). This module only holds the table; memplan.planners fills it
(one line per planner), and PlanOptions checks its method against it when it is built.

>>> import memplan
>>> sorted(PLANNERS)[:3]
['approx', 'auto', 'chen']
>>> lookup("fast")
Traceback (most recent call last):
...
memplan.errors.MemplanError: unknown method 'fast'; choose one of approx, auto, chen, exact, hand, remat, rev, rev-only
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from .errors import MemplanError

if TYPE_CHECKING:
    from .graph import MemGraph
    from .options import PlanOptions
    from .plan import Plan

Planner = Callable[["MemGraph", "PlanOptions"], "Plan"]

#: name -> planner; filled by memplan.planners (imported by memplan/__init__).
PLANNERS: dict[str, Planner] = {}


def lookup(name: str) -> Planner:
    """The planner registered as ``name``; MemplanError listing the registered names if none is."""
    if name not in PLANNERS:
        raise MemplanError(f"unknown method {name!r}; choose one of {', '.join(sorted(PLANNERS))}")
    return PLANNERS[name]
