"""Model files for the command line: run ``PATH[:ATTR]`` as Python and find the network and its input.

Without ATTR the file's ``model`` (an instance), ``build_model`` (a zero-argument factory) or
``Model`` (a class) is used, in that order; ATTR may name any of the three kinds. The input comes
from ``--input-shape`` or the file's ``example_inputs()`` / ``INPUT_SHAPE``. The file is executed:
load only files you trust.

>>> parse_shape("1,1,176,112,112"), parse_shape("2x1x32x32x32")
((1, 1, 176, 112, 112), (2, 1, 32, 32, 32))
>>> split_reference("examples/unet.py:build_model")
('examples/unet.py', 'build_model')
"""
from __future__ import annotations

import hashlib
import importlib.util
import inspect
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from ._meta import as_tuple, meta_copy, tensors_in, to_meta
from .errors import MemplanError

#: Names looked up, in order, when the reference has no ``:ATTR``.
DEFAULT_NAMES = ("model", "build_model", "Model")
DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
          "bfloat16": torch.bfloat16}
_ATTR = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*$")


class ModelFileError(MemplanError):
    """A model file, its model or its input shape cannot be used; the message says the fix."""


@dataclass(frozen=True)
class LoadedModel:
    """A network from a model file, its example inputs on ``meta``, and where each came from."""
    model: nn.Module = field(repr=False)
    inputs: tuple[torch.Tensor, ...] = field(repr=False)
    model_source: str                    # e.g. "build_model() in examples/tiny_unet.py"
    input_source: str                    # e.g. "--input-shape" or "INPUT_SHAPE in ..."
    real_inputs: tuple[torch.Tensor, ...] | None = field(default=None, repr=False, compare=False)

    @property
    def input_shapes(self) -> tuple[tuple[int, ...], ...]:
        return tuple(tuple(t.shape) for t in self.inputs)


def split_reference(ref: str) -> tuple[str, str | None]:
    """``"path.py:attr"`` -> (path, attr); a colon not followed by a Python name stays in the path."""
    head, sep, tail = ref.rpartition(":")
    if sep and head and _ATTR.match(tail):
        return head, tail
    return ref, None


def parse_shape(text: str) -> tuple[int, ...]:
    """``"1,1,176,112,112"`` (or ``1x1x176x112x112``) -> a tuple of positive ints."""
    parts = [p.strip() for p in re.split(r"[,x×]", text.strip().strip("()[]"))]
    try:
        dims = tuple(int(p) for p in parts)
    except ValueError:
        raise ModelFileError(f"cannot parse input shape {text!r}: write positive integers separated by commas, "
                             "e.g. --input-shape 1,1,176,112,112 (batch, channels, D, H, W)") from None
    if not dims or any(d < 1 for d in dims):
        raise ModelFileError(f"input shape {text!r} has a dimension < 1; every size must be a positive integer, "
                             "e.g. --input-shape 1,1,176,112,112")
    return dims


def parse_dtype(name: str | None) -> torch.dtype | None:
    """``"float16"`` -> torch.float16; None stays None."""
    if name is None:
        return None
    try:
        return DTYPES[name]
    except KeyError:
        raise ModelFileError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}") from None


def execute_file(path: str | Path) -> ModuleType:
    """Run the model file as a fresh module (its folder first on sys.path, so sibling imports work)."""
    path = Path(path)
    if not path.is_file():
        hint = " (it is a folder; name the .py file inside it)" if path.is_dir() else ""
        raise ModelFileError(f"model file {path} does not exist{hint}; pass the path of a Python file that "
                             f"defines {', '.join(DEFAULT_NAMES)} (e.g. examples/tiny_unet.py)")
    digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:8]
    name = f"memplan_modelfile_{re.sub(r'[^0-9A-Za-z_]', '_', path.stem)}_{digest}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ModelFileError(f"model file {path} cannot be loaded as Python; give it a .py suffix")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module          # dataclasses and pickling look the module up by name
    folder = str(path.resolve().parent)
    sys.path.insert(0, folder)
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # noqa: BLE001 - any failure of user code is reported with its file and line
        del sys.modules[name]
        raise ModelFileError(f"running model file {path} failed: {_where(exc, path)}{type(exc).__name__}: "
                             f"{exc}; fix the file (memplan executes it as Python)") from exc
    finally:
        if folder in sys.path:
            sys.path.remove(folder)
    return module


def _where(exc: BaseException, path: Path) -> str:
    """``"line 12: "`` of the deepest frame in ``path`` (or of a SyntaxError), else ''."""
    if isinstance(exc, SyntaxError) and exc.lineno:
        return f"line {exc.lineno}: "
    line = None
    tb = exc.__traceback__
    while tb is not None:
        if Path(tb.tb_frame.f_code.co_filename).resolve() == path.resolve():
            line = tb.tb_lineno
        tb = tb.tb_next
    return f"line {line}: " if line else ""


def _candidates(module: ModuleType) -> list[str]:
    """Names in the file that could be a model: instances, subclasses defined there, factories."""
    out = []
    for name, value in vars(module).items():
        if name.startswith("_"):
            continue
        if isinstance(value, nn.Module) or inspect.isclass(value) and issubclass(value, nn.Module) and value.__module__ == module.__name__:
            out.append(name)
    return out


def resolve_model(module: ModuleType, path: str | Path, attr: str | None) -> tuple[nn.Module, str]:
    """The nn.Module the file offers under ``attr`` (or the default names), and a description of it."""
    if attr is None:
        found = next((n for n in DEFAULT_NAMES if hasattr(module, n)), None)
        if found is None:
            cands = _candidates(module)
            also = f"; this file defines {', '.join(cands)}: name one as {path}:{cands[0]}" if cands else ""
            raise ModelFileError(f"no model found in {path}: define `model = MyNet()`, `def build_model()` or "
                                 f"`class Model(nn.Module)`, or pick one with {path}:NAME{also}")
        attr = found
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            cands = _candidates(module)
            raise ModelFileError(f"{path} has no attribute {attr!r}; name an nn.Module instance, class or "
                                 f"zero-argument factory (model-like names here: {', '.join(cands) or 'none'})")
        obj = getattr(obj, part)
    return _instantiate(obj, attr, path), _describe(obj, attr, path)


def _describe(obj: Any, attr: str, path: str | Path) -> str:
    kind = "" if isinstance(obj, nn.Module) else "()"
    return f"{attr}{kind} in {path}"


def _instantiate(obj: Any, attr: str, path: str | Path) -> nn.Module:
    """An instance stays; a class or a factory is called with no arguments; the result must be a Module."""
    if isinstance(obj, nn.Module):
        return obj
    if not callable(obj):
        raise ModelFileError(f"{path}:{attr} is a {type(obj).__name__}, not an nn.Module, a class or a factory; "
                             "name the network instead")
    try:
        made = obj()
    except TypeError as exc:
        raise ModelFileError(f"calling {path}:{attr}() failed: {exc}; memplan calls it with no arguments, so give "
                             "every argument a default or add `def build_model(): return ...` to the file") from exc
    except Exception as exc:  # noqa: BLE001 - user code
        raise ModelFileError(f"calling {path}:{attr}() failed: {type(exc).__name__}: {exc}; fix the model file") from exc
    if not isinstance(made, nn.Module):
        raise ModelFileError(f"{path}:{attr}() returned a {type(made).__name__}, not an nn.Module; "
                             "return the network from it")
    return made


def file_inputs(module: ModuleType, path: str | Path) -> tuple[tuple[torch.Tensor, ...] | None, str]:
    """The file's ``example_inputs()`` (tensors) or ``INPUT_SHAPE``, as (tensors or None, source)."""
    if hasattr(module, "example_inputs"):
        value = module.example_inputs
        try:
            value = value() if callable(value) else value
        except Exception as exc:  # noqa: BLE001 - user code
            raise ModelFileError(f"calling example_inputs() in {path} failed: {type(exc).__name__}: {exc}; "
                                 "fix it or pass --input-shape") from exc
        tensors = as_tuple(value)
        if not tensors or not all(isinstance(t, torch.Tensor) for t in tensors):
            raise ModelFileError(f"example_inputs in {path} must give a tensor or a tuple of tensors, got "
                                 f"{type(value).__name__}; fix it or pass --input-shape")
        return tensors, f"example_inputs() in {path}"
    if hasattr(module, "INPUT_SHAPE"):
        shape = module.INPUT_SHAPE
        if not isinstance(shape, (tuple, list)) or not shape or not all(
                isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape):
            raise ModelFileError(f"INPUT_SHAPE in {path} must be a tuple of positive ints like (1, 1, 176, 112, 112), "
                                 f"got {shape!r}")
        return (torch.empty(tuple(shape), device="meta"),), f"INPUT_SHAPE in {path}"
    return None, ""


def load_model(ref: str, *, input_shape: str | tuple[int, ...] | None = None, dtype: str | None = None,
               check: bool = True) -> LoadedModel:
    """Execute the model file ``ref`` (``PATH[:ATTR]``) and return its model and meta example inputs.

    ``input_shape`` overrides the file's inputs; ``dtype`` casts the model and floating inputs;
    ``check`` runs the model once on meta tensors so a shape it rejects fails here, with a fix.
    """
    path, attr = split_reference(ref)
    torch_dtype = parse_dtype(dtype)
    shape = parse_shape(input_shape) if isinstance(input_shape, str) else input_shape
    module = execute_file(path)
    model, source = resolve_model(module, path, attr)
    arity = required_inputs(model)
    if shape is not None:
        if arity > 1:
            raise ModelFileError(f"{source} takes {arity} inputs ({', '.join(input_names(model))}) but --input-shape "
                                 f"gives one tensor; {several_inputs_fix(path, model, drop_option=True)}")
        real, input_source = (torch.empty(shape, device="meta"),), "--input-shape"
    else:
        real, input_source = file_inputs(module, path)
        if real is None:
            fix = (several_inputs_fix(path, model) if arity > 1 else "pass --input-shape 1,1,D,H,W (batch, channels, "
                   "spatial sizes), or define INPUT_SHAPE = (...) or example_inputs() in the file")
            raise ModelFileError(f"no input shape for {path}: {fix}")
        if arity > len(real):
            raise ModelFileError(f"{source} takes {arity} inputs ({', '.join(input_names(model))}) but {input_source} "
                                 f"gives {len(real)}; {several_inputs_fix(path, model)}")
    if torch_dtype is not None:
        model = model.to(torch_dtype)
        real = tuple(t.to(torch_dtype) if t.is_floating_point() else t for t in real)
    loaded = LoadedModel(model=model, inputs=to_meta(tuple(real)), model_source=source, input_source=input_source,
                         real_inputs=None if any(t.is_meta for t in real) else tuple(real))
    if check:
        why = rejection(model, loaded.inputs)
        if why and not value_dependent(why):     # those are the tracer's to explain (TraceError and its fix)
            shapes = ", ".join(shape_text(s) for s in loaded.input_shapes)
            raise ModelFileError(f"{source} does not accept an input of shape {shapes} ({input_source}): {why}; "
                                 "pass an --input-shape the network accepts (e.g. spatial sizes divisible by 2**k "
                                 "for k poolings, and the channel count of its first layer)")
    return loaded


def input_names(model: nn.Module) -> list[str]:
    """The names of ``model.forward``'s required positional parameters (the inputs it must be given)."""
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):          # a builtin or C++ forward: no signature to read
        return []
    return [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
            and p.default is p.empty]


def required_inputs(model: nn.Module) -> int:
    """How many inputs ``model.forward`` requires (1 when its signature cannot be read)."""
    return max(1, len(input_names(model)))


def several_inputs_fix(path: str | Path, model: nn.Module, *, drop_option: bool = False) -> str:
    """The fix for a network with several inputs: ``example_inputs()`` returning a tuple, one tensor each."""
    names = input_names(model)
    return (f"define `def example_inputs(): return ({', '.join(names)})` in {path}, a tuple of {len(names)} "
            "tensors, one per argument of forward (meta tensors are enough: torch.empty(shape, device='meta'))"
            + (", and drop --input-shape" if drop_option else ""))


def rejection(model: nn.Module, inputs: tuple[torch.Tensor, ...], *, meta_model: nn.Module | None = None) -> str:
    """'' when ``model`` runs a forward pass on ``inputs`` (meta tensors, no compute), else the error."""
    net = meta_model if meta_model is not None else meta_copy(model)
    try:
        with torch.no_grad():
            out = net(*to_meta(tuple(inputs)))
    except Exception as exc:  # noqa: BLE001 - any failure means: this input is rejected
        first = str(exc).strip().splitlines()
        return f"{type(exc).__name__}: {first[0][:300] if first else ''}"
    if not tensors_in(out):
        return "its forward returned no tensor"
    return ""


def value_dependent(reason: str) -> bool:
    """True when a meta forward failed because the network reads tensor values (not because of the shape)."""
    return any(k in reason for k in ("meta tensor", "data-dependent", "data dependent"))


def shape_text(shape: tuple[int, ...]) -> str:
    """(1, 1, 32, 24, 24) -> '1x1x32x24x24'."""
    return "x".join(str(d) for d in shape)


def real_inputs(loaded: LoadedModel, device: str | torch.device = "cpu", *, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Real tensors for a measured step: the file's example_inputs() when it has them, else seeded randn."""
    if loaded.real_inputs is not None and not any(t.is_meta for t in loaded.real_inputs):
        return tuple(t.to(device) for t in loaded.real_inputs)
    gen = torch.Generator().manual_seed(seed)
    out = []
    for t in loaded.inputs:
        if t.is_floating_point():
            out.append(torch.randn(t.shape, generator=gen, dtype=t.dtype).to(device))
        else:
            out.append(torch.zeros(t.shape, dtype=t.dtype).to(device))
    return tuple(out)
