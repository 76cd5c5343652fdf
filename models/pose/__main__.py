"""Command line of the pose client (FetusMap / FetusMapV2 landmark detector through memplan).

examples:
  python -m models.pose train --data DIR --budget 8GB                      # V2 detector, 176x112x112
  python -m models.pose train --data DIR --preset fetusmapv2               # 208x128x144, GCP+REV, 8 GB
  python -m models.pose train --data DIR --preset fetusmap                 # 16 landmarks, 0.5x volumes
  python -m models.pose evaluate --checkpoint runs/pose/last.pt --data TEST_DIR [--pck-csv pck.csv]
  python -m models.pose refine --checkpoint runs/pose/last.pt --data TEST_DIR --library TRAIN_DIR
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from models.cli import add_evaluate_arguments, add_train_arguments, main_of, make_parser, parse_budget
from models.planning import compile_for_training, resolve_device
from models.pose.metrics import pck_table
from models.pose.refine import FETUSMAP_SSL, V2_SSL, refine_case, ssl_planning_loss
from models.pose.registration import PoseLibrary
from models.pose.train import PAPER_WIDTH, PRESETS, VARIANTS, TrainConfig, evaluate, load_checkpoint, make_dataset, train

WIDTHS = {"unet3d": 32, "paper": PAPER_WIDTH}
#: FetusMap §3: volumes downsampled 0.4x without GCP (0.5x with it: --preset fetusmap)
FETUSMAP_SCALE_RATIO = 0.4


def build_parser() -> argparse.ArgumentParser:
    parser, sub = make_parser("pose", __doc__)
    p = add_train_arguments(sub, "pose", help="train a detector through memplan.compile", input_size="176,112,112",
                            epochs=None, lr=None)
    p.set_defaults(input_size=None)           # None: the preset's, else 176,112,112
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="a paper's set-up (explicit flags win): " + "; ".join(
                       f"{k} = " + ", ".join(f"{a}={b}" for a, b in v.items()) for k, v in PRESETS.items()))
    p.add_argument("--variant", default=None, choices=sorted(VARIANTS), help="landmarks, loss and paper settings "
                   "(default v2; lr and epochs default to the variant's: v2 1e-4 / 100, fetusmap 1e-3 / 20)")
    p.add_argument("--width", choices=sorted(WIDTHS), default="unet3d",
                   help=f"base channels: unet3d = 32 (22.6 M parameters), paper = {PAPER_WIDTH} (37.1 M, V2 Table 4)")
    p.add_argument("--channels", type=int, default=None, help="base channels (overrides --width)")
    p.add_argument("--depth", type=int, default=4, help="number of poolings")
    p.add_argument("--convs", type=int, default=None, help="convolutions per block (default: the variant's)")
    p.add_argument("--scale-ratio", type=float, default=None,
                   help="downsample each volume by this ratio instead of --input-size (default for --variant "
                        "fetusmap without --input-size: 0.4, its paper's; 0.5 with GCP)")
    p.add_argument("--val-fraction", type=float, default=0.0,
                   help="hold out this fraction of the cases; best.pt keeps the lowest validation error")
    p.add_argument("--rev", action="store_true", default=None, help="let memplan substitute reversible blocks")
    p.add_argument("--no-augment", action="store_true", help="no rotation/scaling/flip augmentation")
    for name, text in (("evaluate", "metrics table of a checkpoint"), ("refine", "SSL online refinement")):
        e = add_evaluate_arguments(sub, "pose", help=text, name=name)
        if name == "evaluate":
            e.add_argument("--pck-csv", default=None, help="also write the PCK curves (CSV) here")
        else:
            e.add_argument("--library", required=True, help="training cases: their poses form the library")
            e.add_argument("--iterations", type=int, default=None, help="SSL iterations (paper: 8 V2, 6 FetusMap)")
            e.add_argument("--lr", type=float, default=None, help="SSL learning rate (paper: 5e-4)")
            e.add_argument("--k", type=int, default=None, help="atlases kept (paper: 8 V2, 10 FetusMap)")
            e.add_argument("--budget", type=parse_budget, default=None, help="memory budget for memplan, e.g. 8GB")
    return parser


def train_config(args) -> TrainConfig:
    """Flags over the preset over the defaults."""
    preset = PRESETS.get(args.preset, {})
    explicit = {"variant": args.variant, "budget": args.budget, "rev": args.rev, "scale_ratio": args.scale_ratio}
    chosen = {**{k: v for k, v in preset.items()}, **{k: v for k, v in explicit.items() if v is not None}}
    input_size = args.input_size or preset.get("input_size", (176, 112, 112))
    variant = chosen.get("variant", "v2")
    if variant == "fetusmap" and args.input_size is None and "scale_ratio" not in chosen:
        chosen["scale_ratio"] = FETUSMAP_SCALE_RATIO             # FetusMap downsamples volumes, it does not resize
    return TrainConfig(data=args.data, out=args.out, variant=variant,
                       input_size=input_size, channels=args.channels or WIDTHS[args.width], depth=args.depth,
                       convs=args.convs, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                       budget=chosen.get("budget"), rev=bool(chosen.get("rev", False)), device=args.device,
                       augment=not args.no_augment, seed=args.seed, progress=not args.quiet,
                       scale_ratio=chosen.get("scale_ratio"), val_fraction=args.val_fraction, amp=args.amp)


def _run_train(args) -> int:
    result = train(train_config(args))
    best = f"; best {result['best']}" if result["best"] else ""
    print(f"loss {result['losses'][0]:.4f} -> {result['losses'][-1]:.4f}; checkpoint {result['checkpoint']}{best}")
    return 0


def _run_evaluate(args) -> int:
    device = resolve_device(args.device)
    model, config = load_checkpoint(args.checkpoint, device)
    result = evaluate(model, make_dataset(config, None, augment=False, data=args.data), config.variant, device=device)
    print(result.table)
    if args.pck_csv:
        v = VARIANTS[config.variant]
        Path(args.pck_csv).write_text(pck_table(result.errors_mm, v.landmarks.names, v.pck_max_mm) + "\n")
        print(f"wrote PCK curves to {args.pck_csv}")
    return 0


def _run_refine(args) -> int:
    device = resolve_device(args.device)
    model, config = load_checkpoint(args.checkpoint, device)
    ssl = V2_SSL if config.variant == "v2" else FETUSMAP_SSL
    overrides = {k: getattr(args, k) for k in ("iterations", "lr", "k") if getattr(args, k) is not None}
    ssl = dataclasses.replace(ssl, **overrides)
    library = PoseLibrary.from_directory(args.library, ssl.landmarks.names)
    data = make_dataset(config, None, augment=False, data=args.data)

    def compile_fn(module, shape):                         # planned with the SSL loss itself
        return compile_for_training(module, shape, loss_fn=ssl_planning_loss(ssl), budget=args.budget,
                                    device=device).module

    def refined(image, sample):
        return refine_case(model, image, sample["affine"].numpy(), library, ssl, compile_fn=compile_fn).after_vox

    before = evaluate(model, data, config.variant, device=device)
    after = evaluate(model, data, config.variant, device=device, predict=refined)
    print("before SSL\n" + before.table + "\n\nafter SSL\n" + after.table)
    print(f"mean ED {before.errors_mm.mean():.2f} -> {after.errors_mm.mean():.2f} mm")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return main_of(build_parser, {"train": _run_train, "evaluate": _run_evaluate, "refine": _run_refine}, argv)


if __name__ == "__main__":
    np.set_printoptions(precision=3, suppress=True)
    sys.exit(main())
