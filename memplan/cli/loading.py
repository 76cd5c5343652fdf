"""Model and plan for a ``memplan`` command: load the model file, then compile it with the options."""
from __future__ import annotations

import argparse

from ..api import compile as compile_model
from ..modelfile import LoadedModel, load_model
from ..units import parse_bytes
from .progress import Progress, notes_to
from .tables import shape_text


def scratch_for(args: argparse.Namespace, device: str = "cpu") -> str:
    """``--scratch``, else what the device's allocator sees: ``none`` on CUDA, ``cpu`` on the CPU."""
    return args.scratch or ("none" if device == "cuda" else "cpu")


def load(args: argparse.Namespace, progress: Progress) -> LoadedModel:
    """The model file's network and meta inputs; a bad ``--budget`` fails first, before any work."""
    if args.budget is not None:
        parse_bytes(args.budget)
    with progress.stage(f"loading {args.model}"):
        return load_model(args.model, input_shape=args.input_shape, dtype=args.dtype)


def compile_loaded(loaded: LoadedModel, args: argparse.Namespace, progress: Progress):
    """``memplan.compile`` with the command's options; warnings become notes on stderr."""
    what = "planning GCP+REV (tries each reversible block)" if args.rev else "tracing and planning"
    with progress.stage(f"{what} on {shape_text(loaded.input_shapes[0])}"), notes_to(progress.console):
        return compile_model(loaded.model, loaded.inputs, budget=args.budget, optimizer=args.optimizer,
                             method=args.method, rev=args.rev, scratch=args.scratch, amp=args.amp,
                             threads=args.threads, split_concat=args.split_concat)
