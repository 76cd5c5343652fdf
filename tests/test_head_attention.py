"""The attention module of the head paper (Fig. 3): shapes, channel softmax, T = A * P, fusion."""
import pytest
import torch
import torch.nn.functional as F

from models.head.attention import AttentionModule


@pytest.mark.parametrize("spatial_dims, in_channels, out_channels, inner, kernel", [
    (3, 6, 8, 4, 3), (3, 3, 5, 2, 5), (2, 4, 4, 3, 3),
])
def test_output_and_attention_shapes(spatial_dims, in_channels, out_channels, inner, kernel):
    torch.manual_seed(0)
    am = AttentionModule(spatial_dims, in_channels, out_channels, inner_channels=inner, kernel_size=kernel)
    x = torch.randn(2, in_channels, *([6] * spatial_dims))
    assert am(x).shape == (2, out_channels, *([6] * spatial_dims))
    projected = am.project(x)
    assert projected.shape == (2, inner, *([6] * spatial_dims))
    assert am.attention_map(projected).shape == projected.shape
    assert am.project.kernel_size == (1,) * spatial_dims
    assert [m.kernel_size for m in am.weigh if hasattr(m, "kernel_size")] == [(kernel,) * spatial_dims] * 2


def test_paper_defaults_project_to_32_and_emit_64():
    am = AttentionModule(3, 128)
    assert am.project.out_channels == 32
    assert am.fuse[0].in_channels == 64 and am.fuse[0].out_channels == 64


def test_attention_sums_to_one_across_channels_and_lies_in_open_unit_interval():
    torch.manual_seed(1)
    am = AttentionModule(3, 5, 6, inner_channels=7)
    a = am.attention_map(am.project(3 * torch.randn(2, 5, 5, 4, 6)))
    torch.testing.assert_close(a.sum(dim=1), torch.ones(2, 5, 4, 6))
    assert (a > 0).all() and (a < 1).all()
    # Not a softmax over space: spatial sums of one channel differ from 1.
    assert not torch.allclose(a.sum(dim=(2, 3, 4)), torch.ones(2, 7))


def test_zero_weights_give_uniform_attention_and_forward_is_fuse_of_p_and_p_over_c():
    torch.manual_seed(2)
    am = AttentionModule(3, 3, 4, inner_channels=4).eval()
    last = am.weigh[-1]
    torch.nn.init.zeros_(last.weight)
    torch.nn.init.zeros_(last.bias)
    x = torch.randn(1, 3, 4, 4, 4)
    p = F.conv3d(x, am.project.weight, am.project.bias)  # independent 1x1x1 projection
    torch.testing.assert_close(am.attention_map(p), torch.full_like(p, 0.25))
    expected = am.fuse(torch.cat([p, p / 4], dim=1))
    torch.testing.assert_close(am(x), expected)


def test_dominant_channel_takes_the_attention():
    am = AttentionModule(3, 2, 2, inner_channels=3)
    last = am.weigh[-1]
    torch.nn.init.zeros_(last.weight)
    with torch.no_grad():
        last.bias.copy_(torch.tensor([0.0, 10.0, 0.0]))
    a = am.attention_map(am.project(torch.randn(1, 2, 3, 3, 3)))
    expected = torch.softmax(torch.tensor([0.0, 10.0, 0.0]), 0)  # e^10 / (e^10 + 2)
    torch.testing.assert_close(a[0, :, 1, 1, 1], expected)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="inner_channels must be a positive int, got 0"):
        AttentionModule(3, 4, 4, inner_channels=0)
    with pytest.raises(ValueError, match="kernel_size must be an odd positive int.*got 4"):
        AttentionModule(3, 4, 4, kernel_size=4)
