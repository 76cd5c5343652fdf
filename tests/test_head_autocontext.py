"""Auto-context (head paper §2.5): level k input = volume + level k-1 foreground probability."""
import pytest
import torch
from torch import nn

from models.head.autocontext import AutoContext, context_input, foreground_probability
from models.head.net import TINY_CONFIG, USegNetHAS
from models.head.train import level_input


class _Echo(nn.Module):
    """Logits (0, scale * x): background 0, head = scaled input, so softmax fg = sigmoid(scale * x)."""

    def __init__(self, scale):
        super().__init__()
        self.scale = scale

    def forward(self, x):
        return (torch.cat([torch.zeros_like(x), self.scale * x], dim=1),)


def test_context_input_is_elementwise_sum_and_level0_map_is_zero():
    v = torch.randn(1, 1, 3, 3, 3)
    p = torch.rand(1, 1, 3, 3, 3)
    torch.testing.assert_close(context_input(v, p), v + p)
    torch.testing.assert_close(context_input(v, None), v)
    with pytest.raises(ValueError, match=r"probability map shape \(1, 2, 3, 3, 3\) must equal"):
        context_input(v, torch.rand(1, 2, 3, 3, 3))


def test_foreground_probability_is_softmax_channel_one():
    logits = torch.tensor([0.0, 2.0]).reshape(1, 2, 1)
    assert float(foreground_probability(logits)) == pytest.approx(1 / (1 + torch.e ** -2))


def test_cascade_feeds_volume_plus_previous_probability():
    v = torch.randn(2, 1, 4, 4, 4)
    out1, out2 = AutoContext([_Echo(3.0), _Echo(1.0)])(v)
    torch.testing.assert_close(out1[:, 1:2], 3.0 * v)                         # level 1 sees X + 0
    torch.testing.assert_close(out2[:, 1:2], v + torch.sigmoid(3.0 * v))      # level 2 sees X + Y^1


def test_training_inputs_use_frozen_previous_levels_in_eval_mode():
    torch.manual_seed(0)
    level1 = USegNetHAS.from_config(TINY_CONFIG)
    v = torch.randn(1, 1, 16, 16, 16)
    torch.testing.assert_close(level_input([], v), v)
    level1.train()
    got = level_input([level1], v)
    assert level1.training  # mode restored
    level1.eval()
    expected = v + torch.softmax(level1(v)[0], dim=1)[:, 1:2]
    torch.testing.assert_close(got, expected)
    assert not got.requires_grad
