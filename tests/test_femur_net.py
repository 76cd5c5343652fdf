"""Branched femur network and pair discriminator: outputs, cross connections, traceability."""
import networkx as nx
import pytest
import torch
from torch import nn

from memplan.trace import trace
from models.femur.adversarial import AdversarialSchedule, PairDiscriminator
from models.femur.net import BranchConfig, BranchedFemurNet

TINY = (2, 4, 4, 8)


def _grads(net, output_index):
    """Parameter names whose gradient is non-zero for the sum of output ``output_index``."""
    net.zero_grad()
    x = torch.randn(2, 1, 16, 16, 16)
    out = net(x)[output_index]
    (out * torch.randn_like(out)).sum().backward()
    return {n for n, p in net.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}


def test_outputs_are_probabilities_and_two_heatmaps():
    torch.manual_seed(0)
    net = BranchedFemurNet(3, 1, 3, channels=TINY)
    seg, h1, h2 = net(torch.randn(1, 1, 16, 8, 24))
    assert seg.shape == (1, 3, 16, 8, 24) and h1.shape == h2.shape == (1, 1, 16, 8, 24)
    assert torch.allclose(seg.sum(1), torch.ones(1, 16, 8, 24), atol=1e-5) and bool((seg >= 0).all())
    assert not torch.equal(h1, h2)


def test_cross_connections_carry_gradients_both_ways():
    torch.manual_seed(0)
    net = BranchedFemurNet(3, 1, 2, channels=TINY)
    seg_grads, heat_grads = _grads(net, 0), _grads(net, 1)
    # loc -> seg (one connection): the localisation path up to loc_dec2 feeds the segmentation
    assert any(n.startswith("loc_enc2") for n in seg_grads) and any(n.startswith("loc_dec2") for n in seg_grads)
    assert not any(n.startswith(("loc_dec1", "loc_dec0", "loc_head")) for n in seg_grads)
    # seg -> loc (two connections): the segmentation bottom and its 1/2-resolution decoder feed the heatmaps
    assert any(n.startswith("seg_bottom") for n in heat_grads) and any(n.startswith("seg_dec1") for n in heat_grads)
    assert not any(n.startswith(("seg_dec0", "seg_head", "seg_up0")) for n in heat_grads)
    assert any(n.startswith("stem") for n in seg_grads & heat_grads)   # the shared encoder


def test_architecture_follows_the_paper():
    net = BranchedFemurNet(3, 1, 2, channels=TINY)
    convs = [m for m in net.modules() if isinstance(m, nn.Conv3d) and m.kernel_size != (1, 1, 1)]
    assert {m.kernel_size for m in convs} == {(3, 3, 3)}
    # the localisation branch is one level deeper than the segmentation branch
    assert net.loc_bottom[0][0].out_channels == TINY[3] and net.seg_bottom[0][0].out_channels == TINY[2]


def test_fx_trace_matches_eager():
    torch.manual_seed(0)
    net = BranchedFemurNet(3, 1, 2, channels=TINY).eval()
    gm = torch.fx.symbolic_trace(net)
    x = torch.randn(1, 1, 16, 16, 16)
    for a, b in zip(net(x), gm(x)):
        assert torch.equal(a, b)


def test_memplan_traces_two_branches_and_three_outputs():
    net = BranchedFemurNet(3, 1, 2, channels=TINY)
    g = trace(net, torch.empty(1, 1, 16, 16, 16, device="meta"))
    assert len(g.outputs) == 3
    seg_out, h1_out, h2_out = g.outputs
    anc = {o: nx.ancestors(g.dag, o) | {o} for o in g.outputs}
    assert anc[h1_out] - {h1_out} == anc[h2_out] - {h2_out}

    def has(o, prefix):
        return any(n.startswith(prefix) for n in anc[o])
    assert has(seg_out, "seg_head") and not has(h1_out, "seg_head") and not has(h1_out, "seg_dec0")
    assert has(h1_out, "loc_head") and not has(seg_out, "loc_head") and not has(seg_out, "loc_dec1")
    assert has(h1_out, "seg_bottom") and has(h1_out, "seg_dec1") and has(seg_out, "loc_dec2")   # cross links
    # branching makes the graph wider than a chain: more lower sets than nodes + 1
    assert g.count_lower_sets(100_000) > len(g) + 1


def test_network_validation():
    with pytest.raises(ValueError, match=r"spatial_dims must be 3, got 2"):
        BranchedFemurNet(2, 1, 2)
    with pytest.raises(ValueError, match=r"out_channels .* must be >= 2, got 1"):
        BranchedFemurNet(3, 1, 1)
    with pytest.raises(ValueError, match=r"channels must have 4 widths"):
        BranchConfig(channels=(2, 4, 8))
    with pytest.raises(ValueError, match=r"\(12, 16, 16\) must be 3 sizes divisible by 8"):
        BranchedFemurNet.check_input_shape((12, 16, 16))


def test_discriminator_layout_and_any_input_size():
    torch.manual_seed(0)
    d = PairDiscriminator(3, 4, channels=(2, 2, 4, 4, 4, 4))
    convs = [m for m in d.modules() if isinstance(m, nn.Conv3d)]
    assert len(convs) == 6 and all(m.kernel_size == (4, 4, 4) for m in convs)
    assert [m.stride[0] for m in convs] == [2, 2, 1, 1, 1, 1]
    assert d(torch.randn(2, 4, 16, 16, 16)).shape == d(torch.randn(2, 4, 12, 20, 8)).shape == (2, 1)
    # stride-1 layers keep the size: two halvings only
    assert d.features(torch.randn(1, 4, 16, 16, 16)).shape[2:] == (4, 4, 4)
    with pytest.raises(ValueError, match=r"6 widths"):
        PairDiscriminator(3, 4, channels=(2, 2))
    with pytest.raises(ValueError, match=r"branch_epochs=-1"):
        AdversarialSchedule(-1, 2)


def test_without_cross_connections_the_branches_share_only_the_encoder():
    """BRN / BRND: the segmentation output does not depend on the localization branch, nor back."""
    torch.manual_seed(0)
    net = BranchedFemurNet(3, 1, 2, channels=(2, 4, 4, 8), cross=False).eval()
    x = torch.randn(1, 1, 16, 16, 16)
    seg, h1, h2 = net(x)
    with torch.no_grad():
        for p in net.loc_enc2.parameters():      # change the localization branch only
            p.add_(1.0)
        seg2, h1b, _ = net(x)
    assert torch.equal(seg, seg2) and not torch.equal(h1, h1b)
    with_cross = BranchedFemurNet(3, 1, 2, channels=(2, 4, 4, 8)).eval()
    assert with_cross.loc_bottom[0][0].in_channels == 2 * 4 and net.loc_bottom[0][0].in_channels == 4
    from models.blocks import count_parameters
    assert count_parameters(with_cross) > count_parameters(net)


def test_unet_s_and_unet_l_are_the_two_branches_of_brn():
    """Unet-S / Unet-L: "the same encoder, decoder and skip connections as the segmentation / localization
    branch of BRN": their parameters add up to BRN's plus one shared encoder."""
    from models.blocks import count_parameters
    widths = (2, 4, 4, 8)
    brn = BranchedFemurNet(3, 1, 2, channels=widths, cross=False)
    seg = BranchedFemurNet(3, 1, 2, channels=widths, cross=False, branches="seg")
    loc = BranchedFemurNet(3, 1, 2, channels=widths, cross=False, branches="loc")
    encoder = count_parameters(brn.stem) + count_parameters(brn.enc1)
    assert count_parameters(seg) + count_parameters(loc) == count_parameters(brn) + encoder
    x = torch.randn(1, 1, 16, 16, 16)
    (probs,) = seg(x)
    h1, h2 = loc(x)
    assert probs.shape == (1, 2, 16, 16, 16) and h1.shape == h2.shape == (1, 1, 16, 16, 16)
    # with BRN's weights, each baseline computes exactly BRN's corresponding outputs (no cross connections)
    seg.load_state_dict({k: v for k, v in brn.state_dict().items() if k in seg.state_dict()})
    loc.load_state_dict({k: v for k, v in brn.state_dict().items() if k in loc.state_dict()})
    brn.eval(), seg.eval(), loc.eval()
    full = brn(x)
    assert torch.allclose(seg(x)[0], full[0], atol=1e-6) and torch.allclose(loc(x)[1], full[2], atol=1e-6)
    with pytest.raises(ValueError, match="no cross connections"):
        BranchedFemurNet(3, 1, 2, channels=widths, branches="seg")
