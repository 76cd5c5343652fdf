"""Command line of the face client.

    python -m models.face train --data DIR --out RUN [--input-size 64,64,64] [--budget 8GB] [--epochs 50] ...
    python -m models.face evaluate --checkpoint RUN --data DIR [--no-prior]

Make phantom data with ``python -m tools.phantom face --out DIR --count 16``.
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from models.data import parse_shape


def _channels(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(c) for c in text.split(","))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"channels {text!r} must be 4 comma-separated ints like 32,64,128,256"
                                         ) from exc


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m models.face", description="3D RPN fetal-face landmark detector")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train through memplan.compile")
    t.add_argument("--data", required=True, help="folder of ID.nii.gz + ID.json cases")
    t.add_argument("--out", required=True, help="run folder for face.pt and graph_prior.json")
    t.add_argument("--input-size", default="64,64,64", type=parse_shape, help="X,Y,Z, each divisible by 8")
    t.add_argument("--budget", default=None, help="memplan memory budget, e.g. 8GB (default: least memory)")
    t.add_argument("--epochs", type=int, default=50)
    t.add_argument("--batch-size", type=int, default=1)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--channels", type=_channels, default=(32, 64, 128, 256), help="4 block widths")
    t.add_argument("--fuse-channels", type=int, default=128)
    t.add_argument("--rpn-channels", type=int, default=128)
    t.add_argument("--box-scale", type=float, default=1.0, help="anchor and target box size factor (1 = paper)")
    t.add_argument("--no-iou-balance", action="store_true", help="plain cross-entropy (ablation)")
    t.add_argument("--no-augment", action="store_true")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default="cpu", help="torch device, e.g. cuda")
    e = sub.add_parser("evaluate", help="Table 1 metrics on a dataset")
    e.add_argument("--checkpoint", required=True, help="face.pt or the run folder holding it")
    e.add_argument("--data", required=True)
    e.add_argument("--no-prior", action="store_true", help="top-1 box per landmark (ablation)")
    e.add_argument("--device", default="cpu", help="torch device, e.g. cuda")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "train":
            from models.face.train import TrainConfig, train

            config = TrainConfig(data=args.data, out=args.out, input_size=args.input_size, epochs=args.epochs,
                                 batch_size=args.batch_size, lr=args.lr, budget=args.budget, channels=args.channels,
                                 fuse_channels=args.fuse_channels, rpn_channels=args.rpn_channels,
                                 box_scale=args.box_scale, iou_balanced=not args.no_iou_balance,
                                 augment=not args.no_augment, seed=args.seed, device=args.device)
            _, history = train(config)
            print(f"trained {len(history)} epochs: loss {history[0]:.4f} -> {history[-1]:.4f}; "
                  f"checkpoint in {args.out}")
        else:
            from models.face.evaluate import evaluate, format_metrics, load_checkpoint

            loaded = load_checkpoint(args.checkpoint, device=args.device)
            print(format_metrics(evaluate(loaded, args.data, use_prior=not args.no_prior)))
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
