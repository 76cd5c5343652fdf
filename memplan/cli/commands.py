"""The three ``memplan`` commands: optimize (plan, save, plot), fit (largest input), measure (peaks, time).

Each takes the parsed arguments and the command's :class:`Streams` and returns an exit code;
input errors are raised as MemplanError (the caller turns them into exit code 2).
"""
from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from rich.console import Console

from ..errors import MemplanError
from ..options import amp_text
from .loading import compile_loaded, load, scratch_for
from .outputs import Writer, check_output_path, plot_suffixes, write_all
from .parsing import ExitCode
from ..quiet import drop_native_lines
from .progress import Progress, notes_to
from .records import fit_record, measure_record, optimize_record, to_json
from .tables import fit_table, fmt, print_measure, print_optimize, shape_text


@dataclass(frozen=True)
class Streams:
    """Where a command writes: tables to ``out``, progress and notes to ``progress`` (stderr), --json to ``json``."""
    out: Console
    progress: Progress
    json: TextIO

    @property
    def err(self) -> Console:
        return self.progress.console


# -- fp32 beside mixed precision -----------------------------------------------------------------------
def side_precisions(args: argparse.Namespace) -> tuple[None, str]:
    """The two precisions the output puts side by side: fp32 (None) and ``--amp``, else bf16."""
    return None, args.amp or "bf16"


def precision_peaks(loaded, module, plan, args: argparse.Namespace, scratch: str, progress: Progress
                    ) -> dict[str, dict[str, int]]:
    """Simulated vanilla and planned peaks in fp32 and in the mixed precision, keyed "fp32"/"bf16"/"fp16":
    the plan's own precision from the plan, the other simulated with the same compiled module."""
    from ..measure import simulate_step
    out: dict[str, dict[str, int]] = {}
    for amp in side_precisions(args):
        if amp == plan.amp and plan.simulated_peak_bytes is not None:
            out[amp_text(amp)] = {"vanilla_peak_bytes": plan.simulated_vanilla_peak_bytes,
                                  "planned_peak_bytes": plan.simulated_peak_bytes}
            continue
        with progress.stage(f"simulating both steps in {amp_text(amp)}"), notes_to(progress.console):
            out[amp_text(amp)] = {
                f"{name}_peak_bytes": simulate_step(m, loaded.inputs, optimizer=args.optimizer, scratch=scratch,
                                                    amp=amp, threads=plan.threads).peak_bytes
                for name, m in (("vanilla", loaded.model), ("planned", module))}
    return out


# -- optimize ----------------------------------------------------------------------------------------
def output_paths(args: argparse.Namespace) -> tuple[Path | None, Path | None]:
    """``--out`` and ``--plot`` checked before any planning (folder, permission, suffix)."""
    out = check_output_path(args.out, suffixes=(".json",), option="--out") if args.out else None
    plot = check_output_path(args.plot, suffixes=plot_suffixes(), option="--plot") if args.plot else None
    return out, plot


def cmd_optimize(args: argparse.Namespace, io: Streams) -> int:
    """Plan the model; print peaks, overhead and segments (or JSON); write the plan and the plot together."""
    out_path, plot_path = output_paths(args)
    loaded = load(args, io.progress)
    module = compile_loaded(loaded, args, io.progress)
    plan, scratch = module.memplan_plan, scratch_for(args)
    writers: dict[Path, Writer] = {}
    if out_path is not None:
        text = plan.to_json()
        writers[out_path] = lambda p: p.write_text(text)
    if plot_path is not None:
        from .plots import plot_timeline, steady_timeline
        with io.progress.stage("simulating both steps for the timeline"), notes_to(io.err):
            curves = {name: steady_timeline(m, loaded.inputs, optimizer=args.optimizer, scratch=scratch,
                                            amp=args.amp, threads=plan.threads)
                      for name, m in (("vanilla", loaded.model), ("planned", module))}
        title = (f"{loaded.model_source}, input {shape_text(loaded.input_shapes[0])}, optimizer {args.optimizer}, "
                 f"scratch {scratch}, {amp_text(args.amp)} (simulated)")
        writers[plot_path] = lambda p: plot_timeline(curves, p, budget_bytes=plan.budget_bytes, title=title)
    if writers:
        names = ", ".join(str(p) for p in writers)
        try:
            write_all(writers)
        except (OSError, ValueError) as exc:
            raise MemplanError(f"writing {names} failed ({type(exc).__name__}: {exc}); nothing was written, "
                               "choose another path") from exc
    peaks = precision_peaks(loaded, module, plan, args, scratch, io.progress)
    if args.json:
        print(to_json(optimize_record(loaded, plan, scratch=scratch, out=args.out, plot=args.plot,
                                      precision_peaks=peaks)), file=io.json)
    else:
        print_optimize(io.out, loaded, plan, scratch=scratch, all_segments=args.all_segments,
                       written=[p for p in (args.out, args.plot) if p], precision_peaks=peaks)
    return ExitCode.OK


# -- fit ---------------------------------------------------------------------------------------------
def cmd_fit(args: argparse.Namespace, io: Streams) -> int:
    """The largest input per strategy that fits ``--budget``; exit 3 when none fits at any size."""
    import torch

    from ..fit import fit, peak_function
    from ..units import parse_bytes
    budget = parse_bytes(args.budget)
    loaded = load(args, io.progress)
    if len(loaded.inputs) != 1:
        raise MemplanError(f"fit grows one input tensor; {loaded.model_source} takes {len(loaded.inputs)} "
                           f"({loaded.input_source}); use `memplan optimize` at each size instead")
    strategies = ("vanilla", "GCP", "REV", "GCP+REV") if args.rev else ("vanilla", "GCP")
    scratch = scratch_for(args)
    threads = args.threads or torch.get_num_threads()
    with io.progress.stage(f"searching the largest input ({', '.join(strategies)})") as update, notes_to(io.err):
        def wrap(strategy, fn):
            def peak(shape):
                update(f"fit {strategy}: simulating {shape_text(shape)} ...")
                t0 = time.perf_counter()
                value = fn(shape)
                io.progress.line(f"  {strategy:8} {shape_text(shape):>18}  peak {fmt(value):>10}  "
                                 f"{'fits' if value <= budget else 'over'}  ({time.perf_counter() - t0:.1f} s)")
                return value
            return peak
        grid, results = fit(loaded.model, loaded.input_shapes[0], budget, strategies=strategies, axis=args.axis,
                            optimizer=args.optimizer, method=args.method, scratch=scratch,
                            dtype=loaded.inputs[0].dtype, peak_wrapper=wrap, amp=args.amp, threads=threads,
                            split_concat=args.split_concat)
    side = side_precisions(args)
    other = side[1] if args.amp is None else side[0]
    with io.progress.stage(f"peaks at the given input in {amp_text(other)}"), notes_to(io.err):
        other_peaks = {r.strategy: peak_function(loaded.model, r.strategy, optimizer=args.optimizer,
                                                 method=args.method, scratch=scratch, dtype=loaded.inputs[0].dtype,
                                                 amp=other, threads=threads, split_concat=args.split_concat)(grid.base)
                       for r in results}
    by_precision = {amp_text(a): {r.strategy: (r.base_peak_bytes if a == args.amp else other_peaks[r.strategy])
                                  for r in results} for a in side}
    failure = None
    if all(r.shape is None for r in results):
        least = min(results, key=lambda r: r.next_peak_bytes or math.inf)
        failure = (f"no strategy fits {fmt(budget)} even at the smallest input {shape_text(grid.shape(grid.min_n))} "
                   f"(least: {least.strategy} at {fmt(least.next_peak_bytes)}); raise the budget"
                   + ("" if args.rev else " or try --rev"))
    if args.json:
        record = fit_record(loaded, grid, results, budget, optimizer=args.optimizer, scratch=scratch, amp=args.amp,
                            threads=threads, peaks_by_precision=by_precision)
        if failure:                                  # the answer and the error in the one object
            record["error"] = {"type": "BudgetError", "message": failure, "exit_code": int(ExitCode.BUDGET)}
        print(to_json(record), file=io.json)
    else:
        io.out.print(fit_table(loaded, grid, results, budget, peaks_by_precision=by_precision, amp=args.amp))
    if failure:
        io.err.print(f"memplan: error: {failure}", soft_wrap=True, markup=False)
        return ExitCode.BUDGET
    return ExitCode.OK


# -- measure -----------------------------------------------------------------------------------------
def cmd_measure(args: argparse.Namespace, io: Streams) -> int:
    """Simulated peaks of the unplanned and planned step, and with --real measured peaks and step times."""
    import torch

    from ..measure import measure_step, simulate_step
    from ..modelfile import real_inputs
    from .timing import time_steps
    if args.repeat < 1:
        raise MemplanError(f"--repeat must be >= 1, got {args.repeat}")
    if args.real and args.device == "cuda" and not torch.cuda.is_available():
        raise MemplanError("--device cuda: no CUDA device is available here; use --device cpu")
    loaded = load(args, io.progress)
    if args.real and args.device == "cuda":
        loaded.model.to("cuda")
    module = compile_loaded(loaded, args, io.progress)
    plan, scratch = module.memplan_plan, scratch_for(args, args.device if args.real else "cpu")
    modules = {"vanilla": loaded.model, "planned": module}
    rows: dict[str, dict] = {name: {} for name in modules}
    with io.progress.stage("simulating both steps"):
        for name, m in modules.items():
            rows[name]["simulated_peak_bytes"] = simulate_step(m, loaded.inputs, optimizer=args.optimizer,
                                                               scratch=scratch, amp=args.amp,
                                                               threads=plan.threads).peak_bytes
    if args.real:
        real = real_inputs(loaded, args.device)
        threads_before = torch.get_num_threads()
        torch.set_num_threads(plan.threads)          # the real steps run at the threads the simulation assumed
        try:
            for name, m in modules.items():
                with io.progress.stage(f"measuring a real {name} step on {args.device}"), drop_native_lines():
                    rows[name]["measured_peak_bytes"] = measure_step(m, real, optimizer=args.optimizer,
                                                                     device=args.device, amp=args.amp).peak_bytes
            with io.progress.stage(f"timing {args.repeat} steps of each, alternating"):
                times = time_steps(modules, real, args.optimizer, args.repeat, amp=args.amp)
        finally:
            torch.set_num_threads(threads_before)
        for name in modules:
            rows[name]["step_time_s"] = times[name]
    record = measure_record(loaded, plan, rows, optimizer=args.optimizer, scratch=scratch,
                            device=args.device if args.real else None, amp=args.amp, threads=plan.threads)
    if args.json:
        print(to_json(record), file=io.json)
    else:
        print_measure(io.out, loaded, record, repeat=args.repeat)
    return ExitCode.OK


COMMANDS = {"optimize": cmd_optimize, "fit": cmd_fit, "measure": cmd_measure}
