"""split_concat (memplan.splitcat): convolutions over channel concatenations split into per-part
convolutions, opt-in. It must compute the original's function (to rounding, checked in float64 against
the unplanned model), say what it split, survive a plan file, and leave everything else alone."""
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import memplan
from examples.fetusmapv2_unet import UNet3D
from memplan.errors import MemplanError, PlanMismatchError
from memplan.splitcat import concat_convolutions, split_concat
from tests.bitwise import tensors, weighted_loss


def _train_side_by_side(compiled, original, twin, x, steps=2):
    """Largest relative difference of outputs, input and parameter gradients over ``steps`` SGD steps."""
    opt_a = torch.optim.SGD(original.parameters(), lr=0.01)
    opt_b = torch.optim.SGD(twin.parameters(), lr=0.01)
    worst = 0.0
    for _ in range(steps):
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = compiled(xa), twin(xb)
        weighted_loss(ya).backward()
        weighted_loss(yb).backward()
        pairs = list(zip(tensors(ya), tensors(yb))) + [(xa.grad, xb.grad)]
        pairs += [(p.grad, q.grad) for p, q in zip(original.parameters(), twin.parameters())]
        for a, b in pairs:
            worst = max(worst, ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item())
        opt_a.step(), opt_b.step(), opt_a.zero_grad(), opt_b.zero_grad()
    return worst


@pytest.mark.parametrize("method", ["auto", "remat"])
def test_split_unet_trains_like_the_original_to_rounding_and_lists_each_split(method):
    torch.manual_seed(0)
    net = UNet3D(widths=(4, 8, 16)).double()
    twin = copy.deepcopy(net)
    x = torch.randn(1, 1, 16, 16, 16, dtype=torch.float64)
    plan = memplan.plan(net, x, method=method, scratch="none", split_concat=True)
    # two decoder levels: cat(up 8 ch, skip 8 ch) and cat(up 4 ch, skip 4 ch), each into its first conv
    assert [(r.conv, r.channels) for r in plan.split_concat] == [("dec_0_0_0", (8, 8)), ("dec_1_0_0", (4, 4))]
    assert "round differently" in plan.summary() and "split dec_0_0_0" in plan.summary()
    with pytest.warns(UserWarning, match="round differently"):
        compiled = memplan.compile(net, x, plan=plan)
    assert _train_side_by_side(compiled, net, twin, x) < 1e-12
    for a, b in zip(net.state_dict().values(), twin.state_dict().values()):   # same parameters, trained alike
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-10)


def test_without_the_option_nothing_is_split_and_the_plan_file_round_trips_the_split(tmp_path):
    net = UNet3D(widths=(4, 8))
    x = torch.empty(1, 1, 16, 16, 16, device="meta")
    assert memplan.plan(net, x, scratch="none").split_concat == ()
    plan = memplan.plan(net, x, scratch="none", split_concat=True)
    path = tmp_path / "plan.json"
    plan.to_json(path)
    assert memplan.Plan.from_json(path) == plan
    real = torch.randn(1, 1, 16, 16, 16)
    with pytest.warns(UserWarning, match="splits 1 convolution"):
        module = memplan.compile(net, real, plan=str(path))
    assert module.memplan_plan.split_concat == plan.split_concat
    with pytest.raises(PlanMismatchError, match="split"):
        memplan.compile(UNet3D(widths=(4, 8, 16)), real, plan=str(path))


def test_split_concat_lowers_the_floor_of_a_cat_conv_by_the_concatenation():
    """Hand bytes: conv(cat(a, b)) with a, b of 8 channels each at 16^3 (float32 16 KiB a channel).
    The split graph has no concatenation node, and its vanilla forward never holds the 16-channel cat."""
    class CatConv(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv3d(1, 8, 3, padding=1), nn.Conv3d(1, 8, 3, padding=1)
            self.c = nn.Conv3d(16, 1, 3, padding=1)

        def forward(self, x):
            return self.c(torch.cat([self.a(x), self.b(x)], dim=1))

    x = torch.empty(1, 1, 16, 16, 16, device="meta")
    graph = memplan.trace(CatConv(), x)
    split, records = split_concat(graph)
    assert [r.channels for r in records] == [(8, 8)]
    assert "cat" in graph.order and "cat" not in split.order and "c" not in split.order
    assert len(records[0].convs) == 2 and records[0].output in split.order
    cat_bytes = graph.info("cat").out_bytes
    assert cat_bytes == 16 * 16 ** 3 * 4
    # the split forward allocates a, b, two 1-channel partial convolutions and their 1-channel sum; the
    # original a, b, the 16-channel cat and one 1-channel convolution: 16 - 2 channels less
    assert graph.activation_bytes == (8 + 8 + 16 + 1) * 16 ** 3 * 4
    assert split.activation_bytes == (8 + 8 + 1 + 1 + 1) * 16 ** 3 * 4


class _NotSplittable(nn.Module):
    """Convolutions over concatenations that must stay whole: grouped, transposed, a cat read twice, a
    cat along a spatial dimension."""

    def __init__(self):
        super().__init__()
        self.grouped = nn.Conv3d(8, 8, 3, padding=1, groups=2)
        self.transposed = nn.ConvTranspose3d(8, 4, 2, stride=2)
        self.plain = nn.Conv3d(8, 4, 3, padding=1)
        self.spatial = nn.Conv3d(4, 4, 3, padding=1)

    def forward(self, x):
        a, b = x[:, :4], x[:, 4:]
        g = self.grouped(torch.cat([a, b], 1))
        t = self.transposed(torch.cat([a, b], 1))
        both = torch.cat([a, b], 1)
        p = self.plain(both) + both.sum(1, keepdim=True)
        s = self.spatial(torch.cat([a, a], 2))
        return g.sum() + t.sum() + p.sum() + s.sum()


def test_what_cannot_be_split_exactly_is_left_whole():
    graph = memplan.trace(_NotSplittable(), torch.empty(1, 8, 8, 8, 8, device="meta"))
    assert concat_convolutions(graph) == []
    assert split_concat(graph)[1] == ()


def test_functional_and_exported_convolutions_are_split_too():
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(2, 6, 3, 3, 3, dtype=torch.float64))

        def forward(self, x):
            if x.shape[2] > 4:         # shape-dependent branch: fx cannot trace it, torch.export can
                x = x * 2
            return F.conv3d(torch.cat([x, torch.relu(x), x * x], dim=1), self.w, None, 1, 1)

    torch.manual_seed(0)
    net = Functional()
    x = torch.randn(1, 2, 8, 8, 8, dtype=torch.float64)
    graph = memplan.trace(net, x)
    split, records = split_concat(graph)
    assert [r.channels for r in records] == [(2, 2, 2)], graph.tracer
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = split.gm(x)
    ref = net(x)
    assert torch.allclose(out if isinstance(out, torch.Tensor) else out[0], ref, rtol=1e-12, atol=1e-12)


def test_split_concat_with_rev_is_refused_naming_both():
    with pytest.raises(MemplanError, match="split_concat=True with method 'rev'"):
        memplan.plan(UNet3D(widths=(4, 8)), torch.empty(1, 1, 16, 16, 16, device="meta"), rev=True,
                     split_concat=True)


def test_split_concat_plans_under_bf16_autocast():
    net = UNet3D(widths=(4, 8))
    x = torch.empty(1, 1, 16, 16, 16, device="meta")
    plan = memplan.plan(net, x, scratch="none", split_concat=True, amp="bf16")
    assert plan.amp == "bf16" and len(plan.split_concat) == 1
    assert plan.simulated_peak_bytes <= plan.simulated_vanilla_peak_bytes
