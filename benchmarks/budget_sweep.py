"""Do budgets hold? For each net, budgets from the least-memory plan's simulated peak up to vanilla's:
was each accepted, and is the accepted plan's MEASURED CPU peak (memplan.measure_step, profiler
allocator events) within it? It measures and prints; it never asserts.

    python benchmarks/budget_sweep.py                  # 4 clients + 2 zoo nets, 6 budgets each
    python benchmarks/budget_sweep.py --only femur UNet --points 4
    python benchmarks/budget_sweep.py --render         # budget_sweep.md again from budget_sweep.json

Nets run reduced (a few seconds of CPU per step), float32, Adam, scratch="cpu" (the CPU default).
Writes budget_sweep.md and budget_sweep.json to ``--out`` (default benchmarks/results).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402


@dataclass(frozen=True)
class SweepNet:
    """A net of the sweep: how to build it and the (small) input it trains on."""
    name: str
    build: Callable[[], nn.Module]
    shape: tuple[int, ...]
    source: str


def _pose() -> nn.Module:
    from models.pose import fetusmap_v2
    return fetusmap_v2(channels=4, depth=3)


def _femur() -> nn.Module:
    from models.femur import BranchedFemurNet
    return BranchedFemurNet(channels=(4, 8, 16, 32))


def _face() -> nn.Module:
    from models.face.net import FaceRPN
    return FaceRPN(channels=(4, 8, 16, 32), fuse_channels=16, rpn_channels=16)


def _head() -> nn.Module:
    from models.head import USegNetHAS
    return USegNetHAS(channels=(4, 8, 8, 8), attention_channels=4, attention_out_channels=8)


def _zoo(name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        from benchmarks.zoo import by_name
        return by_name(name).build(16)
    return build


NETS: tuple[SweepNet, ...] = (
    SweepNet("pose", _pose, (1, 1, 32, 32, 32), "models.pose.fetusmap_v2(channels=4, depth=3)"),
    SweepNet("femur", _femur, (1, 1, 32, 16, 24), "models.femur.BranchedFemurNet(channels=(4, 8, 16, 32))"),
    SweepNet("face", _face, (1, 1, 32, 32, 32), "models.face.FaceRPN(channels=(4, 8, 16, 32), fuse 16, rpn 16)"),
    SweepNet("head", _head, (1, 1, 32, 32, 32), "models.head.USegNetHAS(channels=(4, 8, 8, 8), attention 4/8)"),
    SweepNet("UNet", _zoo("UNet"), (1, 1, 32, 32, 32), "zoo UNet: monai UNet(3, 1, 2, (8,16,32,64), num_res_units=2)"),
    SweepNet("AttentionUnet", _zoo("AttentionUnet"), (1, 1, 32, 32, 32),
             "zoo AttentionUnet: monai AttentionUnet(3, 1, 2, (8,16,32,64))"),
)


def sweep_net(net: SweepNet, points: int) -> list[dict]:
    """One row per budget: accepted or refused, simulated and measured peaks of the accepted plan."""
    import memplan
    torch.manual_seed(0)
    model = net.build()
    x = torch.randn(net.shape)
    t0 = time.perf_counter()
    least = memplan.plan(model, x)
    floor, vanilla = least.simulated_peak_bytes, least.simulated_vanilla_peak_bytes
    vanilla_measured = memplan.measure_step(model, x).peak_bytes
    base = {"net": net.name, "input": "x".join(map(str, net.shape)), "threads": torch.get_num_threads(),
            "floor_simulated_bytes": floor, "vanilla_simulated_bytes": vanilla,
            "vanilla_measured_bytes": vanilla_measured, "least_plan_s": time.perf_counter() - t0}
    rows = []
    budgets = [floor + round(k * (vanilla - floor) / (points - 1)) for k in range(points)]
    for k, budget in enumerate(budgets):
        row = {**base, "point": k, "budget_bytes": budget}
        t1 = time.perf_counter()
        try:
            module = memplan.compile(model, x, budget=budget)
        except memplan.BudgetError as err:
            row.update(accepted=False, min_feasible_bytes=err.min_feasible_bytes, refusal=str(err).splitlines()[0])
        else:
            plan = module.memplan_plan
            measured = memplan.measure_step(module, x).peak_bytes
            row.update(accepted=True, simulated_bytes=plan.simulated_peak_bytes, measured_bytes=measured,
                       over_bytes=measured - budget, recomputed=len(plan.recomputed_segments),
                       overhead=plan.predicted_overhead)
        row["seconds"] = time.perf_counter() - t1
        print(f"  {row}", file=sys.stderr, flush=True)
        rows.append(row)
    return rows


def markdown(rows: list[dict], nets: list[SweepNet]) -> str:
    from memplan import format_bytes
    rng_b = torch.get_rng_state().numel()          # bytes of the CPU generator state (uint8)
    accepted = [r for r in rows if r.get("accepted")]
    missed = [r for r in accepted if r["over_bytes"] > 0]
    refused = [r for r in rows if r.get("accepted") is False]
    gaps = [r["measured_bytes"] - r["simulated_bytes"] for r in accepted]
    lines = ["# Budget sweep: do accepted budgets hold when measured?", "",
             "Generated by `python benchmarks/budget_sweep.py`. Budgets run from the least-memory plan's simulated "
             "peak (point 0) to the vanilla step's simulated peak, evenly spaced. Each accepted budget's module "
             "(`memplan.compile(model, x, budget=b)`) is measured with `memplan.measure_step` (CPU profiler "
             "allocator events, 2 Adam steps, float32, scratch=\"cpu\"). over = measured - budget (> 0: the "
             "budget was exceeded).", "",
             f"Summary: {len(rows)} budgets, {len(accepted)} accepted, {len(refused)} refused; "
             f"{len(missed)} accepted budget(s) exceeded when measured"
             + (f" (worst by {format_bytes(max(r['over_bytes'] for r in missed))}, "
                f"{max(r['over_bytes'] / r['budget_bytes'] for r in missed):+.2%})" if missed else "") + ". "
             + (f"measured - simulated over the accepted plans: {min(gaps):+,} B to {max(gaps):+,} B." if gaps else ""),
             "",
             "The simulation counts the CPU generator state checkpoint saves per recomputed segment "
             f"({rng_b:,} B each, `preserve_rng_state=True`) and keeps the model output alive through backward "
             "(`keep_output=True`, the ordinary training loop).", "",
             "| net | input | point | budget | accepted | simulated | measured | over | over % | recomputed segs "
             "| measured - simulated |",
             "|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['net']} | {r.get('input', '')} | | | failed: {r['error']} | | | | | |")
            continue
        if r["accepted"]:
            gap = r["measured_bytes"] - r["simulated_bytes"]
            lines.append(f"| {r['net']} | {r['input']} | {r['point']} | {r['budget_bytes']:,} B | yes | "
                         f"{r['simulated_bytes']:,} B | {r['measured_bytes']:,} B | {r['over_bytes']:+,} B | "
                         f"{r['over_bytes'] / r['budget_bytes']:+.2%} | {r['recomputed']} | {gap:+,} B |")
        else:
            lines.append(f"| {r['net']} | {r['input']} | {r['point']} | {r['budget_bytes']:,} B | **refused** "
                         f"(min feasible {r['min_feasible_bytes']:,} B) | | | | | | |")
    lines += ["", "| net | vanilla simulated | vanilla measured | measured / simulated | least-memory simulated |",
              "|---|---:|---:|---:|---:|"]
    seen = set()
    for r in rows:
        if r["net"] in seen or "error" in r:
            continue
        seen.add(r["net"])
        lines.append(f"| {r['net']} | {r['vanilla_simulated_bytes']:,} B | {r['vanilla_measured_bytes']:,} B | "
                     f"{r['vanilla_measured_bytes'] / r['vanilla_simulated_bytes']:.4f} | "
                     f"{r['floor_simulated_bytes']:,} B |")
    threads = sorted({r["threads"] for r in rows if "threads" in r})
    lines += ["", f"torch threads: {', '.join(map(str, threads))}; torch {torch.__version__}.", "", "Networks:", ""]
    lines += [f"- {n.name}: {n.source}" for n in nets]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="folder for the results")
    ap.add_argument("--only", nargs="*", default=None, help=f"nets to sweep ({', '.join(n.name for n in NETS)})")
    ap.add_argument("--points", type=int, default=6, help="budgets per net, floor to vanilla (>= 2)")
    ap.add_argument("--render", action="store_true", help="only rewrite budget_sweep.md from budget_sweep.json")
    args = ap.parse_args(argv)
    if args.render:
        rows = json.loads((Path(args.out) / "budget_sweep.json").read_text())
        text = markdown(rows, [n for n in NETS if n.name in {r["net"] for r in rows}])
        (Path(args.out) / "budget_sweep.md").write_text(text)
        print(text)
        return 0
    if args.points < 2:
        ap.error(f"--points must be >= 2, got {args.points}")
    names = {n.name: n for n in NETS}
    unknown = [n for n in args.only or () if n not in names]
    if unknown:
        ap.error(f"unknown net {unknown[0]!r}; choose from {', '.join(names)}")
    nets = [names[n] for n in args.only] if args.only else list(NETS)
    rows: list[dict] = []
    for net in nets:
        print(f"sweeping {net.name} at {'x'.join(map(str, net.shape))} ...", file=sys.stderr, flush=True)
        try:
            rows += sweep_net(net, args.points)
        except Exception as exc:  # noqa: BLE001 - a benchmark reports a failure and goes on
            rows.append({"net": net.name, "input": "x".join(map(str, net.shape)),
                         "error": f"{type(exc).__name__}: {exc}"[:300]})
            print(f"  {rows[-1]}", file=sys.stderr, flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    text = markdown(rows, nets)
    (out / "budget_sweep.json").write_text(json.dumps(rows, indent=1))
    (out / "budget_sweep.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
