"""Command line of the femur client.

    python -m models.femur train --data DIR --out CKPT_DIR [--config tiny|paper] [--budget 8GB] ...
    python -m models.femur evaluate --data DIR --checkpoints CKPT_DIR [--gt-roi] [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Sequence

from models.data import parse_shape
from models.femur.adversarial import AdversarialSchedule
from models.femur.evaluate import evaluate
from models.femur.roi import ROI_MARGIN_VOX
from models.femur.train import TrainConfig, train

#: Network widths per named configuration: branched net, discriminator, ROI U-Net.
CONFIGS = {
    "paper": {"channels": (16, 32, 64, 128), "disc_channels": (16, 32, 64, 64, 128, 128),
              "roi_channels": (32, 64, 128, 256, 512)},
    "small": {"channels": (4, 8, 16, 32), "disc_channels": (4, 8, 16, 16, 32, 32), "roi_channels": (4, 8, 16, 32)},
    "tiny": {"channels": (2, 4, 4, 8), "disc_channels": (2, 2, 4, 4, 4, 4), "roi_channels": (2, 4, 8)},
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m models.femur", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train the ROI detector and the branched network")
    t.add_argument("--data", required=True, help="dataset directory (models/data.py format)")
    t.add_argument("--out", required=True, help="checkpoint directory (created)")
    t.add_argument("--config", choices=sorted(CONFIGS), default="paper", help="network widths")
    t.add_argument("--patch", default="64,64,64", help="ROI patch size X,Y,Z (multiples of 8)")
    t.add_argument("--epochs", type=int, default=16, help="epochs with L_branch only")
    t.add_argument("--adv-epochs", type=int, default=5, help="then epochs with L_branch + L_gan")
    t.add_argument("--adv-weight", type=float, default=1.0, help="weight of L_gan in fine-tuning")
    t.add_argument("--roi-epochs", type=int, default=2, help="epochs of the 2D ROI detector (0: skip)")
    t.add_argument("--roi-size", default="64,64,64", help="volume size the ROI detector works at")
    t.add_argument("--roi-margin", type=int, default=ROI_MARGIN_VOX, help="voxels added to each side of the ROI")
    t.add_argument("--sigma", type=float, default=2.0, help="std of the endpoint Gaussian heatmaps, patch voxels")
    t.add_argument("--batch-size", type=int, default=1)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--budget", default=None, help="memory budget for memplan, e.g. 8GB (default: least memory)")
    t.add_argument("--no-compile", action="store_true", help="train the plain model (no memplan)")
    t.add_argument("--seed", type=int, default=0)
    e = sub.add_parser("evaluate", help="score checkpoints on a dataset")
    e.add_argument("--data", required=True, help="dataset directory")
    e.add_argument("--checkpoints", required=True, help="directory written by train")
    e.add_argument("--gt-roi", action="store_true", help="crop the ground-truth ROI instead of detecting it")
    e.add_argument("--json", default=None, help="also write per-case metrics and the summary here")
    return p


def _train(args: argparse.Namespace) -> int:
    widths = CONFIGS[args.config]
    config = TrainConfig(
        data_dir=args.data, out_dir=args.out, patch_size=parse_shape(args.patch), **widths,
        schedule=AdversarialSchedule(args.epochs, args.adv_epochs, args.adv_weight), batch_size=args.batch_size,
        lr=args.lr, roi_epochs=args.roi_epochs, roi_volume_size=parse_shape(args.roi_size),
        roi_margin_vox=args.roi_margin, sigma_vox=args.sigma, budget=args.budget, compile=not args.no_compile,
        seed=args.seed)
    result = train(config)
    first, last = result.branch_history[0]["total"], result.branch_history[-1]["total"]
    print(f"trained {len(result.branch_history)} epochs: L_branch {first:.4g} -> {last:.4g}; "
          f"checkpoint {result.branch_checkpoint}" + (f", ROI detector {result.roi_checkpoint}"
                                                     if result.roi_checkpoint else ""))
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    results, summary = evaluate(args.data, args.checkpoints, use_detector=not args.gt_roi)
    for name, (mean, std) in summary.items():
        print(f"{name:>16}: {mean:9.4f} ± {std:.4f}")
    if args.json:
        def clean(x: float) -> float | None:
            return x if math.isfinite(x) else None
        payload = {"cases": [{"id": r.case_id, "roi_iou": r.roi_iou, "roi_from_detector": r.roi_from_detector,
                              **{k: clean(v) for k, v in r.metrics.as_dict().items()}} for r in results],
                   "summary": {k: [clean(m), clean(s)] for k, (m, s) in summary.items()}}
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=1)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _train(args) if args.command == "train" else _evaluate(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
