"""The pose U-Net: parameter counts in the docstrings, shapes, fx tracing, no state writes, arguments."""
import re

import pytest
import torch

from models.blocks import count_parameters
from models.pose.net import PoseUNet, check_input_size, fetusmap, fetusmap_v2


def _documented_count(factory) -> int:
    return int(re.search(r"([\d,]+) parameters", factory.__doc__).group(1).replace(",", ""))


@pytest.mark.parametrize("factory, landmarks", [(fetusmap_v2, 22), (fetusmap, 16)])
def test_named_configurations_match_their_docstrings(factory, landmarks):
    with torch.device("meta"):
        net = factory()
    assert net.head.out_channels == landmarks
    assert count_parameters(net) == _documented_count(factory)


def test_parameter_count_by_hand():
    # depth 1, base 2, 1 -> 3 landmarks, one conv per block:
    # enc0 conv 1->2 (54, no bias) + BN (4); enc1 conv 2->4 (216) + BN (8);
    # up 4->2 transposed 2^3 (64) + BN (4); dec0 conv 4->2 (216) + BN (4); head 2->3 (6 + 3)
    net = PoseUNet(3, 1, 3, channels=2, depth=1, convs=1)
    assert count_parameters(net) == 54 + 4 + 216 + 8 + 64 + 4 + 216 + 4 + 9


def test_shapes_and_fx_trace_equal_eager():
    torch.manual_seed(0)
    net = PoseUNet(3, 1, 22, channels=4, depth=2)
    x = torch.randn(1, 1, 16, 8, 12)
    out = net(x)
    assert out.shape == (1, 22, 16, 8, 12)
    traced = torch.fx.symbolic_trace(net)
    torch.testing.assert_close(traced(x), out)


def test_forward_writes_no_state_and_train_equals_eval():
    torch.manual_seed(0)
    net = PoseUNet(3, 1, 5, channels=4, depth=2)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(1, 1, 8, 8, 8)
    y_train = net.train()(x)
    y_eval = net.eval()(x)
    torch.testing.assert_close(y_train, y_eval)          # BN uses batch statistics in both modes (V2 §4.1)
    after = net.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not any("running" in k for k in after)


@pytest.mark.parametrize("kwargs, match", [
    (dict(channels=0), "channels must be a positive int"),
    (dict(depth=0), "depth .* must be a positive int"),
    (dict(out_channels=-1), "out_channels must be a positive int"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PoseUNet(**{"spatial_dims": 3, "in_channels": 1, "out_channels": 22, **kwargs})


def test_input_size_divisibility():
    check_input_size((176, 112, 112), 4)
    with pytest.raises(ValueError, match=r"sides \[100\] not divisible by 2\*\*depth = 16; use e.g. 176,96,112"):
        check_input_size((176, 100, 112), 4)
