"""``memplan``'s entry point: parse, run the command, and turn every failure into an exit code.

Errors go to stderr as ``memplan: error: ...`` (the fix included); under ``--json`` stdout also
carries one ``{"error": {...}}`` record, so a script reading stdout always gets JSON.
"""
from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Sequence
from typing import TextIO

from rich.console import Console

from ..errors import BudgetError, MemplanError
from .commands import COMMANDS, Streams
from .parsing import ExitCode, UsageError, build_parser
from .progress import Progress
from .records import error_record, to_json


def consoles() -> tuple[Console, Console]:
    """stdout and stderr consoles; a terminal's stderr gets its own fd so the spinner survives fd 2 filtering."""
    width = None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 110
    err_file = sys.stderr
    if sys.stderr.isatty():
        err_file = os.fdopen(os.dup(sys.stderr.fileno()), "w", buffering=1)
    return Console(width=width, highlight=False), Console(file=err_file, highlight=False)


def budget_message(exc: BudgetError, rev: bool) -> str:
    """The BudgetError's text, with the ``--rev`` hint when REV could go below the GCP floor."""
    if not rev and exc.rev_min_bytes is not None and exc.rev_min_bytes < exc.min_feasible_bytes:
        return f"{exc}\nhint: add --rev to plan with reversible blocks"
    return str(exc)


def report(exc: BaseException, code: int, *, message: str, err: TextIO, json_out: TextIO | None,
           prefix: str = "memplan: error: ") -> int:
    """Print ``prefix + message`` on ``err`` and, with --json, the error record on ``json_out``; return ``code``."""
    print(prefix + message, file=err, flush=True)
    if json_out is not None:
        print(to_json(error_record(exc, code, message)), file=json_out, flush=True)
    return int(code)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``memplan`` command line; returns the exit code (0 ok, 2 input error, 3 budget infeasible)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    stdout = sys.stdout
    json_out = stdout if "--json" in argv else None
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except UsageError as exc:
        return report(exc, ExitCode.USAGE, message=str(exc), prefix=f"{exc.usage}{exc.prog}: error: ",
                      err=sys.stderr, json_out=json_out)
    except SystemExit as exc:                      # --help and --version print and exit 0
        return int(exc.code or 0) if not isinstance(exc.code, str) else int(ExitCode.USAGE)
    if args.command is None:                       # bare `memplan`: the commands and what they do
        parser.print_help(sys.stderr)
        return int(ExitCode.USAGE)
    out, err = consoles()
    io = Streams(out=out, progress=Progress(err, live=err.is_terminal, quiet=args.quiet), json=stdout)
    # under --json only the record reaches stdout; whatever the model file prints goes to stderr
    quiet = contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext()
    try:
        with quiet:
            return int(COMMANDS[args.command](args, io))
    except BudgetError as exc:
        return report(exc, ExitCode.BUDGET, message=budget_message(exc, args.rev),
                      err=err.file, json_out=json_out)
    except MemplanError as exc:
        return report(exc, ExitCode.USAGE, message=str(exc), err=err.file, json_out=json_out)
    except KeyboardInterrupt as exc:
        return report(exc, ExitCode.INTERRUPTED, message="interrupted", prefix="memplan: ", err=err.file,
                      json_out=json_out)
    except Exception as exc:                       # a bug: the traceback follows; --json still gets its record
        if json_out is not None:
            print(to_json(error_record(exc, 1)), file=json_out, flush=True)
        raise
