"""compile(): gradient checkpointing must not change what the network computes."""
import copy
import json

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import memplan
from memplan import BudgetError, MemplanError, Plan, PlanMismatchError
from tests.nets import RandomDAGNet, TinyUNet3D, TwoBranch, random_spec


def _loss(out):
    outs = out if isinstance(out, tuple) else (out,)
    return sum((o * torch.linspace(0.5, 1.5, o.numel(), dtype=o.dtype).view_as(o)).pow(2).sum() for o in outs)


def _step_pair(model, compiled_of, x, steps=1):
    """Train ``model`` (planned) and an untouched copy on the same data; return both and their input grads."""
    ref = copy.deepcopy(model)
    compiled = compiled_of(model)
    xs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
    outs = []
    for step in range(steps):
        for net, xi in ((compiled, xs[0]), (ref, xs[1])):
            torch.manual_seed(100 + step)
            out = net(xi)
            _loss(out).backward()
            outs.append(out)
    return compiled, ref, xs, outs


def _assert_same(model, ref, xs, exact=True):
    eq = torch.equal if exact else (lambda a, b: torch.allclose(a, b, rtol=1e-5, atol=1e-6))
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert (p.grad is None and q.grad is None) or eq(p.grad, q.grad), name   # dead branches: both None
    assert eq(xs[0].grad, xs[1].grad)
    for (name, b), c in zip(model.named_buffers(), ref.buffers()):
        assert torch.equal(b, c), name


def test_unet_gradients_and_bn_statistics_equal_bitwise_float64():
    net = TinyUNet3D(width=4).double()
    x = torch.randn(2, 1, 8, 8, 8, dtype=torch.float64)
    compiled, ref, xs, outs = _step_pair(net, lambda m: memplan.compile(m, x), x, steps=3)
    assert any(s.recompute for s in compiled.memplan_plan.segments)
    _assert_same(net, ref, xs)
    assert int(net.enc1[0][1].num_batches_tracked) == 3          # updated once per step, not twice
    assert all(torch.equal(a, b) for a, b in zip(outs[0::2], outs[1::2]))


def test_dropout_masks_equal_with_rng_preserved():
    net = TinyUNet3D(width=4, dropout=0.5).double()
    x = torch.randn(1, 1, 8, 8, 8, dtype=torch.float64)
    compiled, ref, xs, outs = _step_pair(net, lambda m: memplan.compile(m, x), x, steps=2)
    assert any(s.recompute and any(n.startswith("bottom") for n in s.nodes) for s in compiled.memplan_plan.segments)
    _assert_same(net, ref, xs)


def test_float32_gradients_close():
    net = TinyUNet3D(width=4)
    x = torch.randn(1, 1, 8, 8, 8)
    _, ref, xs, _ = _step_pair(net, lambda m: memplan.compile(m, x), x)
    _assert_same(net, ref, xs, exact=False)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), n=st.integers(3, 10))
def test_random_nets_gradients_equal(data, n):
    spec = random_spec(lambda lo, hi: data.draw(st.integers(lo, hi)), n)
    net = RandomDAGNet(spec, channels=2, extra_outputs=(1,)).double()
    x = torch.randn(1, 1, 4, 4, 4, dtype=torch.float64)
    _, ref, xs, _ = _step_pair(net, lambda m: memplan.compile(m, x), x)
    _assert_same(net, ref, xs)


@pytest.mark.parametrize("name", ["UNet", "AttentionUnet"])
def test_monai_networks_gradients_equal(name):
    nets = pytest.importorskip("monai.networks.nets")
    net = getattr(nets, name)(spatial_dims=3, in_channels=1, out_channels=2, channels=(4, 8, 16),
                              strides=(2, 2)).double()
    x = torch.randn(1, 1, 16, 16, 16, dtype=torch.float64)
    compiled, ref, xs, _ = _step_pair(net, lambda m: memplan.compile(m, x), x)
    assert any(s.recompute for s in compiled.memplan_plan.segments)
    _assert_same(net, ref, xs)


def test_two_outputs_batch_eval_mode_and_shared_parameters():
    net = TwoBranch().double()
    x = torch.randn(3, 1, 8, 8, 8, dtype=torch.float64)
    compiled = memplan.compile(net, x)
    assert {id(p) for p in compiled.parameters()} == {id(p) for p in net.parameters()}
    seg, vec = compiled(x)
    assert seg.shape == (3, 2, 8, 8, 8) and vec.shape == (3, 3)
    compiled.eval()
    net.eval()
    with torch.no_grad():
        a, b = compiled(x), net(x)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    opt = torch.optim.SGD(net.parameters(), lr=0.1)             # an optimizer on the original trains the compiled
    compiled.train()
    _loss(compiled(x)).backward()
    before = net.stem[0].weight.detach().clone()
    opt.step()
    assert not torch.equal(before, net.stem[0].weight)
    # the step on the original's parameters is what the compiled module now computes, and the original's
    # state_dict (the format to save) rebuilds it in a fresh network
    compiled.eval()
    net.eval()
    fresh = TwoBranch().double().eval()
    fresh.load_state_dict(net.state_dict())
    with torch.no_grad():
        after, rebuilt = compiled(x), fresh(x)
    assert not torch.equal(after[0], a[0]) and not torch.equal(after[1], a[1])
    assert torch.equal(after[0], rebuilt[0]) and torch.equal(after[1], rebuilt[1])


def test_to_dtype_after_compiling_moves_the_shared_parameters():
    net = TinyUNet3D(width=2)
    x = torch.randn(1, 1, 8, 8, 8)
    compiled = memplan.compile(net, x).to(torch.float64)
    assert net.head.weight.dtype == torch.float64
    out = compiled(x.double())
    assert out.dtype == torch.float64


def test_budget_is_met_and_prediction_is_honest():
    net = TinyUNet3D(width=8)
    x = torch.empty(1, 1, 32, 32, 32, device="meta")
    free = memplan.plan(net, x)
    budget = (free.simulated_peak_bytes + free.simulated_vanilla_peak_bytes) // 2
    p = memplan.plan(net, x, budget=budget)
    assert p.objective == "time-centric" and p.budget_bytes == budget
    compiled = memplan.compile(net, x, plan=p)
    simulated = memplan.simulate_step(compiled, x).peak_bytes
    assert simulated <= budget
    assert simulated <= p.predicted_peak_bytes * 1.05
    assert p.predicted_overhead <= free.predicted_overhead      # more memory, less recompute
    assert "cost model" in p.summary() and "vs simulation" in p.summary()


def test_infeasible_budget_names_the_floor():
    net = TinyUNet3D(width=4)
    x = torch.empty(1, 1, 16, 16, 16, device="meta")
    with pytest.raises(BudgetError, match=r"below the smallest feasible peak .* raise the budget") as info:
        memplan.plan(net, x, budget="1KB")
    assert info.value.min_feasible_bytes > 1000


def test_plan_json_round_trip_and_fingerprint_refusal(tmp_path):
    net = TinyUNet3D(width=2)
    x = torch.randn(1, 1, 8, 8, 8)
    p = memplan.plan(net, x)
    path = tmp_path / "plan.json"
    p.to_json(path)
    assert Plan.from_json(path) == p
    assert Plan.from_json(p.to_json()) == p
    compiled = memplan.compile(net, x, plan=str(path))
    assert compiled.memplan_plan == p
    with pytest.raises(PlanMismatchError, match="re-plan"):
        memplan.compile(net, torch.randn(1, 1, 16, 16, 16), plan=p)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(MemplanError, match="not valid JSON"):
        memplan.compile(net, x, plan=bad)
    with pytest.raises(MemplanError, match="does not exist"):
        memplan.compile(net, x, plan=tmp_path / "missing.json")
    assert json.loads(p.to_json())["method"] == "exact"


def test_bad_options_are_named():
    net = TinyUNet3D(width=2)
    x = torch.empty(1, 1, 8, 8, 8, device="meta")
    with pytest.raises(MemplanError, match="unknown method 'fast'"):
        memplan.plan(net, x, method="fast")
    with pytest.raises(MemplanError, match="cannot parse byte quantity '12 apples'"):
        memplan.plan(net, x, budget="12 apples")


def test_approx_method_is_reported():
    net = TinyUNet3D(width=2)
    x = torch.empty(1, 1, 8, 8, 8, device="meta")
    p = memplan.plan(net, x, method="approx")
    assert p.method == "approx" and p.lower_set_count is None
    e = memplan.plan(net, x, method="exact")
    assert e.predicted_peak_bytes <= p.predicted_peak_bytes


def test_budget_between_cost_model_floor_and_simulated_floor_is_accepted():
    net = TinyUNet3D(width=4)
    x = torch.empty(1, 1, 16, 16, 16, device="meta")
    least = memplan.plan(net, x)
    assert least.simulated_peak_bytes < least.predicted_peak_bytes   # the cost model is conservative here
    p = memplan.plan(net, x, budget=least.simulated_peak_bytes)
    assert p.simulated_peak_bytes <= least.simulated_peak_bytes
    with pytest.raises(BudgetError) as info:
        memplan.plan(net, x, budget=least.simulated_peak_bytes - 1)
    assert info.value.min_feasible_bytes == least.simulated_peak_bytes


def test_a_generous_budget_recomputes_nothing():
    net = TinyUNet3D(width=4)
    x = torch.empty(1, 1, 16, 16, 16, device="meta")
    p = memplan.plan(net, x, budget="1GB")
    assert p.predicted_overhead == 0 and not p.recomputed_segments


def test_measured_node_times_drive_the_overhead(monkeypatch):
    """The overhead is the recomputed segments' share of the node times given (or measured), not of FLOPs:
    checked against the times themselves, summed over the plan's recomputed segments by hand."""
    import memplan.analyze
    net = TinyUNet3D(width=2)
    x = torch.randn(1, 1, 8, 8, 8)

    def share(plan, times):                  # checkpoint re-runs every node of a recomputed segment
        nodes = [n for s in plan.segments for n in s.nodes]
        return sum(times[n] for s in plan.segments if s.recompute for n in s.nodes) / sum(times[n] for n in nodes)

    order = [n for s in memplan.plan(net, x).segments for n in s.nodes]
    given = {n: float(i + 1) for i, n in enumerate(order)}        # later nodes dearer: unlike their FLOPs
    p = memplan.plan(net, x, times=given)
    assert p.recomputed_segments and p.predicted_overhead == pytest.approx(share(p, given), rel=1e-12)

    seen = {}
    real = memplan.analyze.measure_node_times

    def recorded(*args, **kwargs):
        seen.update(real(*args, **kwargs))
        return dict(seen)
    monkeypatch.setattr(memplan.analyze, "measure_node_times", recorded)
    p = memplan.plan(net, x, times="measured")
    assert set(order) <= set(seen) and all(t >= 0 for t in seen.values())   # (also the input and output)
    assert 0 < p.predicted_overhead == pytest.approx(share(p, seen), rel=1e-12)
    with pytest.raises(MemplanError, match="'measured'"):
        memplan.plan(net, x, times="fast")