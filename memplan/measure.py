"""The ruler: the peak memory of a whole training step, predicted on meta tensors or measured.

A step is what an ordinary training loop does: zero_grad(set_to_none) -> ``out = model(x)`` ->
``loss = loss_fn(out)`` -> backward -> optimizer.step(), run twice so the optimizer state of a
steady-state step is included; ``out`` stays alive through backward until the next step replaces it
(``keep_output=False``: dropped once the loss is built), under autocast when ``amp`` is set.
``simulate_step`` runs it on a meta copy under a dispatch mode that sums the bytes of every live
storage after each ATen op (exact for tensor lifetimes; sees storages resized in place; autocast's
cached weight casts included). It adds the transient scratch buffers kernels allocate and free
inside one op (CPU convolution unfold / oneDNN blocked copies and weight-gradient buffers, batch
norm's backward temporary), which tensor tracking cannot see, from a model of those kernels read off
the profiler (``scratch="cpu"``; shapes, dtypes and threads only, bf16 as on AVX512-BF16 CPUs).
``measure_step`` runs the step for real: the CPU profiler's allocator events, or CUDA's
max_memory_allocated.

Beyond tensors, the simulation counts what checkpoint saves outside the dispatcher: the CPU generator
state ``preserve_rng_state`` keeps per recomputed segment (5,056 B, plus one more while a segment is
recomputed under ``fork_rng``). ``target="cuda"`` books every storage as CUDA's caching allocator
does (rounded up to 512 B) and leaves out host memory (RNG states, Adam's step counters).
"""
from __future__ import annotations

import contextlib
import functools
import math
import os
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from ._meta import FakeWorld, as_tuple, home_device, is_fake, storage_key, tensors_in
from .errors import MemplanError
from .inputs import check_model_and_inputs

OPTIMIZERS = ("adam", "sgd", "sgd-momentum", "none")
SCRATCH_MODELS = ("none", "cpu")
TARGETS = ("cpu", "cuda")
#: autocast dtypes of the ``amp`` option (None: full precision)
AMP_DTYPES = {None: None, "bf16": torch.bfloat16, "fp16": torch.float16}
#: CUDA's caching allocator rounds every allocation up to a multiple of this (kMinBlockSize)
CUDA_BLOCK_BYTES = 512


def cuda_allocation_bytes(nbytes: int) -> int:
    """Bytes CUDA's caching allocator books for a ``nbytes`` storage: rounded up to 512 B, 0 stays 0.

    >>> cuda_allocation_bytes(4), cuda_allocation_bytes(512), cuda_allocation_bytes(513)
    (512, 512, 1024)
    """
    return 0 if nbytes <= 0 else -(-nbytes // CUDA_BLOCK_BYTES) * CUDA_BLOCK_BYTES


def check_amp(amp: str | None) -> torch.dtype | None:
    """The autocast dtype of ``amp`` (None, "bf16" or "fp16"); MemplanError for anything else."""
    if not (amp is None or isinstance(amp, str)) or amp not in AMP_DTYPES:
        raise MemplanError(f"unknown amp mode {amp!r}; choose None (full precision), 'bf16' or 'fp16'")
    return AMP_DTYPES[amp]


@dataclass(frozen=True)
class MemoryReport:
    """Peak bytes of a training step, what was live at the peak, and live bytes after every op."""

    peak_bytes: int
    breakdown: dict[str, int]
    timeline: list[tuple[str, int]] = field(repr=False)
    method: str = "simulated"
    peak_op: str = ""

    def summary(self) -> str:
        from .units import format_bytes
        parts = ", ".join(f"{k} {format_bytes(v)}" for k, v in self.breakdown.items())
        return f"{self.method} peak {format_bytes(self.peak_bytes)} at {self.peak_op or '?'} ({parts})"


def make_optimizer(name: str, params: Sequence[nn.Parameter]) -> torch.optim.Optimizer | None:
    """The optimizer a step uses; single-tensor (foreach=False) so every device runs the same ops."""
    if name not in OPTIMIZERS:
        raise MemplanError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
    params = [p for p in params if p.requires_grad]
    if name == "none" or not params:
        return None
    if name == "adam":
        return torch.optim.Adam(params, lr=1e-3, foreach=False)
    if name == "sgd":
        return torch.optim.SGD(params, lr=1e-3, foreach=False)
    return torch.optim.SGD(params, lr=1e-3, momentum=0.9, foreach=False)


def default_loss(output: Any) -> torch.Tensor:
    """Sum of every floating-point tensor the model returns."""
    leaves = [t for t in tensors_in(output) if t.is_floating_point()]
    if not leaves:
        raise MemplanError("the model returned no floating-point tensor to build a loss from; pass loss_fn=")
    total = leaves[0].sum()
    for t in leaves[1:]:
        total = total + t.sum()
    return total


def run_steps(model: nn.Module, inputs: tuple, loss_fn: Callable | None, optimizer: str,
              steps: int = 2, on_optimizer: Callable[[Any], None] | None = None, *, keep_output: bool = True,
              amp: str | None = None, device_type: str = "cpu", fake: bool = False) -> None:
    """Run ``steps`` training steps of ``model`` on ``inputs``; ``on_optimizer`` sees the optimizer.

    ``keep_output``: the loop holds ``out`` (and ``loss``) until the next step's replace them, as
    ``out = model(x); loss = loss_fn(out)`` does; else the output is dropped once the loss is built.
    ``amp``: forward and loss under ``torch.autocast(device_type)``; "fp16" scales the loss with a
    GradScaler. ``fake``: the step runs on fake tensors, where GradScaler.step cannot read its inf
    flag, so it unscales and steps as a finite step does.
    """
    dtype = check_amp(amp)
    opt = make_optimizer(optimizer, list(model.parameters()))
    if on_optimizer is not None:
        on_optimizer(opt)
    loss_fn = loss_fn or default_loss
    scaler = torch.amp.GradScaler(device_type) if amp == "fp16" and opt is not None else None
    autocast = (lambda: torch.autocast(device_type, dtype=dtype)) if dtype is not None else contextlib.nullcontext
    out = loss = None
    for _ in range(steps):
        if opt is not None:
            opt.zero_grad(set_to_none=True)
        else:
            model.zero_grad(set_to_none=True)
        with autocast():
            if keep_output:
                out = model(*inputs)
                loss = loss_fn(out)
            else:
                loss = loss_fn(model(*inputs))
        (loss if scaler is None else scaler.scale(loss)).backward()
        if not keep_output:
            loss = None
        if scaler is not None:
            if fake:
                scaler.unscale_(opt)
                opt.step()
            else:
                scaler.step(opt)
            scaler.update()
        elif opt is not None:
            opt.step()
    del out, loss


# -- kernel scratch model --------------------------------------------------------------------------
# Every rule below was read off the CPU profiler's allocator events of single ops (tests/test_ruler.py
# checks each against the profiler); they depend on shapes, dtypes and the thread count only.
#: oneDNN's fp32 weight-gradient reduction buffer: a fixed part beside (threads - 1) weight copies
#: (measured 20,672-21,056 B at 2 and 4 threads)
ONEDNN_REDUCTION_FIXED_B = 20_864
#: a strided oneDNN data-gradient kernel's scratch: fixed part, and per thread (the smallest measured;
#: it grows with the input: 24,600 B per thread at 4^3-8^3, 57,368 at 16^3)
ONEDNN_STRIDED_FIXED_B, ONEDNN_STRIDED_PER_THREAD_B = 12_288, 24_600


#: the CPU kernel families the scratch model knows; MEMPLAN_CPU=<one of them> makes it assume that CPU
#: (tools/gendocs pins "avx512-bf16" so documented figures match on any machine)
CPU_KERNELS = ("avx512-bf16", "avx512", "amx", "avx2")


@functools.lru_cache(maxsize=None)
def _machine_kernels() -> str:
    cap = torch._C._cpu._get_cpu_capability()
    if cap.get("amx_tile"):
        return "amx"
    if cap.get("avx512_bf16"):
        return "avx512-bf16"
    return "avx512" if cap.get("avx512_f") else "avx2"


def cpu_kernels() -> str:
    """Which oneDNN kernel family the CPU scratch model assumes: this machine's, or ``MEMPLAN_CPU``'s.
    The ISA, like the thread count, changes CPU scratch figures (never a plan's arithmetic)."""
    forced = os.environ.get("MEMPLAN_CPU")
    if not forced:
        return _machine_kernels()
    if forced not in CPU_KERNELS:
        raise MemplanError(f"MEMPLAN_CPU={forced!r} is not a CPU kernel family the scratch model knows; use one "
                           f"of {', '.join(CPU_KERNELS)} or unset it (this machine: {_machine_kernels()})")
    return forced


def onednn_block() -> int:
    """Channels per block of oneDNN's fp32 kernels: 16 (nCdhw16c) with AVX512, 8 (nCdhw8c) with AVX2."""
    return 8 if cpu_kernels() == "avx2" else 16


def cpu_has_bf16_kernels() -> bool:
    """Whether oneDNN runs bf16 convolutions natively (AVX512-BF16 without AMX): the CPU the bf16 rules
    were read on; other CPUs get the rough bf16 model (or, on AVX2, ATen's slow_conv3d)."""
    return cpu_kernels() == "avx512-bf16"


def cpu_has_amx() -> bool:
    """Whether the CPU has AMX tiles: oneDNN's reduced-precision kernels (and their scratch) differ
    there from AVX512-BF16 ones, so the bf16 model depends on it."""
    return cpu_kernels() == "amx"


def _conv_scratch_cpu(func, args, threads: int) -> int:
    """Bytes a CPU kernel allocates and frees inside one op: convolutions and batch norm (0 for others)."""
    name = str(func.overloadpacket)
    if name == "aten.convolution":      # (input, weight, bias, stride, padding, dilation, transposed, ...)
        return conv_scratch_bytes(args[0], args[1], args[3], args[4], bool(args[6]), int(args[8]), backward=False,
                                  threads=threads)
    if name == "aten.convolution_backward":  # (grad_out, input, weight, bias_sizes, stride, ..., output_mask)
        mask = args[10] if len(args) > 10 else (True, True, True)
        return conv_scratch_bytes(args[1], args[2], args[4], args[5], bool(args[7]), int(args[9]), backward=True,
                                  threads=threads, grad_input=bool(mask[0]))
    if name == "aten.native_batch_norm_backward":
        mask = args[9] if len(args) > 9 else (True, True, True)
        return batch_norm_backward_scratch_bytes(args[0], args[1], train=bool(args[7]), grad_input=bool(mask[0]))
    return 0


def batch_norm_backward_scratch_bytes(grad_out: torch.Tensor, x: torch.Tensor, *, train: bool,
                                     grad_input: bool = True) -> int:
    """CPU ``native_batch_norm_backward`` computing grad_input in training mode from a contiguous
    grad_out holds one input-sized temporary (measured: exactly x's bytes); none from an expanded
    grad_out (a ``sum`` loss's), without grad_input, or in eval mode.

    >>> x = torch.empty(2, 16, 8, 8, 8, device="meta")
    >>> batch_norm_backward_scratch_bytes(torch.empty_like(x), x, train=True)
    65536
    """
    if not (train and grad_input and x.dim() >= 2 and grad_out.is_contiguous()):
        return 0
    return x.numel() * x.element_size()


@dataclass(frozen=True)
class _Conv:
    """The geometry of one 3D convolution as its CPU kernels see it (bytes at the input's dtype)."""
    n: int
    c_in: int
    c_out: int
    k: tuple[int, ...]
    spatial: tuple[int, ...]
    out: tuple[int, ...]
    esize: int
    groups: int
    transposed: bool
    strided: bool
    pointwise: bool
    block: int = 16          # oneDNN's channel block (onednn_block(); 16 for the bf16 kernels)

    @staticmethod
    def of(x: torch.Tensor, w: torch.Tensor, stride, padding, transposed: bool, groups: int,
           block: int = 16) -> "_Conv":
        spatial, k = tuple(x.shape[2:]), tuple(w.shape[2:])
        if transposed:
            c_out = w.shape[1] * groups
            out = tuple((spatial[i] - 1) * stride[i] - 2 * padding[i] + k[i] for i in range(3))
        else:
            c_out = w.shape[0]
            out = tuple((spatial[i] + 2 * padding[i] - k[i]) // stride[i] + 1 for i in range(3))
        pointwise = all(v == 1 for v in k) and all(v == 1 for v in stride) and not any(padding)
        return _Conv(x.shape[0], x.shape[1], c_out, k, spatial, out, x.element_size(), groups, transposed,
                     any(s > 1 for s in stride), pointwise, block)

    def act(self, c: int, vox: tuple[int, ...]) -> int:
        """Bytes of an activation with ``c`` channels over ``vox``."""
        return self.n * c * math.prod(vox) * self.esize

    def blocked(self, c: int) -> int:
        """``c`` channels rounded up to whole oneDNN blocks."""
        return self.block * math.ceil(c / self.block)


def _block16(c: int) -> int:
    """oneDNN's bf16 kernels (AVX512-BF16) keep channels in blocks of 16 (nCdhw16c): ``c`` rounded up."""
    return 16 * math.ceil(c / 16)


def _uses_onednn(cv: _Conv, dtype: torch.dtype, threads: int) -> bool:
    """ATen's ``use_mkldnn`` for a CPU 3D convolution: bf16/fp16 where oneDNN supports them; fp32 unless a 1x1x1
    unstrided kernel at batch < 16 on one thread, and only for batch > 1, a kernel wider than 3 in
    the last two dims, groups > 1, or N*C*D*H > 20480."""
    if dtype in (torch.bfloat16, torch.float16):       # without oneDNN support (AVX2): slow_conv3d
        return _onednn_supports(dtype)
    return dtype == torch.float32 and (not cv.pointwise or cv.n >= 16 or threads > 1) and (
        cv.groups > 1 or (cv.k[-1] > 3 and cv.k[-2] > 3) or cv.n > 1
        or cv.n * cv.c_in * cv.spatial[0] * cv.spatial[1] > 20480)


def _onednn_supports(dtype: torch.dtype) -> bool:
    """ATen's check that oneDNN runs ``dtype`` convolutions on this CPU: bf16 needs AVX512 cores, fp16
    AVX512-FP16 or AMX (read from the machine unless MEMPLAN_CPU names the kernels)."""
    if os.environ.get("MEMPLAN_CPU"):
        return cpu_kernels() != "avx2" if dtype == torch.bfloat16 else cpu_kernels() == "amx"
    check = torch.ops.mkldnn._is_mkldnn_bf16_supported if dtype == torch.bfloat16 else \
        torch.ops.mkldnn._is_mkldnn_fp16_supported
    return bool(check())


def _slow_conv_scratch(cv: _Conv, backward: bool, grad_input: bool = True) -> int:
    """ATen's own slow_conv3d: it unfolds the input (N * C_in * prod(k) * out voxels); a transposed
    one builds N * C_out * prod(k) * in voxels of columns (and, in a training step, a copy of the
    input); a 1x1x1 one reads x in place forward, and its backward copies x when it computes grad_input."""
    x_sz = cv.act(cv.c_in, cv.spatial)
    if cv.transposed:
        return cv.n * cv.c_out * math.prod(cv.k) * math.prod(cv.spatial) * cv.esize + x_sz
    if cv.pointwise:
        return x_sz if backward and grad_input else 0
    return cv.n * cv.c_in * math.prod(cv.k) * math.prod(cv.out) * cv.esize


def _onednn_weights(cv: _Conv, *, backward_data: bool = False) -> int:
    """Bytes of oneDNN's blocked weights: C_out padded to a whole block; C_in too when it fills one, the
    kernel is 1x1x1, or (backward data) always."""
    pad_in = backward_data or cv.pointwise or cv.c_in >= cv.block
    c_in = cv.blocked(cv.c_in) if pad_in else cv.c_in
    return cv.blocked(cv.c_out) * c_in * math.prod(cv.k) * cv.esize // max(cv.groups, 1)


def _onednn_forward(cv: _Conv, threads: int = 1) -> int:
    """oneDNN forward: ``max(b(x) + b(w) + b(y), b(y) + y) - y``, where b(t) is t in channel blocks;
    the input is read in place when C_in is less than a block (but for a 1x1x1 kernel)."""
    y_sz = cv.act(cv.c_out, cv.out)
    x_b = cv.act(cv.blocked(cv.c_in), cv.spatial) if cv.c_in >= cv.block or cv.pointwise else 0
    y_b = cv.act(cv.blocked(cv.c_out), cv.out)
    copies = _bf16_pointwise_copies(cv, threads, cv.c_out)
    return max(copies + x_b + _onednn_weights(cv) + y_b, y_b + y_sz) - y_sz


def _onednn_weight_grad(cv: _Conv, threads: int) -> int:
    """Peak bytes of oneDNN's fp32 weight-gradient kernel (beyond what is live around it).

    Three kernels: a gemm one when 4 <= C_in < 16 (not 1x1x1) or the kernel is wider than the input,
    holding per thread one depth slice of columns (C_in * prod(k) * out H * W) and 4 weight-sized
    partials, plus 256 B, next to the plain weight gradient; else a blocked one reading x in 16-channel
    blocks (in place for a first layer, C_in < 4), the blocked output gradient and weight gradient,
    and, when C_out/16 * C_in/16 blocks leave threads idle, a reduction buffer of one blocked weight
    per extra thread (``nthr_mb = threads // blocks``) plus a fixed part; then the blocked weight
    gradient beside the plain one. Weight and bias gradients are included (they are op outputs)."""
    w_sz = cv.c_out * cv.c_in * math.prod(cv.k) * cv.esize // max(cv.groups, 1)
    b_sz = cv.c_out * cv.esize
    wider = any(cv.k[i] > cv.spatial[i] for i in range(3))
    if wider or (not cv.pointwise and (cv.block < 16 or 4 <= cv.c_in < 16)):
        cols = cv.c_in * math.prod(cv.k) * math.prod(cv.out[1:]) * cv.esize
        workers = threads if cv.block == 16 else min(cv.n, threads)     # AVX2 splits the batch only
        return max(w_sz + workers * (cols + 4 * w_sz) + 256, 2 * w_sz) + 2 * b_sz
    first_layer = cv.c_in < 4 and not cv.pointwise
    x_b = 0 if first_layer else cv.act(cv.blocked(cv.c_in), cv.spatial)
    w_b = _onednn_weights(cv)
    nthr_mb = threads // (math.ceil(cv.c_out / cv.block) * math.ceil(cv.c_in / cv.block))
    reduction = (nthr_mb - 1) * w_b + ONEDNN_REDUCTION_FIXED_B if nthr_mb > 1 else 0
    # the blocked buffers, then the blocked weight gradient reordered into the plain one
    return max(x_b + cv.act(cv.blocked(cv.c_out), cv.out) + w_b + reduction + b_sz, w_b + w_sz + 2 * b_sz)


def _bf16_pointwise_copies(cv: _Conv, threads: int, channels: int) -> int:
    """A bf16 1x1x1 oneDNN kernel first makes an fp32 buffer of its blocked result per thread (the
    output forward, ``channels`` = C_out; the input gradient backward, C_in), plus 128 B (measured at
    1 and 2 threads, 8^3-16^3, batch 1 and 2, 2-384 channels)."""
    if cv.esize != 2 or not cv.pointwise:
        return 0
    return threads * _block16(channels) * math.prod(cv.spatial) * 4 + 128


def _bf16_weight_grad(cv: _Conv, threads: int) -> int:
    """Peak bytes of oneDNN's bf16 weight-gradient kernel on AVX512-BF16 (beyond what is live around it).

    C_in < 16 (not 1x1x1) with C_out < 16 or a kernel wider than 7 (measured: 7 blocked, 16 gemm): a
    gemm kernel (unlike fp32, not for a kernel wider than the input) beside the plain weight
    gradient, with a depth slice of bf16 columns per working thread (min(batch, threads)) and
    2 * workers + 2 fp32 weight copies, plus 512 B + 4 B per output channel. Else a blocked one: b(x),
    b(gy), b(w) and, per thread splitting the batch (all of them when C_in <= 16 or batch * out depth
    > 8, else one: a heuristic), an fp32 weight accumulator and bf16 transposed copies of one sample's
    input (W padded; none when C_in < 16, x read in place and the fp32 weights unpadded) and output
    gradient (a 1x1x1 kernel over 16^3 voxels or more transposes nothing), plus 8,580 B (600 for
    1x1x1) and 8,192 B per other thread (per thread but one for 1x1x1). Measured to within 256 B at 1
    and 2 threads on 1x1x1 to 16^3 kernels, 1-384 channels, 2^3-24^3 (the split heuristic misses some:
    4->32 channels at batch 2, 8^3, is 30% over)."""
    w_sz = cv.c_out * cv.c_in * math.prod(cv.k) * cv.esize
    b_sz = cv.c_out * cv.esize
    if cv.c_in < 16 and not cv.pointwise and (cv.c_out < 16 or max(cv.k) > 7):
        workers = min(cv.n, threads)
        cols = cv.c_in * math.prod(cv.k) * math.prod(cv.out[1:]) * cv.esize
        s = workers * cols + (2 * workers + 2) * (w_sz // cv.esize) * 4 + 512 + 4 * cv.c_out
        return max(w_sz + s + b_sz, 2 * w_sz) + 2 * b_sz
    first_layer = cv.c_in < 16 and not cv.pointwise      # x read in place: no transposed input copy
    w_f32 = _block16(cv.c_out) * (cv.c_in if first_layer else _block16(cv.c_in)) * math.prod(cv.k) * 4
    if cv.pointwise and math.prod(cv.spatial) >= 4096:
        tr = 0
    elif first_layer:
        tr = _block16(cv.c_out) * math.prod(cv.out) * cv.esize
    else:
        pad_w = cv.out[2] - cv.spatial[2] + cv.k[2] - 1          # both sides of W (stride 1)
        tr = (_block16(cv.c_in) * math.prod(cv.spatial[:2]) * (cv.spatial[2] + pad_w)
              + _block16(cv.c_out) * math.prod(cv.out)) * cv.esize
    nthr_mb = threads if cv.c_in <= 16 or cv.n * cv.out[0] > 8 else 1
    idle = threads - 1 if cv.pointwise else threads - nthr_mb
    s = nthr_mb * (w_f32 + tr + 4 * cv.c_out) + (600 if cv.pointwise else 8_580) + 8_192 * idle
    x_b = 0 if first_layer else cv.act(_block16(cv.c_in), cv.spatial)
    y_b, w_b = cv.act(_block16(cv.c_out), cv.out), _onednn_weights(cv)
    return max(x_b + y_b + w_b + s + b_sz, w_b + w_sz + 2 * b_sz)


def _onednn_backward(cv: _Conv, threads: int, grad_input: bool) -> int:
    """fp32 oneDNN backward, its phases in order, minus the op's outputs (dx, dw, db).

    Data gradient: ``b(gy) + b(w) + b(gx)`` (weights padded in both channel dims; a strided kernel adds
    ``ONEDNN_STRIDED_*`` scratch and, with C_in >= 16, a phase ``x + b(x) + b(gx)``), then ``b(gx) + gx``
    as gx is reordered out; then the weight gradient beside gx (``_onednn_weight_grad``)."""
    x_sz = cv.act(cv.c_in, cv.spatial)
    w_sz = cv.c_out * cv.c_in * math.prod(cv.k) * cv.esize // max(cv.groups, 1)
    outputs = w_sz + cv.c_out * cv.esize + (x_sz if grad_input else 0)
    gx_b = cv.act(cv.blocked(cv.c_in), cv.spatial)
    y_b = cv.act(cv.blocked(cv.c_out), cv.out)
    weight_grad = _bf16_weight_grad(cv, threads) if cv.esize == 2 else _onednn_weight_grad(cv, threads)
    phases = [(x_sz if grad_input else 0) + weight_grad]
    if grad_input:
        strided = ONEDNN_STRIDED_FIXED_B + threads * ONEDNN_STRIDED_PER_THREAD_B if cv.strided else 0
        copies = _bf16_pointwise_copies(cv, threads, cv.c_in)
        phases += [y_b + _onednn_weights(cv, backward_data=True) + gx_b + strided + copies, gx_b + x_sz]
        if cv.strided and cv.c_in >= cv.block:
            phases.append(x_sz + gx_b + gx_b)
    return max(0, max(phases) - outputs)


def _onednn_legacy(cv: _Conv, backward: bool, grad_input: bool) -> int:
    """The earlier fp32 model, kept for transposed and grouped convolutions (not re-measured):
    weight gradient with 2 (9 when the kernel is wider than the input) weight-sized buffers."""
    x_sz, y_sz = cv.act(cv.c_in, cv.spatial), cv.act(cv.c_out, cv.out)
    gx_b = cv.act(cv.blocked(cv.c_in), cv.spatial)
    x_b = gx_b if cv.c_in >= cv.block else 0
    y_b = cv.act(cv.blocked(cv.c_out), cv.out)
    w_b = cv.blocked(cv.c_out) * (cv.blocked(cv.c_in) if cv.c_in >= cv.block else cv.c_in) * math.prod(cv.k) \
        * cv.esize // max(cv.groups, 1)
    if not backward:
        return max(x_b + w_b + y_b, y_b + y_sz) - y_sz
    w_sz = cv.c_out * cv.c_in * math.prod(cv.k) * cv.esize // max(cv.groups, 1)
    outputs = w_sz + cv.c_out * cv.esize + (x_sz if grad_input else 0)
    partials = 9 if any(cv.k[i] > cv.spatial[i] for i in range(3)) else 2
    x_w = gx_b if cv.pointwise else x_b
    phases = [x_w + y_b + partials * w_b + (x_sz if grad_input else 0)]
    if grad_input:
        phases += [y_b + w_b + gx_b, gx_b + x_sz]
        if cv.strided and not cv.transposed:
            phases.append(x_sz + x_b + gx_b)
    return max(0, max(phases) - outputs)


def conv_scratch_bytes(x: torch.Tensor, w: torch.Tensor, stride, padding, transposed: bool, groups: int,
                       *, backward: bool, threads: int | None = None, grad_input: bool = True) -> int:
    """Bytes a CPU 3D convolution holds beyond its inputs and outputs at its peak; 0 for other ranks.

    Which kernel runs follows ATen (``_uses_onednn``); ATen's slow_conv3d unfolds its input
    (``_slow_conv_scratch``); fp32 oneDNN works in blocked copies (16 channels with AVX512, 8 with AVX2:
    ``onednn_block``) (``_onednn_forward``,
    ``_onednn_backward``; transposed and grouped ones: ``_onednn_legacy``). bfloat16 on an AVX512-BF16
    CPU without AMX runs the same blocked kernels at 2 bytes an element, with its own weight-gradient
    buffers (``_bf16_weight_grad``) and, for a 1x1x1 kernel, fp32 copies of the blocked input
    (``_bf16_pointwise_copies``). Else (fp16, AMX, a CPU without AVX512-BF16, transposed or grouped bf16)
    a rough model: 2x the
    largest blocked activation forward, 5x backward (measured 2.0-2.4x and 3.8-8.3x per op with AMX).
    """
    if x.dim() != 5:
        return 0
    threads = torch.get_num_threads() if threads is None else threads
    half = x.dtype in (torch.bfloat16, torch.float16)
    cv = _Conv.of(x, w, stride, padding, transposed, groups, block=16 if half else onednn_block())
    if not _uses_onednn(cv, x.dtype, threads):
        return _slow_conv_scratch(cv, backward, grad_input)
    if half and (x.dtype == torch.float16 or transposed or groups > 1 or not cpu_has_bf16_kernels()):
        x_b, y_b = cv.act(_block16(cv.c_in), cv.spatial), cv.act(_block16(cv.c_out), cv.out)
        return (5 if backward else 2) * max(x_b if cv.c_in >= 16 else 0, y_b, x_b if backward else 0)
    if transposed or groups > 1:
        return _onednn_legacy(cv, backward, grad_input)
    return _onednn_forward(cv, threads) if not backward else _onednn_backward(cv, threads, grad_input)


# -- live-storage tracking -------------------------------------------------------------------------
class _LiveStorages(TorchDispatchMode):
    """Tracks every storage any op returns; after each op records total live bytes (+ op scratch).

    ``host`` storages (real CPU tensors saved outside the dispatcher: checkpoint's RNG states) count
    on a CPU target only; on a CUDA target every device storage is booked at CUDA's 512-B rounding
    and ``host_keys`` (optimizer step counters, CPU tensors on CUDA too) are left out.
    """

    def __init__(self, scratch: str, classify: Callable[[dict[int, int]], dict[str, int]], *,
                 target: str = "cpu", threads: int = 1):
        super().__init__()
        self.refs: dict[int, weakref.ref] = {}
        self.sizes: dict[int, int] = {}     # booked bytes of every live tracked storage
        self.total = 0                      # their sum, kept up to date by track/_book/_dead
        self.host: dict[int, weakref.ref] = {}
        self.host_keys: set[int] = set()
        self.counting_steps: Any = None     # the optimizer during its first step (counters appear)
        self.scratch = scratch
        self.classify = classify
        self.target = target
        self.threads = threads
        self.timeline: list[tuple[str, int]] = []
        self.peak = 0
        self.peak_op = ""
        self.breakdown: dict[str, int] = {}

    def track(self, t: torch.Tensor) -> None:
        key = storage_key(t)
        ref = self.refs.get(key)
        if ref is not None and ref() is not None:
            return
        storage = t.untyped_storage()
        self.refs[key] = weakref.ref(storage, functools.partial(self._dead, key))
        self._book(key, storage.nbytes())

    def _dead(self, key: int, ref: weakref.ref) -> None:
        """A tracked storage was freed: its bytes leave the running total at once."""
        if self.refs.get(key) is ref:
            del self.refs[key]
            self.total -= self.sizes.pop(key, 0)

    def _book(self, key: int, nbytes: int) -> None:
        """Record ``nbytes`` for storage ``key`` as the target's allocator books them."""
        if self.target == "cuda":
            nbytes = 0 if key in self.host_keys else cuda_allocation_bytes(nbytes)
        self.total += nbytes - self.sizes.get(key, 0)
        self.sizes[key] = nbytes

    def resized(self, storage) -> None:
        """A storage changed size in place (``UntypedStorage.resize_``, ``Tensor.set_``)."""
        key = storage._cdata
        if key in self.refs:
            self._book(key, storage.nbytes())

    def track_host(self, t: torch.Tensor) -> None:
        """Count a real tensor saved outside the dispatch mode (an RNG state) while it lives."""
        self.host[storage_key(t)] = weakref.ref(t.untyped_storage())

    def _contiguous_copy(self, func, args) -> int:
        """A convolution backward copies a non-contiguous grad_output (the expanded gradient of a
        ``sum`` loss) into a contiguous tensor for the duration of the op, on every device."""
        if str(func.overloadpacket) != "aten.convolution_backward" or args[0].is_contiguous():
            return 0
        nbytes = args[0].numel() * args[0].element_size()
        return cuda_allocation_bytes(nbytes) if self.target == "cuda" else nbytes

    @staticmethod
    def _alive(refs: dict[int, weakref.ref]) -> dict[int, int]:
        sizes, dead = {}, []
        for key, ref in refs.items():
            s = ref()
            if s is None:
                dead.append(key)
            else:
                sizes[key] = s.nbytes()
        for key in dead:
            del refs[key]
        return sizes

    def live(self) -> dict[int, int]:
        """Bytes booked per live storage on the target device (kept up to date op by op)."""
        if self.counting_steps is not None:
            new = _step_counters(self.counting_steps) - self.host_keys
            if new:
                self.host_keys |= new
                for key in new & self.sizes.keys():
                    self._book(key, 0)
        return self.sizes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tensors_in(out):
            self.track(t)
        for t in tensors_in((args, kwargs)):       # an op may have resized a storage it read or wrote
            key = storage_key(t)
            if key in self.refs:
                self._book(key, t.untyped_storage().nbytes())
        scratch = _conv_scratch_cpu(func, args, self.threads) if self.scratch == "cpu" else 0
        scratch += self._contiguous_copy(func, args)
        sizes = self.live()
        host = sum(self._alive(self.host).values()) if self.target == "cpu" else 0
        total = self.total + host + scratch
        name = str(func.overloadpacket)
        self.timeline.append((name, total))
        if total > self.peak:
            self.peak = total
            self.peak_op = name
            self.breakdown = self.classify(dict(sizes))
            if host:
                self.breakdown["checkpoint rng states"] = host
            if scratch:
                self.breakdown["kernel scratch"] = scratch
        return out


@contextlib.contextmanager
def _rng_states_to(record: Callable[[torch.Tensor], None]):
    """Show every CPU generator state taken (checkpoint's preserve_rng_state, fork_rng) to ``record``.

    ``torch.get_rng_state`` returns a real tensor made outside the dispatcher, so no dispatch mode
    sees it; it is wrapped for the duration of the block and restored after."""
    original = torch.get_rng_state

    def get_rng_state() -> torch.Tensor:
        state = original()
        record(state)
        return state

    torch.get_rng_state = get_rng_state
    try:
        yield
    finally:
        torch.get_rng_state = original


@contextlib.contextmanager
def _storage_resizes_to(record: Callable[[Any], None]):
    """Show every ``UntypedStorage.resize_`` (a reversible block freeing and refilling its input) to
    ``record``: storage methods bypass the dispatcher, so no dispatch mode sees them."""
    original = torch.UntypedStorage.resize_

    def resize_(storage, size):
        out = original(storage, size)
        record(storage)
        return out

    torch.UntypedStorage.resize_ = resize_
    try:
        yield
    finally:
        torch.UntypedStorage.resize_ = original


def _step_counters(opt: torch.optim.Optimizer | None) -> set[int]:
    """Storage keys of the optimizer's 0-dim ``step`` tensors (kept on the CPU unless capturable)."""
    if opt is None:
        return set()
    return {storage_key(st["step"]) for st in opt.state.values()
            if isinstance(st.get("step"), torch.Tensor) and st["step"].dim() == 0}


def simulate_step(model: nn.Module, example_inputs: Any, *, loss_fn: Callable | None = None,
                  optimizer: str = "adam", scratch: str | None = None, steps: int = 2,
                  keep_output: bool = True, amp: str | None = None, target: str | None = None,
                  threads: int | None = None) -> MemoryReport:
    """Predict the peak memory of training ``model`` on ``example_inputs`` without compute.

    Runs ``steps`` real training steps on fake-tensor copies (no data, no compute); the model and
    inputs are not touched. ``target`` is the device whose allocator is modelled (default: the
    model's): "cuda" rounds each storage to 512 B and leaves host memory out. ``scratch="cpu"`` (the
    default on a CPU target) adds the CPU convolution kernels' transient buffers for ``threads``
    OpenMP threads (default torch.get_num_threads()); ``"none"`` (CUDA's default) counts only tensors,
    cuDNN workspaces excluded. ``amp``: None, "bf16" or "fp16" autocast on the model's device.

    >>> net = nn.Linear(1000, 1000, bias=False)            # 4 MB of weights
    >>> r = simulate_step(net, torch.empty(1, 1000, device="meta"), optimizer="sgd")
    >>> r.peak_bytes // 1000                                # weights + grad + input + output
    8008
    """
    check_model_and_inputs(model, example_inputs)
    check_amp(amp)
    if optimizer not in OPTIMIZERS:
        raise MemplanError(f"unknown optimizer {optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
    device = home_device(model, example_inputs)
    target = device.type if target is None else target
    if target not in TARGETS:
        raise MemplanError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")
    scratch = ("cpu" if target == "cpu" else "none") if scratch is None else scratch
    if scratch not in SCRATCH_MODELS:
        raise MemplanError(f"unknown scratch model {scratch!r}; choose one of {SCRATCH_MODELS}")
    if scratch == "cpu" and target == "cuda":
        raise MemplanError("scratch='cpu' models CPU convolution kernels, not a CUDA step; "
                           "use scratch='none' with target='cuda'")
    threads = torch.get_num_threads() if threads is None else threads
    if not isinstance(threads, int) or threads < 1:
        raise MemplanError(f"threads must be a positive int (OpenMP threads of the CPU step), got {threads!r}")
    world = FakeWorld(device)
    mmodel = world.module(model)
    inputs = world.inputs(as_tuple(example_inputs))
    params = list(mmodel.parameters())
    param_keys = {storage_key(p) for p in params} | {storage_key(b) for b in mmodel.buffers()}

    holder: list[Any] = [None]

    def classify(sizes: dict[int, int]) -> dict[str, int]:
        grads = {storage_key(p.grad) for p in params if p.grad is not None}
        opt = holder[0]
        state = set()
        if opt is not None:
            for st in opt.state.values():
                state |= {storage_key(v) for v in st.values() if isinstance(v, torch.Tensor) and is_fake(v)}
        out = {"parameters": 0, "gradients": 0, "optimizer state": 0, "activations and other": 0}
        for key, nbytes in sizes.items():
            kind = ("parameters" if key in param_keys else "gradients" if key in grads
                    else "optimizer state" if key in state else "activations and other")
            out[kind] += nbytes
        return out

    mode = _LiveStorages(scratch, classify, target=target, threads=threads)

    def seen_optimizer(opt) -> None:
        holder[0] = opt
        if opt is not None and target == "cuda":     # step counters appear during the first step
            opt.register_step_pre_hook(lambda o, *_: setattr(mode, "counting_steps", o if not mode.host_keys else None))
            opt.register_step_post_hook(lambda o, *_: (mode.host_keys.update(_step_counters(o)),
                                                       setattr(mode, "counting_steps", None)))

    for t in params + list(mmodel.buffers()) + list(inputs):
        if isinstance(t, torch.Tensor):
            mode.track(t)
    with world.mode, mode, _rng_states_to(mode.track_host), _storage_resizes_to(mode.resized):
        run_steps(mmodel, inputs, loss_fn, optimizer, steps=steps, on_optimizer=seen_optimizer,
                  keep_output=keep_output, amp=amp, device_type=device.type, fake=True)
    label = f"scratch={scratch}" + (f", target={target}" if target != "cpu" else "") + (f", amp={amp}" if amp else "")
    return MemoryReport(peak_bytes=mode.peak, breakdown=mode.breakdown, timeline=mode.timeline,
                        method=f"simulated ({label})", peak_op=mode.peak_op)


def measure_step(model: nn.Module, example_inputs: Any, *, loss_fn: Callable | None = None,
                 optimizer: str = "adam", device: str | torch.device = "cpu", steps: int = 2,
                 keep_output: bool = True, amp: str | None = None) -> MemoryReport:
    """Measure the peak memory of real training steps on ``device`` (a copy of model and inputs).

    CPU: bytes live before the step plus the largest running sum of the profiler's allocator events.
    CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``. ``keep_output`` and
    ``amp`` as in simulate_step.
    """
    import copy
    check_model_and_inputs(model, example_inputs, real=True)
    check_amp(amp)
    device = measure_device(device)
    if any(t.is_meta for t in tensors_in(as_tuple(example_inputs))):
        raise MemplanError("measure_step needs real example inputs, got meta tensors; use simulate_step to predict")
    inputs = tuple(t.to(device) if isinstance(t, torch.Tensor) else t for t in as_tuple(example_inputs))
    work = copy.deepcopy(model).to(device)
    base = _storage_bytes(list(work.parameters()) + list(work.buffers()) + list(inputs))
    run = dict(steps=steps, keep_output=keep_output, amp=amp, device_type=device.type)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        run_steps(work, inputs, loss_fn, optimizer, **run)
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        return MemoryReport(peak_bytes=int(peak), breakdown={"before step": base}, timeline=[],
                            method="measured (cuda max_memory_allocated)", peak_op="")
    _, deltas = allocator_events(lambda: run_steps(work, inputs, loss_fn, optimizer, **run))
    current = peak = 0
    timeline = []
    for nbytes in deltas:
        current += nbytes
        timeline.append(("alloc" if nbytes > 0 else "free", base + current))
        peak = max(peak, current)
    return MemoryReport(peak_bytes=base + peak, breakdown={"before step": base, "step": peak},
                        timeline=timeline, method="measured (cpu profiler)", peak_op="")


def allocator_events(fn: Callable[[], Any]) -> tuple[Any, list[int]]:
    """``fn()``'s result and the CPU allocator's events while it ran (bytes, + allocated / - freed, in time
    order) from the profiler; frees of storages allocated before ``fn`` count too."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    return result, [e.nbytes() for e in events]


def running_peak(deltas: Sequence[int]) -> tuple[int, int]:
    """The largest running sum of allocator ``deltas`` (0 at the start) and the final sum.

    >>> running_peak([100, 50, -120, 30])
    (150, 60)
    """
    current = peak = 0
    for nbytes in deltas:
        current += nbytes
        peak = max(peak, current)
    return peak, current


def measure_device(device: Any) -> torch.device:
    """``device`` as a torch.device measure_step can read a peak on (cpu, or cuda when one is visible);
    else MemplanError naming the device and the fix."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        dev = None
    if dev is None or dev.type not in TARGETS:
        raise MemplanError(f"measure_step cannot measure on device {device!r}: it reads peaks on cpu (profiler) "
                           "or cuda (max_memory_allocated) only; pass device='cpu' or device='cuda'")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise MemplanError(f"measure_step device {device!r}: no CUDA device is visible here "
                           f"(torch {torch.__version__}); pass device='cpu'")
    return dev


def _storage_bytes(tensors: Sequence[Any]) -> int:
    seen: dict[int, int] = {}
    for t in tensors:
        if isinstance(t, torch.Tensor):
            seen[storage_key(t)] = t.untyped_storage().nbytes()
    return sum(seen.values())
