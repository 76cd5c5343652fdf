"""Feasibility is monotone in the budget: every budget at or above the least-memory plan's simulated
peak is accepted with a plan whose simulated step fits it; a refused budget lies below that peak, and
the smallest feasible peak the error names is itself accepted (issue 15)."""
import functools

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import memplan
from memplan import BudgetError
from memplan.calibrate import bytes_pair
from tests.nets import RandomDAGNet, TinyUNet3D, random_spec


class SharedConv(nn.Module):
    """One 4 -> 4 convolution applied three times (its weight has three readers), between a stem and a head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv3d(1, 4, 3, padding=1)
        self.shared = nn.Conv3d(4, 4, 3, padding=1)
        self.head = nn.Conv3d(4, 1, 1)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        for _ in range(3):
            h = torch.relu(self.shared(h))
        return self.head(h)


def _net(key):
    torch.manual_seed(0)
    if key == "unet":
        return TinyUNet3D(width=4), (1, 1, 16, 16, 16)
    if key == "shared":
        return SharedConv(), (1, 1, 16, 16, 16)
    spec = list(key)
    return RandomDAGNet(spec, channels=2), (1, 1, 8, 8, 8)


@functools.lru_cache(maxsize=None)
def _least_and_vanilla(key, scratch):
    net, shape = _net(key)
    least = memplan.plan(net, torch.empty(shape, device="meta"), scratch=scratch)
    return least.simulated_peak_bytes, least.simulated_vanilla_peak_bytes


def _spec_key(data, n):
    return tuple(random_spec(lambda lo, hi: data.draw(st.integers(lo, hi)), n))


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), which=st.sampled_from(["unet", "shared", "random"]), scratch=st.sampled_from(["cpu", "none"]),
       frac=st.floats(-0.2, 1.1))
def test_every_budget_from_the_least_peak_up_is_accepted(data, which, scratch, frac):
    key = _spec_key(data, data.draw(st.integers(3, 8))) if which == "random" else which
    least, vanilla = _least_and_vanilla(key, scratch)
    budget = max(1, int(least + frac * (vanilla - least)))
    net, shape = _net(key)
    x = torch.empty(shape, device="meta")
    if budget >= least:
        plan = memplan.plan(net, x, budget=budget, scratch=scratch)
        assert plan.simulated_peak_bytes <= budget and plan.budget_bytes == budget
        assert memplan.simulate_step(memplan.compile(net, x, plan=plan), x, scratch=scratch).peak_bytes <= budget
    else:
        try:
            plan = memplan.plan(net, x, budget=budget, scratch=scratch)
        except BudgetError as err:
            assert budget < err.min_feasible_bytes <= least and err.budget_bytes == budget
            advised = memplan.plan(net, x, budget=err.min_feasible_bytes, scratch=scratch)   # the advice works
            assert advised.simulated_peak_bytes <= err.min_feasible_bytes
        else:                                       # a plan below the least-memory one's peak may exist; it must fit
            assert plan.simulated_peak_bytes <= budget


@pytest.mark.parametrize("key", ["unet", "shared"])
def test_the_least_plans_own_peak_is_accepted_as_a_budget(key):
    net, shape = _net(key)
    x = torch.empty(shape, device="meta")
    least = memplan.plan(net, x)
    plan = memplan.plan(net, x, budget=least.simulated_peak_bytes)
    assert plan.simulated_peak_bytes <= least.simulated_peak_bytes


def test_budget_error_prints_exact_bytes_when_the_rounded_figures_agree():
    net, shape = _net("unet")
    x = torch.empty(shape, device="meta")
    least = memplan.plan(net, x).simulated_peak_bytes
    with pytest.raises(BudgetError) as info:
        memplan.plan(net, x, budget=least - 1)
    text = str(info.value)
    assert f"budget {memplan.format_bytes(least - 1)} ({least - 1:,} B) is below the smallest feasible peak " \
           f"{memplan.format_bytes(least)} ({least:,} B)" in text
    assert bytes_pair(1, 2**30) == ("1 B", "1.00 GiB")            # distinct texts stay short


def test_an_optimistic_cost_model_cannot_refuse_a_budget_the_least_plan_meets():
    """A cost model that believes 40% more memory is available than the budget (so calibration tightens
    into the DP's floor) still gets every budget from the least plan's simulated peak up."""
    import dataclasses

    from memplan.calibrate import fit_to_budget
    from memplan.kusumoto import dp_plan
    from memplan.options import plan_options

    def optimistic(graph, options):
        if options.budget_bytes is None:
            return dp_plan(graph, options)
        return dp_plan(graph, dataclasses.replace(options, budget_bytes=int(options.budget_bytes * 1.4)))

    net, shape = _net("unet")
    x = torch.empty(shape, device="meta")
    graph = memplan.trace(net, x)
    least, vanilla = _least_and_vanilla("unet", "cpu")
    for budget in (least, least + (vanilla - least) // 4):
        plan = fit_to_budget(optimistic, graph, plan_options(net, (x,), budget=budget))
        assert plan.simulated_peak_bytes <= budget
    with pytest.raises(BudgetError) as info:
        fit_to_budget(optimistic, graph, plan_options(net, (x,), budget=least - 1))
    assert info.value.min_feasible_bytes == least
