"""The ``memplan`` command line: optimize (plan a model file), fit (largest input), measure (peaks, time).

Exit codes: 0 ok, 2 usage or input error (the message says the fix), 3 budget infeasible.
Tables and --json go to stdout; progress, notes and errors go to stderr.

Modules, one job each: ``parsing`` (options, help, exit codes), ``loading`` (model file and plan),
``progress`` (stderr), ``outputs`` (checked, atomic files), ``tables`` (text), ``records`` (JSON),
``plots``, ``timing``, ``commands`` (the three commands) and ``main`` (errors to exit codes).
"""
from .main import main
from .parsing import EXIT_BUDGET, EXIT_OK, EXIT_USAGE, ExitCode, build_parser

__all__ = ["main", "build_parser", "ExitCode", "EXIT_OK", "EXIT_USAGE", "EXIT_BUDGET"]
