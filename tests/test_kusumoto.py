"""The DP against brute force over every chain of lower sets, on random small DAGs."""
import math

import networkx as nx
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from memplan.costmodel import build_costs, chain_cost
from memplan.graph import MemGraph, NodeInfo
from memplan.kusumoto import Family, least_time, min_budget
from memplan.kusumoto import choose_family
from memplan.plan import PlanOptions, chain_to_segments


@st.composite
def random_graphs(draw, max_nodes=7):
    n = draw(st.integers(2, max_nodes))
    dag = nx.DiGraph()
    names = [f"v{i}" for i in range(n)]
    preds = {}
    for i, name in enumerate(names):
        ps = sorted(set(draw(st.lists(st.integers(0, i - 1), max_size=2)))) if i else []
        preds[name] = [names[p] for p in ps]
    for i, name in enumerate(names):
        saved = tuple(draw(st.sets(st.sampled_from(preds[name] + [name]), max_size=2)))
        info = NodeInfo(name=name, op="call_function", target="op", out_shapes=((1,),), out_dtypes=("f32",),
                        out_bytes=draw(st.integers(1, 9)) * 100, alias_of=None, saved_from=saved,
                        saved_extra_bytes=draw(st.sampled_from([0, 0, 30])), saved_input_bytes=0,
                        saved_param_bytes=0, flops=draw(st.integers(1, 5)), has_params=False)
        dag.add_node(name, info=info)
        for p in preds[name]:
            dag.add_edge(p, name)
    sinks = tuple(nm for nm in names if dag.out_degree(nm) == 0)
    return MemGraph(gm=None, dag=dag, order=names, outputs=sinks, input_bytes=10, param_bytes=50,
                    trainable_param_bytes=50, buffer_bytes=0, tracer="synthetic")


def all_chains(sets: list[int], full: int):
    """Every strictly increasing chain of lower sets from the empty set to ``full``."""
    by_size = sorted(sets, key=lambda m: m.bit_count())

    def extend(cur):
        if cur == full:
            yield []
            return
        for nxt in by_size:
            if nxt != cur and nxt & cur == cur:
                for rest in extend(nxt):
                    yield [nxt] + rest

    yield from extend(0)


def brute_force(costs, sets, full, budget):
    best_t, best_peak = math.inf, math.inf
    for chain in all_chains(sets, full):
        peak, t = chain_cost(costs, chain)
        best_peak = min(best_peak, peak)
        if peak <= budget:
            best_t = min(best_t, t)
    return best_t, best_peak


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(g=random_graphs(), frac=st.floats(0.0, 1.0))
def test_exact_dp_equals_brute_force(g, frac):
    costs = build_costs(g, optimizer="sgd")
    sets = g.lower_sets()
    full = (1 << len(g)) - 1
    fam = Family(costs, sets)
    _, brute_min_peak = brute_force(costs, sets, full, math.inf)
    assert min_budget(fam) == math.ceil(brute_min_peak)
    vanilla_peak = chain_cost(costs, [(1 << (i + 1)) - 1 for i in range(len(g))])[0]
    budget = brute_min_peak + frac * max(0.0, vanilla_peak - brute_min_peak)
    brute_t, _ = brute_force(costs, sets, full, budget)
    result = least_time(fam, budget)
    assert result is not None
    assert result.time == brute_t
    assert result.peak_bytes <= budget
    # the emitted segments partition the graph and each prefix union is a lower set
    segs = chain_to_segments(g, costs, result.chain)
    names = [n for s in segs for n in s.nodes]
    assert sorted(names) == sorted(g.order) and len(names) == len(set(names))
    seen = set()
    for s in segs:
        seen |= set(s.nodes)
        assert all(set(g.dag.predecessors(n)) <= seen for n in seen)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(g=random_graphs(max_nodes=9), frac=st.floats(0.0, 1.0))
def test_approximate_dp_never_beats_exact(g, frac):
    costs = build_costs(g, optimizer="adam")
    exact = Family(costs, g.lower_sets())
    approx = Family(costs, [0, (1 << len(g)) - 1] + g.ancestor_masks())
    assert min_budget(approx) >= min_budget(exact)
    budget = min_budget(approx) * (1 + frac)
    a, e = least_time(approx, budget), least_time(exact, budget)
    assert a is not None and e is not None
    assert a.time >= e.time


def test_auto_method_falls_back_to_approx_past_the_bound():
    dag = nx.DiGraph()
    names = [f"v{i}" for i in range(12)]
    for name in names:   # 12 independent nodes: 4096 lower sets
        dag.add_node(name, info=NodeInfo(name, "call_function", "op", ((1,),), ("f32",), 100, None, (name,), 0, 0, 0,
                                         1, False))
    g = MemGraph(gm=None, dag=dag, order=names, outputs=tuple(names), input_bytes=0, param_bytes=0,
                 trainable_param_bytes=0, buffer_bytes=0, tracer="synthetic")
    costs = build_costs(g)
    fam, method, why, count = choose_family(g, costs, PlanOptions(lower_set_bound=1000))
    assert (method, count) == ("approx", None) and "more than 1000" in why
    fam, method, why, count = choose_family(g, costs, PlanOptions(lower_set_bound=5000))
    assert (method, count) == ("exact", 4096)


def test_pinned_nodes_are_never_recomputed():
    dag = nx.DiGraph()
    names = [f"v{i}" for i in range(6)]
    for i, name in enumerate(names):
        dag.add_node(name, info=NodeInfo(name, "call_function", "op", ((1,),), ("f32",), 1000, None, (name,), 0, 0, 0,
                                         1, False))
        if i:
            dag.add_edge(names[i - 1], name)
    g = MemGraph(gm=None, dag=dag, order=names, outputs=(names[-1],), input_bytes=0, param_bytes=0,
                 trainable_param_bytes=0, buffer_bytes=0, tracer="synthetic")
    free = least_time(Family(build_costs(g), g.lower_sets()), min_budget(Family(build_costs(g), g.lower_sets())))
    pinned_costs = build_costs(g, pinned=frozenset({"v2"}))
    fam = Family(pinned_costs, g.lower_sets())
    result = least_time(fam, min_budget(fam))
    segs = chain_to_segments(g, pinned_costs, result.chain)
    assert all(not s.recompute for s in segs if "v2" in s.nodes)
    assert any(s.recompute for s in chain_to_segments(g, build_costs(g), free.chain))
    assert np.isfinite(result.peak_bytes)


def test_unet_plan_on_meta_meets_its_own_floor():
    import torch

    import memplan
    from tests.nets import TinyUNet3D
    g = memplan.trace(TinyUNet3D(width=8), torch.empty(1, 1, 64, 64, 64, device="meta"))
    fam = Family(build_costs(g), g.lower_sets())
    b = min_budget(fam)
    r = least_time(fam, b)
    assert r is not None and r.peak_bytes <= b
    assert least_time(fam, b - 1) is None          # the floor is tight

