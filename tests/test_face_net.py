"""Face RPN network: structure, tracing, head layout consistent with anchor order, argument errors."""
import pytest
import torch
import torch.fx

from models.face.anchors import generate_anchors
from models.face.net import FEATURE_STRIDE, FaceRPN, flatten_head, tiny_config


def test_head_shapes_and_stride():
    torch.manual_seed(0)
    net = FaceRPN(**tiny_config())
    cls, reg = net(torch.randn(2, 1, 16, 24, 32))
    assert cls.shape == (2, 64 * 6, 4, 6, 8) and reg.shape == (2, 64 * 6, 4, 6, 8)
    # FEATURE_STRIDE (what make_anchors uses) must be the network's real stride on every axis
    assert tuple(n // FEATURE_STRIDE for n in (16, 24, 32)) == tuple(cls.shape[2:])
    assert FaceRPN(**tiny_config())(torch.zeros(1, 1, 40, 8, 16))[0].shape[2:] == (40 // FEATURE_STRIDE, 2, 4)


def test_block4_is_upsampled_and_concatenated_with_block3():
    net = FaceRPN(**tiny_config())
    gm = torch.fx.symbolic_trace(net)
    cats = [n for n in gm.graph.nodes if n.target is torch.cat]
    assert len(cats) == 1
    sources = [a.target for a in cats[0].args[0]]
    assert sources == ["block3.1.2", "up"]        # the block-3 ReLU output and the upsampled block 4
    x = torch.randn(1, 1, 16, 16, 16)
    net.eval()
    for got, want in zip(gm(x), net(x)):
        assert torch.equal(got, want)


def test_vgg_blocks_have_two_conv_bn_relu():
    net = FaceRPN(**tiny_config())
    for block in (net.block1, net.block2, net.block3, net.block4):
        kinds = [type(m).__name__ for layer in block for m in layer]
        assert kinds == ["Conv3d", "BatchNorm3d", "ReLU"] * 2
        assert all(layer[0].kernel_size == (3, 3, 3) for layer in block)
    assert net.cls.kernel_size == (1, 1, 1) and net.reg.kernel_size == (1, 1, 1)


def test_flatten_head_matches_anchor_order():
    # write into each channel/cell a code of (cell, anchor) and check row r decodes to anchor r
    a, k1, grid = 64, 6, (2, 3, 2)
    cells = torch.arange(12.0).reshape(1, 1, 1, *grid)
    anchor = torch.arange(float(a)).reshape(1, a, 1, 1, 1, 1)
    cls_map = (cells * 1000 + anchor).expand(1, a, k1, *grid).reshape(1, a * k1, *grid)
    reg_map = (cells * 1000 + anchor).expand(1, a, 6, *grid).reshape(1, a * 6, *grid)
    scores, deltas = flatten_head(cls_map, reg_map, a)
    anchors = generate_anchors(grid, 4)
    cell_of_row = (scores[0, :, 0] // 1000).long()
    anchor_of_row = (scores[0, :, 0] % 1000).long()
    centres = torch.stack(torch.meshgrid(*[torch.arange(n) * 4 + 1.5 for n in grid], indexing="ij"), -1).reshape(-1, 3)
    assert torch.equal(anchors[:, :3], centres[cell_of_row])
    assert torch.equal(anchor_of_row, torch.arange(scores.shape[1]) % a)
    assert torch.equal(deltas[0, :, 0], scores[0, :, 0])


@pytest.mark.parametrize("kwargs, match", [({"spatial_dims": 2}, "spatial_dims must be 3"),
                                           ({"channels": (4, 8, 8)}, "4 block widths"),
                                           ({"in_channels": 0}, "in_channels"),
                                           ({"num_landmarks": 0}, "num_landmarks")])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FaceRPN(**{**tiny_config(), **kwargs})


def test_flatten_head_rejects_wrong_anchor_count():
    with pytest.raises(ValueError, match="do not fit 5 anchors"):
        flatten_head(torch.zeros(1, 12, 1, 1, 1), torch.zeros(1, 12, 1, 1, 1), 5)
