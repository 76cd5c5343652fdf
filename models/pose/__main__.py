"""Command line of the pose client.

    python -m models.pose train --data DIR --input-size 176,112,112 --budget 8GB [--rev] [--variant v2|fetusmap]
    python -m models.pose evaluate --checkpoint runs/pose/last.pt --data TEST_DIR
    python -m models.pose refine --checkpoint runs/pose/last.pt --data TEST_DIR --library TRAIN_DIR
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Sequence

import numpy as np

from models.data import parse_shape
from models.pose.dataset import PoseDataset
from models.pose.refine import FETUSMAP_SSL, V2_SSL, refine_case
from models.pose.registration import PoseLibrary
from models.pose.train import VARIANTS, TrainConfig, compile_detector, evaluate, load_checkpoint, train


def _train_parser(sub) -> None:
    p = sub.add_parser("train", help="train a detector through memplan.compile")
    p.add_argument("--data", required=True, help="folder of ID.nii.gz + ID.json cases (see models/data.py)")
    p.add_argument("--out", default="runs/pose", help="checkpoint folder")
    p.add_argument("--variant", default="v2", choices=sorted(VARIANTS))
    p.add_argument("--input-size", default="176,112,112", type=parse_shape, help="network input X,Y,Z")
    p.add_argument("--channels", type=int, default=32, help="base channels")
    p.add_argument("--depth", type=int, default=4, help="number of poolings")
    p.add_argument("--convs", type=int, default=None, help="convolutions per block (default: the variant's)")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--budget", default=None, help="memory budget for memplan, e.g. 8GB")
    p.add_argument("--rev", action="store_true", help="let memplan substitute reversible blocks")
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-augment", action="store_true", help="no random 90 degree rotations")
    p.add_argument("--seed", type=int, default=0)


def _eval_parsers(sub) -> None:
    for name, text in (("evaluate", "metrics table of a checkpoint"), ("refine", "SSL online refinement")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--checkpoint", required=True)
        p.add_argument("--data", required=True, help="test cases")
        p.add_argument("--device", default="cpu")
        if name == "refine":
            p.add_argument("--library", required=True, help="training cases: their poses form the library")
            p.add_argument("--iterations", type=int, default=None, help="SSL iterations (paper: 8 V2, 6 FetusMap)")
            p.add_argument("--lr", type=float, default=None, help="SSL learning rate (paper: 5e-4)")
            p.add_argument("--k", type=int, default=None, help="atlases kept (paper: 8 V2, 10 FetusMap)")
            p.add_argument("--budget", default=None, help="memory budget for memplan, e.g. 8GB")


def _run_train(args) -> int:
    config = TrainConfig(data=args.data, out=args.out, variant=args.variant, input_size=args.input_size,
                         channels=args.channels, depth=args.depth, convs=args.convs, epochs=args.epochs, lr=args.lr,
                         batch_size=args.batch_size, budget=args.budget, rev=args.rev, device=args.device,
                         augment=not args.no_augment, seed=args.seed)
    result = train(config)
    print(f"loss {result['losses'][0]:.4f} -> {result['losses'][-1]:.4f}; checkpoint {result['checkpoint']}")
    return 0


def _dataset(args, config: TrainConfig) -> PoseDataset:
    v = VARIANTS[config.variant]
    return PoseDataset(args.data, config.input_size, landmarks=v.landmarks, normalized_heatmaps=v.normalized_heatmaps)


def _run_evaluate(args) -> int:
    model, config = load_checkpoint(args.checkpoint, args.device)
    result = evaluate(model, _dataset(args, config), config.variant, device=args.device)
    print(result.table)
    return 0


def _run_refine(args) -> int:
    model, config = load_checkpoint(args.checkpoint, args.device)
    ssl = V2_SSL if config.variant == "v2" else FETUSMAP_SSL
    overrides = {k: getattr(args, k) for k in ("iterations", "lr", "k") if getattr(args, k) is not None}
    ssl = dataclasses.replace(ssl, **overrides)
    library = PoseLibrary.from_directory(args.library, ssl.landmarks.names)
    data = _dataset(args, config)
    compile_fn = lambda m, shape: compile_detector(m, shape, budget=args.budget, device=args.device)  # noqa: E731
    refined = lambda image, sample: refine_case(model, image, sample["spacing_mm"].numpy(), library, ssl,  # noqa: E731
                                                compile_fn=compile_fn).after_vox
    before = evaluate(model, data, config.variant, device=args.device)
    after = evaluate(model, data, config.variant, device=args.device, predict=refined)
    print("before SSL\n" + before.table + "\n\nafter SSL\n" + after.table)
    print(f"mean ED {before.errors_mm.mean():.2f} -> {after.errors_mm.mean():.2f} mm")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m models.pose", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    _eval_parsers(sub)
    args = parser.parse_args(argv)
    run = {"train": _run_train, "evaluate": _run_evaluate, "refine": _run_refine}[args.command]
    try:
        return run(args)
    except ValueError as exc:                       # DataError, MemplanError and bad flags: a clear message
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    np.set_printoptions(precision=3, suppress=True)
    sys.exit(main())
