"""The ``memplan`` argument parser: commands, options, help texts and exit codes.

A parse error raises :class:`UsageError` (exit code 2) instead of exiting, so that the caller can
report it like any other error (and as a JSON record under ``--json``).

>>> args = build_parser().parse_args(["optimize", "net.py", "--budget", "8GB"])
>>> args.command, args.model, args.budget, args.scratch
('optimize', 'net.py', '8GB', None)
"""
from __future__ import annotations

import argparse
import sys
import textwrap
from enum import IntEnum

from ..errors import MemplanError


class ExitCode(IntEnum):
    """What ``memplan`` returns: 0 ok, 2 usage or input error, 3 budget infeasible, 130 interrupted."""
    OK = 0
    USAGE = 2
    BUDGET = 3
    INTERRUPTED = 130


EXIT_OK, EXIT_USAGE, EXIT_BUDGET = ExitCode.OK, ExitCode.USAGE, ExitCode.BUDGET

COMMANDS = ("optimize", "fit", "measure")
MODEL_HELP = ("model file PATH[:ATTR]: a Python file that memplan EXECUTES (load only files you trust); "
              "ATTR names an nn.Module instance, a class or a zero-argument factory; without it the file's "
              "`model`, `build_model` or `Model` is used, in that order")
EPILOGS = {
    "optimize": """examples:
  memplan optimize examples/tiny_unet.py
  memplan optimize examples/fetusmapv2_unet.py --budget 4GB --scratch none
  memplan optimize examples/fetusmapv2_unet.py:build_model --input-shape 1,1,176,112,112 --budget 6GB \\
      --out plan.json --plot timeline.png
  memplan optimize examples/tiny_unet.py --json > plan_summary.json
load the plan in Python:  memplan.compile(model, x, plan="plan.json")  (same model, input shape, dtype)""",
    "fit": """examples:
  memplan fit examples/tiny_unet.py --budget 24MiB
  memplan fit examples/fetusmapv2_unet.py --budget 8GB --input-shape 1,1,176,112,112 --scratch none
  memplan fit examples/fetusmapv2_unet.py --budget 8GB --axis 2        # grow D only
  memplan fit examples/fetusmapv2_unet.py --budget 8GB --axis 0        # the largest batch
  memplan fit examples/convnet_instance.py --budget 4MiB --rev --json
--rev plans REV at every size tried: minutes for a full-size U-Net.""",
    "measure": """examples:
  memplan measure examples/tiny_unet.py
  memplan measure examples/tiny_unet.py --real --repeat 3
  memplan measure examples/fetusmapv2_unet.py --budget 6GB --real --device cuda --scratch none""",
}
MAIN_EPILOG = ("exit codes: 0 ok, 2 usage or input error, 3 budget infeasible.\n"
               "`memplan COMMAND --help` shows a command's options and examples; docs/cli.md has real output.")


class UsageError(MemplanError):
    """A command line argparse rejects; ``usage`` and ``prog`` are those of the (sub)command."""

    def __init__(self, message: str, *, usage: str = "", prog: str = "memplan"):
        super().__init__(message)
        self.usage, self.prog = usage, prog


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors raise :class:`UsageError` (subparsers inherit the class)."""

    def error(self, message: str):
        raise UsageError(message, usage=self.format_usage(), prog=self.prog)


def _common(p: argparse.ArgumentParser, *, budget_required: bool = False) -> None:
    p.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    p.add_argument("--input-shape", metavar="SHAPE", help="input shape, e.g. 1,1,176,112,112 (batch, channels, "
                   "D, H, W); default: the file's example_inputs() or INPUT_SHAPE")
    p.add_argument("--dtype", choices=("float32", "float64", "float16", "bfloat16"),
                   help="cast the model and inputs (default: float32, or the dtype example_inputs() gives)")
    p.add_argument("--budget", required=budget_required, metavar="BYTES",
                   help="memory budget for the whole training step, e.g. 8GB, 7.5GiB, 512MiB"
                   + ("" if budget_required else " (default: none, the least memory)"))
    p.add_argument("--rev", action="store_true", help="also replace Conv-BN-ReLU passes by reversible blocks "
                   "(changes the network: the new blocks start from fresh weights)")
    p.add_argument("--method", choices=("auto", "exact", "approx", "remat"), default="auto",
                   help="Kusumoto DP over all lower sets (exact) or ancestor sets (approx); auto (default): exact "
                   "when affordable; remat: also rebuilds tensors a chain of lower sets must keep (slower to plan, "
                   "less memory)")
    p.add_argument("--split-concat", action="store_true",
                   help="split each convolution over a channel concatenation into per-part convolutions first "
                   "(less memory for U-Nets; not bitwise: values and gradients round differently)")
    p.add_argument("--optimizer", choices=("adam", "sgd", "sgd-momentum", "none"), default="adam",
                   help="optimizer whose state the step holds (default: adam)")
    p.add_argument("--scratch", choices=("cpu", "none"), default=None,
                   help="cpu: count CPU convolution scratch buffers; none: tensors only, as CUDA's allocator "
                   "(default: cpu when planning for the CPU)")
    p.add_argument("--amp", choices=("bf16", "fp16"), default=None,
                   help="plan the step under torch.autocast in this precision (fp16 with a GradScaler); the "
                   "output shows the fp32 and the mixed-precision peaks side by side (default: fp32, and "
                   "bf16 beside it)")
    p.add_argument("--threads", type=positive_threads, default=None, metavar="N",
                   help="OpenMP threads of the CPU step, which CPU convolution scratch depends on; recorded in "
                   "the plan (default: torch.get_num_threads())")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout and nothing else (an "
                   "error too: {\"error\": {...}})")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr (notes and errors stay)")


def positive_threads(text: str) -> int:
    """argparse type of --threads: a positive int.

    >>> positive_threads("2")
    2
    """
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"--threads {text}: give a positive number of OpenMP threads, e.g. "
                                         "--threads 1")
    return value


def wrap(text: str) -> str:
    """A help paragraph wrapped to 88 columns (the raw formatter keeps the examples' layout as written)."""
    return textwrap.fill(text, 88)


def build_parser() -> Parser:
    """The ``memplan`` parser with its three commands."""
    fmt = argparse.RawDescriptionHelpFormatter
    parser = Parser(
        prog="memplan", formatter_class=fmt, epilog=MAIN_EPILOG,
        description=wrap("Plan gradient checkpointing (and reversible blocks) so that training a PyTorch network "
                         "fits a memory budget. Model files are executed as Python."))
    parser.add_argument("--version", action="version", version=version_text())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    opt = sub.add_parser("optimize", help="plan a model: peaks, overhead, segments; save the plan",
                         description=wrap("Trace the model on meta tensors and plan what to keep and what to "
                                          "recompute."),
                         epilog=EPILOGS["optimize"], formatter_class=fmt)
    _common(opt)
    opt.add_argument("--out", metavar="PLAN.json", help="write the plan (loadable by memplan.compile(..., plan=...)); "
                     "checked before planning, written only when everything succeeded")
    opt.add_argument("--plot", metavar="TIMELINE.png", help="plot live memory over the step, vanilla vs planned "
                     "(.png, .pdf, .svg, ...)")
    opt.add_argument("--all-segments", action="store_true", help="one table row per segment (default: runs of "
                     "stored segments are merged)")
    fit = sub.add_parser("fit", help="the largest input that fits a budget (vanilla, GCP, REV, GCP+REV)",
                         description=wrap("Grow the input (spatial sizes together, keeping the aspect ratio, rounded "
                                          "to what the network accepts) to the largest whose training step fits "
                                          "the budget."),
                         epilog=EPILOGS["fit"], formatter_class=fmt)
    _common(fit, budget_required=True)
    fit.add_argument("--axis", type=int, metavar="AXIS", help="grow only this axis of the input shape "
                     "(0 batch, 2.. spatial; default: all spatial axes together)")
    mea = sub.add_parser("measure", help="vanilla vs planned peak: simulated, and measured with --real",
                         description=wrap("Compare the unplanned and the planned training step: simulated peaks, and "
                                          "with --real the measured peaks and step times, side by side in one "
                                          "run."),
                         epilog=EPILOGS["measure"], formatter_class=fmt)
    _common(mea)
    mea.add_argument("--real", action="store_true", help="also run real steps: measured peak (CPU profiler or "
                     "CUDA max_memory_allocated) and step-time ratio")
    mea.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="device for --real (default: cpu)")
    mea.add_argument("--repeat", type=int, default=3, metavar="N", help="timed steps per module with --real "
                     "(default: 3)")
    return parser


def version_text() -> str:
    """``memplan 0.1.0 (torch 2.13.0, Python 3.11.7)``: what a bug report needs."""
    import torch

    from .. import __version__
    py = ".".join(str(v) for v in sys.version_info[:3])
    return f"memplan {__version__} (torch {torch.__version__}, Python {py})"
