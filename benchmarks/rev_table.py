"""FetusMapV2 Table 4 on memplan: the simulated training-step peak of the FetusMapV2-shaped U-Net
(176x112x112, batch 1, Adam) for vanilla, GCP only, REV only and GCP+REV (the paper's heuristic and
memplan's joint re-plan). Prints the table and writes benchmarks/results/rev_table.md.

    python benchmarks/rev_table.py                 # both scratch models
    python benchmarks/rev_table.py --scratch none  # tensors only (what CUDA's allocator holds)

Everything runs on meta tensors (no real memory, no compute). ``--scratch none`` counts tensors only,
the quantity FetusMapV2 reports (``torch.cuda.max_memory_allocated``, cuDNN workspaces aside);
``--scratch cpu`` adds the transient buffers CPU convolution kernels allocate inside one op.
"""
from __future__ import annotations

import argparse
import os
import importlib.util
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import memplan
from memplan.rev.search import RevOutcome, compare_rev, rev_only_plan

ROOT = Path(__file__).resolve().parents[1]
PAPER_RATIOS = {"vanilla": 1.00, "GCP only": 0.75, "REV only": 0.66, "GCP+REV": 0.57}   # Table 4, 176x112x112


@dataclass(frozen=True)
class Row:
    """One configuration's figures."""
    name: str
    rev_blocks: int
    params: int
    peak_bytes: int
    overhead: float
    planning_time_s: float
    rated_by: str = "simulated"


def load_unet() -> tuple[torch.nn.Module, tuple[int, ...]]:
    spec = importlib.util.spec_from_file_location("fetusmapv2_unet", ROOT / "examples" / "fetusmapv2_unet.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.UNet3D(), mod.INPUT_SHAPE


def _params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _row(name: str, o: RevOutcome, time_s: float) -> Row:
    return Row(name, len(o.names), _params(o.graph.gm), o.peak_bytes, o.overhead, time_s,
               "simulated" if o.simulated_peak_bytes is not None else "cost model")


def rows_for(scratch: str) -> tuple[list[Row], list[str]]:
    """Every configuration under one scratch model, plus the planner's notes."""
    torch.manual_seed(0)
    model, shape = load_unet()
    x = torch.empty(shape, device="meta")
    vanilla = memplan.simulate_step(model, x, optimizer="adam", scratch=scratch).peak_bytes
    t0 = time.perf_counter()
    cmp = compare_rev(model, x, optimizer="adam", scratch=scratch)
    total_s = time.perf_counter() - t0
    stage = dict(cmp.stage_time_s)
    t0 = time.perf_counter()
    rev_plan, rev_graph = rev_only_plan(model, x, optimizer="adam", scratch=scratch)
    rev_s = time.perf_counter() - t0
    gcp_s = stage["GCP plan"]
    rows = [
        Row("vanilla", 0, _params(model), vanilla, 0.0, 0.0),
        _row("GCP only (memory-centric)", cmp.gcp, gcp_s),
        Row("REV only", len(rev_plan.rev), _params(rev_graph.gm), int(rev_plan.simulated_peak_bytes),
            rev_plan.predicted_overhead, rev_s),
        _row("GCP+REV, FetusMapV2 heuristic", cmp.heuristic, gcp_s + stage["heuristic (cost model)"]),
        *[_row(f"GCP+REV finalist: {o.label}", o, total_s) for o in cmp.finalists],
        _row(f"GCP+REV chosen ({cmp.best.label})", cmp.best, total_s),
    ]
    return rows, list(cmp.notes)


def table(rows: list[Row], scratch: str) -> str:
    vanilla = rows[0].peak_bytes
    lines = [f"### scratch={scratch}", "",
             "| configuration | REV blocks | parameters | peak | rated by | vs vanilla | recompute overhead | "
             "planning time |",
             "|---|---:|---:|---:|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r.name} | {r.rev_blocks} | {r.params / 1e6:.2f} M | {memplan.format_bytes(r.peak_bytes)} "
                     f"({r.peak_bytes} B) | {r.rated_by} | {r.peak_bytes / vanilla:.2%} | {r.overhead:.1%} | "
                     f"{r.planning_time_s:.1f} s |")
    simulated = [r for r in rows if r.rated_by == "simulated"]
    lowest = min(simulated, key=lambda r: r.peak_bytes)
    gcp = rows[1]
    gain = gcp.peak_bytes - min(r.peak_bytes for r in simulated if r.rev_blocks and "REV only" not in r.name) \
        if any(r.rev_blocks and "REV only" not in r.name for r in simulated) else 0
    lines += ["", f"Lowest simulated: {lowest.name}. GCP+REV's best simulated configuration is "
              f"{memplan.format_bytes(gain)} ({gain / gcp.peak_bytes:.2%}) below GCP only"
              + (" (REV is taken only for a gain of 1% or more)." if gain < 0.01 * gcp.peak_bytes else ".")]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scratch", choices=("none", "cpu", "both"), default="both")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "rev_table.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    scratches = ("none", "cpu") if args.scratch == "both" else (args.scratch,)
    model, shape = load_unet()
    parts = ["# REV table: FetusMapV2-shaped U-Net, simulated training step", "",
             f"Input {shape} (batch 1), Adam, {_params(model) / 1e6:.2f} M parameters, torch {torch.__version__}, "
             f"load average {os.getloadavg()[0]:.1f} at the start (planning times are wall clock); "
             "meta tensors, one ruler (`memplan.simulate_step`, two steps so Adam's state is included). "
             "Overhead = recomputed forward FLOPs (checkpointed segments plus one F and G evaluation per "
             "REV block) / forward FLOPs. Planning time includes tracing and every simulation.", "",
             "FetusMapV2 Table 4 at this input (GPU, max_memory_allocated): " +
             ", ".join(f"{k} {v:.0%}" for k, v in PAPER_RATIOS.items()) + ".", ""]
    for scratch in scratches:
        rows, notes = rows_for(scratch)
        text = table(rows, scratch)
        print(text, "\n")
        parts += [text, "", "Planner notes:", "", *[f"- {n}" for n in notes], ""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(parts))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
