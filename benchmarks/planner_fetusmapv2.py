"""Planner figures for the FetusMapV2-shaped U-Net (issue: Planner, performance section).

Traces and plans examples/fetusmapv2_unet.py at 176x112x112, batch 1, Adam, on meta tensors, and
prints/writes: planning time, simulated step peak of vanilla and of the memory-centric plan (exact
and approximate DP), their ratio, the cost model's error, time-centric plans at a few budgets, and
GCP+REV planning time and gain (here and on models.pose's FetusMapV2 net).

    python benchmarks/planner_fetusmapv2.py [--out benchmarks/results]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

import memplan
from memplan.units import format_bytes

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fetusmapv2_unet import INPUT_SHAPE, UNet3D  # noqa: E402


def run(scratch: str) -> list[str]:
    net = UNet3D()
    x = torch.empty(INPUT_SHAPE, device="meta")
    t0 = time.perf_counter()
    graph = memplan.trace(net, x)
    trace_s = time.perf_counter() - t0
    rows = [f"### scratch={scratch} ({'CPU convolution scratch counted' if scratch == 'cpu' else 'tensors only, as CUDA'})",
            "", f"graph: {len(graph)} nodes, {graph.count_lower_sets()} lower sets, traced in {trace_s:.2f} s", "",
            "| plan | DP time | plan() total | simulated peak | vs vanilla | cost model error | recompute |",
            "|---|---|---|---|---|---|---|"]
    vanilla = None
    for method in ("exact", "approx"):
        t0 = time.perf_counter()
        p = memplan.plan(net, x, method=method, scratch=scratch)
        total = time.perf_counter() - t0
        vanilla = p.simulated_vanilla_peak_bytes
        err = (p.predicted_peak_bytes - p.simulated_peak_bytes) / p.simulated_peak_bytes
        rows.append(f"| memory-centric, {method} | {p.planning_time_s:.2f} s | {total:.2f} s | "
                    f"{format_bytes(p.simulated_peak_bytes)} | {p.simulated_peak_bytes / vanilla:.3f} | {err:+.1%} | "
                    f"{p.predicted_overhead:.1%} |")
    for frac in (0.57, 0.75):
        budget = int(frac * vanilla)
        t0 = time.perf_counter()
        try:
            p = memplan.plan(net, x, budget=budget, scratch=scratch)
        except memplan.BudgetError as err:
            rows.append(f"| budget {frac:.2f} x vanilla ({format_bytes(budget)}) | - | - | infeasible: "
                        f"{str(err).splitlines()[0][:80]} | | | |")
            continue
        total = time.perf_counter() - t0
        err = (p.predicted_peak_bytes - p.simulated_peak_bytes) / p.simulated_peak_bytes
        rows.append(f"| budget {frac:.2f} x vanilla ({format_bytes(budget)}) | {p.planning_time_s:.2f} s | "
                    f"{total:.2f} s | {format_bytes(p.simulated_peak_bytes)} | {p.simulated_peak_bytes / vanilla:.3f} | "
                    f"{err:+.1%} | {p.predicted_overhead:.1%} |")
    rows += ["", f"vanilla simulated step peak: {format_bytes(vanilla)}", ""]
    return rows


def rev_rows() -> list[str]:
    """GCP+REV planning (rev=True, memory-centric, tensors only) on this U-Net and on models.pose's
    FetusMapV2 net: wall and CPU time, what REV replaced and its gain over GCP only, as simulated."""
    from models.pose import fetusmap_v2
    rows = ["### GCP+REV planning (rev=True, scratch=none, memory-centric)", "",
            "| network | GCP plan() | rev=True plan() | CPU time | REV blocks | GCP peak | GCP+REV peak | gain |",
            "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, build in (("examples/fetusmapv2_unet.py", UNet3D), ("models.pose fetusmap_v2", fetusmap_v2)):
        torch.manual_seed(0)
        net, x = build(), torch.empty(INPUT_SHAPE, device="meta")
        t0 = time.perf_counter()
        gcp = memplan.plan(net, x, scratch="none")
        gcp_s = time.perf_counter() - t0
        t0, c0 = time.perf_counter(), time.process_time()
        rev = memplan.plan(net, x, scratch="none", rev=True)
        rev_s, cpu_s = time.perf_counter() - t0, time.process_time() - c0
        gain = gcp.simulated_peak_bytes - rev.simulated_peak_bytes
        rows.append(f"| {name} | {gcp_s:.1f} s | {rev_s:.1f} s | {cpu_s:.1f} s | {len(rev.rev)} | "
                    f"{format_bytes(gcp.simulated_peak_bytes)} | {format_bytes(rev.simulated_peak_bytes)} | "
                    f"{gain / gcp.simulated_peak_bytes:.2%} |")
        rows += [f"  - {name}: {n}" for n in rev.notes if n.startswith(("chose", "finalist"))]
    return rows + [""]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args(argv)
    lines = ["# Planner on the FetusMapV2-shaped U-Net (1x1x176x112x112, Adam)", "",
             f"torch {torch.__version__}, {torch.get_num_threads()} threads; times are wall clock on this machine.", ""]
    for scratch in ("none", "cpu"):
        lines += run(scratch)
    lines += rev_rows()
    text = "\n".join(lines)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "planner_fetusmapv2.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
