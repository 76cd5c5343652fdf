"""REV: reversible blocks in place of Conv-BN-ReLU passes (FetusMapV2 §3.1), in three stages:

- :mod:`memplan.rev.block` — :class:`ReversibleBlock`, the additive coupling that rebuilds its input;
- :mod:`memplan.rev.substitution` — which passes are eligible (from analyze's MemGraph) and the fx
  substitution, recorded as :class:`~memplan.plan.RevReplacementRecord`;
- :mod:`memplan.rev.search` — the planners "rev" (GCP + REV) and "rev-only".
"""
from .block import ReversibleBlock, coupling_param_count, is_reversible_leaf, make_conv_bn_relu_coupling
from .search import (REV_MIN_GAIN, REV_SEED, RevComparison, RevOutcome, chain_violation, compare_rev,
                     convert_partition, free_input_flags, plan_rev, plan_rev_only, plan_with_rev, rebuild_rev_graph,
                     rev_only_plan)
from .substitution import (RevCandidate, RevEligibilityError, check_output_shapes, check_rev_candidate,
                           default_free_input, find_rev_candidates, rev_ineligible_reasons, substitute_rev)

__all__ = [
    "REV_MIN_GAIN", "REV_SEED", "RevCandidate", "RevComparison", "RevEligibilityError", "RevOutcome",
    "ReversibleBlock", "chain_violation", "check_output_shapes", "check_rev_candidate", "compare_rev",
    "convert_partition", "coupling_param_count", "default_free_input", "find_rev_candidates", "free_input_flags",
    "is_reversible_leaf", "make_conv_bn_relu_coupling", "plan_rev", "plan_rev_only", "plan_with_rev",
    "rebuild_rev_graph", "rev_ineligible_reasons", "rev_only_plan", "substitute_rev",
]
