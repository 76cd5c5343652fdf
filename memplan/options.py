"""How to plan: one frozen, validated record every planner takes (``plan_x(graph, options) -> Plan``).

``memplan.plan``/``memplan.compile`` keyword arguments build it; planners never read globals.

>>> o = PlanOptions(method="exact", budget_bytes=2**30, optimizer="sgd", scratch="none")
>>> o.objective, o.dp, o.optimizer, o.scratch
(<Objective.TIME: 'time-centric'>, <DP.EXACT: 'exact'>, <Optimizer.SGD: 'sgd'>, <ScratchModel.NONE: 'none'>)
>>> PlanOptions(optimizer="adamw")
Traceback (most recent call last):
...
memplan.errors.MemplanError: unknown optimizer 'adamw'; choose one of adam, sgd, sgd-momentum, none
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import torch
from torch import nn

from .errors import MemplanError
from .graph import DEFAULT_LOWER_SET_BOUND
from .measure import check_amp
from .registry import lookup
from .units import parse_bytes


class Optimizer(str, Enum):
    """The optimizer of the training step (its state counts in the peak: Adam 2x, momentum 1x)."""
    ADAM = "adam"
    SGD = "sgd"
    SGD_MOMENTUM = "sgd-momentum"
    NONE = "none"

    def __str__(self) -> str:
        return self.value


class ScratchModel(str, Enum):
    """What the simulator counts besides tensors: CPU convolution scratch ("cpu") or nothing ("none")."""
    CPU = "cpu"
    NONE = "none"

    def __str__(self) -> str:
        return self.value


class Amp(str, Enum):
    """Autocast precision of the training step (None in PlanOptions: full precision); fp16 adds a GradScaler."""
    BF16 = "bf16"
    FP16 = "fp16"

    def __str__(self) -> str:
        return self.value


def check_amp_mode(amp: Any) -> Amp | None:
    """``amp`` as an :class:`Amp` (None stays None: full precision); MemplanError naming the choices.

    >>> check_amp_mode("bf16"), check_amp_mode(None)
    (<Amp.BF16: 'bf16'>, None)
    >>> check_amp_mode("fp8")
    Traceback (most recent call last):
    ...
    memplan.errors.MemplanError: unknown amp mode 'fp8'; choose None (full precision), 'bf16' or 'fp16'
    """
    if amp is None or isinstance(amp, Amp):
        return amp
    check_amp(amp)                      # the ruler's check: one list of modes, one message
    return Amp(amp)


def amp_text(amp: Any) -> str:
    """The precision's name for messages: 'fp32' (full precision) for None, else 'bf16' / 'fp16'."""
    return "fp32" if amp is None else str(Amp(amp))


class DP(str, Enum):
    """Kusumoto's lower-set family: exact below the lower-set bound ("auto"), always exact, or approximate."""
    AUTO = "auto"
    EXACT = "exact"
    APPROX = "approx"

    def __str__(self) -> str:
        return self.value


class Objective(str, Enum):
    """Least memory (no budget), or least recompute under a budget."""
    MEMORY = "memory-centric"
    TIME = "time-centric"

    def __str__(self) -> str:
        return self.value


def _enum(cls: type[Enum], value: Any, what: str) -> Enum:
    try:
        return cls(value)
    except ValueError:
        raise MemplanError(f"unknown {what} {value!r}; choose one of {', '.join(m.value for m in cls)}") from None


@dataclass(frozen=True)
class PlanOptions:
    """Every planning choice. ``method`` names a registered planner (memplan.planners); ``dp`` is the
    Kusumoto family the DP planners (and REV's re-plans) use (``method`` "exact"/"approx" sets it).
    ``simulate``: check (and, under a budget, calibrate) plans with simulate_step, which needs
    ``example_inputs``. ``pinned`` nodes are never recomputed. ``rev_*`` steer the REV planners (REV
    changes the network, so it is taken only for a gain of ``rev_min_gain``: a fraction of the peak, or of
    forward FLOPs recomputed under a budget),
    ``checkpoint_modules`` the hand baseline, ``rev_hint`` whether a BudgetError estimates REV's reach.
    ``amp``, ``keep_output`` and ``threads`` describe the step every simulation runs (simulate_step's
    arguments of those names); ``threads`` None is filled with torch.get_num_threads() when built, so a
    plan records the OpenMP thread count its CPU scratch figures assume. ``split_concat``: split every
    convolution over a channel concatenation into per-part convolutions first (memplan.splitcat; opt-in:
    values and gradients round differently, the plan lists each split)."""
    method: str = "auto"
    budget_bytes: int | None = None
    optimizer: Optimizer = Optimizer.ADAM
    scratch: ScratchModel = ScratchModel.CPU
    dp: DP = DP.AUTO
    lower_set_bound: int = DEFAULT_LOWER_SET_BOUND
    time_steps: int = 1000
    times: Mapping[str, float] | None = field(default=None, hash=False)
    pinned: frozenset[str] = frozenset()
    simulate: bool = True
    rev_search: bool = True
    rev_seed: int = 0
    rev_min_gain: float = 0.01
    rev_hint: bool = True
    checkpoint_modules: tuple[str, ...] = ()
    amp: Amp | None = None
    keep_output: bool = True
    threads: int | None = None
    split_concat: bool = False
    example_inputs: tuple = field(default=(), hash=False, compare=False, repr=False)
    loss_fn: Callable | None = field(default=None, hash=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        lookup(self.method)                                  # MemplanError naming the registered planners
        coerce = {"optimizer": (Optimizer, "optimizer"), "scratch": (ScratchModel, "scratch model"),
                  "dp": (DP, "DP family")}
        for name, (cls, what) in coerce.items():
            object.__setattr__(self, name, _enum(cls, getattr(self, name), what))
        if self.method in {d.value for d in DP}:
            if self.dp not in (DP.AUTO, DP(self.method)):
                raise MemplanError(f"method {self.method!r} and dp {self.dp.value!r} disagree; give one of them")
            object.__setattr__(self, "dp", DP(self.method))
        if self.budget_bytes is not None:
            if isinstance(self.budget_bytes, bool) or not isinstance(self.budget_bytes, int):
                raise MemplanError(f"budget_bytes must be an int number of bytes, got {self.budget_bytes!r}; "
                                   "parse strings like '12GB' with memplan.parse_bytes")
            if self.budget_bytes <= 0:
                raise MemplanError(f"budget must be positive, got {self.budget_bytes} B")
        for name in ("lower_set_bound", "time_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise MemplanError(f"{name} must be a positive int, got {value!r}")
        object.__setattr__(self, "amp", check_amp_mode(self.amp))
        if self.threads is None:
            object.__setattr__(self, "threads", torch.get_num_threads())
        if isinstance(self.threads, bool) or not isinstance(self.threads, int) or self.threads < 1:
            raise MemplanError(f"threads must be a positive int (OpenMP threads of the CPU step), got {self.threads!r}; "
                               "e.g. threads=torch.get_num_threads()")
        for name in ("simulate", "rev_search", "rev_hint", "keep_output", "split_concat"):
            if not isinstance(getattr(self, name), bool):
                raise MemplanError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if isinstance(self.rev_min_gain, bool) or not isinstance(self.rev_min_gain, (int, float)) \
                or not 0 <= self.rev_min_gain < 1:
            raise MemplanError(f"rev_min_gain must be a fraction in [0, 1), got {self.rev_min_gain!r}")
        if self.times is not None and not isinstance(self.times, Mapping):
            raise MemplanError(f"times must map node names to seconds, got {type(self.times).__name__}")
        if self.split_concat and self.method in ("rev", "rev-only"):
            raise MemplanError(f"split_concat=True with method {self.method!r}: REV substitution plans the network "
                               "as written; use one of them (split_concat with auto, exact, approx, chen or remat)")
        object.__setattr__(self, "pinned", frozenset(self.pinned))
        object.__setattr__(self, "checkpoint_modules", tuple(self.checkpoint_modules))
        object.__setattr__(self, "example_inputs", tuple(self.example_inputs))

    @property
    def objective(self) -> Objective:
        return Objective.MEMORY if self.budget_bytes is None else Objective.TIME

    def step_kwargs(self) -> dict[str, Any]:
        """simulate_step's keyword arguments for the step these options plan (every planner's ruler)."""
        return dict(loss_fn=self.loss_fn, optimizer=self.optimizer.value, scratch=self.scratch.value,
                    amp=None if self.amp is None else self.amp.value, keep_output=self.keep_output,
                    threads=self.threads)


def default_scratch(model: nn.Module, inputs: tuple, scratch: str | None) -> ScratchModel:
    """``scratch`` when given; else "cpu" when the step would run on the CPU (kernel scratch matters
    there), "none" on another device (CUDA's allocator reports tensors only)."""
    if scratch is not None:
        return _enum(ScratchModel, scratch, "scratch model")
    tensors = list(model.parameters()) + [t for t in inputs if isinstance(t, torch.Tensor)]
    devices = {t.device.type for t in tensors if not t.is_meta}
    return ScratchModel.NONE if devices and devices != {"cpu"} else ScratchModel.CPU


def plan_options(model: nn.Module, example_inputs: tuple, *, budget: Any = None, optimizer: str = "adam",
                 method: str = "auto", rev: bool = False, loss_fn: Callable | None = None,
                 scratch: str | None = None, lower_set_bound: int = DEFAULT_LOWER_SET_BOUND,
                 simulate: bool = True, times: Mapping[str, float] | None = None, amp: str | None = None,
                 keep_output: bool = True, threads: int | None = None, **more: Any) -> PlanOptions:
    """The options ``memplan.plan``'s keyword arguments stand for. ``rev=True`` with a DP method
    ("auto"/"exact"/"approx") is the "rev" planner re-planning with that DP; ``more`` sets other fields."""
    if not isinstance(rev, bool):
        raise MemplanError(f"rev must be True or False, got {rev!r}")
    if rev:
        if method not in {d.value for d in DP} | {"rev"}:
            raise MemplanError(f"rev=True plans GCP with the DP; method must be auto, exact or approx, got {method!r} "
                               "(or drop rev=True)")
        more.setdefault("dp", DP.AUTO if method == "rev" else method)
        method = "rev"
    return PlanOptions(method=method, budget_bytes=None if budget is None else parse_bytes(budget),
                       optimizer=optimizer, scratch=default_scratch(model, example_inputs, scratch),
                       lower_set_bound=lower_set_bound, simulate=simulate, times=times,
                       amp=amp, keep_output=keep_output, threads=threads,
                       example_inputs=example_inputs, loss_fn=loss_fn, **more)
