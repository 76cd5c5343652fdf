"""The ruler: the peak memory of a whole training step, predicted on meta tensors or measured.

A step is what an ordinary training loop does: zero_grad(set_to_none) -> ``out = model(x)`` ->
``loss = loss_fn(out)`` -> backward -> optimizer.step(), run twice so the optimizer state of a
steady-state step is included; ``out`` stays alive through backward until the next step replaces it
(``keep_output=False``: dropped once the loss is built), under autocast when ``amp`` is set. ``simulate_step`` runs it on a meta copy
under a dispatch mode that sums the bytes of every live storage after each ATen op (exact for
tensor lifetimes; sees storages resized in place). It adds the transient scratch buffers kernels
allocate and free inside one op (CPU convolution unfold / oneDNN reorder buffers), which tensor
tracking cannot see, from a model of those kernels (``scratch="cpu"``). ``measure_step`` runs the
step for real: the CPU profiler's allocator events, or CUDA's max_memory_allocated.

Beyond tensors, the simulation counts what checkpoint saves outside the dispatcher: the CPU generator
state ``preserve_rng_state`` keeps per recomputed segment (5,056 B, plus one more while a segment is
recomputed under ``fork_rng``). ``target="cuda"`` books every storage as CUDA's caching allocator
does (rounded up to 512 B) and leaves out host memory (RNG states, Adam's step counters).
"""
from __future__ import annotations

import contextlib
import functools
import math
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
    if amp not in AMP_DTYPES:
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
def _conv_scratch_cpu(func, args, threads: int) -> int:
    """Bytes a CPU 3D convolution op allocates and frees inside itself (0 for other ops)."""
    name = str(func.overloadpacket)
    if name == "aten.convolution":      # (input, weight, bias, stride, padding, dilation, transposed, ...)
        return conv_scratch_bytes(args[0], args[1], args[3], args[4], bool(args[6]), int(args[8]), backward=False,
                                  threads=threads)
    if name == "aten.convolution_backward":  # (grad_out, input, weight, bias_sizes, stride, ..., output_mask)
        mask = args[10] if len(args) > 10 else (True, True, True)
        return conv_scratch_bytes(args[1], args[2], args[4], args[5], bool(args[7]), int(args[9]), backward=True,
                                  threads=threads, grad_input=bool(mask[0]))
    return 0


def conv_scratch_bytes(x: torch.Tensor, w: torch.Tensor, stride, padding, transposed: bool, groups: int,
                       *, backward: bool, threads: int | None = None, grad_input: bool = True) -> int:
    """Bytes a CPU 3D convolution holds beyond its inputs and outputs at its peak; 0 for other ranks.

    Which kernel runs follows ATen's ``use_mkldnn``: oneDNN when the input is float32 (and the kernel
    is not 1x1x1 unstrided, or batch >= 16, or more than one ``threads``) and (batch > 1, kernel > 3
    in the last two dims, groups > 1, or N*C*D*H > 20480); bfloat16/float16 always (AMX/AVX-512).
    Otherwise slow_conv3d unfolds the input (N * C_in * prod(k) * out voxels), a transposed one
    builds N * C_out * prod(k) * in voxels of columns, a 1x1x1 one's backward copies its input.
    oneDNN (fp32) works in 16-channel blocked copies: ``b(t)`` (t padded to 16 channels; the input
    is read in place when C_in < 16). Phases, each measured with the profiler (tests/test_ruler.py):
    forward ``max(b(x) + b(w) + b(y), b(y) + y)``; backward ``max(b(gy) + b(w) + b(gx), b(gx) + gx,
    gx + b(x) + b(gy) + p * b(w))`` (b(x) padded below 16 channels too for a 1x1x1 kernel), for a stride > 1 also ``gx + b(x) + b(gx)``; minus the op's
    outputs. ``b(w)`` pads C_in only when C_in >= 16; p = 2 weight-sized buffers, 9 when the kernel is
    wider than the input (an upper bound: 5 to 9 measured).
    """
    if x.dim() != 5:
        return 0
    threads = torch.get_num_threads() if threads is None else threads
    n, c_in, spatial = x.shape[0], x.shape[1], tuple(x.shape[2:])
    k = tuple(w.shape[2:])
    esize = x.element_size()
    if transposed:
        c_out = w.shape[1] * groups
        out_sp = [(spatial[i] - 1) * stride[i] - 2 * padding[i] + k[i] for i in range(3)]
    else:
        c_out = w.shape[0]
        out_sp = [(spatial[i] + 2 * padding[i] - k[i]) // stride[i] + 1 for i in range(3)]
    vox_in, vox_out = math.prod(spatial), math.prod(out_sp)
    pointwise = all(v == 1 for v in k) and all(v == 1 for v in stride) and not any(padding)
    half = x.dtype in (torch.bfloat16, torch.float16)
    mkldnn = half or (x.dtype == torch.float32 and (not pointwise or n >= 16 or threads > 1) and (
        groups > 1 or (k[-1] > 3 and k[-2] > 3) or n > 1 or n * c_in * spatial[0] * spatial[1] > 20480))
    if not mkldnn:
        if transposed:   # columns, and (in a training step) a copy of the input
            return n * c_out * math.prod(k) * vox_in * esize + x.numel() * esize
        if pointwise:
            return x.numel() * esize if backward else 0    # the weight gradient reads a copy of x
        return n * c_in * math.prod(k) * vox_out * esize
    block = lambda c: 16 * math.ceil(c / 16)  # noqa: E731
    xsz, ysz = n * c_in * vox_in * esize, n * c_out * vox_out * esize
    gx_b = n * block(c_in) * vox_in * esize
    x_b = gx_b if c_in >= 16 else 0
    y_b = n * block(c_out) * vox_out * esize
    w_b = block(c_out) * (block(c_in) if c_in >= 16 else c_in) * math.prod(k) * esize // max(groups, 1)
    if half:   # reduced-precision oneDNN: 2x the largest blocked activation forward (measured 2.0-2.4x),
        # 5x backward (measured 3.8-8.3x per op; 5 fits the clients' whole steps best): a rough model
        return (5 if backward else 2) * max(x_b, y_b, gx_b if backward else 0)
    if not backward:
        return max(x_b + w_b + y_b, y_b + ysz) - ysz
    w_sz = w.numel() * esize
    outputs = w_sz + c_out * esize + (xsz if grad_input else 0)
    # the weight gradient is built in a blocked buffer beside the output one (2 weight-sized buffers);
    # a kernel wider than the input (a 3x3x3 on 2^3 or 1^3 voxels) reduces over partial buffers: 4 to 8
    # weights beyond the outputs were measured, run to run; the model takes the upper one (9 in all)
    partials = 9 if any(k[i] > spatial[i] for i in range(3)) else 2
    x_w = gx_b if pointwise else x_b        # a 1x1x1 weight gradient reads x padded even below 16 channels
    phases = [x_w + y_b + partials * w_b + (xsz if grad_input else 0)]
    if grad_input:
        phases += [y_b + w_b + gx_b, gx_b + xsz]
        if any(s > 1 for s in stride) and not transposed:
            phases.append(xsz + x_b + gx_b)
    return max(0, max(phases) - outputs)


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
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run_steps(work, inputs, loss_fn, optimizer, **run)
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    current = peak = 0
    timeline = []
    for e in events:
        current += e.nbytes()
        timeline.append(("alloc" if e.nbytes() > 0 else "free", base + current))
        peak = max(peak, current)
    return MemoryReport(peak_bytes=base + peak, breakdown={"before step": base, "step": peak},
                        timeline=timeline, method="measured (cpu profiler)", peak_op="")


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
