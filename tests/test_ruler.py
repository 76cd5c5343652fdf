"""The ruler's honest budgets: checkpoint RNG states, the CUDA allocator's rounding, the CPU
convolution scratch model against the profiler per op, threads as an explicit input, amp options."""
import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import memplan
from memplan import MemplanError
from memplan import measure
from memplan.measure import allocator_events, conv_scratch_bytes, cuda_allocation_bytes, onednn_block, running_peak

RNG_STATE_B = 5056          # torch.get_rng_state(): the mt19937 generator state as bytes


class TwoSegments(nn.Module):
    """Two checkpointed Linear-Tanh-Linear segments (no convolution: the CPU peak has no kernel scratch)."""

    def __init__(self, preserve: bool):
        super().__init__()
        self.preserve = preserve
        self.segs = nn.ModuleList([nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 64)) for _ in range(2)])

    def forward(self, x):
        for m in self.segs:
            x = checkpoint(m, x, use_reentrant=False, preserve_rng_state=self.preserve)
        return x


def test_rng_state_size_is_what_the_ruler_assumes():
    assert torch.get_rng_state().numel() == RNG_STATE_B


def test_checkpoint_rng_states_counted_by_hand():
    x = torch.randn(32, 64)
    kept = memplan.simulate_step(TwoSegments(True), x, optimizer="sgd", steps=1).timeline
    plain = memplan.simulate_step(TwoSegments(False), x, optimizer="sgd", steps=1).timeline
    diff = [a[1] - b[1] for a, b in zip(kept, plain)]
    assert [a[0] for a in kept] == [b[0] for b in plain]
    first_sum = [name for name, _ in kept].index("aten.sum")
    assert diff[first_sum] == 2 * RNG_STATE_B         # end of forward: one state per checkpoint frame
    assert max(diff) == 3 * RNG_STATE_B               # recomputing segment 2: fork_rng holds one more
    assert diff[-1] == 0                              # every frame freed after its backward


def test_checkpoint_rng_states_match_the_profiler_exactly():
    x = torch.randn(32, 64)
    torch.manual_seed(0)
    net = TwoSegments(True)
    assert memplan.simulate_step(net, x, optimizer="sgd").peak_bytes == memplan.measure_step(net, x, optimizer="sgd").peak_bytes
    report = memplan.simulate_step(net, x, optimizer="sgd")
    assert report.breakdown["checkpoint rng states"] == RNG_STATE_B


def test_rng_states_are_host_memory_on_cuda():
    x = torch.randn(32, 64)
    kept = memplan.simulate_step(TwoSegments(True), x, optimizer="sgd", target="cuda", scratch="none")
    plain = memplan.simulate_step(TwoSegments(False), x, optimizer="sgd", target="cuda", scratch="none")
    assert kept.peak_bytes == plain.peak_bytes
    assert torch.get_rng_state is torch.random.get_rng_state or callable(torch.get_rng_state)


def test_get_rng_state_restored_after_simulation():
    original = torch.get_rng_state
    memplan.simulate_step(TwoSegments(True), torch.randn(4, 64), optimizer="sgd")
    assert torch.get_rng_state is original


@pytest.mark.parametrize("nbytes, booked", [(0, 0), (1, 512), (4, 512), (511, 512), (512, 512), (513, 1024),
                                            (4_000_000, 4_000_256), (1 << 20, 1 << 20)])
def test_cuda_rounding_rule(nbytes, booked):
    assert cuda_allocation_bytes(nbytes) == booked


def test_cuda_target_linear_by_hand():
    # W and dW 4,000,000 B -> 7813 blocks of 512 = 4,000,256 each; x and out 4,000 B -> 4,096 each;
    # the loss and the ones_like gradient scalar 4 B -> 512 each.
    net, x = nn.Linear(1000, 1000, bias=False), torch.empty(1, 1000, device="meta")
    r = memplan.simulate_step(net, x, optimizer="sgd", target="cuda")
    assert r.peak_bytes == 2 * 4_000_256 + 2 * 4_096 + 2 * 512
    assert r.method == "simulated (scratch=none, target=cuda)"


def test_cuda_target_leaves_adam_step_counters_out():
    # Linear(10, 10): W 400 B, b 40 B. On CUDA each is one 512-B block, as are their gradients and the
    # two Adam moments each; the step counters are CPU tensors and book nothing on the device.
    net, x = nn.Linear(10, 10), torch.empty(1, 10, device="meta")
    adam = memplan.simulate_step(net, x, optimizer="adam", target="cuda").breakdown
    assert adam["optimizer state"] == 4 * 512
    assert adam["parameters"] == 2 * 512


def test_target_and_scratch_validation():
    x = torch.empty(1, 2, device="meta")
    with pytest.raises(MemplanError, match="unknown target 'tpu'"):
        memplan.simulate_step(nn.Linear(2, 2), x, target="tpu")
    with pytest.raises(MemplanError, match="scratch='none' with target='cuda'"):
        memplan.simulate_step(nn.Linear(2, 2), x, target="cuda", scratch="cpu")
    with pytest.raises(MemplanError, match="threads must be a positive int"):
        memplan.simulate_step(nn.Linear(2, 2), x, threads=0)
    with pytest.raises(MemplanError, match="unknown amp mode 'int8'"):
        memplan.simulate_step(nn.Linear(2, 2), x, amp="int8")
    with pytest.raises(MemplanError, match="unknown amp mode"):
        memplan.measure_step(nn.Linear(2, 2), torch.randn(1, 2), amp="fp8")


# -- the CPU convolution scratch model, per op, against the profiler -------------------------------
def _profiled_scratch(fn) -> int:
    """Peak of the allocator events while ``fn`` runs, minus what is still allocated after it."""
    keep, deltas = allocator_events(fn)
    peak, cur = running_peak(deltas)
    del keep
    return peak - cur


# (batch, C_in, C_out, kernel, stride, size, transposed, padding): oneDNN with C_in >= 16 and < 16,
# padded outputs (16->2), 1x1x1, strided, the slow unfold path, slow transposed columns
CONVS = [(1, 16, 16, 3, 1, 40, False, 1), (1, 32, 16, 3, 1, 40, False, 1), (1, 16, 2, 3, 1, 40, False, 1),
         (1, 16, 2, 1, 1, 40, False, 0), (1, 16, 32, 3, 2, 40, False, 1), (2, 1, 16, 3, 1, 24, False, 1),
         (2, 2, 2, 3, 1, 24, False, 1), (2, 8, 16, 3, 2, 24, False, 1), (1, 4, 4, 3, 1, 16, False, 1),
         (1, 16, 16, 3, 1, 40, True, 1), (1, 64, 32, 2, 2, 16, True, 0), (2, 128, 128, 3, 1, 3, False, 1),
         (2, 128, 128, 3, 1, 2, False, 1), (2, 64, 64, 3, 1, 2, False, 1)]


@pytest.mark.slow
@pytest.mark.parametrize("n, cin, cout, k, s, size, transposed, pad", CONVS)
def test_conv_scratch_model_matches_the_profiler_per_op(n, cin, cout, k, s, size, transposed, pad):
    torch.manual_seed(0)
    x = torch.randn(n, cin, size, size, size)
    w = torch.randn(*((cin, cout) if transposed else (cout, cin)), k, k, k)
    conv = dict(stride=[s] * 3, padding=[pad] * 3, dilation=[1] * 3, transposed=transposed,
                output_padding=[0] * 3, groups=1)
    y = torch.ops.aten.convolution(x, w, None, **conv)
    gy = torch.randn_like(y)
    fwd = _profiled_scratch(lambda: torch.ops.aten.convolution(x, w, None, **conv))
    bwd = _profiled_scratch(lambda: torch.ops.aten.convolution_backward(
        gy, x, w, [cout], conv["stride"], conv["padding"], conv["dilation"], transposed, conv["output_padding"], 1,
        [True, True, True]))
    model_f = conv_scratch_bytes(x, w, conv["stride"], conv["padding"], transposed, 1, backward=False)
    model_b = conv_scratch_bytes(x, w, conv["stride"], conv["padding"], transposed, 1, backward=True)
    slow_transposed = transposed and k == 2      # slow_conv_transpose3d: per op its columns only; the
    if slow_transposed:                          # model adds the input copy a training step holds
        model_f, model_b = model_f - x.numel() * 4, model_b - x.numel() * 4   # (test_measure.py)
    assert abs(model_f - fwd) <= 0.01 * max(fwd, 1), (model_f, fwd)
    # a kernel wider than the input: partial weight gradients vary run to run; an upper bound. So is the
    # transposed backward on AVX2 (8-channel blocks): the legacy model was read on AVX512 only
    if k > size or (transposed and onednn_block() == 8 and not slow_transposed):
        assert bwd <= model_b <= 2.1 * bwd, (model_b, bwd)
    else:
        assert abs(model_b - bwd) <= 0.04 * max(bwd, 1), (model_b, bwd)


@pytest.mark.parametrize("block", [8, 16])
def test_conv_scratch_by_hand_and_threads_explicit(block, monkeypatch):
    monkeypatch.setattr(measure, "onednn_block", lambda: block)     # both ISAs' rules, on any machine
    # 16->2 1x1x1 conv on 40^3: oneDNN at 2 threads blocks the input (16 ch, 4,096,000 B), the weights
    # padded to one block x 16 (1,024 B with AVX512's 16-channel blocks, 512 B with AVX2's 8) and the
    # output padded to one block (16 ch 4,096,000 B, 8 ch 2,048,000 B); the real output (512,000 B) is
    # allocated after the blocked input is freed. At 1 thread slow_conv3d reads x in place.
    x, w = torch.empty(1, 16, 40, 40, 40, device="meta"), torch.empty(2, 16, 1, 1, 1, device="meta")
    args = ([1, 1, 1], [0, 0, 0], False, 1)
    assert conv_scratch_bytes(x, w, *args, backward=False, threads=2) == \
        4_096_000 + block * 16 * 4 + block * 64_000 * 4 - 512_000
    assert conv_scratch_bytes(x, w, *args, backward=False, threads=1) == 0
    assert conv_scratch_bytes(x, w, *args, backward=True, threads=1) == 4_096_000   # weight grad copies x
    net, xx = nn.Conv3d(16, 2, 1), torch.empty(1, 16, 40, 40, 40, device="meta")
    one = memplan.simulate_step(net, xx, optimizer="sgd", threads=1).peak_bytes
    two = memplan.simulate_step(net, xx, optimizer="sgd", threads=2).peak_bytes
    assert two > one


def test_memplan_cpu_names_the_kernels_assumed_and_refuses_an_unknown_family(monkeypatch):
    x, w = torch.empty(1, 16, 40, 40, 40, device="meta"), torch.empty(2, 16, 3, 3, 3, device="meta")
    args = ([1, 1, 1], [1, 1, 1], False, 1)
    monkeypatch.setenv("MEMPLAN_CPU", "avx2")
    assert measure.onednn_block() == 8
    # forward at 2 threads: x in 8-channel blocks (16 ch, 4,096,000 B), weights 8 x 16 x 27 x 4 B, output 8 ch
    assert conv_scratch_bytes(x, w, *args, backward=False, threads=2) == 4_096_000 + 13_824 + 2_048_000 - 512_000
    monkeypatch.setenv("MEMPLAN_CPU", "avx512-bf16")
    assert measure.onednn_block() == 16 and measure.cpu_has_bf16_kernels()
    monkeypatch.setenv("MEMPLAN_CPU", "avx9")
    with pytest.raises(MemplanError, match="MEMPLAN_CPU='avx9' is not a CPU kernel family.*avx512-bf16, avx512, amx, avx2"):
        memplan.simulate_step(nn.Conv3d(1, 2, 3), torch.empty(1, 1, 8, 8, 8, device="meta"))


# -- mixed precision --------------------------------------------------------------------------------
def test_amp_bf16_halves_activations_and_fp16_runs_a_grad_scaler():
    net = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256))
    x = torch.empty(512, 256, device="meta")
    fp32 = memplan.simulate_step(net, x, scratch="none", keep_output=False)
    bf16 = memplan.simulate_step(net, x, scratch="none", amp="bf16", keep_output=False)
    fp16 = memplan.simulate_step(net, x, scratch="none", amp="fp16", keep_output=False)
    assert bf16.peak_bytes < fp32.peak_bytes
    assert fp16.method.endswith("amp=fp16)") and fp16.peak_bytes > 0


_CPU = torch._C._cpu._get_cpu_capability()
#: ATen runs fp16 matmuls through oneDNN (with scratch) only on CPUs with native fp16 arithmetic
_ONEDNN_FP16 = bool(_CPU.get("avx512_fp16") or _CPU.get("amx_fp16"))


#: ATen runs bf16 matmuls through oneDNN (with scratch) only on CPUs with AVX512-BF16 or AMX
_ONEDNN_BF16 = bool(_CPU.get("avx512_bf16") or _CPU.get("amx_bf16"))


@pytest.mark.parametrize("amp", [None, pytest.param("bf16", marks=pytest.mark.xfail(
    _ONEDNN_BF16, strict=True, reason="oneDNN's bf16 matmul scratch is not modelled: 8% under with AMX, 19% "
                                      "under on AVX512-BF16 (AMD EPYC) on this net (known gap)")),
    pytest.param("fp16", marks=pytest.mark.xfail(_ONEDNN_FP16, strict=True, reason=(
        "oneDNN's fp16 matmul scratch is not modelled: 24% under on a CPU with AMX/AVX512-FP16 (fp16 is meant "
        "for CUDA); without them ATen's own fp16 matmul allocates nothing beyond its tensors")))])
def test_amp_prediction_matches_measurement_on_linear_nets(amp):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64))
    x = torch.randn(256, 64)
    predicted = memplan.simulate_step(net, x, amp=amp, optimizer="sgd").peak_bytes
    measured = memplan.measure_step(net, x, amp=amp, optimizer="sgd").peak_bytes
    assert abs(predicted - measured) <= 0.05 * measured, (predicted, measured)


# -- the user's loop keeps its output ---------------------------------------------------------------
def test_keep_output_matches_the_profiler():
    # 64-wide layers at batch 32 run without matmul scratch: the simulation is exact to the byte; the
    # difference the kept output makes is the profiler's difference
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
    x = torch.randn(32, 64)
    sim = {k: memplan.simulate_step(net, x, optimizer="sgd", keep_output=k).peak_bytes for k in (True, False)}
    meas = {k: memplan.measure_step(net, x, optimizer="sgd", keep_output=k).peak_bytes for k in (True, False)}
    assert sim == meas
    assert sim[True] - sim[False] == meas[True] - meas[False] == 32 * 64 * 4


def test_kept_output_costs_its_bytes_at_the_backward_peak():
    net = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 512))
    x = torch.empty(64, 64, device="meta")
    kept = memplan.simulate_step(net, x, optimizer="sgd").peak_bytes
    dropped = memplan.simulate_step(net, x, optimizer="sgd", keep_output=False).peak_bytes
    assert kept - dropped == 64 * 512 * 4             # the 64x512 float output


# -- each fp32 kernel-scratch rule, on a one-layer net whose step peaks inside that rule's kernel ---
def _no_bn_scratch(monkeypatch):
    monkeypatch.setattr(measure, "batch_norm_backward_scratch_bytes", lambda *a, **k: 0)


def _legacy_conv(monkeypatch):   # the model before these rules: every plain conv through _onednn_legacy
    monkeypatch.setattr(measure, "_onednn_forward", lambda cv, threads: measure._onednn_legacy(cv, False, True))
    monkeypatch.setattr(measure, "_onednn_backward", lambda cv, t, gi: measure._onednn_legacy(cv, True, gi))


SCRATCH_RULES = {   # rule -> (net, input shape, how to take the rule out)
    "1x1x1 input padded to 16 channels, reduction buffer": (lambda: nn.Conv3d(4, 2, 1), (2, 4, 8, 8, 8), _legacy_conv),
    "gemm weight gradient (4 <= C_in < 16)": (lambda: nn.Conv3d(4, 4, 3, padding=1), (2, 4, 8, 8, 8), _legacy_conv),
    "blocked weight gradient, no reduction": (lambda: nn.Conv3d(32, 32, 3, padding=1), (2, 32, 8, 8, 8), _legacy_conv),
    "gemm weight gradient (kernel wider than input)": (lambda: nn.Conv3d(16, 16, 3, padding=1), (2, 16, 2, 2, 2),
                                                       _legacy_conv),
    "strided data-gradient scratch": (lambda: nn.Conv3d(16, 16, 3, stride=2, padding=1), (2, 16, 4, 4, 4),
                                      _legacy_conv),
    "first layer (C_in < 4) reads x in place": (lambda: nn.Conv3d(1, 8, 3, padding=1), (2, 1, 8, 8, 8), _legacy_conv),
    "batch-norm backward temporary": (lambda: nn.Sequential(nn.BatchNorm3d(8), nn.Tanh(), nn.BatchNorm3d(8), nn.Tanh()),
                                      (1, 8, 16, 16, 16), _no_bn_scratch),
    "AVX2: 8-channel blocks, gemm weight gradient per sample": (lambda: nn.Conv3d(32, 32, 3, padding=1),
                                                                (2, 32, 6, 6, 6), _legacy_conv),
}
#: rules read on one ISA's oneDNN kernels: AVX512 (16-channel blocks) or AVX2 (8-channel blocks, the gemm
#: weight gradient for every kernel but 1x1x1)
_AVX512_ONLY = {"first layer (C_in < 4) reads x in place", "blocked weight gradient, no reduction"}
_AVX2_ONLY = {"AVX2: 8-channel blocks, gemm weight gradient per sample"}


def _on_this_isa(rule):
    wrong = rule in (_AVX512_ONLY if onednn_block() == 8 else _AVX2_ONLY)
    return pytest.param(rule, marks=pytest.mark.skipif(wrong, reason=f"a rule of another ISA's oneDNN kernels "
                                                                     f"(this CPU: {onednn_block()}-channel blocks)"))


@pytest.fixture
def two_threads():
    """oneDNN's thread-dependent buffers need more than the suite's one thread (conftest)."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("rule", [_on_this_isa(r) for r in SCRATCH_RULES])
def test_each_scratch_rule_matches_the_profiler_and_is_needed(rule, monkeypatch, two_threads):
    build, shape, remove = SCRATCH_RULES[rule]
    torch.manual_seed(0)
    net, x = build(), torch.randn(shape)
    measured = memplan.measure_step(net, x, optimizer="sgd").peak_bytes
    predicted = memplan.simulate_step(net, x, optimizer="sgd").peak_bytes
    assert abs(predicted - measured) <= 0.005 * measured, (predicted, measured)
    remove(monkeypatch)
    without = memplan.simulate_step(net, x, optimizer="sgd").peak_bytes
    assert abs(without - measured) > 0.02 * measured, (without, measured)


# -- bf16 under CPU autocast on AVX512-BF16 (no AMX): each rule, sim vs profiler, and needed --------
def _fp32_weight_grad(monkeypatch):
    monkeypatch.setattr(measure, "_bf16_weight_grad", measure._onednn_weight_grad)


def _no_pointwise_copies(monkeypatch):
    monkeypatch.setattr(measure, "_bf16_pointwise_copies", lambda cv, threads, channels: 0)


BF16_RULES = {   # rule -> (net, input shape, how to take the rule out)
    "1x1x1 fp32 result buffers": (lambda: nn.Conv3d(8, 64, 1), (1, 8, 12, 12, 12), _no_pointwise_copies),
    "blocked weight gradient, transposed copies": (lambda: nn.Conv3d(16, 16, 3, padding=1), (1, 16, 16, 16, 16),
                                                   _fp32_weight_grad),
    "gemm weight gradient (C_in < 16)": (lambda: nn.Conv3d(4, 4, 3, padding=1), (2, 4, 8, 8, 8), _fp32_weight_grad),
    "blocked weight gradient, kernel wider than input": (lambda: nn.Conv3d(32, 32, 3, padding=1), (1, 32, 2, 2, 2),
                                                         _fp32_weight_grad),
    "blocked weight gradient, C_in < 16 read in place": (lambda: nn.Conv3d(8, 16, 3, padding=1), (1, 8, 16, 16, 16),
                                                         _fp32_weight_grad),
    "gemm weight gradient, a patch embedding (kernel 16)": (lambda: nn.Conv3d(1, 24, 16, stride=16), (1, 1, 16, 16, 16),
                                                            _fp32_weight_grad),
}


@pytest.mark.skipif(not measure.cpu_has_bf16_kernels(),
                    reason="the bf16 rules model AVX512-BF16 kernels (no AMX); this CPU runs others")
@pytest.mark.parametrize("rule", list(BF16_RULES))
def test_each_bf16_scratch_rule_matches_the_profiler_and_is_needed(rule, monkeypatch, two_threads):
    build, shape, remove = BF16_RULES[rule]
    torch.manual_seed(0)
    net, x = build(), torch.randn(shape)
    measured = memplan.measure_step(net, x, optimizer="sgd", amp="bf16").peak_bytes
    predicted = memplan.simulate_step(net, x, optimizer="sgd", amp="bf16").peak_bytes
    assert abs(predicted - measured) <= 0.01 * measured, (predicted, measured)
    remove(monkeypatch)
    without = memplan.simulate_step(net, x, optimizer="sgd", amp="bf16").peak_bytes
    assert abs(without - measured) > 0.03 * measured, (without, measured)
