"""The ``memplan`` command line: optimize (plan a model file), fit (largest input), measure (peaks, time).

Exit codes: 0 ok, 2 usage or input error (the message says the fix), 3 budget infeasible.
Tables and --json go to stdout; progress and notes go to stderr.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from typing import Any

EXIT_OK, EXIT_USAGE, EXIT_BUDGET = 0, 2, 3

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


# -- argument parsing --------------------------------------------------------------------------------
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
    p.add_argument("--method", choices=("auto", "exact", "approx"), default="auto",
                   help="Kusumoto DP over all lower sets (exact) or ancestor sets (approx); auto: exact when affordable")
    p.add_argument("--optimizer", choices=("adam", "sgd", "sgd-momentum", "none"), default="adam",
                   help="optimizer whose state the step holds (default: adam)")
    p.add_argument("--scratch", choices=("cpu", "none"), default=None,
                   help="cpu: count CPU convolution scratch buffers; none: tensors only, as CUDA's allocator "
                   "(default: cpu when planning for the CPU)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout and nothing else")


def build_parser() -> argparse.ArgumentParser:
    """The ``memplan`` parser with its three commands."""
    parser = argparse.ArgumentParser(
        prog="memplan", description="Plan gradient checkpointing (and reversible blocks) so that training a "
        "PyTorch network fits a memory budget. Model files are executed as Python.",
        epilog="exit codes: 0 ok, 2 usage or input error, 3 budget infeasible. `memplan COMMAND --help` for more.")
    parser.add_argument("--version", action="version", version=f"memplan {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    fmt = argparse.RawDescriptionHelpFormatter
    opt = sub.add_parser("optimize", help="plan a model: peaks, overhead, segments; save the plan",
                         description="Trace the model on meta tensors and plan what to keep and what to recompute.",
                         epilog=EPILOGS["optimize"], formatter_class=fmt)
    _common(opt)
    opt.add_argument("--out", metavar="PLAN.json", help="write the plan (loadable by memplan.compile(..., plan=...))")
    opt.add_argument("--plot", metavar="TIMELINE.png", help="plot live memory over the step, vanilla vs planned")
    opt.add_argument("--all-segments", action="store_true", help="one table row per segment (default: runs of "
                     "stored segments are merged)")
    fit = sub.add_parser("fit", help="the largest input that fits a budget (vanilla, GCP, REV, GCP+REV)",
                         description="Grow the input (spatial sizes together, keeping the aspect ratio, rounded to "
                         "what the network accepts) to the largest whose training step fits the budget.",
                         epilog=EPILOGS["fit"], formatter_class=fmt)
    _common(fit, budget_required=True)
    fit.add_argument("--axis", type=int, metavar="AXIS", help="grow only this axis of the input shape "
                     "(0 batch, 2.. spatial)")
    mea = sub.add_parser("measure", help="vanilla vs planned peak: simulated, and measured with --real",
                         description="Compare the unplanned and the planned training step: simulated peaks, and "
                         "with --real the measured peaks and step times, side by side in one run.",
                         epilog=EPILOGS["measure"], formatter_class=fmt)
    _common(mea)
    mea.add_argument("--real", action="store_true", help="also run real steps: measured peak (CPU profiler or "
                     "CUDA max_memory_allocated) and step-time ratio")
    mea.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="device for --real (default: cpu)")
    mea.add_argument("--repeat", type=int, default=3, metavar="N", help="timed steps per module with --real (default 3)")
    return parser


def _version() -> str:
    from . import __version__
    return __version__


# -- output helpers ----------------------------------------------------------------------------------
def _consoles(args: argparse.Namespace):
    from rich.console import Console
    width = None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 110
    err_file = sys.stderr
    if sys.stderr.isatty():          # a terminal of our own: the spinner survives _drop_native_lines
        err_file = os.fdopen(os.dup(sys.stderr.fileno()), "w", buffering=1)
    return Console(width=width, highlight=False), Console(file=err_file, highlight=False)


@contextlib.contextmanager
def _drop_native_lines(prefixes: tuple[str, ...] = ("USDT:",)) -> Iterator[None]:
    """Hide the lines native code (the profiler's kineto) writes to fd 2 that start with ``prefixes``."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            lines = tmp.read().decode(errors="replace").splitlines(keepends=True)
            sys.stderr.write("".join(line for line in lines if not line.startswith(prefixes)))


@contextlib.contextmanager
def _status(err, text: str) -> Iterator[Any]:
    """A spinner on stderr (silent when stderr is not a terminal)."""
    with err.status(text, spinner="dots") as status:
        yield status


def _fmt(n: float | None) -> str:
    from .units import format_bytes
    return "-" if n is None else format_bytes(n)


def to_json(obj: Any, level: int = 0) -> str:
    """JSON with one key per line and lists of plain values on one line (shapes, node names).

    >>> print(to_json({"shape": [1, 2], "rows": [{"a": None}]}))
    {
     "shape": [1, 2],
     "rows": [
      {
       "a": null
      }
     ]
    }
    """
    pad, inner = " " * level, " " * (level + 1)
    if isinstance(obj, dict) and obj:
        items = [f"{inner}{json.dumps(str(k))}: {to_json(v, level + 1)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + f"\n{pad}}}"
    if isinstance(obj, (list, tuple)) and any(isinstance(v, (dict, list, tuple)) for v in obj):
        return "[\n" + ",\n".join(f"{inner}{to_json(v, level + 1)}" for v in obj) + f"\n{pad}]"
    return json.dumps(obj)


def _budget_text(budget_bytes: int | None) -> str:
    """'8.00 GB (7.45 GiB)' for a budget in whole MB, else '512 MiB'; 'none (least memory)' for None.

    >>> _budget_text(8 * 10**9), _budget_text(20 * 1024), _budget_text(2**20)
    ('8.00 GB (7.45 GiB)', '20.0 KiB', '1.00 MiB')
    """
    from .units import format_bytes
    if not budget_bytes:
        return "none (least memory)"
    binary = format_bytes(budget_bytes)
    if budget_bytes % 10**6 == 0 and budget_bytes % 2**20 != 0:
        return f"{format_bytes(budget_bytes, binary=False)} ({binary})"
    return binary


def _shape_text(shape) -> str:
    return "x".join(str(d) for d in shape) if shape is not None else "-"


@contextlib.contextmanager
def _notes_to(err) -> Iterator[None]:
    """Python warnings raised inside become one-line notes on stderr."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    seen = set()
    for w in caught:
        text = str(w.message).strip().splitlines()[0]
        if text not in seen:
            seen.add(text)
            err.print(f"[yellow]note:[/] {text}", markup=True, soft_wrap=True)


# -- loading and planning ----------------------------------------------------------------------------
def _load(args, err):
    from .modelfile import load_model
    from .units import parse_bytes
    if args.budget is not None:
        parse_bytes(args.budget)                     # a bad budget string fails before any work
    with _status(err, f"loading {args.model} ..."):
        return load_model(args.model, input_shape=args.input_shape, dtype=args.dtype)


def _compile(loaded, args, err):
    """memplan.compile with the command's options; REV through the public API, clearly refused if missing."""
    import memplan

    from .errors import MemplanError
    what = "planning GCP+REV (tries each reversible block)" if args.rev else "tracing and planning"
    with _status(err, f"{what} on {_shape_text(loaded.input_shapes[0])} ..."), _notes_to(err):
        try:
            return memplan.compile(loaded.model, loaded.inputs, budget=args.budget, optimizer=args.optimizer,
                                   method=args.method, rev=args.rev, scratch=args.scratch)
        except ImportError as exc:
            if not args.rev:
                raise
            raise MemplanError(f"--rev needs memplan.rev_plan, which this installation lacks ({exc}); "
                               "run without --rev, or update memplan") from exc


def _scratch(args, device: str = "cpu") -> str:
    return args.scratch or ("none" if device == "cuda" else "cpu")


def _segment_rows(plan, all_segments: bool) -> list[dict]:
    """Table rows: recomputed segments one by one, runs of stored ones merged (unless ``all_segments``)."""
    rev_nodes = {r.new_module.replace(".", "_"): r.name for r in plan.rev}
    rows: list[dict] = []
    for s in plan.segments:
        rev = [rev_nodes[n] for n in s.nodes if n in rev_nodes]
        row = {"first": s.index, "last": s.index, "mode": "recompute" if s.recompute else "store",
               "nodes": list(s.nodes), "kept": list(s.kept), "kept_bytes": s.kept_bytes, "rev": rev}
        prev = rows[-1] if rows else None
        if (not all_segments and prev is not None and not s.recompute and prev["mode"] == "store"
                and not rev and not prev["rev"]):
            prev.update(last=s.index, nodes=prev["nodes"] + row["nodes"], kept=prev["kept"] + row["kept"],
                        kept_bytes=prev["kept_bytes"] + s.kept_bytes)
        else:
            rows.append(row)
    return rows


def _segment_table(plan, all_segments: bool):
    from rich.table import Table
    table = Table(title="segments", title_justify="left", caption_justify="left",
                  caption="store: every output kept for backward; recompute: only the kept outputs are stored, "
                  "the rest runs again in backward")
    cols = [("seg", "right"), ("mode", "left"), ("nodes", "right"), ("first .. last", "left"), ("kept", "left"),
            ("kept bytes", "right")] + ([("REV", "left")] if plan.rev else [])
    for col, just in cols:
        table.add_column(col, justify=just)
    for r in _segment_rows(plan, all_segments):
        seg = str(r["first"]) if r["first"] == r["last"] else f"{r['first']}-{r['last']}"
        if r["mode"] == "store":
            kept = "all"
        else:
            kept = ", ".join(r["kept"][:3]) + (f" +{len(r['kept']) - 3}" if len(r["kept"]) > 3 else "")
        mode = "[bold red]recompute[/]" if r["mode"] == "recompute" else "store"
        table.add_row(seg, mode, str(len(r["nodes"])), f"{r['nodes'][0]} .. {r['nodes'][-1]}", kept,
                      _fmt(r["kept_bytes"]), *([", ".join(r["rev"])] if plan.rev else []))
    return table


# -- optimize ----------------------------------------------------------------------------------------
def cmd_optimize(args, out, err) -> int:
    """Plan the model; print peaks, overhead and segments (or JSON); write the plan and the plot."""
    loaded = _load(args, err)
    module = _compile(loaded, args, err)
    plan = module.memplan_plan
    reload_note = ""
    if args.out:
        plan.to_json(args.out)
        reload_note = _check_reload(loaded, args, err) if plan.rev else ""
        if reload_note:
            err.print(f"note: {reload_note}", markup=False, soft_wrap=True)
    if args.plot:
        with _status(err, "simulating both steps for the timeline ..."):
            curves = {name: steady_timeline(m, loaded.inputs, optimizer=args.optimizer, scratch=_scratch(args))
                      for name, m in (("vanilla", loaded.model), ("planned", module))}
            plot_timeline(curves, args.plot, budget_bytes=plan.budget_bytes,
                          title=f"{loaded.model_source}, input {_shape_text(loaded.input_shapes[0])}, "
                          f"optimizer {args.optimizer}, scratch {_scratch(args)} (simulated)")
    if args.json:
        print(to_json(_optimize_record(loaded, plan, args, reload_note)), file=args.json_file)
        return EXIT_OK
    _print_optimize(out, loaded, plan, args, reloads=not reload_note)
    return EXIT_OK


def _check_reload(loaded, args, err) -> str:
    """'' when memplan.compile(..., plan=args.out) takes the REV plan just written, else why not."""
    import memplan
    with _status(err, f"checking that {args.out} loads ..."), _notes_to(err):
        try:
            memplan.compile(loaded.model, loaded.inputs, plan=args.out, scratch=args.scratch)
        except memplan.MemplanError as exc:
            return (f"this memplan's compile(..., plan=...) cannot load the REV plan in {args.out} yet "
                    f"({type(exc).__name__}: {str(exc).splitlines()[0]}); compile(model, x, rev=True) re-plans it, "
                    "and plans made without --rev load")
    return ""


def _optimize_record(loaded, plan, args, reload_note: str = "") -> dict:
    """The machine-readable summary of ``memplan optimize`` (the full plan under "plan")."""
    sim_v, sim_p = plan.simulated_vanilla_peak_bytes, plan.simulated_peak_bytes
    return {
        "model": loaded.model_source, "input_shapes": [list(s) for s in loaded.input_shapes],
        "dtype": str(loaded.inputs[0].dtype).removeprefix("torch."), "input_source": loaded.input_source,
        "graph_nodes": sum(len(s.nodes) for s in plan.segments), "lower_sets": plan.lower_set_count,
        "method": plan.method, "method_reason": plan.method_reason, "objective": plan.objective,
        "optimizer": plan.optimizer, "scratch": _scratch(args), "budget_bytes": plan.budget_bytes,
        "vanilla_peak_bytes": sim_v, "planned_peak_bytes": sim_p,
        "vanilla_cost_model_bytes": plan.vanilla_peak_bytes, "planned_cost_model_bytes": plan.predicted_peak_bytes,
        "peak_ratio": None if not sim_v or sim_p is None else sim_p / sim_v,
        "overhead": plan.predicted_overhead, "planning_time_s": plan.planning_time_s,
        "segments": _segment_rows(plan, True), "rev": [asdict(r) for r in plan.rev], "notes": list(plan.notes),
        "plan_file": args.out, "plan_file_loads": (not reload_note) if args.out else None, "plot_file": args.plot,
        "plan": json.loads(plan.to_json()),
    }


def _print_optimize(out, loaded, plan, args, *, reloads: bool = True) -> None:
    from rich.table import Table
    sim_v, sim_p = plan.simulated_vanilla_peak_bytes, plan.simulated_peak_bytes
    nodes = sum(len(s.nodes) for s in plan.segments)
    sets = f"{plan.lower_set_count} lower sets" if plan.lower_set_count is not None else "lower sets not enumerated"
    ratio = f", {sim_p / sim_v:.0%} of vanilla" if sim_v and sim_p is not None else ""
    head = Table.grid(padding=(0, 2))
    head.add_column(style="bold")
    head.add_column()
    head.add_row("model", loaded.model_source)
    head.add_row("input", f"{', '.join(_shape_text(s) for s in loaded.input_shapes)} "
                 f"{str(loaded.inputs[0].dtype).removeprefix('torch.')} ({loaded.input_source})")
    head.add_row("graph", f"{nodes} nodes, {sets}")
    head.add_row("method", f"{plan.method} DP ({plan.method_reason}); {plan.objective}; planned in "
                 f"{plan.planning_time_s:.2f} s")
    head.add_row("step", f"optimizer {plan.optimizer}, scratch {_scratch(args)}")
    head.add_row("budget", _budget_text(plan.budget_bytes))
    head.add_row("vanilla peak", f"{_fmt(sim_v)} simulated  (cost model {_fmt(plan.vanilla_peak_bytes)})")
    head.add_row("planned peak", f"{_fmt(sim_p)} simulated  (cost model {_fmt(plan.predicted_peak_bytes)}){ratio}")
    head.add_row("overhead", f"{plan.predicted_overhead:.1%} of forward FLOPs recomputed"
                 + (" (incl. REV rebuilds)" if plan.rev else ""))
    out.print(head)
    out.print(_segment_table(plan, args.all_segments))
    for r in plan.rev:
        out.print(f"REV replaced {r.name}: {', '.join(r.replaced)} -> {r.new_module} "
                  f"(params {r.params_before} -> {r.params_after}; fresh weights, must be trained)")
    for note in plan.notes:
        out.print(f"note: {note}", soft_wrap=True)
    if args.out:
        out.print(f"wrote {args.out}" + (f": memplan.compile(model, x, plan={args.out!r}) reuses it (same model, "
                                         "input shape and dtype)" if reloads else ""), soft_wrap=True)
    if args.plot:
        out.print(f"wrote {args.plot}")


def steady_timeline(module, inputs, *, optimizer: str, scratch: str) -> list[int]:
    """Live bytes after every op of a steady-state training step (the second of two simulated steps)."""
    import memplan
    first = memplan.simulate_step(module, inputs, optimizer=optimizer, scratch=scratch, steps=1).timeline
    both = memplan.simulate_step(module, inputs, optimizer=optimizer, scratch=scratch, steps=2).timeline
    return [b for _, b in both[len(first):]]


def plot_timeline(curves: dict[str, list[int]], path: str, *, budget_bytes: int | None = None,
                  title: str = "") -> None:
    """Live memory over one training step per curve (e.g. vanilla vs planned), saved with matplotlib."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    top = max(max(c) for c in curves.values())
    scale, unit = (2**30, "GiB") if top >= 2**30 else (2**20, "MiB")
    fig, ax = plt.subplots(figsize=(9, 4))
    for (label, ys), color in zip(curves.items(), ("tab:gray", "tab:blue", "tab:green", "tab:orange")):
        peak_at = max(range(len(ys)), key=ys.__getitem__)
        ax.plot(range(len(ys)), [y / scale for y in ys], color=color, lw=1, label=f"{label}: peak {_fmt(ys[peak_at])}")
        ax.plot([peak_at], [ys[peak_at] / scale], "o", color=color, ms=4)
    if budget_bytes:
        ax.axhline(budget_bytes / scale, color="tab:red", ls="--", lw=1, label=f"budget {_fmt(budget_bytes)}")
    ax.set_xlabel("ATen op of one training step (forward, backward with recomputation, optimizer)")
    ax.set_ylabel(f"live memory ({unit})")
    ax.set_title(title, fontsize=9)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- fit ---------------------------------------------------------------------------------------------
def cmd_fit(args, out, err) -> int:
    """The largest input per strategy that fits ``--budget``; exit 3 when none fits at any size."""
    from .errors import MemplanError
    from .fit import fit
    from .units import parse_bytes
    budget = parse_bytes(args.budget)
    loaded = _load(args, err)
    if len(loaded.inputs) != 1:
        raise MemplanError(f"fit grows one input tensor; {loaded.model_source} takes {len(loaded.inputs)}")
    strategies = ("vanilla", "GCP", "REV", "GCP+REV") if args.rev else ("vanilla", "GCP")
    if args.rev:
        try:
            import memplan.rev_plan  # noqa: F401
        except ImportError as exc:
            raise MemplanError(f"--rev needs memplan.rev_plan, which this installation lacks ({exc}); "
                               "run without --rev") from exc
    with _status(err, "finding the sizes the network accepts ...") as status, _notes_to(err):
        def wrap(strategy, fn):
            def peak(shape):
                status.update(f"fit {strategy}: simulating {_shape_text(shape)} ...")
                t0 = time.perf_counter()
                value = fn(shape)
                err.print(f"  {strategy:8} {_shape_text(shape):>18}  peak {_fmt(value):>10}  "
                          f"{'fits' if value <= budget else 'over'}  ({time.perf_counter() - t0:.1f} s)")
                return value
            return peak
        grid, results = fit(loaded.model, loaded.input_shapes[0], budget, strategies=strategies, axis=args.axis,
                            optimizer=args.optimizer, method=args.method, scratch=_scratch(args),
                            dtype=loaded.inputs[0].dtype, peak_wrapper=wrap)
    record = _fit_record(loaded, grid, results, budget, args)
    if args.json:
        print(to_json(record), file=args.json_file)
    else:
        _print_fit(out, loaded, grid, results, budget)
    if all(r.shape is None for r in results):
        smallest = grid.shape(grid.min_n)
        least = min(results, key=lambda r: r.next_peak_bytes or math.inf)
        err.print(f"memplan: error: no strategy fits {_fmt(budget)} even at the smallest input "
                  f"{_shape_text(smallest)} (least: {least.strategy} at {_fmt(least.next_peak_bytes)}); raise the "
                  "budget" + ("" if args.rev else " or try --rev"), soft_wrap=True)
        return EXIT_BUDGET
    return EXIT_OK


def _fit_record(loaded, grid, results, budget, args) -> dict:
    return {
        "model": loaded.model_source, "budget_bytes": budget, "base_shape": list(grid.base),
        "axes": list(grid.axes), "multiples": list(grid.multiples), "optimizer": args.optimizer,
        "scratch": _scratch(args),
        "results": [{**{k: v for k, v in asdict(r).items() if k not in ("shape", "next_shape")},
                     "shape": None if r.shape is None else list(r.shape),
                     "next_shape": None if r.next_shape is None else list(r.next_shape), "capped": r.capped}
                    for r in results],
    }


def _print_fit(out, loaded, grid, results, budget) -> None:
    from rich.table import Table
    base_v = next((r.base_peak_bytes for r in results if r.strategy == "vanilla"), None)
    vox0 = math.prod(grid.base[a] for a in grid.axes)
    axes = f"axes {', '.join(map(str, grid.axes))} grown in multiples of {', '.join(map(str, grid.multiples))}"
    table = Table(title=f"largest input within {_budget_text(budget)}: {loaded.model_source}", title_justify="left",
                  caption=f"given input {_shape_text(grid.base)}; {axes}; peaks: simulated training steps, the "
                  "smallest each strategy reaches; x given: max input size / given; next size up: the next "
                  "grid shape, over the budget", caption_justify="left")
    for col, just in (("strategy", "left"), ("peak at given", "right"), ("max input", "left"),
                      ("peak", "right"), ("x given", "right"), ("next size up", "left")):
        table.add_column(col, justify=just)
    for r in results:
        pct = f" ({r.base_peak_bytes / base_v:.0%})" if base_v else ""
        size = "-" if r.shape is None else f"{math.prod(r.shape[a] for a in grid.axes) / vox0:.2f}x"
        nxt = ("size cap reached" if r.capped else f"{_shape_text(r.next_shape)}: {_fmt(r.next_peak_bytes)}")
        table.add_row(r.strategy, f"{_fmt(r.base_peak_bytes)}{pct}", _shape_text(r.shape) if r.shape else "none fits",
                      _fmt(r.peak_bytes), size, nxt)
    out.print(table)


# -- measure -----------------------------------------------------------------------------------------
def cmd_measure(args, out, err) -> int:
    """Simulated peaks of the unplanned and planned step, and with --real measured peaks and step times."""
    import memplan

    from .errors import MemplanError
    from .modelfile import real_inputs
    if args.repeat < 1:
        raise MemplanError(f"--repeat must be >= 1, got {args.repeat}")
    loaded = _load(args, err)
    if args.real and args.device == "cuda":
        import torch
        if not torch.cuda.is_available():
            raise MemplanError("--device cuda: no CUDA device is available here; use --device cpu")
        loaded.model.to("cuda")
    module = _compile(loaded, args, err)
    plan, scratch = module.memplan_plan, _scratch(args, args.device if args.real else "cpu")
    rows = {"vanilla": {"module": loaded.model}, "planned": {"module": module}}
    with _status(err, "simulating both steps ..."):
        for row in rows.values():
            row["simulated_peak_bytes"] = memplan.simulate_step(row["module"], loaded.inputs, optimizer=args.optimizer,
                                                                scratch=scratch).peak_bytes
    if args.real:
        real = real_inputs(loaded, args.device)
        for name, row in rows.items():
            with _status(err, f"measuring a real {name} step on {args.device} ..."), _drop_native_lines():
                row["measured_peak_bytes"] = memplan.measure_step(row["module"], real, optimizer=args.optimizer,
                                                                  device=args.device).peak_bytes
        with _status(err, f"timing {args.repeat} steps of each, alternating ..."):
            times = time_steps({k: r["module"] for k, r in rows.items()}, real, args.optimizer, args.repeat)
        for name, row in rows.items():
            row["step_time_s"] = times[name]
    record = _measure_record(loaded, plan, rows, args, scratch)
    if args.json:
        print(to_json(record), file=args.json_file)
    else:
        _print_measure(out, loaded, record, args)
    return EXIT_OK


def time_steps(modules: dict, inputs: tuple, optimizer: str, repeat: int) -> dict[str, float]:
    """Median seconds of one training step per module, after one warm-up step each, steps alternating."""
    import torch

    from .measure import default_loss, make_optimizer
    opts = {k: make_optimizer(optimizer, list(m.parameters())) for k, m in modules.items()}
    cuda = any(t.is_cuda for t in inputs)
    samples: dict[str, list[float]] = {k: [] for k in modules}

    def step(name: str) -> float:
        module, opt = modules[name], opts[name]
        module.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        default_loss(module(*inputs)).backward()
        if opt is not None:
            opt.step()
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    for name in modules:
        step(name)
    for _ in range(repeat):
        for name in modules:
            samples[name].append(step(name))
    return {k: statistics.median(v) for k, v in samples.items()}


def _measure_record(loaded, plan, rows, args, scratch) -> dict:
    clean = {k: {f: v for f, v in r.items() if f != "module"} for k, r in rows.items()}
    v, p = clean["vanilla"], clean["planned"]
    return {
        "model": loaded.model_source, "input_shapes": [list(s) for s in loaded.input_shapes],
        "budget_bytes": plan.budget_bytes, "optimizer": args.optimizer, "scratch": scratch, "rev": bool(plan.rev),
        "device": args.device if args.real else None, "vanilla": v, "planned": p,
        "simulated_ratio": p["simulated_peak_bytes"] / v["simulated_peak_bytes"],
        "measured_ratio": (p["measured_peak_bytes"] / v["measured_peak_bytes"]) if args.real else None,
        "step_time_ratio": (p["step_time_s"] / v["step_time_s"]) if args.real else None,
        "overhead": plan.predicted_overhead,
    }


def _print_measure(out, loaded, rec, args) -> None:
    from rich.table import Table
    out.print(f"{loaded.model_source}, input {_shape_text(loaded.input_shapes[0])}, optimizer {rec['optimizer']}, "
              f"budget {_budget_text(rec['budget_bytes'])}" + (", REV" if rec["rev"] else ""), soft_wrap=True)
    table = Table()
    cols = [("", "left"), ("simulated peak", "right")]
    if args.real:
        cols += [("measured peak", "right"), ("sim. error", "right"), ("step time", "right")]
        table.caption = (f"simulated: meta tensors, scratch {rec['scratch']}; measured: "
                         f"{'CPU profiler' if rec['device'] == 'cpu' else 'CUDA max_memory_allocated'}; "
                         f"step time: median of {args.repeat} alternating steps")
        table.caption_justify = "left"
    for col, just in cols:
        table.add_column(col, justify=just)
    for name in ("vanilla", "planned"):
        r = rec[name]
        cells = [name, _fmt(r["simulated_peak_bytes"])]
        if args.real:
            err_pct = (r["simulated_peak_bytes"] - r["measured_peak_bytes"]) / r["measured_peak_bytes"]
            cells += [_fmt(r["measured_peak_bytes"]), f"{err_pct:+.1%}", f"{r['step_time_s']:.3f} s"]
        table.add_row(*cells)
    ratio = ["planned / vanilla", f"{rec['simulated_ratio']:.2f}x"]
    if args.real:
        ratio += [f"{rec['measured_ratio']:.2f}x", "", f"{rec['step_time_ratio']:.2f}x"]
    table.add_row(*ratio, style="bold")
    out.print(table)
    out.print(f"predicted overhead: {rec['overhead']:.1%} of forward FLOPs recomputed")


# -- entry point -------------------------------------------------------------------------------------
COMMANDS = {"optimize": cmd_optimize, "fit": cmd_fit, "measure": cmd_measure}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``memplan`` command line; returns the exit code (0 ok, 2 input error, 3 budget infeasible)."""
    from .errors import BudgetError, MemplanError
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:                      # --help, --version, or a usage error (argparse prints it)
        return int(exc.code or 0) if not isinstance(exc.code, str) else EXIT_USAGE
    out, err = _consoles(args)
    args.json_file = sys.stdout                    # --json: only the record goes here; any print() of the
    quiet = contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext()  # model file: stderr
    try:
        with quiet:
            return COMMANDS[args.command](args, out, err)
    except BudgetError as exc:
        err.print(f"memplan: error: {_budget_message(exc, args)}", markup=False, soft_wrap=True)
        return EXIT_BUDGET
    except MemplanError as exc:
        err.print(f"memplan: error: {exc}", markup=False, soft_wrap=True)
        return EXIT_USAGE
    except KeyboardInterrupt:
        err.print("memplan: interrupted")
        return 130


def _budget_message(exc, args) -> str:
    """The BudgetError's text, with the REV reach spelled out when --rev was not given."""
    from .units import format_bytes
    text = str(exc)
    rev_min = getattr(exc, "rev_min_bytes", None)
    if not args.rev and rev_min is not None and "REV would reach" not in text and rev_min < exc.min_feasible_bytes:
        text += f"\nREV would reach {format_bytes(rev_min)}: add --rev"
    elif not args.rev and rev_min is not None and rev_min < exc.min_feasible_bytes:
        text += "\nhint: add --rev to plan with reversible blocks"
    return text


if __name__ == "__main__":
    sys.exit(main())
