"""Moved to :mod:`memplan.rev.search`; this name stays for existing imports (the CLI, fit, benchmarks)."""
from .rev.search import (RevComparison, RevOutcome, chain_violation, compare_rev, convert_partition,
                         free_input_flags, plan_with_rev, rebuild_rev_graph, rev_only_plan)

__all__ = ["RevComparison", "RevOutcome", "chain_violation", "compare_rev", "convert_partition", "free_input_flags",
           "plan_with_rev", "rebuild_rev_graph", "rev_only_plan"]
