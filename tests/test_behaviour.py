"""The compiled module keeps every behaviour of the original: the idioms of real training code,
each trained side by side with the original and compared bitwise in float64 (issue: "Trains
exactly like yours")."""
import copy

import pytest
import torch
import torch._inductor.config
import torch.fx
from torch import nn

import memplan
from memplan import MemplanError
from memplan.rewrite import CheckpointSegment
from tests import idioms
from tests.bitwise import compile_and_compare, first_difference, tensors, weighted_loss

X = (1, 1, 8, 8, 8)


def _x(shape=X):
    torch.manual_seed(1)
    return torch.randn(shape, dtype=torch.float64)


class SetGradGate(idioms.NoGradGate):
    """``torch.set_grad_enabled(False)`` as a statement pair instead of a with-block."""

    def forward(self, x):
        torch.set_grad_enabled(False)
        gate = torch.sigmoid(self.frozen(x))
        torch.set_grad_enabled(True)
        return self.head(self.trained(x) * gate)


class ExportedBN(nn.Module):
    """BatchNorm behind a shape branch fx cannot trace: the torch.export path, which bakes the mode."""

    def __init__(self, w=4):
        super().__init__()
        self.body = nn.Sequential(nn.Conv3d(1, w, 3, padding=1), nn.BatchNorm3d(w), nn.ReLU(),
                                  nn.Conv3d(w, w, 3, padding=1), nn.BatchNorm3d(w), nn.ReLU(),
                                  nn.Conv3d(w, w, 3, padding=1), nn.Dropout(0.3), nn.Conv3d(w, 2, 1))

    def forward(self, x):
        if x.shape[-1] % 2 == 0:
            x = x * 1.0
        return self.body(x)


class DictOut(ExportedBN):
    def forward(self, x):
        y = super().forward(x)
        return {"seg": y, "mean": y.mean(dim=(2, 3, 4))}


class SharedThrice(nn.Module):
    """One conv called four times (shared weights): its gradient sums four contributions."""

    def __init__(self, w=4):
        super().__init__()
        self.stem = nn.Conv3d(1, w, 3, padding=1)
        self.shared = nn.Conv3d(w, w, 3, padding=1)
        self.head = nn.Conv3d(w, 1, 1)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        for _ in range(4):
            h = torch.relu(self.shared(h)) + h
        return self.head(h)


class CountsSteps(nn.Module):
    """A step counter and an EMA of the features, updated in forward (read before the update)."""

    def __init__(self, w=4):
        super().__init__()
        self.conv1 = nn.Conv3d(1, w, 3, padding=1)
        self.conv2 = nn.Conv3d(w, w, 3, padding=1)
        self.head = nn.Conv3d(w, 1, 1)
        self.register_buffer("steps", torch.zeros((), dtype=torch.float64))
        self.register_buffer("ema", torch.zeros(w, dtype=torch.float64))

    def forward(self, x):
        h = torch.relu(self.conv1(x)) * (1 + 0.1 * self.steps)
        h = torch.relu(self.conv2(h)) + self.ema.view(1, -1, 1, 1, 1)
        if self.training:
            with torch.no_grad():
                self.ema.mul_(0.9).add_(0.1 * h.mean(dim=(0, 2, 3, 4)))
                self.steps.add_(1)
        return self.head(h)


class KeywordOnly(nn.Module):
    def __init__(self, w=4):
        super().__init__()
        self.body = nn.Sequential(nn.Conv3d(1, w, 3, padding=1), nn.ReLU(), nn.Conv3d(w, w, 3, padding=1), nn.ReLU(),
                                  nn.Conv3d(w, 1, 1))

    def forward(self, x, *, scale: float = 1.0):
        return self.body(x) * scale


@pytest.mark.parametrize("make", [idioms.NoGradGate, SetGradGate], ids=["no_grad", "set_grad_enabled"])
def test_grad_mode_regions_inside_forward(make):
    plan = compile_and_compare(make, _x())
    assert any("fx:" in n and "differently" in n for n in plan.notes)   # fx dropped the region: refused
    net = make().double()
    compiled = memplan.compile(net, _x(), scratch="none")
    weighted_loss(compiled(_x().requires_grad_())).backward()
    assert net.frozen.weight.grad is None and net.trained[0].weight.grad is not None


@pytest.mark.parametrize("compiled_in", ["train", "eval"])
def test_train_eval_switch_after_compile_on_the_export_path(compiled_in):
    torch.manual_seed(0)
    net = ExportedBN().double().train(compiled_in == "train")
    twin = copy.deepcopy(net)
    compiled = memplan.compile(net, _x((2, 1, 8, 8, 8)), scratch="none")
    assert any(n.startswith("fx:") for n in compiled.memplan_plan.notes)          # really the export path
    for mode in ("train", "eval", "train"):
        compiled.train(mode == "train")
        twin.train(mode == "train")
        why = first_difference(compiled, net, twin, _x((2, 1, 8, 8, 8)), steps=2)
        assert not why, f"{mode}: {why}"
    assert int(net.body[1].num_batches_tracked) == 4


def test_export_path_keeps_dict_outputs():
    torch.manual_seed(0)
    net = DictOut().double()
    compiled = memplan.compile(net, _x(), scratch="none")
    out = compiled(_x())
    assert isinstance(out, dict) and set(out) == {"seg", "mean"}
    compile_and_compare(DictOut, _x())


@pytest.mark.parametrize("fraction", [None, 0.0, 0.3, 0.7])
def test_module_called_four_times_keeps_its_gradient_sum_order(fraction):
    # budgets from the least-memory plan's simulated peak (0.0) towards vanilla: every one is feasible
    x = _x((1, 1, 12, 12, 12))
    budget = None
    if fraction is not None:
        least = memplan.plan(SharedThrice().double(), x, scratch="none")
        floor, vanilla = least.simulated_peak_bytes, least.simulated_vanilla_peak_bytes
        budget = int(floor + fraction * (vanilla - floor))
    compile_and_compare(SharedThrice, x, budget=budget, require_recompute=False)


def test_retain_graph_twice_and_a_gradient_penalty():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.Tanh(), nn.Conv3d(4, 4, 3, padding=1), nn.Tanh(),
                        nn.Conv3d(4, 4, 3, padding=1), nn.Tanh(), nn.Conv3d(4, 1, 1)).double()
    twin = copy.deepcopy(net)
    compiled = memplan.compile(net, _x(), scratch="none")
    assert compiled.memplan_plan.recomputed_segments
    results = []
    for module, params in ((compiled, list(net.parameters())), (twin, list(twin.parameters()))):
        x = _x().requires_grad_()
        loss = weighted_loss(module(x))
        loss.backward(retain_graph=True)
        loss.backward()                                           # twice: gradients accumulate
        g1 = [p.grad.clone() for p in params]
        (gx,) = torch.autograd.grad(weighted_loss(module(x)), x, create_graph=True)
        penalty = (gx ** 2).sum()
        gp = torch.autograd.grad(penalty, params, allow_unused=True)
        results.append((g1, gp))
    assert sum(g is not None for g in results[0][1]) >= 6
    for a, b in zip(results[0][0] + list(results[0][1]), results[1][0] + list(results[1][1])):
        assert (a is None and b is None) or torch.equal(a, b)


def test_buffers_updated_in_forward_train_exactly_and_compiling_leaves_them_alone():
    torch.manual_seed(0)
    net = CountsSteps().double()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    twin = copy.deepcopy(net)
    compiled = memplan.compile(net, _x(), scratch="none")
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert compiled.memplan_plan.recomputed_segments
    why = first_difference(compiled, net, twin, _x(), steps=3)
    assert not why, why
    assert float(net.steps) == 3.0


def test_state_dict_has_the_original_keys_and_loads_both_ways_strictly():
    torch.manual_seed(0)
    net = idioms.IAddResNet().double()
    compiled = memplan.compile(net, _x(), scratch="none")
    assert list(compiled.state_dict()) == list(net.state_dict())
    assert [n for n, _ in compiled.named_parameters()] == [n for n, _ in net.named_parameters()]
    other = idioms.IAddResNet().double()
    compiled.load_state_dict(other.state_dict(), strict=True)
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), other.state_dict().values()))
    fresh = idioms.IAddResNet().double()
    fresh.load_state_dict(compiled.state_dict(), strict=True)
    x = _x()
    assert torch.equal(fresh.eval()(x), compiled.eval()(x))


def test_keyword_arguments_are_checked_not_silently_fixed():
    torch.manual_seed(0)
    net = KeywordOnly().double()
    compiled = memplan.compile(net, _x(), scratch="none")
    x = _x()
    assert torch.equal(compiled(x, scale=1.0), net(x))
    with pytest.raises(MemplanError, match=r"scale=2\.0 differs from the 1\.0"):
        compiled(x, scale=2.0)
    with pytest.raises(MemplanError, match=r"argument scale is a tensor but was 1\.0 .*example_kwargs"):
        compiled(x, scale=torch.ones(()))          # a tensor where a constant was traced: never ignored


class Masked(nn.Module):
    """A keyword-only tensor (a mask, as attention and loss masks are passed) and a keyword constant."""

    def __init__(self, w=4):
        super().__init__()
        self.body = nn.Sequential(nn.Conv3d(1, w, 3, padding=1), nn.ReLU(), nn.Conv3d(w, w, 3, padding=1), nn.ReLU(),
                                  nn.Conv3d(w, w, 3, padding=1), nn.ReLU(), nn.Conv3d(w, 1, 1))

    def forward(self, x, *, mask=None, scale=1.0):
        h = self.body(x) * scale
        return h * mask if mask is not None else h


def test_tensor_keyword_arguments_are_graph_inputs():
    # compiled with one mask, trained with others: every step's output, input, mask and parameter
    # gradients bitwise the original's in float64; the constant keyword stays checked
    torch.manual_seed(0)
    net = Masked().double()
    twin = copy.deepcopy(net)
    x = _x()
    compiled = memplan.compile(net, x, scratch="none", example_kwargs={"mask": torch.rand_like(x), "scale": 2.0})
    assert compiled.memplan_plan.recomputed_segments, compiled.memplan_plan.summary()
    opt_a, opt_b = torch.optim.SGD(net.parameters(), lr=0.01), torch.optim.SGD(twin.parameters(), lr=0.01)
    for step in range(3):
        mask = torch.rand_like(x)
        xa, xb, ma, mb = x.clone().requires_grad_(), x.clone().requires_grad_(), mask.clone().requires_grad_(), \
            mask.clone().requires_grad_()
        ya, yb = compiled(xa, mask=ma, scale=2.0), twin(xb, mask=mb, scale=2.0)
        assert torch.equal(ya, yb), step
        weighted_loss(ya).backward()
        weighted_loss(yb).backward()
        assert torch.equal(xa.grad, xb.grad) and torch.equal(ma.grad, mb.grad), step
        assert all(torch.equal(p.grad, q.grad) for p, q in zip(net.parameters(), twin.parameters())), step
        opt_a.step(); opt_b.step(); opt_a.zero_grad(); opt_b.zero_grad()
    assert torch.equal(compiled(x=x, mask=mask, scale=2.0), twin(x, mask=mask, scale=2.0))   # x by name too
    with pytest.raises(MemplanError, match=r"scale=1\.0 differs from the 2\.0"):
        compiled(x, mask=mask)
    with pytest.raises(MemplanError, match=r"argument mask is None but was a tensor"):
        compiled(x, scale=2.0)
    assert list(compiled.state_dict()) == list(net.state_dict())


def test_example_kwargs_are_checked_up_front():
    net = Masked()
    x = torch.randn(X)
    with pytest.raises(MemplanError, match=r"does not take .*keyword\(s\) maks"):
        memplan.compile(net, x, example_kwargs={"maks": x})
    with pytest.raises(MemplanError, match=r"mask hold tensors inside a container"):
        memplan.compile(net, x, example_kwargs={"mask": [x]})
    with pytest.raises(MemplanError, match=r"example_kwargs with REV"):
        memplan.compile(net, x, rev=True, example_kwargs={"mask": x})


def test_compiling_a_compiled_module_and_deepcopy():
    torch.manual_seed(0)
    net = idioms.IAddResNet().double()
    compiled = memplan.compile(net, _x(), scratch="none")
    again = memplan.compile(compiled, _x(), scratch="none")
    assert again.memplan_original is net and again.memplan_plan.segments == compiled.memplan_plan.segments
    twin = copy.deepcopy(net)
    clone = copy.deepcopy(compiled)
    assert clone.memplan_plan == compiled.memplan_plan
    assert all(a is not b for a, b in zip(clone.parameters(), net.parameters()))
    why = first_difference(clone, clone.memplan_original, twin, _x(), steps=2)
    assert not why, why


def test_to_moves_every_graph_with_the_original():
    torch.manual_seed(0)
    net = ExportedBN()
    compiled = memplan.compile(net, torch.randn(X), scratch="none")
    compiled.double()
    assert all(t.dtype == torch.float64 for t in net.state_dict().values() if t.is_floating_point())
    twin = copy.deepcopy(net)
    why = first_difference(compiled, net, twin, _x(), steps=2)
    assert not why, why


class NormZoo(nn.Module):
    """InstanceNorm and in-place ReLU (segments torch.compile recomputes itself), BatchNorm and dropout
    (segments with buffers or RNG, which memplan recomputes eagerly behind a graph break)."""

    def __init__(self, w=4):
        super().__init__()
        inorm = lambda: (nn.Conv3d(w, w, 3, padding=1), nn.InstanceNorm3d(w, affine=True), nn.ReLU(inplace=True))
        self.body = nn.Sequential(
            nn.Conv3d(1, w, 3, padding=1), nn.ReLU(), *inorm(), *inorm(),
            nn.Conv3d(w, w, 3, padding=1), nn.BatchNorm3d(w), nn.ReLU(), *inorm(), *inorm(),
            nn.Conv3d(w, w, 3, padding=1), nn.BatchNorm3d(w, momentum=None), nn.ReLU(), nn.Dropout(0.3), *inorm(),
            nn.Conv3d(w, 2, 1))

    def forward(self, x):
        return self.body(x)


def _train_close(fast, original, twin, x, *, steps=3, rtol=1e-9) -> str:
    """first_difference with a tolerance (inductor fuses and reorders float64 sums): '' or the first
    output, gradient or buffer off by more than ``rtol`` of its kind's largest magnitude (a bias before
    InstanceNorm has a gradient of pure rounding noise, so each gradient is judged on the largest one)."""
    opt_a = torch.optim.SGD(original.parameters(), lr=0.01)
    opt_b = torch.optim.SGD(twin.parameters(), lr=0.01)
    off = lambda a, b, scale: not torch.allclose(a.detach(), b.detach(), rtol=rtol, atol=rtol * scale)
    for step in range(steps):
        torch.manual_seed(step)
        ya = fast(x)
        torch.manual_seed(step)
        yb = twin(x)
        if off(ya, yb, float(yb.detach().abs().max())):
            return f"step {step}: output differs by {(ya - yb).abs().max().item():.3g}"
        weighted_loss(ya).backward()
        weighted_loss(yb).backward()
        scale = max(float(q.grad.abs().max()) for q in twin.parameters())
        for (name, p), q in zip(original.named_parameters(), twin.parameters(), strict=True):
            if off(p.grad, q.grad, scale):
                return f"step {step}: gradient of {name} differs by {(p.grad - q.grad).abs().max().item():.3g}"
        for (name, a), b in zip(original.named_buffers(), twin.buffers(), strict=True):
            if off(a.double(), b.double(), float(b.double().abs().max())):
                return f"step {step}: buffer {name} differs: {a} vs {b}"
        opt_a.step(); opt_b.step()
        opt_a.zero_grad(); opt_b.zero_grad()
    return ""


@pytest.mark.parametrize("layers, dynamo", [
    ((nn.Conv3d(2, 2, 3, padding=1), nn.InstanceNorm3d(2, affine=True), nn.ReLU()), True),
    ((nn.Conv3d(2, 2, 3, padding=1), nn.Dropout(0.0)), True),                 # MONAI's dropout=0.0 default
    ((nn.Conv3d(2, 2, 3, padding=1), nn.BatchNorm3d(2)), False),              # running statistics
    ((nn.Conv3d(2, 2, 3, padding=1), nn.Dropout3d(0.2)), False),              # RNG
    ((nn.Conv3d(2, 2, 3, padding=1), nn.BatchNorm3d(2, track_running_stats=False)), True),
])
def test_which_segments_torch_compile_may_recompute(layers, dynamo):
    body = torch.fx.symbolic_trace(nn.Sequential(*layers))
    assert CheckpointSegment(body).dynamo_recomputes is dynamo
    noisy = torch.fx.symbolic_trace(lambda x: x * torch.rand_like(x))            # a random function, not a module
    assert not CheckpointSegment(noisy).dynamo_recomputes


class _Noise(nn.Module):
    def forward(self, x):
        return x + torch.randn_like(x)


def test_an_opaque_leaf_module_is_recomputed_by_memplan():
    # a leaf from outside torch.nn (memplan.trace.register_leaf) may draw random numbers unseen
    class Leafy(torch.fx.Tracer):
        def is_leaf_module(self, m, qualname):
            return isinstance(m, _Noise) or super().is_leaf_module(m, qualname)
    net = nn.Sequential(nn.Conv3d(1, 1, 3), _Noise())
    body = torch.fx.GraphModule(net, Leafy().trace(net))
    assert [n.op for n in body.graph.nodes].count("call_module") == 2
    assert not CheckpointSegment(body).dynamo_recomputes


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["eager", "aot_eager", "inductor"])
def test_torch_compile_of_a_compiled_module(backend):
    # float64, 3 SGD steps: BatchNorm statistics (momentum and cumulative) and dropout in recomputed
    # segments next to pure ones; the eager backend runs the same kernels, so it must be bitwise
    torch.manual_seed(0)
    net = NormZoo().double()
    twin = copy.deepcopy(net)
    compiled = memplan.compile(net, _x(), scratch="none")
    segments = [m for m in compiled.graph_module.modules() if isinstance(m, CheckpointSegment)]
    assert {m.dynamo_recomputes for m in segments} == {True, False}, compiled.memplan_plan.summary()
    torch._dynamo.reset()
    fast = torch.compile(compiled, backend=backend)
    with torch._inductor.config.patch(fallback_random=True):     # inductor's own RNG differs from eager's
        if backend == "eager":
            why = first_difference(fast, net, twin, _x(), steps=3)
        else:
            why = _train_close(fast, net, twin, _x(), steps=3)
    assert not why, f"{backend}: {why}"
    assert int(net.body[9].num_batches_tracked) == int(twin.body[9].num_batches_tracked) == 3
