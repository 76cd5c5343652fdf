"""Command line of the head client.

    python -m models.head train --data DIR --out CKPT [--input-size 64,64,64] [--epochs 30] [--levels 2]
                                [--budget 8GB] [--tiny] [--lr 1e-4] [--no-augment] [--seed 0]
    python -m models.head evaluate --data DIR --checkpoints CKPT [--report CKPT/metrics.json]

Make phantom data with ``python -m tools.phantom head --out DIR --count 8``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from rich.console import Console
from rich.table import Table

from models.data import parse_shape
from models.head.net import PAPER_CONFIG, TINY_CONFIG


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m models.head", description="Whole-fetal-head segmentation "
                                "(USegNet-DS-HAS with auto-context), trained through memplan.compile")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train every auto-context level in turn")
    t.add_argument("--data", required=True, type=Path, help="dataset folder (ID.nii.gz + ID_mask.nii.gz)")
    t.add_argument("--out", required=True, type=Path, help="checkpoint folder (levelK.pt)")
    t.add_argument("--input-size", default="64,64,64", help="network input X,Y,Z, multiples of 8")
    t.add_argument("--epochs", type=int, default=30, help="epochs per level (paper: 30)")
    t.add_argument("--levels", type=int, default=2, help="auto-context levels (paper: 2)")
    t.add_argument("--budget", default=None, help='memory budget for memplan, e.g. "8GB" (default: least memory)')
    t.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate")
    t.add_argument("--tiny", action="store_true", help="tiny widths (tests, smoke runs)")
    t.add_argument("--no-augment", action="store_true", help="no flips, rotations or erasing")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default="cpu", help='torch device, e.g. "cuda"')
    e = sub.add_parser("evaluate", help="score a trained cascade on a labelled folder")
    e.add_argument("--data", required=True, type=Path, help="dataset folder with masks")
    e.add_argument("--checkpoints", required=True, type=Path, help="folder holding level1.pt, level2.pt, ...")
    e.add_argument("--report", type=Path, default=None, help="JSON output (default: CHECKPOINTS/metrics.json)")
    return p


def _train(args: argparse.Namespace, console: Console) -> None:
    from models.head.augment import AugmentConfig
    from models.head.train import TrainConfig, train
    budget = None if args.budget is None else (int(args.budget) if args.budget.isdigit() else args.budget)
    config = TrainConfig(data_dir=args.data, out_dir=args.out, input_size=parse_shape(args.input_size),
                         net=TINY_CONFIG if args.tiny else PAPER_CONFIG, levels=args.levels, epochs=args.epochs,
                         lr=args.lr, budget=budget, augment=None if args.no_augment else AugmentConfig(),
                         seed=args.seed, device=args.device)
    for result in train(config):
        losses = result.epoch_losses
        console.print(f"level {result.level}: loss {losses[0]:.4f} -> {losses[-1]:.4f}, saved {result.checkpoint}")


def _evaluate(args: argparse.Namespace, console: Console) -> None:
    from models.head.evaluate import evaluate_cases, summarize, write_report
    results = evaluate_cases(args.checkpoints, args.data)
    path = write_report(results, args.report or args.checkpoints / "metrics.json")
    table = Table(title=f"head segmentation, {len(results)} cases (means)")
    columns = ("dsc", "conformity", "jaccard", "asd_mm", "hausdorff_mm", "volume_error_ml")
    table.add_column("level")
    for name in columns:
        table.add_column(name, justify="right")
    for level, means in enumerate(summarize(results), start=1):
        table.add_row(str(level), *(f"{means[name]:.4f}" for name in columns))
    console.print(table)
    console.print(f"report: {path}")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    console = Console()
    try:
        (_train if args.command == "train" else _evaluate)(args, console)
    except ValueError as exc:  # bad input: our errors are ValueError subclasses with the fix
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
