"""USegNet-DS-HAS layout (head paper §2.3-2.4): levels, kernels, SAM/UAM placement, outputs, fx."""
import pytest
import torch
import torch.fx
from torch import nn

from models.head.attention import AttentionModule
from models.head.net import PAPER_CONFIG, PAPER_INPUT_SIZE, TINY_CONFIG, HeadNetConfig, USegNetHAS


def _tiny():
    torch.manual_seed(0)
    return USegNetHAS.from_config(TINY_CONFIG)


def test_paper_layout_three_pools_two_convs_per_block_and_3_then_5_kernels():
    net = USegNetHAS()
    assert net.config == PAPER_CONFIG and net.config.pools == 3
    for encoder, k, width in zip(net.encoders, (3, 3, 5, 5), (32, 64, 64, 64)):
        convs = [m for m in encoder.modules() if isinstance(m, nn.Conv3d)]
        bns = [m for m in encoder.modules() if isinstance(m, nn.BatchNorm3d)]
        relus = [m for m in encoder.modules() if isinstance(m, nn.ReLU)]
        assert len(convs) == len(bns) == len(relus) == 2
        assert {c.kernel_size for c in convs} == {(k, k, k)} and convs[-1].out_channels == width
    assert sum(isinstance(m, nn.MaxPool3d) for m in net.modules()) == 1  # one module, applied 3 times
    assert len(net.sams) == len(net.uams) == 3
    assert all(isinstance(m, AttentionModule) for m in [*net.sams, *net.uams])
    # UAM inputs are concatenations: up-sampled features (channels[i]) + SAM output (64).
    assert [u.project.in_channels for u in net.uams] == [32 + 64, 64 + 64, 64 + 64]
    assert all(h.kernel_size == (1, 1, 1) for h in net.heads)


def test_outputs_main_then_aux_at_half_and_quarter():
    net = _tiny()
    outs = net(torch.randn(1, 1, 16, 24, 32))
    assert [tuple(o.shape) for o in outs] == [(1, 2, 16, 24, 32), (1, 2, 8, 12, 16), (1, 2, 4, 6, 8)]


def test_aux_heads_read_the_uams():
    """Auxiliary outputs are 1x1x1 convs of the UAM outputs (§2.4: losses behind the UAMs)."""
    net = _tiny().eval()
    seen = {}
    hooks = [net.uams[i].register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(i, out)) for i in range(3)]
    outs = net(torch.randn(1, 1, 16, 16, 16))
    for h in hooks:
        h.remove()
    for i in range(3):
        torch.testing.assert_close(outs[i], net.heads[i](seen[i]))


def test_every_skip_goes_through_a_sam():
    """Changing a SAM's output changes the result: the skip is not bypassed."""
    net = _tiny().eval()
    x = torch.randn(1, 1, 16, 16, 16)
    before = net(x)[0]
    for sam in net.sams:
        with torch.no_grad():
            sam.fuse[1].bias.add_(1.0)
        after = net(x)[0]
        assert not torch.allclose(before, after)
        before = after


def test_fx_trace_matches_eager():
    net = _tiny().eval()
    gm = torch.fx.symbolic_trace(net)
    x = torch.randn(1, 1, 16, 16, 16)
    for a, b in zip(gm(x), net(x)):
        torch.testing.assert_close(a, b)


def test_paper_input_size_is_valid_and_bad_sizes_are_named():
    net = _tiny()
    net.check_input_shape(PAPER_INPUT_SIZE)
    with pytest.raises(ValueError, match=r"\(21, 16, 16\) must have 3 sizes, each a multiple of 8.*\(24, 16, 16\)"):
        net.check_input_shape((21, 16, 16))


def test_config_validation():
    with pytest.raises(ValueError, match="kernel sizes must be odd"):
        HeadNetConfig(kernel_sizes=(3, 3, 4, 5))
    with pytest.raises(ValueError, match="one entry per level"):
        HeadNetConfig(channels=(4, 8, 8))
    with pytest.raises(ValueError, match="out_channels counts classes.*got 1"):
        USegNetHAS(3, 1, 1)


def test_ablation_switches_remove_what_they_name():
    """USegNet-DS (no attention), USegNet-HAS without DS, and one module type at a time (Table 2 rows)."""
    def count(net, kind):
        return sum(1 for m in net.modules() if type(m).__name__ == kind)
    cfg = TINY_CONFIG
    full = USegNetHAS.from_config(cfg)
    assert count(full, "AttentionModule") == 6 and len(full(torch.zeros(1, 1, 16, 16, 16))) == 3
    no_ds = USegNetHAS.from_config(HeadNetConfig(**{**cfg.__dict__, "deep_supervision": False}))
    outs = no_ds(torch.zeros(1, 1, 16, 16, 16))
    assert len(outs) == 1 and outs[0].shape == (1, 2, 16, 16, 16) and len(no_ds.heads) == 1
    no_sam = USegNetHAS.from_config(HeadNetConfig(**{**cfg.__dict__, "sam": False}))
    assert count(no_sam, "AttentionModule") == 3
    # without SAM a skip enters raw: UAM i reads channels[i] (up) + channels[i] (skip)
    assert no_sam.uams[0].project.in_channels == 4 + 4 and full.uams[0].project.in_channels == 4 + 8
    plain = USegNetHAS.from_config(HeadNetConfig(**{**cfg.__dict__, "sam": False, "uam": False}))
    assert count(plain, "AttentionModule") == 0
    assert [o.shape for o in plain(torch.zeros(1, 1, 16, 16, 16))] == [o.shape for o in full(torch.zeros(1, 1, 16, 16, 16))]


def test_convs_start_from_a_truncated_normal():
    torch.manual_seed(0)
    net = USegNetHAS.from_config(PAPER_CONFIG)
    conv = net.encoders[2][0][0]                       # a 5x5x5 conv, 64 in-channels: He std sqrt(2 / (64 * 125))
    std = (2 / (64 * 125)) ** 0.5
    w = conv.weight.detach()
    assert float(w.abs().max()) <= 2 * std + 1e-9
    # a N(0, s) truncated at 2s has std 0.8796 s
    assert float(w.std()) == pytest.approx(0.8796 * std, rel=0.02)
