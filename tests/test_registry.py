"""The planner registry and PlanOptions: every planner has one signature and is rated by one ruler;
options are one frozen, validated record; memplan's modules import each other without a cycle."""
import ast
import copy
import dataclasses
import inspect
import pathlib
import warnings

import networkx as nx
import pytest
import torch

import memplan
from memplan import MemplanError, Plan, PlanOptions
from memplan.options import DP, Objective, Optimizer, ScratchModel, plan_options
from memplan.plan import check_plan
from memplan.registry import PLANNERS
from memplan.rev.search import rebuild_rev_graph
from memplan.rewrite import rewrite
from tests.nets import TinyUNet3D

ROOT = pathlib.Path(memplan.__file__).parent


def test_the_registry_lists_every_planner_with_one_signature():
    assert {"auto", "exact", "approx", "chen", "hand", "rev", "rev-only"} <= set(PLANNERS)
    for name, planner in PLANNERS.items():
        params = list(inspect.signature(planner).parameters)
        assert params == ["graph", "options"], name


def test_an_unknown_method_is_refused_when_options_are_built_naming_the_planners():
    with pytest.raises(MemplanError, match=r"unknown method 'fast'; choose one of approx, auto, chen, exact, hand"):
        PlanOptions(method="fast")
    net, x = TinyUNet3D(width=2), torch.empty(1, 1, 8, 8, 8, device="meta")
    with pytest.raises(MemplanError, match="unknown method 'fast'"):
        memplan.plan(net, x, method="fast")
    with pytest.raises(MemplanError, match="rev=True plans GCP with the DP; method must be auto, exact or approx"):
        memplan.plan(net, x, method="chen", rev=True)


@pytest.mark.parametrize("field, value, message", [
    ("optimizer", "adamw", "unknown optimizer 'adamw'"),
    ("scratch", "gpu", "unknown scratch model 'gpu'"),
    ("dp", "greedy", "unknown DP family 'greedy'"),
    ("budget_bytes", -5, "budget must be positive, got -5 B"),
    ("budget_bytes", "12GB", "budget_bytes must be an int number of bytes"),
    ("lower_set_bound", 0, "lower_set_bound must be a positive int, got 0"),
    ("simulate", "yes", "simulate must be True or False"),
    ("rev_min_gain", 1.5, "rev_min_gain must be a fraction in"),
    ("times", [1.0], "times must map node names to seconds"),
])
def test_bad_options_name_the_field_and_value(field, value, message):
    with pytest.raises(MemplanError, match=message):
        PlanOptions(**{field: value})


def test_options_are_frozen_enums_and_the_method_sets_the_dp_family():
    o = PlanOptions(method="approx", optimizer="sgd-momentum", scratch="none", budget_bytes=1000)
    assert (o.dp, o.optimizer, o.scratch, o.objective) == (DP.APPROX, Optimizer.SGD_MOMENTUM, ScratchModel.NONE,
                                                          Objective.TIME)
    assert PlanOptions().objective is Objective.MEMORY
    with pytest.raises(dataclasses.FrozenInstanceError):
        o.method = "exact"
    with pytest.raises(MemplanError, match="method 'exact' and dp 'approx' disagree"):
        PlanOptions(method="exact", dp="approx")
    assert hash(o) == hash(dataclasses.replace(o))               # usable as a cache key; times are not hashed


def _planned(name):
    torch.manual_seed(0)
    net = TinyUNet3D(width=4).double()
    x = torch.randn(1, 1, 16, 16, 16, dtype=torch.float64)
    extra = {"checkpoint_modules": ("enc1", "dec1")} if name == "hand" else {}
    options = plan_options(net, (x,), method=name, **extra)
    graph = memplan.trace(net, x)
    return net, x, graph, memplan.plan_graph(graph, options)


@pytest.mark.parametrize("name", ["auto", "exact", "approx", "chen", "hand", "rev-only"])
def test_every_planner_returns_a_plan_the_one_ruler_confirms(name):
    net, x, graph, plan = _planned(name)
    assert isinstance(plan, Plan)
    if plan.rev:
        graph = rebuild_rev_graph(graph, x, plan)
    check_plan(plan, graph)
    module = rewrite(graph, plan)
    assert plan.simulated_peak_bytes == memplan.simulate_step(module, x).peak_bytes
    assert plan.simulated_vanilla_peak_bytes == memplan.simulate_step(net, x).peak_bytes
    assert Plan.from_json(plan.to_json()) == plan


@pytest.mark.parametrize("name", ["chen", "hand"])
def test_baseline_plans_train_exactly_like_the_network(name):
    net, x, _, plan = _planned(name)
    assert plan.recomputed_segments, "the baseline should checkpoint something"
    ref = copy.deepcopy(net)
    compiled = memplan.compile(net, x, plan=plan)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    compiled(xa).pow(2).sum().backward()
    ref(xb).pow(2).sum().backward()
    assert torch.equal(xa.grad, xb.grad)
    for (n, p), q in zip(net.named_parameters(), ref.parameters()):
        assert torch.equal(p.grad, q.grad), n


def test_hand_plan_matches_checkpointing_the_modules_with_torch_utils_checkpoint():
    from torch.utils.checkpoint import checkpoint

    class Wrapped(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return checkpoint(self.inner, x, use_reentrant=False)

    net, x, graph, plan = _planned("hand")
    by_hand = copy.deepcopy(net)
    by_hand.enc1, by_hand.dec1 = Wrapped(by_hand.enc1), Wrapped(by_hand.dec1)
    truth = memplan.simulate_step(by_hand, x).peak_bytes
    assert abs(plan.simulated_peak_bytes - truth) <= 0.01 * truth     # same segments, memplan's own rewrite
    assert [s.recompute for s in plan.segments].count(True) == 2


def test_hand_planner_names_a_module_the_graph_does_not_run():
    net, x = TinyUNet3D(width=2), torch.empty(1, 1, 8, 8, 8, device="meta")
    graph = memplan.trace(net, x)
    with pytest.raises(MemplanError, match=r"checkpoint_modules names \['encoder9'\]"):
        memplan.plan_graph(graph, PlanOptions(method="hand", checkpoint_modules=("encoder9",), simulate=False))
    with pytest.raises(MemplanError, match="checkpoint_modules, which is empty"):
        memplan.plan_graph(graph, PlanOptions(method="hand", simulate=False))


def test_rev_planner_leaves_the_network_unchanged_without_a_real_gain():
    torch.manual_seed(0)
    net, x = TinyUNet3D(width=4).double(), torch.empty(1, 1, 16, 16, 16, dtype=torch.float64, device="meta")
    with warnings.catch_warnings():
        warnings.simplefilter("error")                          # no "network changed" warning may be raised
        module = memplan.compile(net, x, rev=True, scratch="cpu")
    plan = module.memplan_plan
    gcp = memplan.plan(net, x, scratch="cpu")
    assert plan.rev == () and plan.simulated_peak_bytes == gcp.simulated_peak_bytes
    assert any(n.startswith("chose: GCP only") for n in plan.notes)


def _imports(path: pathlib.Path, module: str) -> set[str]:
    """memplan modules ``module`` imports, type-checking-only imports left out."""
    tree = ast.parse(path.read_text())
    skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            for n in ast.walk(node)}
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if id(node) in skip or not isinstance(node, ast.ImportFrom):
            continue
        base = package.split(".")[:len(package.split(".")) - node.level + 1] if node.level else []
        target = ".".join(base + [node.module] if node.module else base)
        for alias in node.names:
            sub = f"{target}.{alias.name}"
            out.add(sub if (ROOT.parent / (sub.replace(".", "/") + ".py")).exists() else target)
    return {m for m in out if m.startswith("memplan.") and m != module}


def test_memplan_modules_import_each_other_without_a_cycle():
    graph = nx.DiGraph()
    for path in ROOT.rglob("*.py"):
        module = ".".join(path.relative_to(ROOT.parent).with_suffix("").parts).removesuffix(".__init__")
        graph.add_edges_from((module, m) for m in _imports(path, module))
    assert ("memplan.rev.search", "memplan.api") not in graph.edges
    assert list(nx.simple_cycles(graph)) == []
