"""Peak memory of a training step for every client, by every method users have: memplan against
vanilla autograd, checkpointing by hand, Chen's sqrt(n), torch.compile's activation budget, and
FetusMapV2 Table 4. It measures; it never asserts.

    python benchmarks/peak_memory.py                    # all clients (<= 15 min on 2 CPU cores)
    python benchmarks/peak_memory.py --quick            # CI smoke run: a tiny pose net (<= 2 min)
    python benchmarks/peak_memory.py --full             # measure at the paper sizes (slow on CPU)
    python benchmarks/peak_memory.py --models fetusmapv2,femur --no-fit

Predicted peaks run on meta tensors in worker processes (``--jobs``); measured peaks and step times
run afterwards in this process, one method after another, with one thread. Writes
``peak_memory.json``, ``peak_memory.md`` and one ``<model>.png`` per client to ``--out``, by
default the scratch folder runs/peak_memory-<mode>/ (git-ignored): a run never overwrites the
committed benchmarks/results/ unless ``--out benchmarks/results`` asks for it, and a ``--quick``
run is refused there. See docs/benchmarks.md for what every column means.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import datetime
import gc
import json
import multiprocessing
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from benchmarks import measuring, methods, report  # noqa: E402
from benchmarks.clients import SPEC_KEYS, ModelSpec, quick_specs, specs  # noqa: E402
from memplan.quiet import drop_native_lines  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"      # committed: written only when --out names it
SCRATCH = ROOT / "runs"                        # git-ignored: every run's default output
DEFAULT_FIT_BUDGETS = ("8GiB", "12GiB")
QUICK_FIT_BUDGETS = ("1.2x", "1.6x")
QUICK_FIT_STRATEGIES = ("vanilla", "GCP")   # the REV searches would take most of --quick's two minutes


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter,
                                epilog=f"writes to {SCRATCH.relative_to(ROOT)}/peak_memory-<mode>/ unless --out is "
                                f"given; the committed results are in {RESULTS.relative_to(ROOT)}/")
    p.add_argument("--quick", action="store_true", help="CI smoke run: one tiny pose net, tiny sizes")
    p.add_argument("--full", action="store_true", help="measure at the paper sizes and widths (hours on CPU)")
    p.add_argument("--out", type=Path, default=None,
                   help=f"output folder (default: {SCRATCH.relative_to(ROOT)}/peak_memory-quick, -default or -full; "
                   f"--out {RESULTS.relative_to(ROOT)} replaces the committed results, not allowed with --quick)")
    p.add_argument("--models", default=",".join(SPEC_KEYS), help=f"comma list of {', '.join(SPEC_KEYS)}")
    p.add_argument("--jobs", type=int, default=None, help="planning processes (default 2; --quick 1)")
    p.add_argument("--reps", type=int, default=None, help="timing rounds per model (default 3; --quick 2)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="where to measure (auto: CUDA when present)")
    p.add_argument("--fit-budgets", default=None,
                   help="budgets for the largest-input table: byte strings or multiples of vanilla ('1.5x'); "
                        f"default {','.join(DEFAULT_FIT_BUDGETS)} (--quick: {','.join(QUICK_FIT_BUDGETS)})")
    p.add_argument("--no-fit", action="store_true", help="skip the largest-input table")
    p.add_argument("--no-measure", action="store_true", help="predicted columns only")
    p.add_argument("--rev-search", action="store_true",
                   help="GCP+REV with the per-candidate joint search (as memplan.plan(rev=True); ~2x planning time)")
    args = p.parse_args(argv)
    if args.quick and args.full:
        p.error("--quick and --full contradict each other; pick one")
    args.mode = "quick" if args.quick else "full" if args.full else "default"
    args.out = args.out if args.out is not None else SCRATCH / f"peak_memory-{args.mode}"
    if args.quick and args.out.resolve() == RESULTS.resolve():
        p.error(f"--quick would overwrite the committed results in {args.out} with smoke-run numbers; "
                "write them elsewhere (the default is a scratch folder)")
    args.jobs = args.jobs if args.jobs is not None else (1 if args.quick else 2)
    args.reps = args.reps if args.reps is not None else (2 if args.quick else 3)
    if args.jobs < 1 or args.reps < 1:
        p.error(f"--jobs and --reps must be >= 1, got {args.jobs} and {args.reps}")
    budgets = args.fit_budgets or ",".join(QUICK_FIT_BUDGETS if args.quick else DEFAULT_FIT_BUDGETS)
    args.fit_budgets = tuple(b.strip() for b in budgets.split(",") if b.strip())
    try:
        methods.resolve_budgets(args.fit_budgets, 1)
    except ValueError as exc:
        p.error(f"--fit-budgets: {exc}")
    return args


def measure_setup(args: argparse.Namespace) -> dict:
    """Where and at which size the measured columns run, and the scratch model of their prediction."""
    cuda = torch.cuda.is_available() and args.device != "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is present; use --device cpu")
    size = "paper" if (cuda or args.full) else "reduced"
    return {"device": "cuda" if cuda else "cpu", "size": size, "scratch": "none" if cuda else "cpu",
            "method": "torch.cuda.max_memory_allocated" if cuda else "CPU profiler allocator events"}


# -- predictions (worker processes) ------------------------------------------------------------------

def _init_worker(root: str) -> None:
    if root not in sys.path:
        sys.path.insert(0, root)
    torch.set_num_threads(1)


def _cost_rank(task) -> int:
    """Longest first, so the pool ends together: fit searches, then REV plans, then the rest."""
    if isinstance(task, methods.FitTask):
        return 0 if "REV" in task.strategy else 1
    return 2 if "rev" in task.method else 3


def run_predictions(tasks: list, jobs: int, bar: tqdm) -> dict:
    """Run every Task and FitTask; returns task -> result dict."""
    ordered = sorted(tasks, key=_cost_rank)
    results = {}

    def done(task, res):
        results[task] = res
        label = task.strategy if isinstance(task, methods.FitTask) else f"{task.method} @{task.size}"
        bar.set_postfix_str(f"{task.model} {label}", refresh=False)
        bar.update(1)

    def call(task):
        return methods.run_fit(task) if isinstance(task, methods.FitTask) else methods.run_task(task)

    if jobs == 1:
        for t in ordered:
            done(t, call(t))
        return results
    ctx = multiprocessing.get_context("spawn")   # no fork after torch has started its thread pools
    with cf.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=_init_worker,
                                initargs=(str(ROOT),)) as pool:
        futures = {pool.submit(methods.run_fit if isinstance(t, methods.FitTask) else methods.run_task, t): t
                   for t in ordered}
        for fut in cf.as_completed(futures):
            done(futures[fut], fut.result())
    return results


# -- measurements (this process) ---------------------------------------------------------------------

def measure_model(spec: ModelSpec, predicted: dict[str, dict], setup: dict, reps: int, bar: tqdm) -> dict[str, dict]:
    """Peak of one steady step and median step time of every runnable method; method -> figures."""
    paper = setup["size"] == "paper"
    torch.manual_seed(0)
    model = spec.build() if paper else spec.build_reduced()
    shape = spec.paper_shape if paper else spec.reduced_shape
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(setup["device"])
    model = model.to(setup["device"])
    out: dict[str, dict] = {}
    runners = []
    for key in methods.METHODS:
        bar.set_postfix_str(f"{spec.key} measure {key}", refresh=True)
        try:
            built = methods.build_module(key, model, x, spec, predicted.get(key, {}))
            if built is None:
                out[key] = {"note": "not run: " + (predicted.get(key, {}).get("note") or "nothing to run")}
            else:
                r = measuring.make_runner(key, built[0], built[1], x)
                out[key] = {"peak_bytes": measuring.step_peak(r)}
                runners.append(r)
        except Exception as exc:  # noqa: BLE001 - one failing method is reported, the others still run
            out[key] = {"note": f"measure error: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
        bar.update(1)
    medians = measuring.interleaved_times(runners, reps)
    for r in runners:
        out[r.key].update(step_time_s=medians[r.key], times_s=r.times_s, warmup_s=r.warmup_s)
        if r.key in methods.COMPILE_BUDGETS:
            out[r.key]["compile_s"] = max(r.warmup_s - medians[r.key], 0.0)
    bar.update(1)
    del runners
    gc.collect()
    return out


# -- assembling ------------------------------------------------------------------------------------

def _ratio(a, b):
    return None if a is None or not b else a / b


def model_result(spec: ModelSpec, paper: dict[str, dict], meas_pred: dict[str, dict], meas: dict[str, dict],
                 setup: dict) -> dict:
    """One model's JSON record: spec, floors, and a row per method."""
    v_paper = paper["vanilla"].get("peak_bytes")
    v_meas = meas.get("vanilla", {}).get("peak_bytes")
    v_time = meas.get("vanilla", {}).get("step_time_s")
    floor_p = paper["vanilla"].get("floor")
    floor_m = meas_pred.get("vanilla", {}).get("floor")
    rows = []
    for key in methods.METHODS:
        p = {k: v for k, v in paper[key].items() if k != "plan_json"}
        p["ratio"] = _ratio(p.get("peak_bytes"), v_paper)
        p["peak_over_floor"] = _ratio(p.get("peak_bytes"), floor_p and floor_p["total_bytes"])
        q = dict(meas.get(key, {}))
        mp = meas_pred.get(key, {})
        q["predicted_bytes"] = mp.get("peak_bytes")
        q["predicted_note"] = mp.get("note", "")
        q["ratio"] = _ratio(q.get("peak_bytes"), v_meas)
        q["peak_over_floor"] = _ratio(q.get("peak_bytes"), floor_m and floor_m["total_bytes"])
        q["time_ratio"] = _ratio(q.get("step_time_s"), v_time)
        rows.append({"method": key, "label": methods.LABELS[key], "paper": p, "measured": q})
    shape = spec.paper_shape if setup["size"] == "paper" else spec.reduced_shape
    note = ("paper widths" if setup["size"] == "paper" else spec.reduced_note) + f", {setup['method']}"
    return {"key": spec.key, "title": spec.title, "paper_shape": list(spec.paper_shape), "paper_size": spec.paper_size,
            "size_note": spec.size_note, "params": paper["vanilla"].get("params", 0), "floor_paper": floor_p,
            "floor_measured": floor_m, "rows": rows,
            "measure": {**setup, "shape": list(shape), "note": note}}


def run_notes(args, setup: dict, load: tuple[float, float]) -> list[str]:
    size_words = ("the paper size" if setup["size"] == "paper" else
                  "a reduced size: each client's network with a quarter of its widths on a small volume (per model)")
    gcprev = ("memplan.plan(rev=True) with the joint search" if args.rev_search else
              "plan_with_rev(search=False): the FetusMapV2 heuristic and memplan's joint DP re-plans, without the "
              "per-candidate toggle search that memplan.plan(rev=True) adds (--rev-search; about 2x planning time)")
    notes = [
        "Predicted = memplan.simulate_step on meta tensors (two Adam steps, the larger peak), exact for tensor "
        "lifetimes. At the paper size with scratch=none: tensors only, what CUDA's allocator holds, the figure "
        "FetusMapV2 reports (torch.cuda.max_memory_allocated) - comparable with the paper.",
        f"Measured = {setup['method']} over one steady-state training step after a warm-up step, at {size_words}. "
        f"Its predicted column uses scratch={setup['scratch']}" + (
            " (adds the transient buffers CPU convolution kernels allocate), which is what the profiler sees."
            if setup["scratch"] == "cpu" else "."),
        f"Step time = median of {args.reps} interleaved rounds (rotated order) in one process, one thread; "
        "ratio to vanilla in the same run. torch.compile rows exclude compilation (shown as 'compile' in the "
        "planning column).",
        "Recomputed FLOPs = forward FLOPs re-run in backward / forward FLOPs (memplan's count; REV adds one F and "
        "one G evaluation per block). By-hand rows: the FLOPs of the module calls inside the checkpointed "
        "modules. Not counted for torch.compile.",
        "peak/floor: floor = parameters + gradients + Adam state + buffers and input + the largest single-op "
        "working set (one op's input and output tensors, plus its kernel scratch under scratch=cpu) of the "
        "unplanned network: what any schedule holds while it runs that op.",
        "torch.compile: backend aot_eager with torch._functorch.config.activation_memory_budget; it cannot be "
        "simulated (a dispatch mode makes compiled code run eagerly), so its predicted columns are n/a.",
        f"GCP+REV = {gcprev}. REV rows change the network (fresh F/G weights, fewer parameters, so less Adam state).",
        "memplan 0.57 x vanilla = the time-centric GCP plan (least recompute) under FetusMapV2's UGCPREV ratio.",
        f"Rockmate: {methods.rockmate_skip_reason() or 'run on CUDA under 0.57 x vanilla'}.",
        f"Machine load average {load[0]:.1f} at the start, {load[1]:.1f} at the end "
        f"({os.cpu_count()} CPUs): step times on a shared machine are noisy (two identical modules can differ "
        "by 15%).",
    ]
    return notes


def fit_record(fit_results: list[dict], args, spec: ModelSpec) -> dict:
    return {"model": spec.key, "base_shape": list(spec.paper_shape), "budgets": list(args.fit_budgets),
            "scratch": "none", "paper": {k: list(v) for k, v in methods.PAPER_FIT_8GB.items()},
            "note": ("Grid: FetusMapV2's, 176x112x112 grown by 16 voxels one axis at a time (depth, width, height); "
                     "the paper's answers lie on it. Each answer is checked on both sides: the next grid step does "
                     "not fit. Predicted (simulate_step, scratch=none), memory-centric plans; the paper's 8 GB are "
                     "a GPU's (its vanilla UNet peaks at 7.91 GB at 176x112x112; ours has 22.6 M parameters, the "
                     "paper's 37 M)." + (" --quick: vanilla and GCP only, budgets relative to the vanilla peak."
                                         if args.quick else "")),
            "results": fit_results}


def write_outputs(results: dict, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "peak_memory.json", out / "peak_memory.md"]
    paths[0].write_text(json.dumps(results, indent=1, default=str))
    paths[1].write_text(report.markdown(results))
    for m in results["models"]:
        png = out / f"{m['key']}.png"
        report.plot_model(m, png)
        paths.append(png)
    return paths


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    bar_file = os.fdopen(os.dup(2), "w", buffering=1)   # progress shows at once while fd 2 is filtered
    try:
        with drop_native_lines():                       # the profiler's kineto prints two lines per step
            return run(args, bar_file)
    finally:
        bar_file.close()


def run(args: argparse.Namespace, bar_file) -> int:
    """The whole benchmark: predictions, measurements, files; progress and notes on ``bar_file``."""
    started, t0, load0 = datetime.datetime.now().isoformat(timespec="seconds"), time.perf_counter(), os.getloadavg()[0]
    torch.set_num_threads(1)
    setup = measure_setup(args)
    if args.quick:
        model_specs, skipped = quick_specs(), []
    else:
        model_specs, skipped = specs(tuple(k.strip() for k in args.models.split(",") if k.strip()))
    if not model_specs:
        raise SystemExit(f"no client to benchmark: {'; '.join(skipped)}")
    tasks = []
    for s in model_specs:
        for key in methods.METHODS:
            tasks.append(methods.Task(s.key, "paper", key, "none", args.quick, args.rev_search))
            tasks.append(methods.Task(s.key, setup["size"], key, setup["scratch"], args.quick, args.rev_search))
    tasks = list(dict.fromkeys(tasks))    # CUDA at the paper size: one prediction serves both columns
    pose = next((s for s in model_specs if s.key == "fetusmapv2"), None)
    strategies = QUICK_FIT_STRATEGIES if args.quick else methods.FIT_STRATEGIES
    fit_tasks = [] if args.no_fit or pose is None else [
        methods.FitTask(pose.key, st, args.fit_budgets, "none", args.quick, args.rev_search) for st in strategies]
    measure_units = 0 if args.no_measure else len(model_specs) * (len(methods.METHODS) + 1)
    skip_line = methods.rockmate_skip_reason()
    if skip_line:
        print(f"Rockmate row {skip_line}", file=bar_file)
    with tqdm(total=len(tasks) + len(fit_tasks) + measure_units, desc="peak_memory", file=bar_file,
              unit="step", dynamic_ncols=True) as bar:
        predicted = run_predictions(tasks + fit_tasks, args.jobs, bar)
        models = []
        for s in model_specs:
            paper = {k: predicted[methods.Task(s.key, "paper", k, "none", args.quick, args.rev_search)]
                     for k in methods.METHODS}
            meas_pred = {k: predicted[methods.Task(s.key, setup["size"], k, setup["scratch"], args.quick,
                                                   args.rev_search)] for k in methods.METHODS}
            meas = {} if args.no_measure else measure_model(s, meas_pred, setup, args.reps, bar)
            models.append(model_result(s, paper, meas_pred, meas, setup))
    results = {
        "meta": {"started": started, "wall_s": time.perf_counter() - t0, "torch": torch.__version__, "threads": 1,
                 "jobs": args.jobs, "mode": args.mode,
                 "reps": args.reps, "notes": run_notes(args, setup, (load0, os.getloadavg()[0]))},
        "models": models,
        "fit": fit_record([predicted[t] for t in fit_tasks], args, pose) if fit_tasks else None,
        "skipped": skipped + ([f"Rockmate: {skip_line}"] if skip_line else []),
    }
    paths = write_outputs(results, args.out)
    print(report.markdown(results))
    print("wrote " + ", ".join(str(p) for p in paths), file=bar_file)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
