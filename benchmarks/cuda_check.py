"""GPU validation in one command: predicted vs CUDA-measured peaks and step-time ratios.

``python benchmarks/cuda_check.py`` (one GPU, no downloads, about 4 minutes at most): for the four
clients (pose, femur, face, head; reduced twins) and three zoo nets (UNet, SegResNetDS,
AttentionUnet), at two sizes each, GCP off (the network) and on (memplan.compile, least memory,
scratch="none"), fp32 and bf16 autocast: the predicted peak (simulate_step, scratch="none",
target="cuda": 512-B rounding, host RNG states left out) against torch.cuda.max_memory_allocated after
reset_peak_memory_stats (measure_step), and the median of 5 timed steps (CUDA events, 2 warm-up
steps) over the vanilla one of the same precision. Writes benchmarks/results/cuda.md and cuda.json.

``--dry-run`` runs the same code path on the CPU at small sizes (measured = CPU profiler, one warm-up
and one timed step from perf_counter) and writes cuda_dry_run.md/.json: it keeps the script from
rotting without a GPU. The prediction assumes
torch.backends.cudnn.benchmark=False and deterministic=False (the defaults) and excludes cuDNN
workspaces; the table records the settings the run had.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import memplan  # noqa: E402
from memplan.measure import AMP_DTYPES, default_loss, make_optimizer  # noqa: E402

#: the wall-clock limit the full run keeps to; rows not started by then are reported as skipped
TIME_LIMIT_S = 220.0
WARMUP, TIMED = 2, 5


@dataclass(frozen=True)
class Net:
    """A network of the check, its input shapes on the GPU and in the dry run."""
    name: str
    build: Callable[[], nn.Module]
    gpu_shapes: tuple[tuple[int, ...], tuple[int, ...]]
    dry_shapes: tuple[tuple[int, ...], tuple[int, ...]]


def _doubled(shape: tuple[int, ...]) -> tuple[int, ...]:
    return shape[:2] + tuple(2 * s for s in shape[2:])


def nets() -> list[Net]:
    """The four clients (reduced twins of benchmarks/clients.py) and three zoo nets."""
    from benchmarks import clients, zoo
    dry = {"fetusmapv2": ((1, 1, 32, 32, 32), (1, 1, 48, 32, 32)), "femur": ((1, 1, 32, 16, 24), (1, 1, 32, 32, 32)),
           "face": ((1, 1, 32, 32, 32), (1, 1, 48, 48, 48)), "head": ((1, 1, 16, 16, 16), (1, 1, 32, 32, 32))}
    specs, _ = clients.specs(tuple(dry))
    out = [Net(s.key, s.build_reduced, (s.reduced_shape, _doubled(s.reduced_shape)), dry[s.key]) for s in specs]
    for name in ("UNet", "SegResNetDS", "AttentionUnet"):
        e = zoo.by_name(name)
        out.append(Net(name, lambda e=e: e.build(e.clinical[-1]), ((1, 1, 64, 64, 64), e.clinical),
                       (e.small, _doubled(e.small))))
    return out


def step_seconds(module: nn.Module, x: torch.Tensor, amp: str | None, device: torch.device,
                 warmup: int = WARMUP, timed: int = TIMED) -> float:
    """Median seconds of ``timed`` Adam steps after ``warmup`` (CUDA events on a GPU)."""
    opt = make_optimizer("adam", list(module.parameters()))
    dtype = AMP_DTYPES[amp]
    times = []
    for i in range(warmup + timed):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        else:
            t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            out = module(x)
            loss = default_loss(out)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            end.record()
            torch.cuda.synchronize(device)
            dt = start.elapsed_time(end) / 1000.0
        else:
            dt = time.perf_counter() - t0
        if i >= warmup:
            times.append(dt)
        del out, loss
    return statistics.median(times)


def check_net(net: Net, shape: tuple[int, ...], device: torch.device, *, repeats: tuple[int, int] = (WARMUP, TIMED)
              ) -> list[dict]:
    """The four rows (GCP off/on x fp32/bf16) of one network at one size; ``repeats`` = (warm-up, timed)."""
    import copy
    torch.manual_seed(0)
    model = net.build()
    planned = memplan.compile(model, torch.empty(shape, device="meta"), scratch="none")
    x = torch.randn(shape, device=device)
    rows, vanilla_s = [], {}
    for gcp, module in ((False, model), (True, planned)):
        work = copy.deepcopy(module).to(device)
        for amp in (None, "bf16"):
            predicted = memplan.simulate_step(work, x, amp=amp, scratch="none", target="cuda").peak_bytes
            measured = memplan.measure_step(work, x, amp=amp, device=device).peak_bytes
            seconds = step_seconds(work, x, amp, device, *repeats)
            key = amp or "fp32"
            if not gcp:
                vanilla_s[key] = seconds
            rows.append({"name": net.name, "input": "x".join(map(str, shape)), "gcp": gcp, "precision": key,
                         "predicted_bytes": int(predicted), "measured_bytes": int(measured),
                         "error": predicted / measured - 1, "step_s": seconds,
                         "time_ratio": seconds / vanilla_s[key]})
        del work
    return rows


def markdown(rows: list[dict], meta: dict) -> str:
    """The cuda.md table."""
    lines = ["# CUDA check: predicted vs max_memory_allocated", "",
             f"Generated by `python benchmarks/cuda_check.py{' --dry-run' if meta['dry_run'] else ''}` on "
             f"{meta['device']} (torch {meta['torch']}; cudnn.benchmark={meta['cudnn_benchmark']}, "
             f"cudnn.deterministic={meta['cudnn_deterministic']}). Predicted = simulate_step(scratch=\"none\", "
             "target=\"cuda\"); measured = max_memory_allocated after reset_peak_memory_stats (dry run: CPU "
             f"profiler); time ratio = median of {meta.get('timed', TIMED)} steps after {meta.get('warmup', WARMUP)} "
             "warm-up over the vanilla step of the same precision."
             + (" Dry run: the error sets a CUDA prediction against a CPU measurement (CPU kernel scratch "
                "included), so it is no accuracy figure; the run proves the code path." if meta["dry_run"] else ""), "",
             "| network | input | GCP | precision | predicted B | measured B | error | step | time ratio |",
             "|---|---|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['name']} | {r['input']} | | | | | {r['skipped']} | | |")
            continue
        lines.append(f"| {r['name']} | {r['input']} | {'on' if r['gcp'] else 'off'} | {r['precision']} | "
                     f"{r['predicted_bytes']:,} | {r['measured_bytes']:,} | {r['error']:+.2%} | "
                     f"{r['step_s'] * 1e3:.1f} ms | {r['time_ratio']:.2f}x |")
    done = [r for r in rows if "skipped" not in r]
    if done:
        worst = max(abs(r["error"]) for r in done)
        lines += ["", f"Worst |error| {worst:.2%}; {sum(abs(r['error']) <= 0.03 for r in done)} of {len(done)} "
                      "rows within 3%. Total {:.0f} s.".format(meta["seconds"])]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, small sizes, same code path")
    ap.add_argument("--only", nargs="*", default=None, help="network names (default: all)")
    ap.add_argument("--sizes", type=int, default=2, choices=(1, 2), help="how many of the two sizes to run")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="folder for cuda.md and cuda.json")
    args = ap.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("cuda_check: no CUDA device here; run with --dry-run to check the code path on the CPU", file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.dry_run else "cuda")
    t0 = time.perf_counter()
    rows: list[dict] = []
    for net in nets():
        if args.only and net.name not in args.only:
            continue
        for shape in (net.dry_shapes if args.dry_run else net.gpu_shapes)[:args.sizes]:
            size = "x".join(map(str, shape))
            if not args.dry_run and time.perf_counter() - t0 > TIME_LIMIT_S:
                rows.append({"name": net.name, "input": size, "skipped": "skipped: time limit"})
                continue
            print(f"cuda_check: {net.name} {size}", file=sys.stderr, flush=True)
            try:
                rows += check_net(net, shape, device, repeats=(1, 1) if args.dry_run else (WARMUP, TIMED))
            except Exception as exc:  # noqa: BLE001 - one failing net must not hide the others
                rows.append({"name": net.name, "input": size, "skipped": f"failed: {type(exc).__name__}: {exc}"})
            if device.type == "cuda":
                torch.cuda.empty_cache()
    meta = {"dry_run": args.dry_run, "torch": torch.__version__,
            "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "CPU (dry run)",
            "cudnn_benchmark": torch.backends.cudnn.benchmark,
            "cudnn_deterministic": torch.backends.cudnn.deterministic, "seconds": time.perf_counter() - t0,
            "warmup": 1 if args.dry_run else WARMUP, "timed": 1 if args.dry_run else TIMED}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "cuda_dry_run" if args.dry_run else "cuda"
    text = markdown(rows, meta)
    (out / f"{stem}.md").write_text(text)
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(text)
    failed = [r for r in rows if r.get("skipped", "").startswith("failed")]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
