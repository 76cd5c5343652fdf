"""The public zoo: MONAI networks and the idioms of real training code, planned at clinical size.

``python benchmarks/zoo.py`` traces and plans every entry on fake tensors at its clinical size
(scratch="none", Adam, batch as given) and writes benchmarks/results/zoo.md and zoo.json: vanilla and
least-memory peaks (simulated), their ratio, planning time and the tracer used. ``--out DIR`` writes
elsewhere; ``--only NAME`` plans a subset. The tests (tests/test_zoo.py) train every entry compiled on
a small real float64 input and demand bitwise equality with the original.
"""
from __future__ import annotations

import argparse
import json
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

from tests import idioms  # noqa: E402


@dataclass(frozen=True)
class ZooEntry:
    """A network, how to build it for a spatial size, and the two input shapes it is tried at."""
    name: str
    build: Callable[[int], nn.Module]     # spatial size -> network
    small: tuple[int, ...]                 # real float64 test input
    clinical: tuple[int, ...]              # planning size
    source: str


def _monai():
    from monai.networks import nets
    return nets


def _unetr(size: int) -> nn.Module:
    small = size <= 32
    return _monai().UNETR(in_channels=1, out_channels=2, img_size=(size,) * 3, feature_size=4 if small else 8,
                          hidden_size=24 if small else 96, mlp_dim=48 if small else 192, num_heads=2 if small else 4)


def _dynunet(size: int) -> nn.Module:
    return _monai().DynUNet(3, 1, 2, kernel_size=[3, 3, 3, 3], strides=[1, 2, 2, 2], upsample_kernel_size=[2, 2, 2],
                            filters=[4, 8, 16, 32] if size <= 32 else [16, 32, 64, 128], res_block=True,
                            deep_supervision=True, deep_supr_num=2)


def _swin(size: int) -> nn.Module:
    return _monai().SwinUNETR(in_channels=1, out_channels=2, feature_size=12 if size <= 64 else 24, spatial_dims=3,
                              depths=(1, 1, 1, 1) if size <= 64 else (2, 2, 2, 2))


def _flexible(size: int) -> nn.Module:
    return _monai().FlexibleUNet(in_channels=1, out_channels=2, backbone="efficientnet-b0", spatial_dims=3,
                                 pretrained=False)


def _densenet(size: int) -> nn.Module:
    if size <= 32:
        return _monai().DenseNet121(spatial_dims=3, in_channels=1, out_channels=2, init_features=8, growth_rate=4,
                                    block_config=(2, 2, 2, 2))
    return _monai().DenseNet121(spatial_dims=3, in_channels=1, out_channels=2)


ZOO: tuple[ZooEntry, ...] = (
    ZooEntry("UNETR", _unetr, (1, 1, 16, 16, 16), (1, 1, 96, 96, 96),
             "monai UNETR(1, 2, img_size, feature_size=8, hidden_size=96, mlp_dim=192, num_heads=4)"),
    ZooEntry("resnet18", lambda s: _monai().resnet18(spatial_dims=3, n_input_channels=1, num_classes=2),
             (2, 1, 16, 16, 16), (2, 1, 128, 128, 128), "monai resnet18(spatial_dims=3, n_input_channels=1, num_classes=2)"),
    ZooEntry("SegResNetDS", lambda s: _monai().SegResNetDS(spatial_dims=3, in_channels=1, out_channels=2,
                                                            init_filters=4 if s <= 32 else 8),
             (1, 1, 16, 16, 16), (1, 1, 128, 128, 128), "monai SegResNetDS(3, 1, 2, init_filters=8)"),
    ZooEntry("BasicUNetPlusPlus", lambda s: _monai().BasicUNetPlusPlus(spatial_dims=3, in_channels=1, out_channels=2,
                                                                        features=(4, 4, 8, 16, 32, 4)),
             (1, 1, 32, 32, 32), (1, 1, 128, 128, 128), "monai BasicUNetPlusPlus(3, 1, 2, features=(4,4,8,16,32,4))"),
    ZooEntry("DenseNet121", _densenet, (2, 1, 32, 32, 32), (2, 1, 96, 96, 96),
             "monai DenseNet121(3, 1, 2) (small: init_features=8, growth_rate=4, block_config=(2,2,2,2))"),
    ZooEntry("UNet", lambda s: _monai().UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(8, 16, 32, 64),
                                             strides=(2, 2, 2), num_res_units=2),
             (1, 1, 16, 16, 16), (1, 1, 128, 128, 128), "monai UNet(3, 1, 2, (8,16,32,64), (2,2,2), num_res_units=2)"),
    ZooEntry("AttentionUnet", lambda s: _monai().AttentionUnet(spatial_dims=3, in_channels=1, out_channels=2,
                                                               channels=(8, 16, 32, 64), strides=(2, 2, 2)),
             (1, 1, 16, 16, 16), (1, 1, 128, 128, 128), "monai AttentionUnet(3, 1, 2, (8,16,32,64), (2,2,2))"),
    ZooEntry("VNet", lambda s: _monai().VNet(spatial_dims=3, in_channels=1, out_channels=2), (2, 1, 16, 16, 16),
             (1, 1, 96, 96, 96), "monai VNet(3, 1, 2): ELU(inplace=True), Dropout3d(0.5) on the skip connections"),
    ZooEntry("DynUNet-deepsup", _dynunet, (1, 1, 16, 16, 16), (1, 1, 128, 128, 128),
             "monai DynUNet(3, 1, 2, kernels 3, strides (1,2,2,2), filters (16,32,64,128), res_block, "
             "deep_supervision=True, deep_supr_num=2)"),
    ZooEntry("SwinUNETR", _swin, (1, 1, 64, 64, 64), (1, 1, 96, 96, 96),
             "monai SwinUNETR(1, 2, feature_size=24, depths=(2, 2, 2, 2)); small: feature_size=12, depths 1"),
    ZooEntry("FlexibleUNet", _flexible, (2, 1, 32, 32, 32), (1, 1, 128, 128, 128),
             "monai FlexibleUNet(1, 2, backbone='efficientnet-b0', spatial_dims=3)"),
    ZooEntry("iadd-resnet", lambda s: idioms.IAddResNet(width=4 if s <= 32 else 16), (1, 1, 8, 8, 8),
             (1, 1, 128, 128, 128), "out += identity, ReLU(inplace=True)"),
    ZooEntry("elu-inplace", lambda s: idioms.InplaceChain(nn.ELU, True, width=4 if s <= 32 else 16), (1, 1, 8, 8, 8),
             (1, 1, 128, 128, 128), "Conv-InstanceNorm-ELU(inplace=True) chain"),
    ZooEntry("relu-inplace", lambda s: idioms.InplaceChain(nn.ReLU, True, width=4 if s <= 32 else 16), (1, 1, 8, 8, 8),
             (1, 1, 128, 128, 128), "Conv-InstanceNorm-ReLU(inplace=True) chain"),
    ZooEntry("tensors-in-forward", lambda s: idioms.TensorsInForward(width=4 if s <= 32 else 16), (1, 1, 8, 8, 8),
             (1, 1, 128, 128, 128), "torch.ones/zeros/linspace without device= in forward"),
    ZooEntry("stochastic-depth", lambda s: idioms.StochasticDepth(width=4 if s <= 32 else 16), (2, 1, 8, 8, 8),
             (2, 1, 128, 128, 128), "torch.rand(B,1,1,1,1, device=h.device) drop-path"),
    ZooEntry("bn-momentum-none", lambda s: idioms.CumulativeBN(width=4 if s <= 32 else 16), (2, 1, 8, 8, 8),
             (2, 1, 128, 128, 128), "BatchNorm3d(momentum=None)"),
    ZooEntry("checkpoint-inside", lambda s: idioms.CheckpointInside(width=4 if s <= 32 else 16), (1, 1, 8, 8, 8),
             (1, 1, 128, 128, 128), "torch.utils.checkpoint(block, h, use_reentrant=False) already in forward"),
    ZooEntry("interpolate-cat-list", lambda s: idioms.InterpolateCatList(width=4 if s <= 32 else 16), (1, 1, 8, 8, 8),
             (1, 1, 128, 128, 128), "torch.cat over a list grown in a loop, F.interpolate(scale_factor=2)"),
    ZooEntry("baked-constants", lambda s: idioms.BakedConstants(width=4 if s <= 32 else 16), (1, 1, 8, 8, 8),
             (1, 1, 128, 128, 128), "CPU constant tensors baked in by torch.export"),
    ZooEntry("weight-standardized", lambda s: idioms.WeightStandardized(width=4 if s <= 32 else 16), (1, 1, 8, 8, 8),
             (1, 1, 128, 128, 128), "weights standardized in forward, a split sized by weight.shape[0] // 2"),
)


def by_name(name: str) -> ZooEntry:
    for e in ZOO:
        if e.name == name:
            return e
    raise KeyError(f"no zoo entry {name!r}; entries: {', '.join(e.name for e in ZOO)}")


def plan_entry(entry: ZooEntry) -> dict:
    """Plan one entry at its clinical size on fake tensors; the figures of one zoo.md row."""
    import memplan
    torch.manual_seed(0)
    net = entry.build(entry.clinical[-1])
    x = torch.empty(entry.clinical, device="meta")
    t0 = time.perf_counter()
    plan = memplan.plan(net, x, scratch="none")
    seconds = time.perf_counter() - t0
    tracer = "export" if any(n.startswith("fx:") for n in plan.notes) else "fx"
    return {"name": entry.name, "source": entry.source, "input": "x".join(map(str, entry.clinical)),
            "params": sum(p.numel() for p in net.parameters()),
            "vanilla_bytes": plan.simulated_vanilla_peak_bytes, "planned_bytes": plan.simulated_peak_bytes,
            "ratio": plan.simulated_peak_bytes / plan.simulated_vanilla_peak_bytes,
            "recomputed_flops": plan.predicted_overhead, "planning_s": seconds, "tracer": tracer,
            "method": plan.method}


def markdown(rows: list[dict]) -> str:
    from memplan import format_bytes
    lines = ["# The public zoo at clinical size",
             "",
             "Generated by `python benchmarks/zoo.py`: least-memory plans (no budget), simulated on fake tensors "
             "(scratch=\"none\", Adam). Planning time includes tracing, validation and two simulations.",
             "",
             "| network | input | params | tracer | vanilla peak | planned peak | ratio | recomputed FLOPs | planning |",
             "|---|---|---:|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['name']} | {r['input']} | | | | | failed: {r['error']} | | |")
            continue
        lines.append(f"| {r['name']} | {r['input']} | {r['params'] / 1e6:.2f} M | {r['tracer']} | "
                     f"{format_bytes(r['vanilla_bytes'])} | {format_bytes(r['planned_bytes'])} | {r['ratio']:.2f}x | "
                     f"{r['recomputed_flops']:.0%} | {r['planning_s']:.1f} s |")
    lines += ["", "Networks:", ""] + [f"- {e.name}: {e.source}" for e in ZOO]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="folder for zoo.md and zoo.json")
    ap.add_argument("--only", nargs="*", default=None, help="entry names to plan (default: all)")
    args = ap.parse_args(argv)
    entries = [by_name(n) for n in args.only] if args.only else list(ZOO)
    rows = []
    for e in entries:
        print(f"planning {e.name} at {'x'.join(map(str, e.clinical))} ...", file=sys.stderr, flush=True)
        try:
            rows.append(plan_entry(e))
        except Exception as exc:  # noqa: BLE001 - a benchmark reports a failure and goes on
            rows.append({"name": e.name, "input": "x".join(map(str, e.clinical)), "error": f"{type(exc).__name__}: {exc}"[:200]})
        print(f"  {rows[-1]}", file=sys.stderr, flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "zoo.json").write_text(json.dumps(rows, indent=1))
    (out / "zoo.md").write_text(markdown(rows))
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
