"""Shared command line of the clients: the same flags, defaults shown in --help, one error policy.

Exit codes as ``memplan``'s: 0 ok, 2 usage or input error (one line saying the fix), 3 budget
infeasible (with the smallest feasible peak), 130 interrupted.
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence

import memplan
from models.data import parse_shape

__all__ = ["Formatter", "make_parser", "add_train_arguments", "add_evaluate_arguments", "run_command",
           "parse_budget", "EXIT_USAGE", "EXIT_BUDGET"]

EXIT_USAGE = 2
EXIT_BUDGET = 3


class Formatter(argparse.RawDescriptionHelpFormatter):
    """--help shows every default (unless the help text already explains it) and keeps the description's
    line breaks (its examples)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        hidden = action.default is None or action.default is False or action.default == argparse.SUPPRESS
        if (not hidden and not action.required
                and "default" not in text.lower() and action.option_strings):
            text += " (default: %(default)s)"
        return text


def make_parser(client: str, description: str) -> tuple[argparse.ArgumentParser, argparse._SubParsersAction]:
    """The ``python -m models.CLIENT`` parser and its subcommand group."""
    parser = argparse.ArgumentParser(prog=f"python -m models.{client}", description=description,
                                     formatter_class=Formatter)
    return parser, parser.add_subparsers(dest="command", required=True, metavar="{train,evaluate,...}")


def parse_budget(text: str) -> int | str:
    """argparse type of --budget: bytes ("8GB", "7.5GiB", "8000000000"), checked now, not after loading data."""
    try:
        memplan.parse_bytes(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return int(text) if text.isdigit() else text


def add_train_arguments(sub, client: str, *, help: str, input_size: str | None, epochs: int | None, lr: float | None,
                        batch_size: int | None = 1, input_size_help: str | None = None,
                        epochs_help: str | None = None) -> argparse.ArgumentParser:
    """The ``train`` subcommand with the flags every client shares (client-specific ones are added after)."""
    p = sub.add_parser("train", help=help, description=help, formatter_class=Formatter)
    p.add_argument("--data", required=True, help="folder of ID.nii.gz (+ ID_mask.nii.gz, ID.json) cases; "
                   f"see models/data.py (phantoms: python -m tools.phantom {client} --out DIR)")
    p.add_argument("--out", default=f"runs/{client}", help="run folder: last.pt (checkpoint with the plan), config.json")
    p.add_argument("--input-size", default=input_size, type=parse_shape,
                   help=input_size_help or f"network input X,Y,Z (default: {input_size})")
    p.add_argument("--epochs", type=int, default=epochs,
                   help=epochs_help or "training epochs" + (" (default: the variant's)" if epochs is None else ""))
    p.add_argument("--lr", type=float, default=lr,
                   help="Adam learning rate" + (" (default: the variant's)" if lr is None else ""))
    if batch_size is not None:
        p.add_argument("--batch-size", type=int, default=batch_size, help="cases per step")
    p.add_argument("--budget", type=parse_budget, default=None,
                   help="memory budget of a training step for memplan, e.g. 8GB (default: least memory)")
    p.add_argument("--device", default="cpu", help="torch device: cpu, cuda or cuda:N")
    p.add_argument("--amp", choices=("bf16", "fp16"), default=None,
                   help="train under torch.autocast in this precision (fp16 with a GradScaler); memplan plans "
                   "for it (default: fp32)")
    p.add_argument("--seed", type=int, default=0, help="seeds weights, shuffling, augmentation and splits")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def add_evaluate_arguments(sub, client: str, *, help: str, name: str = "evaluate") -> argparse.ArgumentParser:
    """The ``evaluate`` subcommand (or another of its shape): --checkpoint (file or run folder), --data, --device."""
    p = sub.add_parser(name, help=help, description=help, formatter_class=Formatter)
    p.add_argument("--checkpoint", default=f"runs/{client}", help="checkpoint file or the run folder holding last.pt")
    p.add_argument("--data", required=True, help="folder of test cases (same format as training)")
    p.add_argument("--device", default="cpu", help="torch device: cpu, cuda or cuda:N")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def run_command(handler: Callable[[argparse.Namespace], int | None], args: argparse.Namespace) -> int:
    """Run ``handler(args)``; user errors become one line on stderr and memplan's exit codes."""
    try:
        return int(handler(args) or 0)
    except memplan.BudgetError as exc:
        smallest = memplan.format_bytes(exc.min_feasible_bytes)
        print(f"error: {exc}\n(smallest feasible peak {smallest} = {exc.min_feasible_bytes} bytes; "
              f"rerun with --budget {exc.min_feasible_bytes} or more)", file=sys.stderr)
        return EXIT_BUDGET
    except (ValueError, FileNotFoundError) as exc:   # MemplanError, DataError, ClientError: messages with the fix
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def main_of(build: Callable[[], argparse.ArgumentParser], handlers: dict[str, Callable],
            argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` with ``build()`` and dispatch to ``handlers[args.command]`` under ``run_command``."""
    args = build().parse_args(argv)
    return run_command(handlers[args.command], args)


__all__.append("main_of")
