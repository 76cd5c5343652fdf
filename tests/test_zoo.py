"""The public zoo (MONAI networks and training-code idioms): each trains compiled exactly like the
original on a small real float64 input, and plans below vanilla at a clinical size on fake tensors."""
import pytest
import torch
from torch import nn

import memplan
from benchmarks.zoo import ZOO, by_name
from tests import idioms
from tests.bitwise import compile_and_compare

pytest.importorskip("monai")

SLOW_SMALL = {"UNETR", "DenseNet121", "BasicUNetPlusPlus", "SegResNetDS", "VNet", "DynUNet-deepsup", "SwinUNETR",
              "FlexibleUNet"}
SLOW_CLINICAL = {"UNETR", "DenseNet121", "BasicUNetPlusPlus", "SegResNetDS", "AttentionUnet", "resnet18", "VNet",
                 "DynUNet-deepsup", "SwinUNETR", "FlexibleUNet"}


def _marked(names, slow):
    return [pytest.param(n, marks=pytest.mark.slow) if n in slow else n for n in names]


@pytest.mark.parametrize("name", _marked([e.name for e in ZOO], SLOW_SMALL))
def test_compiled_trains_bitwise_like_the_original(name):
    e = by_name(name)
    x = torch.randn(e.small, dtype=torch.float64)
    compile_and_compare(lambda: e.build(e.small[-1]), x, steps=3)


@pytest.mark.parametrize("name", _marked([e.name for e in ZOO], SLOW_CLINICAL))
def test_plans_below_vanilla_at_clinical_size(name):
    e = by_name(name)
    net = e.build(e.clinical[-1])
    plan = memplan.plan(net, torch.empty(e.clinical, device="meta"), scratch="none")
    assert plan.simulated_peak_bytes < plan.simulated_vanilla_peak_bytes, plan.summary()
    assert plan.recomputed_segments


@pytest.mark.parametrize("act", [nn.ReLU, nn.LeakyReLU, nn.ReLU6])
def test_inplace_activations_plan_within_two_percent_of_their_out_of_place_twin(act):
    x = torch.empty(1, 1, 96, 96, 96, device="meta")
    peaks = {}
    for inplace in (True, False):
        torch.manual_seed(0)
        plan = memplan.plan(idioms.InplaceChain(act, inplace, width=16), x, scratch="none")
        peaks[inplace] = plan.simulated_peak_bytes
        assert plan.recomputed_segments
    assert peaks[True] <= 1.02 * peaks[False], peaks


def test_inplace_elu_is_kept_in_place_and_still_planned_well_below_vanilla():
    # elu_'s backward reads its result, elu's exp(input): not bitwise, so it stays in place, tied to its input
    x = torch.empty(1, 1, 96, 96, 96, device="meta")
    net = idioms.InplaceChain(nn.ELU, True, width=16)
    g = memplan.trace(net, x)
    assert g.together and not g.out_of_place
    plan = memplan.plan(net, x, scratch="none")
    assert plan.simulated_peak_bytes < 0.7 * plan.simulated_vanilla_peak_bytes, plan.summary()


@pytest.mark.parametrize("make", [
    lambda: nn.ReLU(inplace=True), lambda: nn.LeakyReLU(0.1, inplace=True), lambda: nn.ReLU6(inplace=True),
    lambda: nn.Hardtanh(-0.5, 0.5, inplace=True)])
def test_out_of_place_twins_are_bitwise_equal_in_value_and_gradient(make):
    # the claim memplan.outofplace rests on, checked with values exactly on the kinks (0, slopes' edges)
    torch.manual_seed(0)
    base = torch.cat([torch.randn(200, dtype=torch.float64), torch.tensor([0.0, -0.5, 0.5, 6.0, -0.0], dtype=torch.float64)])
    grads = []
    for inplace in (True, False):
        x = base.clone().requires_grad_()
        act = make()
        act.inplace = inplace
        y = act(x * 1.0)                       # in-place on a non-leaf, as in a network
        (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype)).sum().backward()
        grads.append((y.detach(), x.grad))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


def test_inplace_relu_runs_out_of_place_and_the_plan_says_so():
    g = memplan.trace(idioms.IAddResNet(), torch.empty(1, 1, 8, 8, 8, device="meta"))
    assert g.out_of_place and all("ReLU(inplace=True)" == was for _, was in g.out_of_place)
    assert any("out-of-place" in n for n in g.trace_notes)
    assert all(i.mutates == ("<buffer>",) for i in g if i.mutates)   # only BN statistics are written
    assert not g.together


def test_inplace_write_into_a_kept_value_is_planned_into_one_segment():
    # ELU(inplace=True) writes into the norm's output: the two must share a segment, whatever the plan
    g = memplan.trace(idioms.InplaceChain(nn.ELU, True, width=4), torch.empty(1, 1, 16, 16, 16, device="meta"))
    acts = [i for i in g if i.mutates]
    assert acts and all(i.mutates == (i.alias_of,) for i in acts)
    assert all(set(grp) >= {i.name, i.alias_of} for i in acts for grp in g.together if i.name in grp)
    plan = memplan.plan(idioms.InplaceChain(nn.ELU, True, width=4), torch.empty(1, 1, 16, 16, 16, device="meta"))
    seg_of = {n: s.index for s in plan.segments for n in s.nodes}
    assert all(seg_of[i.name] == seg_of[i.alias_of] for i in acts)


class _MutatesInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv3d(1, 2, 3, padding=1)
        self.b = nn.Conv3d(2, 2, 3, padding=1)

    def forward(self, x):
        h = x * 2                    # reads x before the write (and saves nothing of it)
        x.add_(1)                    # an in-place write into the caller's tensor
        return self.b(torch.relu(self.a(h))) + x.mean()


def test_a_write_into_the_input_is_never_recomputed():
    x = torch.randn(1, 1, 8, 8, 8)
    g = memplan.trace(_MutatesInput(), x.clone())
    writer = [i.name for i in g if "<input>" in i.mutates]
    assert len(writer) == 1 and g.pinned == {writer[0], g.order[0]}     # the write and the earlier reader
    plan = memplan.plan(_MutatesInput(), x.clone())
    recomputed = {n for s in plan.recomputed_segments for n in s.nodes}
    assert not (recomputed & g.pinned)


def test_fake_tensor_planning_leaves_the_model_untouched():
    net = idioms.CumulativeBN()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    rng = torch.get_rng_state()
    memplan.plan(net, torch.empty(2, 1, 64, 64, 64, device="meta"), scratch="none")
    assert torch.equal(rng, torch.get_rng_state())
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert all(not t.is_meta and type(t) is torch.Tensor for t in net.state_dict().values())
