"""The registered planners, one line each: ``name -> plan_x(graph: MemGraph, options: PlanOptions) -> Plan``.

``PlanOptions(method=name)`` is checked against this table when it is built; :func:`plan_graph`
runs the chosen one. Each planner simulates (and calibrates) its own plan when ``options.simulate``.
"""
from __future__ import annotations

import dataclasses

from .analyze import at_precision
from .baselines import plan_chen, plan_hand
from .graph import MemGraph
from .kusumoto import plan_kusumoto
from .options import PlanOptions
from .plan import Plan, stamped
from .registry import PLANNERS, lookup
from .rev.search import plan_rev, plan_rev_only
from .splitcat import split_concat

def plan_remat_registered(graph: MemGraph, options: PlanOptions) -> Plan:
    """The remat planner (memplan.remat) with its options taken from ``options``; it calibrates itself."""
    from .remat import RematOptions, plan_remat
    return plan_remat(graph, RematOptions(
        budget_bytes=options.budget_bytes, optimizer=options.optimizer.value, scratch=options.scratch.value,
        lower_set_bound=options.lower_set_bound, loss_fn=options.loss_fn,
        amp=None if options.amp is None else options.amp.value, keep_output=options.keep_output,
        threads=options.threads,
        example_inputs=tuple(options.example_inputs) if options.simulate else ()))


PLANNERS.update({
    "auto": plan_kusumoto,        # Kusumoto DP: exact below the lower-set bound, else approximate
    "exact": plan_kusumoto,       # Kusumoto DP over every lower set
    "approx": plan_kusumoto,      # Kusumoto DP over "node plus its ancestors" sets and fx-order prefixes
    "chen": plan_chen,            # Chen et al. 2016, sqrt(n) segments over articulation points
    "hand": plan_hand,            # checkpointing options.checkpoint_modules by hand
    "rev": plan_rev,              # GCP + REV (FetusMapV2 §3.1 and joint re-plans); changes the network
    "rev-only": plan_rev_only,    # REV without GCP (FetusMapV2's UREV); changes the network
    "remat": plan_remat_registered,  # memplan/remat.py: rematerialization below the chain floor
})


def plan_graph(graph: MemGraph, options: PlanOptions) -> Plan:
    """Plan a traced graph with the planner ``options.method`` names, on byte facts analysed for the
    step's precision (:func:`memplan.analyze.at_precision`: bf16 activations are half the bytes); the plan
    records the step's precision, output lifetime and thread count (:func:`memplan.plan.stamped`). The REV
    planners re-analyse each substituted network at the same precision. ``options.split_concat`` plans the
    graph with its convolutions over concatenations split (memplan.splitcat); the plan lists them."""
    split: tuple = ()
    if options.split_concat:                    # on full-precision facts first: they name the plan
        graph, split = split_concat(graph if graph.full_precision is None else graph.full_precision)
    graph = at_precision(graph, options.amp)
    plan = stamped(lookup(options.method)(graph, options), options)
    if not split:
        return plan
    note = (f"split {len(split)} convolution(s) over concatenations into per-part convolutions (split_concat=True): "
            "values and gradients round differently from the original")
    return dataclasses.replace(plan, split_concat=split, notes=plan.notes + (note,))
