"""The step a plan is made for: precision (amp), output lifetime and thread count travel from
memplan.plan/compile to every simulation, are recorded in the plan (JSON too), and a plan made for one
precision is refused for another."""
from __future__ import annotations

import copy
import json

import pytest
import torch

import memplan
from memplan import Plan, PlanOptions, simulate_step
from memplan.errors import MemplanError, PlanMismatchError
from memplan.plan import graph_part
from tests.nets import TinyUNet3D

META = torch.empty(1, 1, 16, 16, 16, device="meta")


@pytest.fixture(scope="module")
def net() -> TinyUNet3D:
    torch.manual_seed(0)
    return TinyUNet3D(width=4)


@pytest.fixture(scope="module")
def bf16_module(net):
    return memplan.compile(net, META, amp="bf16", threads=1)


def test_bf16_plan_is_rated_by_a_bf16_simulation(net, bf16_module):
    """The plan's simulated peaks are simulate_step's under bf16 autocast, computed here independently."""
    p = bf16_module.memplan_plan
    assert (p.amp, p.keep_output, p.threads) == ("bf16", True, 1)
    assert p.simulated_peak_bytes == simulate_step(bf16_module, META, amp="bf16", threads=1).peak_bytes
    assert p.simulated_vanilla_peak_bytes == simulate_step(net, META, amp="bf16", threads=1).peak_bytes
    assert p.fingerprint.endswith("+bf16") and graph_part(p.fingerprint) == memplan.trace(net, META).fingerprint()


def test_bf16_plan_is_below_the_fp32_plan(net, bf16_module):
    p32 = memplan.plan(net, META, threads=1)
    assert p32.amp is None and p32.fingerprint == graph_part(p32.fingerprint)
    assert p32.simulated_vanilla_peak_bytes == simulate_step(net, META, threads=1).peak_bytes
    assert bf16_module.memplan_plan.simulated_vanilla_peak_bytes < p32.simulated_vanilla_peak_bytes
    assert bf16_module.memplan_plan.simulated_peak_bytes < p32.simulated_peak_bytes


def test_a_budget_is_met_in_the_precision_planned_for(net, bf16_module):
    """A budget between the bf16 floor and bf16 vanilla: met by a bf16 plan (checked by a bf16
    simulation done here), refused for fp32 whose floor is above it."""
    p16 = bf16_module.memplan_plan
    budget = (p16.simulated_vanilla_peak_bytes + p16.simulated_peak_bytes) // 2
    compiled = memplan.compile(net, META, amp="bf16", threads=1, budget=budget)
    assert compiled.memplan_plan.simulated_peak_bytes <= budget
    assert simulate_step(compiled, META, amp="bf16", threads=1).peak_bytes == compiled.memplan_plan.simulated_peak_bytes
    with pytest.raises(memplan.BudgetError) as info:
        memplan.plan(net, META, threads=1, budget=budget)
    assert info.value.min_feasible_bytes > budget


def test_fp16_and_keep_output_reach_the_simulation(net):
    p = memplan.plan(net, META, amp="fp16", keep_output=False, threads=1, scratch="none")
    assert (p.amp, p.keep_output) == ("fp16", False)
    assert p.simulated_vanilla_peak_bytes == simulate_step(net, META, amp="fp16", keep_output=False,
                                                           threads=1, scratch="none").peak_bytes
    kept = simulate_step(net, META, amp="fp16", keep_output=True, threads=1, scratch="none").peak_bytes
    assert kept > p.simulated_vanilla_peak_bytes     # the output alive through backward costs its bytes


def test_threads_are_recorded_and_default_to_torch():
    assert PlanOptions().threads == torch.get_num_threads()
    assert PlanOptions(threads=3).threads == 3
    with pytest.raises(MemplanError, match="threads must be a positive int.*got 0"):
        PlanOptions(threads=0)


def test_plan_with_amp_round_trips_and_is_refused_for_another_precision(net, bf16_module, tmp_path):
    p = bf16_module.memplan_plan
    path = tmp_path / "bf16.json"
    p.to_json(path)
    back = Plan.from_json(path)
    assert back == p and (back.amp, back.threads) == ("bf16", 1)
    assert json.loads(p.to_json())["amp"] == "bf16"
    again = memplan.compile(net, META, plan=path, amp="bf16")
    assert again.memplan_plan == p
    with pytest.raises(PlanMismatchError, match=r"made for a bf16 step but this step runs fp32.*amp='bf16'"):
        memplan.compile(net, META, plan=path)
    p32 = memplan.plan(net, META, simulate=False)
    with pytest.raises(PlanMismatchError, match=r"made for a fp32 step but this step runs bf16.*amp=None"):
        memplan.compile(net, META, plan=p32, amp="bf16")
    with pytest.raises(PlanMismatchError, match=r"made for a bf16 step but this step runs fp16"):
        memplan.compile(net, META, plan=p, amp="fp16")


def test_old_plan_files_without_step_fields_load(net):
    d = json.loads(memplan.plan(net, META, simulate=False).to_json())
    for key in ("amp", "keep_output", "threads"):
        del d[key]
    old = Plan.from_json(json.dumps(d))
    assert (old.amp, old.keep_output, old.threads) == (None, True, None)
    assert memplan.compile(net, META, plan=old).memplan_plan == old


def test_compiled_bf16_module_trains_under_autocast_like_the_original():
    """GCP under bf16 autocast computes what the original computes under it, bitwise."""
    torch.manual_seed(0)
    net = TinyUNet3D(width=4)
    twin = copy.deepcopy(net)
    x = torch.randn(1, 1, 16, 16, 16)
    compiled = memplan.compile(net, x, amp="bf16", scratch="none")
    assert compiled.memplan_plan.recomputed_segments, compiled.memplan_plan.summary()
    grads = []
    for m in (compiled, twin):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = m(x)
            loss = (out.float() * torch.linspace(-1, 1, out.numel()).view_as(out)).sum()
        loss.backward()                              # outside autocast, as AMP training does
        grads.append((out.detach(), [p.grad.clone() for p in m.parameters()]))
    (out_a, g_a), (out_b, g_b) = grads
    assert out_a.dtype == torch.bfloat16 and torch.equal(out_a, out_b)
    assert all(torch.equal(a, b) for a, b in zip(g_a, g_b, strict=True))


# -- graph facts at the step's precision (memplan.analyze.at_precision) ------------------------------
X8 = torch.empty(1, 2, 8, 8, 8, device="meta")


def test_bf16_facts_of_conv_pool_conv_by_hand():
    """Under bf16 autocast a conv writes bf16 (numel*2) and saves bf16 copies of its input and weight;
    CPU autocast runs max-pool in fp32, so it saves an fp32 copy of its bf16 input (plus int64 indices)
    and its backward makes that copy's fp32 gradient first. Hand-computed bytes, fp32 facts unchanged."""
    from memplan.analyze import at_precision
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv3d(2, 4, 3, padding=1), torch.nn.MaxPool3d(2),
                              torch.nn.Conv3d(4, 4, 3, padding=1))
    g32 = memplan.trace(net, X8)
    g16 = at_precision(g32, "bf16")
    assert (g32.amp, g16.amp) == (None, "bf16") and g16.gm is g32.gm
    assert g16.fingerprint() == g32.fingerprint()               # the plan still names the traced network
    conv1, pool, conv2 = (g16.info(n) for n in g16.order)
    assert conv1.out_dtypes == ("torch.bfloat16",) and conv1.out_bytes == 4 * 8**3 * 2
    assert conv1.saved_extra_bytes == 2 * 8**3 * 2 + 4 * 2 * 27 * 2    # bf16 input copy + bf16 weight copy
    assert conv1.cast_grad_bytes == 4 * 2 * 27 * 2 + 4 * 2             # weight and bias copies' bf16 gradients
    assert pool.out_dtypes == ("torch.float32",) and pool.out_bytes == 4 * 4**3 * 4
    assert pool.saved_extra_bytes == 4 * 8**3 * 4 + 4 * 4**3 * 8       # fp32 copy of its input + indices
    assert pool.cast_grad_bytes == 4 * 8**3 * (4 - 2)                  # fp32 gradient beyond the bf16 one
    assert conv2.out_bytes == 4 * 4**3 * 2
    assert conv2.saved_extra_bytes == 4 * 4**3 * 2 + 4 * 4 * 27 * 2
    assert conv2.cast_grad_bytes == 4 * 4 * 27 * 2 + 4 * 2             # an fp32 -> bf16 input cast adds none
    c32 = g32.info(g32.order[0])
    assert c32.out_bytes == 4 * 8**3 * 4 and c32.saved_extra_bytes == 0 and c32.cast_grad_bytes == 0
    assert at_precision(g16, None) is g32 and at_precision(g32, None) is g32
    assert at_precision(g32, "fp16").info(g32.order[0]).out_dtypes == ("torch.float16",)


class _SharedConv(torch.nn.Module):
    """One convolution applied twice: autocast casts its weight once per forward (the cast is cached)."""

    def __init__(self):
        super().__init__()
        self.c = torch.nn.Conv3d(2, 2, 3, padding=1)

    def forward(self, x):
        return self.c(torch.relu(self.c(x)))


def test_a_shared_weights_bf16_copy_counts_once():
    from memplan.analyze import at_precision
    g = at_precision(memplan.trace(_SharedConv(), X8), "bf16")
    first, second = g.info("c"), g.info("c_1")
    assert first.saved_extra_bytes == 2 * 8**3 * 2 + 2 * 2 * 27 * 2   # input copy + the one weight copy
    assert second.saved_extra_bytes == 0                              # reuses the cached copy
    assert second.saved_from == ("relu",)


def test_bf16_cost_model_matches_the_bf16_simulation():
    """The cost model's unplanned bf16 peak within the fp32 tolerance of simulate_step(amp="bf16")
    (tests/test_costmodel_accuracy.py); fp32 facts would over-state it by about 1.6x."""
    from memplan.analyze import at_precision
    from memplan.costmodel import build_costs, chain_cost
    net = torch.nn.Sequential(torch.nn.Conv3d(1, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv3d(8, 8, 3, padding=1))
    x = torch.empty(1, 1, 16, 16, 16, device="meta")
    g32 = memplan.trace(net, x)
    sim = simulate_step(net, x, amp="bf16", scratch="none", optimizer="adam").peak_bytes
    errors = {}
    for name, g in (("bf16", at_precision(g32, "bf16")), ("fp32", g32)):
        peak, _ = chain_cost(build_costs(g, optimizer="adam"), [(1 << len(g)) - 1])
        errors[name] = peak / sim - 1
    assert -0.15 <= errors["bf16"] <= 0.10, errors
    assert errors["fp32"] > 0.3, errors                                # what the fp32 facts got wrong


def test_bf16_unet_plan_predicts_its_simulated_peak():
    """A bf16 least-memory plan of the U-Net: its cost-model peak within 15% of its bf16 simulation
    (with fp32 facts it was +47%), and it simulates no higher than a plan made on fp32 facts."""
    net = TinyUNet3D(width=4)
    x = torch.empty(1, 1, 32, 32, 32, device="meta")
    p = memplan.plan(net, x, amp="bf16", scratch="none", threads=1)
    sim = simulate_step(memplan.compile(net, x, plan=p, amp="bf16"), x, amp="bf16", scratch="none",
                        threads=1).peak_bytes
    assert sim == p.simulated_peak_bytes
    assert abs(p.predicted_peak_bytes / sim - 1) <= 0.15, (p.predicted_peak_bytes, sim)
    assert abs(p.vanilla_peak_bytes / p.simulated_vanilla_peak_bytes - 1) <= 0.10
