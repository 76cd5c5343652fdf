import itertools

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import memplan
from memplan import TraceError
from tests.nets import (ProxyTypeCheck, RandomDAGNet, ResNet3D, ShapeBranch, TinyUNet3D, TwoBranch,
                        ValueBranch, random_spec)

META = dict(device="meta")


def test_unet_with_concatenated_skips_has_exact_bytes():
    g = memplan.trace(TinyUNet3D(width=4), torch.empty(1, 1, 16, 16, 16, **META))
    first_conv = g.info("enc1_0_0")
    assert first_conv.out_bytes == 4 * 16**3 * 4                 # 4 channels, float32
    assert first_conv.saved_input_bytes == 1 * 16**3 * 4         # conv keeps its (graph) input
    pool = g.info("pool")
    assert pool.saved_from == ("enc1_1_2",)                       # max-pool keeps its input ...
    assert pool.saved_extra_bytes == 4 * 8**3 * 8                 # ... and int64 indices
    cats = [i for i in g if i.target == "cat"]
    assert len(cats) == 2
    assert all(len(list(g.dag.predecessors(c.name))) == 2 for c in cats)
    assert all(c.saved_from == () for c in cats)                  # cat's backward keeps nothing
    relu = g.info("enc1_0_2")
    assert relu.saved_from == ("enc1_0_2",)                       # relu keeps its own output
    bn = g.info("enc1_0_1")
    assert bn.saved_from == ("enc1_0_0",) and bn.saved_extra_bytes == 2 * 4 * 4   # mean, invstd
    assert g.outputs == ("head",)
    assert g.tracer == "fx"
    # a U-Net whose skips are plain edges has exactly n + 1 lower sets (its lower sets are prefixes)
    assert g.count_lower_sets() == len(g) + 1


def test_residual_net_and_flops():
    g = memplan.trace(ResNet3D(width=2, blocks=2), torch.empty(1, 1, 8, 8, 8, **META))
    adds = [i for i in g if i.target == "add"]
    assert len(adds) == 2
    stem = g.info("stem")
    # a 3x3x3 conv from 1 to 2 channels on 8^3 outputs: 2 * 27 * 1 * 2 * 512 FLOPs
    assert stem.flops == 2 * 27 * 1 * 2 * 512
    assert g.param_bytes == sum(p.numel() * 4 for p in ResNet3D(width=2, blocks=2).parameters())


def test_two_branches_two_outputs():
    g = memplan.trace(TwoBranch(), torch.empty(2, 1, 8, 8, 8, **META))
    assert len(g.outputs) == 2
    assert len(list(g.dag.successors("stem_2"))) == 2


def test_fx_fails_export_succeeds():
    g = memplan.trace(ShapeBranch(), torch.randn(1, 1, 4, 4, 4))
    assert g.tracer == "export"
    assert any("fx" in note for note in g.trace_notes)


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_silently_wrong_fx_trace_is_caught(device):
    x = torch.randn(1, 1, 6, 6, 6) if device == "cpu" else torch.empty(1, 1, 6, 6, 6, **META)
    g = memplan.trace(ProxyTypeCheck(), x)
    assert g.tracer == "export"
    assert "fx: traced, but" in g.trace_notes[0]
    assert sum(i.target.startswith("add") for i in g) == 1       # the skip the fx trace dropped is there


def test_untraceable_model_raises_trace_error_naming_model_construct_line_and_fix():
    # a Python `if` on a tensor value: named with the model's own file:line and a fix for that construct
    with pytest.raises(TraceError, match=r"(?s)ValueBranch.*nets\.py:\d+.*Fix:.*tensor's values.*torch\.where"):
        memplan.trace(ValueBranch(), torch.randn(1, 1, 4, 4, 4))


def test_validation_leaves_batchnorm_statistics_untouched():
    net = TinyUNet3D()
    before = [b.clone() for b in net.buffers()]
    memplan.trace(net, torch.randn(1, 1, 8, 8, 8))
    assert all(torch.equal(a, b) for a, b in zip(before, net.buffers()))


@pytest.mark.parametrize("name", ["UNet", "AttentionUnet"])
def test_monai_networks_trace_and_validate(name):
    nets = pytest.importorskip("monai.networks.nets")
    cls = getattr(nets, name)
    net = cls(spatial_dims=3, in_channels=1, out_channels=2, channels=(4, 8, 16), strides=(2, 2))
    g = memplan.trace(net, torch.randn(1, 1, 16, 16, 16))
    assert g.tracer == "fx"
    assert len(g) > 10
    assert g.dag.number_of_nodes() == len(g.order)


def _brute_force_lower_sets(g) -> int:
    nodes = g.order
    preds = {n: set(g.dag.predecessors(n)) for n in nodes}
    count = 0
    for r in range(len(nodes) + 1):
        for subset in itertools.combinations(nodes, r):
            s = set(subset)
            count += all(preds[n] <= s for n in s)
    return count


def test_lower_sets_bound_and_count():
    g = memplan.trace(TwoBranch(), torch.empty(1, 1, 8, 8, 8, **META))
    # by hand: a 3-node stem (conv, bn, relu), then two independent chains, seg (4 nodes) and loc (7):
    # a proper prefix of the stem (3 sets: 0, 1 or 2 nodes), or the whole stem and any prefix of each
    # branch ((4 + 1) * (7 + 1) = 40 sets)
    assert len(g) == 14 and g.count_lower_sets() == 3 + 5 * 8 == _brute_force_lower_sets(g)
    assert g.count_lower_sets(bound=43) == 43 and g.count_lower_sets(bound=42) is None
    assert g.count_lower_sets(bound=3) is None


def _hooked_saved_bytes(model, x) -> int:
    """Bytes of activation storages a real eager forward saves for backward (params/input excluded)."""
    skip = {p.untyped_storage()._cdata for p in list(model.parameters()) + list(model.buffers())}
    skip.add(x.untyped_storage()._cdata)
    saved = {}

    def pack(t):
        key = t.untyped_storage()._cdata
        if key not in skip:
            saved[key] = t
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    return sum(t.untyped_storage().nbytes() for t in saved.values())


def _graph_saved_bytes(g) -> int:
    roots = set()
    for info in g:
        roots.update(info.saved_from)
    return sum(g.info(r).out_bytes for r in roots) + sum(i.saved_extra_bytes for i in g)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), n=st.integers(min_value=2, max_value=9))
def test_random_dag_nets_trace_validate_and_saved_bytes_match_autograd(data, n):
    spec = random_spec(lambda lo, hi: data.draw(st.integers(lo, hi)), n)
    net = RandomDAGNet(spec, channels=2)
    x = torch.randn(1, 1, 4, 4, 4)
    g = memplan.trace(net, x)                     # validates against eager values
    assert g.tracer == "fx"
    assert _graph_saved_bytes(g) == _hooked_saved_bytes(net, x)
    if len(g) <= 12:
        assert g.count_lower_sets() == _brute_force_lower_sets(g)
