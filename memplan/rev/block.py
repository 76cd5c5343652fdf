"""Reversible additive-coupling blocks (Gomez et al. 2017; FetusMapV2 Eq. 1): no stored activations.

Forward (channels split in halves)::

    x1, x2 = split(x)            y1 = x1 + F(x2)        y2 = x2 + G(y1)        y = cat(y1, y2)

Backward rebuilds the input from the output and backpropagates in the same pass::

    x2 = y2 - G(y1)              x1 = y1 - F(x2)

so autograd keeps only the block's output (one extra F and one extra G evaluation in backward).
With ``free_input=True`` the block also releases its input's storage after forward and refills
that same storage with the rebuilt input in backward, so a chain of blocks holds one activation
however deep it is. Set it only when nothing reads the input between this block's forward and
its backward except through the refill: no other consumer, not a graph input, and no op that
saved it for backward unless that op is recomputed (checkpointed) or is itself a reversible
block. A ReLU that saved its output and is not recomputed would read the rebuilt values, whose
exact zeros come back as +-1e-7 and flip its mask: wrong gradients. The block never frees a
leaf, a view, or anything when no graph is recorded (``torch.no_grad``).

Backward replays forward's RNG state (dropout) and autocast settings, and freezes BatchNorm
running statistics (updated once, in forward). Never put a block with ``free_input=True``
inside a checkpointed segment (the segment's recompute would read the freed input). The block
is an fx leaf (:func:`is_reversible_leaf`); even a plain ``symbolic_trace`` records it as one
``call_module``.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence

import torch
from torch import fx, nn
from torch.autograd.function import once_differentiable

from ..bnfreeze import frozen_batchnorm_stats

__all__ = ["ReversibleBlock", "coupling_param_count", "is_reversible_leaf", "make_conv_bn_relu_coupling"]

_RngState = tuple[torch.Tensor, torch.device | None, torch.Tensor | None]


def is_reversible_leaf(module: nn.Module) -> bool:
    """True for a :class:`ReversibleBlock`: tracers keep it as one ``call_module`` node."""
    return isinstance(module, ReversibleBlock)


class ReversibleBlock(nn.Module):
    """y = cat(x1 + F(x2), x2 + G(y1)): a C -> C block whose input is rebuilt from its output.

    ``f`` and ``g`` map C/2 -> C/2 channels without changing the shape.

    >>> f, g = make_conv_bn_relu_coupling(3, 4, kernel_size=3, padding=1)
    >>> block = ReversibleBlock(f, g)
    >>> x = torch.randn(2, 4, 5, 5, 5)
    >>> y = block(x)
    >>> y.shape, torch.allclose(block.inverse(y), x, atol=1e-5)
    (torch.Size([2, 4, 5, 5, 5]), True)
    """

    def __init__(self, f: nn.Module, g: nn.Module, *, free_input: bool = False, preserve_rng_state: bool = True):
        super().__init__()
        for name, value in (("f", f), ("g", g)):
            if not isinstance(value, nn.Module):
                raise ValueError(f"ReversibleBlock: {name} must be an nn.Module, got {type(value).__name__}")
        for name, value in (("free_input", free_input), ("preserve_rng_state", preserve_rng_state)):
            if not isinstance(value, bool):
                raise ValueError(f"ReversibleBlock: {name} must be a bool, got {value!r}")
        self.f = f
        self.g = g
        self.free_input = free_input
        self.preserve_rng_state = preserve_rng_state

    def extra_repr(self) -> str:
        return f"free_input={self.free_input}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(x, fx.Proxy):  # any fx tracer records the block as one call_module (a leaf)
            return x.tracer.create_proxy("call_module", x.tracer.path_of_module(self), (x,), {})
        _check_splittable(x)
        f_params = tuple(self.f.parameters())
        params = f_params + tuple(self.g.parameters())
        if not torch.is_grad_enabled() or not (x.requires_grad or any(p.requires_grad for p in params)):
            return self._couple(x)  # no graph is recorded: a plain forward, the input is left alone
        return _ReversibleCoupling.apply(x, self, len(f_params), *params)

    def _couple(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.chunk(2, dim=1)
        y1 = x1 + self.f(x2)
        return torch.cat([y1, x2 + self.g(y1)], dim=1)

    @torch.no_grad()
    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        """The input x with ``self(x) == y`` (BatchNorm statistics are left untouched)."""
        _check_splittable(y)
        y1, y2 = y.chunk(2, dim=1)
        with frozen_batchnorm_stats([self.f, self.g]):
            x2 = y2 - self.g(y1)
            return torch.cat([y1 - self.f(x2), x2], dim=1)


def _check_splittable(x: torch.Tensor) -> None:
    if x.dim() < 2 or x.shape[1] % 2:
        raise ValueError(f"ReversibleBlock needs an input (N, C, ...) with even C to split in halves, "
                         f"got shape {tuple(x.shape)}; use an even channel count")


class _ReversibleCoupling(torch.autograd.Function):
    """Autograd keeps the output only (plus the input when it is not freed); see the module doc."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, block: ReversibleBlock, n_f: int, *params: torch.Tensor) -> torch.Tensor:
        ctx.block, ctx.n_f = block, n_f
        ctx.autocast = _capture_autocast(x.device)
        # detached halves: views of x made here would claim requires_grad without a grad_fn, which
        # breaks module hooks that look for one (FlopCounterMode's module tracker, used by analyze)
        x1, x2 = x.detach().chunk(2, dim=1)
        y = torch.empty_like(x, memory_format=torch.contiguous_format)
        y1, y2 = y.chunk(2, dim=1)
        ctx.rng_f = _capture_rng(x.device) if block.preserve_rng_state else None
        torch.add(x1, block.f(x2), out=y1)
        ctx.rng_g = _capture_rng(x.device) if block.preserve_rng_state else None
        torch.add(x2, block.g(y1), out=y2)
        del x1, x2, y1, y2
        ctx.freed = block.free_input and _owns_storage(x)
        if ctx.freed:
            ctx.input_handle = _untracked_alias(x)  # refilled in backward, for whoever reads x next
            x.untyped_storage().resize_(0)
            ctx.save_for_backward(y)
        else:
            ctx.input_handle = None
            ctx.save_for_backward(y, x)  # kept anyway: use the exact input, not a rebuilt one
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y: torch.Tensor):
        block, n_f = ctx.block, ctx.n_f
        saved = ctx.saved_tensors
        y = saved[0].detach()
        x_kept = saved[1].detach() if len(saved) > 1 else None
        params = tuple(block.f.parameters()) + tuple(block.g.parameters())
        y1, y2 = y.chunk(2, dim=1)
        dy1, dy2 = grad_y.chunk(2, dim=1)
        # the input gradient is written into one buffer in halves (no temporaries, no concatenation)
        grad_x = torch.empty_like(grad_y, memory_format=torch.contiguous_format) if ctx.needs_input_grad[0] else None
        dx1, dx2 = grad_x.chunk(2, dim=1) if grad_x is not None else (torch.empty_like(dy1), None)
        with torch.enable_grad(), frozen_batchnorm_stats([block.f, block.g]), _replayed_autocast(ctx.autocast):
            # G first: dL/dy1 = dy1 + G'(y1)^T dy2, and x2 = y2 - G(y1).
            gy1, (d_y1_from_g, *g_grads) = _vjp(block.g, y1, params[n_f:], dy2, ctx.rng_g)
            with torch.no_grad():
                torch.add(dy1, d_y1_from_g, out=dx1)
            del d_y1_from_g
            x2 = _rebuild_x2(ctx, y2, gy1, x_kept)
            del gy1
            # then F: dL/dx2 = dy2 + F'(x2)^T dL/dy1, and x1 = y1 - F(x2).
            fx2, (d_x2_from_f, *f_grads) = _vjp(block.f, x2, params[:n_f], dx1, ctx.rng_f)
        with torch.no_grad():
            if dx2 is not None:
                torch.add(dy2, d_x2_from_f, out=dx2)
            if ctx.input_handle is not None:  # once: a retain_graph re-run finds the input refilled already
                torch.sub(y1, fx2, out=ctx.input_handle.chunk(2, dim=1)[0])
                ctx.input_handle = None
        return (grad_x, None, None, *f_grads, *g_grads)


def _rebuild_x2(ctx, y2: torch.Tensor, gy1: torch.Tensor, x_kept: torch.Tensor | None) -> torch.Tensor:
    """x2: the kept input's half; else y2 - G(y1), written straight into the refilled input storage
    (when the input was freed) or over G(y1)'s own buffer (bitwise the same difference)."""
    if x_kept is not None:
        return x_kept.chunk(2, dim=1)[1]
    with torch.no_grad():
        if ctx.input_handle is not None:
            handle = ctx.input_handle
            handle.untyped_storage().resize_(handle.numel() * handle.element_size())
            return torch.sub(y2, gy1, out=handle.chunk(2, dim=1)[1])
        if gy1.untyped_storage()._cdata == y2.untyped_storage()._cdata:  # G returned a view of y1
            return y2 - gy1
        return torch.sub(y2, gy1, out=gy1)


def _vjp(fn: nn.Module, inp: torch.Tensor, params: Sequence[torch.Tensor], grad_out: torch.Tensor,
         rng: _RngState | None) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """Evaluate ``fn(inp)`` once (RNG replayed) and return it (detached) with d/d(inp, *params)."""
    inp = inp.detach().requires_grad_(True)
    with _replayed_rng(rng):
        out = fn(inp)
    wrt = [inp] + [p for p in params if p.requires_grad]
    if out.requires_grad:
        grads = iter(torch.autograd.grad(out, wrt, grad_out, allow_unused=True))
    else:  # fn ignores its input and has no trainable parameters
        grads = iter([None] * len(wrt))
    grad_inp = next(grads)
    grad_inp = torch.zeros_like(inp) if grad_inp is None else grad_inp
    param_grads = [next(grads) if p.requires_grad else None for p in params]
    return out.detach(), [grad_inp, *param_grads]


def _owns_storage(x: torch.Tensor) -> bool:
    """Freeing x's storage frees x only: not a leaf, not a view, and x spans its whole storage."""
    return (not x.is_leaf and x._base is None and x.storage_offset() == 0 and x.is_contiguous()
            and x.untyped_storage().nbytes() == x.numel() * x.element_size())


def _untracked_alias(x: torch.Tensor) -> torch.Tensor:
    """A tensor on x's storage with its own version counter: writing it trips no saved-tensor check."""
    alias = torch.empty(0, dtype=x.dtype, device=x.device)
    return alias.set_(x.untyped_storage(), x.storage_offset(), x.size(), x.stride())


def _capture_rng(device: torch.device) -> _RngState | None:
    """CPU RNG state, plus the CUDA device's, before F or G runs (meta tensors draw no numbers)."""
    if device.type == "meta":
        return None
    if device.type == "cuda":
        return torch.get_rng_state(), device, torch.cuda.get_rng_state(device)
    return torch.get_rng_state(), None, None


@contextlib.contextmanager
def _replayed_rng(state: _RngState | None) -> Iterator[None]:
    """Run the block with the RNG as it was in forward; the caller's RNG is restored afterwards."""
    if state is None:
        yield
        return
    cpu_state, device, device_state = state
    devices = [device] if device is not None else []
    with torch.random.fork_rng(devices=devices, device_type=device.type if device is not None else "cuda"):
        torch.set_rng_state(cpu_state)
        if device is not None:
            torch.cuda.set_rng_state(device_state, device)
        yield


def _capture_autocast(device: torch.device) -> tuple[str, bool, torch.dtype] | None:
    """Autocast settings of forward, so that backward's F and G run in the same precision."""
    if device.type not in ("cpu", "cuda"):
        return None
    return device.type, torch.is_autocast_enabled(device.type), torch.get_autocast_dtype(device.type)


def _replayed_autocast(state: tuple[str, bool, torch.dtype] | None) -> contextlib.AbstractContextManager:
    if state is None:
        return contextlib.nullcontext()
    device_type, enabled, dtype = state
    return torch.autocast(device_type, dtype=dtype, enabled=enabled)


def make_conv_bn_relu_coupling(spatial_dims: int, channels: int, kernel_size: int | Sequence[int],
                               padding: int | Sequence[int], layers: int = 1, track_running_stats: bool = True,
                               *, affine: bool = True, eps: float = 1e-5,
                               momentum: float | None = 0.1) -> tuple[nn.Sequential, nn.Sequential]:
    """F and G for a C -> C Conv-BN-ReLU pass: ``layers`` x (Conv C/2 -> C/2, BN, ReLU) each.

    Parameter count: a C -> C conv with kernel volume K has C*C*K weights; F and G together have
    2*(C/2)^2*K = C*C*K/2, half (BN: 2*C affine parameters either way). Convs have no bias (BN follows).

    >>> f, g = make_conv_bn_relu_coupling(3, 8, 3, 1)
    >>> sum(p.numel() for p in f.parameters()) + sum(p.numel() for p in g.parameters())
    880
    >>> coupling_param_count(8, (3, 3, 3))  # 8*8*27/2 + 2*8 = 864 + 16
    880
    """
    if spatial_dims not in (1, 2, 3):
        raise ValueError(f"spatial_dims must be 1, 2 or 3, got {spatial_dims!r}")
    if not isinstance(channels, int) or channels < 2 or channels % 2:
        raise ValueError(f"channels must be an even int >= 2 (the coupling splits them in halves), got {channels!r}")
    if not isinstance(layers, int) or layers < 1:
        raise ValueError(f"layers must be a positive int, got {layers!r}")
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[spatial_dims]
    norm = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[spatial_dims]
    half = channels // 2

    def stack() -> nn.Sequential:
        mods: list[nn.Module] = []
        for _ in range(layers):
            mods += [conv(half, half, kernel_size, padding=padding, bias=False),
                     norm(half, eps=eps, momentum=momentum, affine=affine, track_running_stats=track_running_stats),
                     nn.ReLU()]
        return nn.Sequential(*mods)

    return stack(), stack()


def coupling_param_count(channels: int, kernel_size: Sequence[int], layers: int = 1, affine: bool = True) -> int:
    """Parameters of :func:`make_conv_bn_relu_coupling`'s F and G together (see its docstring)."""
    half = channels // 2
    per_layer = half * half * math.prod(kernel_size) + (2 * half if affine else 0)
    return 2 * layers * per_layer
