"""Command line of the head client: whole-fetal-head segmentation (USegNet-DS-HAS with auto-context)
trained through memplan.compile.

examples:
  python -m tools.phantom head --out data/head --count 8
  python -m models.head train --data data/head --budget 8GB        # paper: 0.4x volumes (152x104x176), lr 1e-5
  python -m models.head train --data data/head --no-sam --no-uam   # USegNet-DS (Table 2's baseline)
  python -m models.head evaluate --data data/head [--checkpoint runs/head] [--report metrics.json]
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Sequence

from rich.console import Console
from rich.table import Table

from models.cli import add_evaluate_arguments, add_train_arguments, main_of, make_parser
from models.head.net import PAPER_CONFIG, PAPER_INPUT_SIZE, TINY_CONFIG


def _parser() -> argparse.ArgumentParser:
    parser, sub = make_parser("head", __doc__)
    t = add_train_arguments(sub, "head", help="train every auto-context level in turn",
                            input_size=",".join(map(str, PAPER_INPUT_SIZE)), epochs=30, lr=1e-5, batch_size=None)
    t.add_argument("--levels", type=int, default=2, help="auto-context levels (paper: 2)")
    t.add_argument("--tiny", action="store_true", help="tiny widths (tests, smoke runs)")
    t.add_argument("--no-deep-supervision", action="store_true", help="no auxiliary heads (USegNet-HAS)")
    t.add_argument("--no-sam", action="store_true", help="no attention on the skips")
    t.add_argument("--no-uam", action="store_true", help="a plain Conv-BN-ReLU instead of each UAM")
    t.add_argument("--no-augment", action="store_true", help="no flips, rotations or erasing")
    e = add_evaluate_arguments(sub, "head", help="score a trained cascade on a labelled folder")
    e.add_argument("--report", type=Path, default=None, help="JSON output (default: RUN/metrics.json)")
    return parser


def _train(args) -> int:
    from models.head.augment import AugmentConfig
    from models.head.train import TrainConfig, train
    net = dataclasses.replace(TINY_CONFIG if args.tiny else PAPER_CONFIG, deep_supervision=not args.no_deep_supervision,
                              sam=not args.no_sam, uam=not args.no_uam)
    config = TrainConfig(data_dir=Path(args.data), out_dir=Path(args.out), input_size=args.input_size, net=net,
                         levels=args.levels, epochs=args.epochs, lr=args.lr, budget=args.budget,
                         augment=None if args.no_augment else AugmentConfig(), seed=args.seed, device=args.device,
                         progress=not args.quiet, amp=args.amp)
    for result in train(config):
        losses = result.epoch_losses
        print(f"level {result.level}: loss {losses[0]:.4f} -> {losses[-1]:.4f}, saved {result.checkpoint}")
    return 0


def _evaluate(args) -> int:
    from models.checkpoint import checkpoint_file
    from models.head.evaluate import evaluate_cases, summarize, volume_agreement, write_report
    results = evaluate_cases(args.checkpoint, args.data, progress=not args.quiet)
    path = write_report(results, args.report or checkpoint_file(args.checkpoint).parent / "metrics.json")
    table = Table(title=f"head segmentation, {len(results)} cases (means)")
    columns = ("dsc", "conformity", "jaccard", "asd_mm", "hausdorff_mm", "volume_error_ml")
    for name in ("level", *columns, "volume r", "bias +- 1.96 SD mL"):
        table.add_column(name, justify="left" if name == "level" else "right")
    for level, (means, agree) in enumerate(zip(summarize(results), volume_agreement(results)), start=1):
        table.add_row(str(level), *(f"{means[name]:.4f}" for name in columns), f"{agree['correlation']:.3f}",
                      f"{agree['bias_ml']:.1f} +- {agree['loa_ml']:.1f}")
    Console(width=None if sys.stdout.isatty() else 160).print(table)       # pipes and logs: no wrapping
    print(f"report: {path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return main_of(_parser, {"train": _train, "evaluate": _evaluate}, argv)


if __name__ == "__main__":
    sys.exit(main())
