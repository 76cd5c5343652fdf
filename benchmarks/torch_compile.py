"""Does memplan's saving survive torch.compile? The CPU peak of one training step of a net, of
torch.compile(net), of memplan.compile(net) (least memory) and of torch.compile(memplan.compile(net)),
for the aot_eager and inductor backends. It measures and prints; it never asserts.

    python benchmarks/torch_compile.py            # two small nets (~3 min on 2 loaded CPU cores; inductor's
                                                  # C++ compiles are most of it, cached on disk for reruns)
    python benchmarks/torch_compile.py --nets pose,monai,bnres --backends aot_eager

Every row is a fresh copy of the same initial weights, warmed up by one step (which compiles and creates
Adam's state), then one steady-state step measured with the CPU profiler's allocator events plus the
bytes alive before it (benchmarks/measuring.py, the ruler of peak_memory.py), in one process with one
thread. memplan plans with scratch="none"; the CPU's convolution scratch sits on top in every row.
Segments with buffers or random ops run eagerly behind a graph break (memplan.rewrite). Writes
benchmarks/results/torch_compile.json and torch_compile.md.
"""
from __future__ import annotations

import argparse
import copy
import datetime
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
import torch._inductor.config  # noqa: E402
from torch import nn  # noqa: E402

import memplan  # noqa: E402
from benchmarks import measuring  # noqa: E402
from memplan.rewrite import CheckpointSegment  # noqa: E402
from memplan.units import format_bytes  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
BACKENDS = ("aot_eager", "inductor")


@dataclass(frozen=True)
class Net:
    """One benchmark network: a builder and its input shape."""
    key: str
    title: str
    build: Callable[[], nn.Module]
    shape: tuple[int, ...]


def _pose() -> nn.Module:
    from models.pose import fetusmap_v2
    return fetusmap_v2(channels=4, depth=3)


def _monai() -> nn.Module:
    from monai.networks.nets import UNet
    return UNet(3, 1, 2, channels=(4, 8, 16, 32), strides=(2, 2, 2), num_res_units=1)


def _bn_resnet() -> nn.Module:
    from tests.idioms import IAddResNet
    return IAddResNet(width=8, blocks=3)


NETS = {
    "pose": Net("pose", "models.pose fetusmap_v2(channels=4, depth=3)", _pose, (1, 1, 32, 32, 32)),
    "monai": Net("monai", "MONAI UNet(3,1,2,(4,8,16,32),(2,2,2),num_res_units=1)", _monai, (1, 1, 32, 32, 32)),
    "bnres": Net("bnres", "tests/idioms.py IAddResNet(width=8, blocks=3): BatchNorm, out += identity", _bn_resnet,
                 (1, 1, 32, 32, 32)),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nets", default="pose,bnres", help=f"comma list of {', '.join(NETS)}")
    p.add_argument("--backends", default=",".join(BACKENDS), help=f"comma list of {', '.join(BACKENDS)}")
    p.add_argument("--out", type=Path, default=RESULTS, help="folder for torch_compile.json and .md")
    args = p.parse_args(argv)
    args.nets = [k.strip() for k in args.nets.split(",") if k.strip()]
    args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    bad = [k for k in args.nets if k not in NETS] + [b for b in args.backends if b not in BACKENDS]
    if bad:
        p.error(f"unknown net or backend {bad}; nets: {', '.join(NETS)}; backends: {', '.join(BACKENDS)}")
    return args


def _row(method: str, module: nn.Module, call, x: torch.Tensor) -> dict:
    """Warm up (compiles), then the measured step's peak; the warm-up's seconds are the compile cost."""
    torch._dynamo.reset()
    r = measuring.make_runner(method, call, module, x)
    t0 = time.perf_counter()
    peak = measuring.step_peak(r)
    return {"method": method, "peak_bytes": peak, "warmup_s": r.warmup_s, "step_s": time.perf_counter() - t0}


def measure_net(net: Net, backends: list[str]) -> dict:
    """Every row of one net, each on its own copy of the same initial weights."""
    torch.manual_seed(0)
    base = net.build()
    x = torch.randn(net.shape)
    rows = []
    original = copy.deepcopy(base)
    rows.append(_row("original", original, original, x))
    for b in backends:
        m = copy.deepcopy(base)
        rows.append(_row(f"torch.compile(original, {b})", m, torch.compile(m, backend=b), x))
    t0 = time.perf_counter()
    planned = memplan.compile(copy.deepcopy(base), x, scratch="none")
    plan_s = time.perf_counter() - t0
    segments = [m for m in planned.graph_module.modules() if isinstance(m, CheckpointSegment)]
    rows.append(_row("memplan.compile (least memory)", planned, planned, x))
    for b in backends:
        p = memplan.compile(copy.deepcopy(base), x, scratch="none")
        rows.append(_row(f"torch.compile(memplan, {b})", p, torch.compile(p, backend=b), x))
    vanilla = rows[0]["peak_bytes"]
    for r in rows:
        r["vs_original"] = r["peak_bytes"] / vanilla
    for b in backends:      # the saving under compile: memplan's row against the same backend's plain row
        plain = next(r for r in rows if r["method"] == f"torch.compile(original, {b})")
        ours = next(r for r in rows if r["method"] == f"torch.compile(memplan, {b})")
        ours["vs_same_backend"] = ours["peak_bytes"] / plain["peak_bytes"]
    return {"key": net.key, "title": net.title, "shape": list(net.shape),
            "params": sum(p.numel() for p in base.parameters()), "planning_s": plan_s,
            "segments": len(segments), "eager_segments": sum(not m.dynamo_recomputes for m in segments),
            "simulated_ratio": planned.memplan_plan.simulated_peak_bytes / planned.memplan_plan.simulated_vanilla_peak_bytes,
            "rows": rows}


def markdown(results: list[dict], when: str) -> str:
    lines = ["# memplan under torch.compile", "",
             f"Generated by `python benchmarks/torch_compile.py` on {when} (CPU, one thread, float32, Adam, "
             "batch 1). Peak: one steady-state training step after a warm-up step that compiles, measured with "
             "the CPU profiler's allocator events plus the bytes alive before the step (parameters, gradients, "
             "Adam state, input); CPU convolution scratch included. `vs same backend`: torch.compile(memplan) "
             "against torch.compile(original) with the same backend, side by side in one run. `eager segments`: "
             "recomputed segments with buffers or random ops, which run eagerly behind a graph break.", ""]
    for net in results:
        lines += [f"## {net['title']}", "",
                  f"Input {'x'.join(map(str, net['shape'][2:]))}; {net['params']:,} parameters; "
                  f"{net['segments']} recomputed segments ({net['eager_segments']} eager); planned in "
                  f"{net['planning_s']:.1f} s; simulate_step (tensors only, scratch=\"none\") rates the plan at "
                  f"{100 * net['simulated_ratio']:.1f}% of vanilla, the CPU's convolution scratch hides part of that.", "",
                  "| method | measured peak | vs original | vs same backend | warm-up (compile) | measured step |",
                  "|---|---:|---:|---:|---:|---:|"]
        for r in net["rows"]:
            same = f"{100 * r['vs_same_backend']:.1f}%" if "vs_same_backend" in r else ""
            lines.append(f"| {r['method']} | {format_bytes(r['peak_bytes'])} | {100 * r['vs_original']:.1f}% | {same} "
                         f"| {r['warmup_s']:.1f} s | {r['step_s']:.2f} s |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)
    torch._inductor.config.compile_threads = 1      # no compile worker pool on a 2-core machine
    t0 = time.perf_counter()
    results = []
    for key in args.nets:
        net = measure_net(NETS[key], args.backends)
        results.append(net)
        print(f"{net['title']} ({net['segments']} segments, {net['eager_segments']} eager):")
        for r in net["rows"]:
            same = f"  ({100 * r['vs_same_backend']:.1f}% of the same backend)" if "vs_same_backend" in r else ""
            print(f"  {r['method']:<36} {format_bytes(r['peak_bytes']):>10}  {100 * r['vs_original']:6.1f}%{same}")
    when = datetime.date.today().isoformat()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "torch_compile.json").write_text(json.dumps({"date": when, "torch": torch.__version__,
                                                             "nets": results}, indent=1) + "\n")
    (args.out / "torch_compile.md").write_text(markdown(results, when) + "\n")
    print(f"wrote {args.out / 'torch_compile.md'} and .json in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
