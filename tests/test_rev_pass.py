"""REV eligibility and substitution on fx graphs, checked against plain autograd of the same coupling."""
import copy
import dataclasses
import json

import pytest
import torch
from torch import nn

from tests.nets import PlainCoupling
from memplan.errors import MemplanError
from memplan.plan import RevReplacementRecord
from memplan.rev import (
    RevEligibilityError,
    check_rev_candidate,
    default_free_input,
    find_rev_candidates,
    rev_ineligible_reasons,
    substitute_rev,
)
from memplan.reversible import ReversibleBlock


def _cbr(in_channels, out_channels, *, stride=1, padding=1, kernel=3, **conv_kwargs):
    return nn.Sequential(nn.Conv3d(in_channels, out_channels, kernel, stride=stride, padding=padding,
                                   bias=False, **conv_kwargs),
                         nn.BatchNorm3d(out_channels), nn.ReLU())


class SkipNet(nn.Module):
    """enc (1->4) -> mid (4->4, its input also feeds the skip) -> last (4->4); plus ineligible layers."""

    def __init__(self):
        super().__init__()
        self.enc = _cbr(1, 4)
        self.mid = _cbr(4, 4)
        self.last = _cbr(4, 4)
        self.to_odd = _cbr(4, 3, kernel=1, padding=0)
        self.odd = _cbr(3, 3)
        self.down = _cbr(4, 4, stride=2)

    def forward(self, x):
        a = self.enc(x)
        c = self.last(self.mid(a))
        return self.odd(self.to_odd(c)), self.down(c), c + a


class CatNet(nn.Module):
    """Two 1->2 branches concatenated, then a 4->4 layer whose input nothing else needs (cat saves nothing)."""

    def __init__(self):
        super().__init__()
        self.p, self.q = _cbr(1, 2), _cbr(1, 2)
        self.body = _cbr(4, 4)
        self.head = nn.Conv3d(4, 1, 1)

    def forward(self, x):
        return self.head(self.body(torch.cat([self.p(x), self.q(x)], dim=1)))


class Misc(nn.Module):
    """Layers that break the pattern in other ways (all 4 -> 4 with even channels)."""

    def __init__(self):
        super().__init__()
        self.valid = _cbr(4, 4, padding=0)
        self.dilated = _cbr(4, 4, padding=2, dilation=2)
        self.grouped = _cbr(4, 4, groups=2)
        self.conv_two_users = nn.Conv3d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm3d(4)
        self.shared = nn.Conv3d(4, 4, 3, padding=1)
        self.bn_sig = _cbr(4, 4)
        self.bn_sig[2] = nn.Sigmoid()

    def forward(self, x):
        a = self.valid(x)
        b = self.dilated(x) + self.grouped(x)
        t = self.conv_two_users(x)
        s = self.shared(self.shared(x))
        return a, b, torch.relu(self.bn(t)) + t, s, self.bn_sig(x)




def _meta(*shape, dtype=torch.float32):
    return torch.empty(*shape, device="meta", dtype=dtype)


def _plain_reference(new_gm, replacements):
    """A deep copy of ``new_gm`` whose reversible blocks are plain autograd with the same F and G."""
    ref = copy.deepcopy(new_gm)
    for r in replacements:
        block = ref.get_submodule(r.new_module)
        parent, _, leaf = r.new_module.rpartition(".")
        setattr(ref.get_submodule(parent), leaf, PlainCoupling(block.f, block.g))
    return ref


def _grads(module, x, weights):
    x = x.clone().requires_grad_(True)
    outs = module(x)
    loss = sum((o * w).sum() for o, w in zip(outs if isinstance(outs, tuple) else (outs,), weights))
    loss.backward()
    return x.grad, {n: p.grad for n, p in module.named_parameters()}


def test_candidates_of_a_skip_net():
    gm = torch.fx.symbolic_trace(SkipNet())
    found = {c.name: c for c in find_rev_candidates(gm, _meta(2, 1, 8, 8, 8))}
    assert sorted(found) == ["last.0", "mid.0"]
    mid, last = found["mid.0"], found["last.0"]
    assert (mid.conv_node, mid.bn_node, mid.relu_node, mid.input_node) == ("mid_0", "mid_1", "mid_2", "enc_2")
    assert mid.modules == ("mid.0", "mid.1", "mid.2")
    assert (mid.channels, mid.kernel_size, mid.padding, mid.spatial_dims) == (4, (3, 3, 3), (1, 1, 1), 3)
    assert mid.shape == (2, 4, 8, 8, 8) and mid.dtype == "torch.float32"
    # conv 4*4*27 = 432 + BN 2*4 = 440; F and G: 2 * (2*2*27 + 2*2) = 224
    assert (mid.original_param_count, mid.new_param_count) == (440, 224)
    assert mid.input_has_other_users and mid.input_kept_by == ("add", "enc_2")  # skip user, ReLU saved it
    assert not last.input_has_other_users and last.input_kept_by == ("mid_2",)  # the ReLU producing it saved it
    assert not default_free_input(last)  # alone: mid's ReLU still needs its output in backward
    assert default_free_input(last, [mid, last]) and not default_free_input(mid, [mid, last])


def test_ineligible_layers_say_why():
    gm = torch.fx.symbolic_trace(SkipNet())
    reasons = rev_ineligible_reasons(gm, _meta(2, 1, 8, 8, 8))
    assert reasons == {"enc_0": "channels change 1 -> 4; REV needs C -> C",
                       "to_odd_0": "channels change 4 -> 3; REV needs C -> C",
                       "odd_0": "odd channel count 3; the coupling splits channels in two equal halves",
                       "down_0": "stride (2, 2, 2) is not 1"}
    misc = torch.fx.symbolic_trace(Misc())
    reasons = rev_ineligible_reasons(misc, _meta(1, 4, 8, 8, 8))
    assert find_rev_candidates(misc, _meta(1, 4, 8, 8, 8)) == []
    assert reasons["valid_0"].startswith("padding (0, 0, 0) with kernel (3, 3, 3) changes the spatial shape")
    assert reasons["dilated_0"] == "dilation (2, 2, 2) is not 1"
    assert reasons["grouped_0"] == "groups 2 is not 1"
    assert reasons["conv_two_users"].startswith("the convolution's output has 2 users")
    assert reasons["shared"].startswith("module 'shared' is called more than once")
    assert reasons["bn_sig_0"].startswith("the BatchNorm is followed by call_module bn_sig.2, not a ReLU")


def test_check_rev_candidate_raises_naming_node_and_reason():
    gm = torch.fx.symbolic_trace(SkipNet())
    x = _meta(2, 1, 8, 8, 8)
    assert check_rev_candidate(gm, "mid_0", x).name == "mid.0"
    with pytest.raises(RevEligibilityError, match=r"'odd_0' is not REV-eligible: odd channel count 3"):
        check_rev_candidate(gm, "odd_0", x)
    with pytest.raises(ValueError, match=r"'down_0' is not REV-eligible: stride \(2, 2, 2\) is not 1"):
        check_rev_candidate(gm, "down_0", x)
    with pytest.raises(MemplanError, match="no node named 'nope'"):
        check_rev_candidate(gm, "nope", x)


def test_substitute_rejects_bad_or_stale_candidates():
    gm = torch.fx.symbolic_trace(SkipNet())
    found = find_rev_candidates(gm, _meta(2, 1, 8, 8, 8))
    with pytest.raises(RevEligibilityError, match="channels is 6 in the candidate but 4 in the graph"):
        substitute_rev(gm, [dataclasses.replace(found[0], channels=6)])
    with pytest.raises(RevEligibilityError, match=r"'odd_0' \(odd.0\) is not REV-eligible: odd channel count 3"):
        substitute_rev(gm, [dataclasses.replace(found[0], name="odd.0", conv_node="odd_0")])
    with pytest.raises(RevEligibilityError, match="both replace node 'mid_0'"):
        substitute_rev(gm, [found[0], found[0]])
    with pytest.raises(RevEligibilityError, match=r"free_input=True for 'mid.0' is unsafe.*read by other nodes"):
        substitute_rev(gm, found, free_input={"mid.0": True})
    with pytest.raises(RevEligibilityError, match=r"free_input names \['foo'\]"):
        substitute_rev(gm, found, free_input={"foo": True})


def test_substitution_keeps_the_original_and_shares_the_rest():
    torch.manual_seed(0)
    model = SkipNet()
    gm = torch.fx.symbolic_trace(model)
    code_before = gm.code
    x = torch.randn(2, 1, 6, 6, 6)
    gm.eval()
    with torch.no_grad():
        out_before = gm(x)
    found = find_rev_candidates(gm, _meta(2, 1, 6, 6, 6))
    new_gm, reps = substitute_rev(gm, found, example_inputs=_meta(2, 1, 6, 6, 6))
    assert gm.code == code_before and isinstance(gm.get_submodule("mid.0"), nn.Conv3d)
    with torch.no_grad():
        for a, b in zip(gm(x), out_before):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert new_gm.get_submodule("enc.0") is gm.get_submodule("enc.0")
    assert new_gm.get_submodule("down.1") is gm.get_submodule("down.1")
    assert [r.new_module for r in reps] == ["mid.rev_0", "last.rev_0"]
    assert all(isinstance(new_gm.get_submodule(r.new_module), ReversibleBlock) for r in reps)
    for r in reps:
        assert not any(hasattr(new_gm.get_submodule(r.new_module.rpartition(".")[0]), m.rpartition(".")[2])
                       for m in r.replaced)  # replaced layers are gone from the new module
    targets = [n.target for n in new_gm.graph.nodes if n.op == "call_module"]
    assert "mid.0" not in targets and "mid.rev_0" in targets
    new_gm.graph.lint()
    record = json.loads(json.dumps([dataclasses.asdict(r) for r in reps]))
    assert record[0] == {"name": "mid.0", "replaced": ["mid.0", "mid.1", "mid.2"],   # the plan's own record type
                         "new_module": "mid.rev_0", "params_before": 440, "params_after": 224,
                         "free_input": False, "seed": 0}
    assert all(isinstance(r, RevReplacementRecord) for r in reps)
    json.dumps(dataclasses.asdict(found[0]))
    total = lambda m: sum(p.numel() for p in m.parameters())
    assert total(gm) - total(new_gm) == 2 * (440 - 224)


def test_skip_input_stays_alive_and_gradients_match_plain_autograd():
    torch.manual_seed(1)
    gm = torch.fx.symbolic_trace(SkipNet().double())
    new_gm, reps = substitute_rev(gm, find_rev_candidates(gm, _meta(2, 1, 6, 6, 6, dtype=torch.float64)))
    assert {r.name: r.free_input for r in reps} == {"mid.0": False, "last.0": True}
    ref = _plain_reference(new_gm, reps)
    seen = {}
    hooks = [new_gm.get_submodule(r.new_module).register_forward_hook(
        lambda mod, args, out, key=r.name: seen.__setitem__(key, args[0])) for r in reps]
    x = torch.randn(2, 1, 6, 6, 6, dtype=torch.float64)
    weights = [torch.randn(2, 3, 6, 6, 6, dtype=torch.float64), torch.randn(2, 4, 3, 3, 3, dtype=torch.float64),
               torch.randn(2, 4, 6, 6, 6, dtype=torch.float64)]
    outs = new_gm(x.clone().requires_grad_(True))
    assert seen["mid.0"].untyped_storage().nbytes() > 0  # the skip still reads mid's input
    assert seen["last.0"].untyped_storage().nbytes() == 0  # last frees mid's output
    del outs
    seen.clear()
    for hook in hooks:
        hook.remove()
    gx, grads = _grads(new_gm, x, weights)
    gx_ref, grads_ref = _grads(ref, x, weights)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-10, atol=1e-12)
    assert grads.keys() == grads_ref.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-10, atol=1e-12, msg=name)


def test_cat_input_is_freed_and_gradients_match():
    torch.manual_seed(2)
    gm = torch.fx.symbolic_trace(CatNet().double())
    (cand,) = find_rev_candidates(gm, _meta(2, 1, 6, 6, 6, dtype=torch.float64))
    assert cand.dtype == "torch.float64"
    assert cand.input_node == "cat" and cand.input_kept_by == () and default_free_input(cand)
    new_gm, (rep,) = substitute_rev(gm, [cand], seed=3)
    assert rep.free_input
    ref = _plain_reference(new_gm, [rep])
    x = torch.randn(2, 1, 6, 6, 6, dtype=torch.float64)
    weight = [torch.randn(2, 1, 6, 6, 6, dtype=torch.float64)]
    gx, grads = _grads(new_gm, x, weight)
    gx_ref, grads_ref = _grads(ref, x, weight)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-10, atol=1e-12)
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-10, atol=1e-12, msg=name)


def test_graph_input_is_never_freed_and_functional_relu_is_matched():
    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(4, 4, 3, padding="same"), nn.BatchNorm2d(4)

        def forward(self, x):
            return nn.functional.relu(self.bn(self.conv(x)))

    gm = torch.fx.symbolic_trace(Head())
    (cand,) = find_rev_candidates(gm, _meta(1, 4, 5, 5))
    assert cand.input_is_graph_input and cand.padding == (1, 1) and cand.modules == ("conv", "bn")
    assert not default_free_input(cand)
    with pytest.raises(RevEligibilityError, match="'conv' is unsafe: its input 'x' is a graph input"):
        substitute_rev(gm, [cand], free_input={"conv": True})
    new_gm, (rep,) = substitute_rev(gm, [cand], example_inputs=_meta(1, 4, 5, 5))
    assert rep.new_module == "rev_conv" and not rep.free_input
    x = torch.randn(1, 4, 5, 5, requires_grad=True)
    x_before = x.detach().clone()
    new_gm(x).sum().backward()
    assert torch.equal(x.detach(), x_before) and x.grad is not None


def test_fresh_weights_are_seeded_and_leave_the_global_rng_alone():
    gm = torch.fx.symbolic_trace(SkipNet())
    found = find_rev_candidates(gm, _meta(2, 1, 6, 6, 6))
    weights = lambda m: [p.detach().clone() for p in m.parameters()]
    torch.manual_seed(42)
    a, _ = substitute_rev(gm, found, seed=0)
    after_a = torch.rand(3)
    torch.manual_seed(42)
    b, _ = substitute_rev(gm, found, seed=0)
    after_b = torch.rand(3)
    c, _ = substitute_rev(gm, found, seed=1)
    torch.manual_seed(42)
    assert torch.equal(after_a, torch.rand(3)) and torch.equal(after_a, after_b)
    assert all(torch.equal(p, q) for p, q in zip(weights(a.mid.rev_0), weights(b.mid.rev_0)))
    assert not torch.equal(weights(a.mid.rev_0)[0], weights(c.mid.rev_0)[0])
    assert not torch.equal(weights(a.mid.rev_0)[0], weights(a.last.rev_0)[0])
    alone, _ = substitute_rev(gm, [found[1]], seed=0)  # a candidate's weights do not depend on the others
    assert all(torch.equal(p, q) for p, q in zip(weights(a.last.rev_0), weights(alone.last.rev_0)))


def test_meta_module_substitution_stays_on_meta():
    with torch.device("meta"):
        gm = torch.fx.symbolic_trace(SkipNet())
    found = find_rev_candidates(gm, _meta(1, 1, 32, 32, 32))
    new_gm, _ = substitute_rev(gm, found, example_inputs=_meta(1, 1, 32, 32, 32))
    assert {p.device.type for p in new_gm.parameters()} == {"meta"}
    outs = new_gm(_meta(1, 1, 32, 32, 32))
    assert [tuple(o.shape) for o in outs] == [(1, 3, 32, 32, 32), (1, 4, 16, 16, 16), (1, 4, 32, 32, 32)]
