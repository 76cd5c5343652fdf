"""What every entry point checks first: a module, tensor inputs it runs on, and something to train.

Shared by trace (``check_inputs``) and the ruler (``check_model_and_inputs`` at the top of
simulate_step / measure_step), so a wrong shape, dtype or device, or a model that is not an
``nn.Module``, gets the same MemplanError naming the value and the fix from every entry point,
never a tracer's advice about control flow or a raw RuntimeError from inside a training step.
"""
from __future__ import annotations

import copy
import logging
import os
import traceback
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from ._meta import FakeWorld, as_tuple, home_device, is_fake, tensors_in
from .errors import MemplanError

_TORCH_DIR = os.path.dirname(torch.__file__)
_MEMPLAN_DIR = os.path.dirname(__file__)

#: Words in an exception that mean: forward read a tensor's values, which fake tensors do not have.
DATA_DEPENDENT = ("DataDependent", "GuardOnDataDependent", "data-dependent", "data dependent")

_SCALARS = (torch.Tensor, int, float, bool, str, type(None))


def user_frame(exc: BaseException) -> str:
    """'file:line' of the innermost traceback frame in the model's own code (not torch's, not memplan's)."""
    where = ""
    for frame in traceback.extract_tb(exc.__traceback__):
        f = frame.filename
        if f.startswith(_TORCH_DIR) or f.startswith(_MEMPLAN_DIR) or f.startswith("<"):
            continue
        where = f"{f}:{frame.lineno}"
    return where


def describe_inputs(inputs: tuple) -> str:
    """'1x1x8x8x8 float32 on cpu, int' - what the user passed, for error messages."""
    return ", ".join(f"{'x'.join(map(str, t.shape))} {str(t.dtype).replace('torch.', '')} on {t.device}"
                     if isinstance(t, torch.Tensor) else type(t).__name__ for t in inputs) or "no inputs"


def check_inputs(model: Any, inputs: tuple) -> None:
    """Refuse what is not a module or not tensors before tracing, with a message that says so."""
    if not isinstance(model, nn.Module):
        what = f"the class {model.__name__}" if isinstance(model, type) else type(model).__name__
        raise MemplanError(f"model must be a torch.nn.Module instance, got {what}; pass the network "
                           "instance (e.g. MyNet()), not its class, a function or its output")
    bad = [type(x).__name__ for x in tree_flatten(inputs)[0] if not isinstance(x, _SCALARS)]
    if bad:
        raise MemplanError(f"example inputs must be tensors (or a tuple of them), got {', '.join(bad)}; "
                           "pass e.g. torch.empty(1, 1, 96, 96, 96, device='meta')")
    if not tensors_in(inputs):
        raise MemplanError("example inputs hold no tensor; pass the input batch, e.g. "
                           "torch.empty(1, 1, 96, 96, 96, device='meta')")


def check_trainable(model: nn.Module, inputs: tuple) -> None:
    """Refuse a step with nothing to differentiate: no parameter and no input requires grad.

    Without one, backward has nothing to compute, autograd keeps no activations and there is no
    training-step memory to plan or measure."""
    params = list(model.parameters())
    if any(p.requires_grad for p in params) or any(t.requires_grad for t in tensors_in(inputs)):
        return
    have = (f"all {len(params)} parameter tensor(s) have requires_grad=False" if params
            else "it has no parameters")
    raise MemplanError(
        f"{type(model).__name__} has nothing to train: {have} and no example input requires grad, so a "
        "training step has no backward and nothing to plan. Fix: unfreeze parameters "
        "(p.requires_grad_(True)), or pass inputs with requires_grad=True to plan for input gradients; "
        "for inference alone run the model under torch.no_grad()")


def input_failure(model: nn.Module, inputs: tuple, exc: BaseException) -> MemplanError:
    """The error for a model that fails on the example inputs: the inputs, the model's line, the fix."""
    where = user_frame(exc)
    at = f" at {where}" if where else ""
    first = (str(exc).strip().splitlines() or [""])[0][:300]
    params = sorted({str(t.device) for t in list(model.parameters()) + list(model.buffers())})
    return MemplanError(
        f"{type(model).__name__} fails on the example inputs ({describe_inputs(inputs)}; parameters on "
        f"{', '.join(params) or 'no device'}): {type(exc).__name__}: {first}{at}.\n"
        "Fix: give the input shape, dtype and device the network expects (batch, channels, then the spatial "
        "sizes; the channel count of its first layer; sizes divisible by its total downsampling), or "
        "pass several inputs as a tuple")


def check_runs(model: nn.Module, inputs: tuple, *, real: bool = False) -> None:
    """Run ``model`` once on fake twins of ``inputs`` (no data, no compute, the model untouched).

    A failure is the inputs' (shape, dtype, device) or the model's, reported as such. For a ``real``
    step on real tensors a fake failure is confirmed by a real forward (forward may read tensor values,
    which fakes do not have)."""
    world = FakeWorld(home_device(model, inputs))
    fake_log = logging.getLogger("torch._subclasses.fake_tensor")
    level, rng = fake_log.level, torch.get_rng_state()
    fake_log.setLevel(logging.CRITICAL)       # it logs a traceback for a shape error we report ourselves
    try:
        twin, fakes = world.module(model), world.inputs(inputs)
        with world.mode, torch.no_grad():
            twin(*fakes)
    except Exception as exc:  # noqa: BLE001 - reported with the model's own frame and the inputs
        if real and is_real(model, inputs):
            return check_runs_for_real(model, inputs)
        if any(k in f"{type(exc).__name__}: {exc}" for k in DATA_DEPENDENT):
            where = user_frame(exc)
            raise MemplanError(
                f"{type(model).__name__} reads tensor values in forward{' at ' + where if where else ''}, which a "
                "step on fake tensors (simulate_step, planning) does not have. Fix: decide from shapes or __init__ "
                "arguments (torch.where instead of a Python `if` on a tensor), or measure the step for real with "
                "memplan.measure_step") from exc
        raise input_failure(model, inputs, exc) from exc
    finally:
        fake_log.setLevel(level)
        torch.set_rng_state(rng)


def is_real(model: nn.Module, inputs: tuple) -> bool:
    """True when no input, parameter or buffer is a meta or fake tensor: the step can run for real."""
    tensors = tensors_in(inputs) + list(model.parameters()) + list(model.buffers())
    return all(not t.is_meta and not is_fake(t) for t in tensors)


def check_runs_for_real(model: nn.Module, inputs: tuple) -> None:
    """One real forward of a copy of ``model`` without autograd (the model and the RNG state untouched)."""
    rng = torch.get_rng_state()
    try:
        with torch.no_grad():
            copy.deepcopy(model)(*inputs)
    except Exception as exc:  # noqa: BLE001 - reported with the model's own frame and the inputs
        raise input_failure(model, inputs, exc) from exc
    finally:
        torch.set_rng_state(rng)


def check_model_and_inputs(model: Any, example_inputs: Any, *, real: bool = False) -> None:
    """Everything a training step needs of its arguments: a module, tensor inputs it runs on, and a
    parameter or input that requires grad; raises MemplanError naming the value and the fix.
    ``real``: the step will run on real tensors (measure_step), not on fakes (simulate_step)."""
    inputs = as_tuple(example_inputs)
    check_inputs(model, inputs)
    check_trainable(model, inputs)
    check_runs(model, inputs, real=real)
