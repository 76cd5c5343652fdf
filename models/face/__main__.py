"""Command line of the face client (3D RPN fetal-face landmark detector through memplan).

examples:
  python -m tools.phantom face --out data/face --count 16
  python -m models.face train --data data/face --budget 8GB              # 1.3 mm voxels, 160^3 field of view
  python -m models.face evaluate --data data/face [--checkpoint runs/face] [--no-prior] [--nms 0.1]
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from models.cli import add_evaluate_arguments, add_train_arguments, main_of, make_parser
from models.face.dataset import PAPER_SPACING_MM


def _channels(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(c) for c in text.split(","))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"channels {text!r} must be 4 comma-separated ints like 32,64,128,256"
                                         ) from exc


def _spacing(text: str) -> float | None:
    if text == "none":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"spacing {text!r} must be mm (e.g. 1.3) or 'none'") from None


def _parser() -> argparse.ArgumentParser:
    parser, sub = make_parser("face", __doc__)
    t = add_train_arguments(sub, "face", help="train the RPN through memplan.compile", input_size="160,160,160",
                            epochs=50, lr=1e-3)
    t.add_argument("--spacing-mm", type=_spacing, default=PAPER_SPACING_MM,
                   help="resample volumes to this isotropic voxel size (mm) before cropping/padding to --input-size; "
                        "anchor and box sizes follow it; 'none' resamples to --input-size instead")
    t.add_argument("--channels", type=_channels, default="32,64,128,256", help="4 block widths")
    t.add_argument("--fuse-channels", type=int, default=128, help="width of the fusion conv")
    t.add_argument("--rpn-channels", type=int, default=128, help="width of the RPN conv")
    t.add_argument("--no-iou-balance", action="store_true", help="plain cross-entropy (ablation)")
    t.add_argument("--no-augment", action="store_true", help="no flips or rotations")
    e = add_evaluate_arguments(sub, "face", help="Table 1 metrics on a dataset")
    e.add_argument("--no-prior", action="store_true", help="top-1 box per landmark (ablation)")
    e.add_argument("--nms", type=float, default=None,
                   help="suppress candidates overlapping a better one by IoU above this (the paper: raw top-2)")
    return parser


def _train(args) -> int:
    from models.face.train import TrainConfig, train
    config = TrainConfig(data=args.data, out=args.out, input_size=args.input_size, epochs=args.epochs,
                         batch_size=args.batch_size, lr=args.lr, budget=args.budget, channels=args.channels,
                         fuse_channels=args.fuse_channels, rpn_channels=args.rpn_channels, spacing_mm=args.spacing_mm,
                         iou_balanced=not args.no_iou_balance, augment=not args.no_augment, seed=args.seed,
                         device=args.device, progress=not args.quiet, amp=args.amp)
    _, history = train(config)
    print(f"trained {len(history)} epochs: loss {history[0]:.4f} -> {history[-1]:.4f}; checkpoint in {args.out}")
    return 0


def _evaluate(args) -> int:
    from models.face.evaluate import evaluate, format_metrics, load_checkpoint
    loaded = load_checkpoint(args.checkpoint, device=args.device)
    print(format_metrics(evaluate(loaded, args.data, use_prior=not args.no_prior, suppress_iou=args.nms,
                                  progress=not args.quiet)))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return main_of(_parser, {"train": _train, "evaluate": _evaluate}, argv)


if __name__ == "__main__":
    sys.exit(main())
