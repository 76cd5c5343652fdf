import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import memplan
from memplan import MemplanError
from tests.nets import TinyUNet3D

META = dict(device="meta")


def test_linear_sgd_peak_by_hand():
    # Peak is the weight-gradient matmul: W (4e6 B) + dW (4e6 B) + x (1000 floats) + loss scalar
    # + the ones_like gradient scalar that sum's backward expands; the training loop's `out`
    # (1000 floats) is alive through backward unless keep_output=False.
    net, x = nn.Linear(1000, 1000, bias=False), torch.empty(1, 1000, **META)
    r = memplan.simulate_step(net, x, optimizer="sgd")
    assert r.peak_bytes == 4_000_000 + 4_000_000 + 4_000 + 4 + 4 + 4_000
    assert r.breakdown["parameters"] == 4_000_000
    dropped = memplan.simulate_step(net, x, optimizer="sgd", keep_output=False)
    assert dropped.peak_bytes == 4_000_000 + 4_000_000 + 4_000 + 4 + 4


def test_mlp_sgd_momentum_peak_by_hand():
    # Second step, at the first layer's weight gradient: W1 80000 + W2 8000, momentum 88000, x 3200,
    # dW2 8000 (already in .grad), d(pre-relu) 6400, dW1 80000, loss and ones 4 + 4.
    # The relu output (6400) is released after threshold_backward; the pre-relu output was never kept.
    net = nn.Sequential(nn.Linear(100, 200, bias=False), nn.ReLU(), nn.Linear(200, 10, bias=False))
    r = memplan.simulate_step(net, torch.empty(8, 100, **META), optimizer="sgd-momentum", keep_output=False)
    assert r.peak_bytes == 80_000 + 8_000 + 88_000 + 3_200 + 8_000 + 6_400 + 80_000 + 8
    kept = memplan.simulate_step(net, torch.empty(8, 100, **META), optimizer="sgd-momentum")
    assert kept.peak_bytes == r.peak_bytes + 8 * 10 * 4          # plus the 8x10 output the loop holds
    assert r.breakdown["optimizer state"] == 88_000
    assert r.breakdown["gradients"] == 8_000


def test_optimizer_none_and_adam_differ_by_state():
    net = nn.Linear(10, 10)
    x = torch.empty(4, 10, **META)
    none = memplan.simulate_step(net, x, optimizer="none").peak_bytes
    adam = memplan.simulate_step(net, x, optimizer="adam").peak_bytes
    assert adam > none + 2 * 440 - 1          # exp_avg + exp_avg_sq of 110 floats at least


def test_simulate_does_not_touch_the_model():
    net = TinyUNet3D()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    memplan.simulate_step(net, torch.randn(1, 1, 8, 8, 8))
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert all(p.grad is None for p in net.parameters())


def test_simulate_sees_checkpoint_savings_and_custom_functions():
    chain = nn.Sequential(*[nn.Sequential(nn.Conv3d(4, 4, 3, padding=1), nn.ReLU()) for _ in range(6)])

    class Ckpt(nn.Module):
        def __init__(self):
            super().__init__()
            self.chain = chain

        def forward(self, x):   # two halves: only one half's activations are alive in backward
            x = checkpoint(self.chain[:3], x, use_reentrant=False)
            return checkpoint(self.chain[3:], x, use_reentrant=False)

    class Square(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return x * x

        @staticmethod
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            return 2 * x * g

    class WithFn(nn.Module):
        def __init__(self):
            super().__init__()
            self.chain = chain

        def forward(self, x):
            return Square.apply(self.chain(x))

    x = torch.empty(1, 4, 16, 16, 16, **META)
    plain = memplan.simulate_step(chain, x, scratch="none").peak_bytes
    ckpt = memplan.simulate_step(Ckpt(), x, scratch="none").peak_bytes
    fn = memplan.simulate_step(WithFn(), x, scratch="none").peak_bytes
    assert ckpt < plain
    assert fn > plain                              # Square keeps one more activation


def test_bad_optimizer_and_scratch_names():
    with pytest.raises(MemplanError, match="unknown optimizer 'rmsprop'"):
        memplan.simulate_step(nn.Linear(2, 2), torch.empty(1, 2, **META), optimizer="rmsprop")
    with pytest.raises(MemplanError, match="unknown scratch model"):
        memplan.simulate_step(nn.Linear(2, 2), torch.empty(1, 2, **META), scratch="gpu")
    with pytest.raises(MemplanError, match="needs real example inputs"):
        memplan.measure_step(nn.Linear(2, 2), torch.empty(1, 2, **META))


@pytest.mark.parametrize("size", [12, 16, 24])
def test_simulated_peak_within_5_percent_of_cpu_profiler(size):
    net = TinyUNet3D(width=4)
    x = torch.randn(1, 1, size, size, size)
    predicted = memplan.simulate_step(net, x).peak_bytes
    measured = memplan.measure_step(net, x).peak_bytes
    assert abs(predicted - measured) <= 0.05 * measured, (predicted, measured)


def test_scratch_model_matches_profiler_on_single_convolutions():
    for conv, shape in [(nn.Conv3d(4, 8, 3, padding=1), (1, 4, 16, 16, 16)),
                        (nn.Conv3d(4, 8, 3, padding=1, stride=2), (1, 4, 16, 16, 16)),
                        (nn.ConvTranspose3d(8, 4, 2, stride=2), (1, 8, 8, 8, 8)),
                        (nn.Conv3d(4, 8, 3, padding=1), (2, 4, 12, 12, 12))]:
        x = torch.randn(shape)
        predicted = memplan.simulate_step(conv, x, optimizer="sgd").peak_bytes
        without = memplan.simulate_step(conv, x, optimizer="sgd", scratch="none").peak_bytes
        measured = memplan.measure_step(conv, x, optimizer="sgd").peak_bytes
        assert abs(predicted - measured) <= 0.05 * measured, (conv, predicted, measured)
        assert without < 0.8 * measured          # tensors alone miss the kernel scratch
