"""Command line of the femur client: joint femur segmentation and endpoint localization through memplan.

examples:
  python -m tools.phantom femur --out data/femur --count 12
  python -m models.femur train --data data/femur --budget 8GB                 # BRNDC-D, ROIs rescaled by 0.65
  python -m models.femur train --data data/femur --variant brnd --gamma 0.5   # Table 1-2 ablations
  python -m models.femur evaluate --data data/femur [--checkpoint runs/femur] [--gt-roi] [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Sequence

from models.cli import add_evaluate_arguments, add_train_arguments, main_of, make_parser
from models.data import parse_shape
from models.femur.adversarial import AdversarialSchedule
from models.femur.dataset import PAPER_ROI_SCALE
from models.femur.losses import BranchLossConfig
from models.femur.roi import ROI_MARGIN_VOX

#: Network widths per named configuration: branched net, discriminator, ROI U-Net.
CONFIGS = {
    "paper": {"channels": (16, 32, 64, 128), "disc_channels": (16, 32, 64, 64, 128, 128),
              "roi_channels": (32, 64, 128, 256, 512)},
    "small": {"channels": (4, 8, 16, 32), "disc_channels": (4, 8, 16, 16, 32, 32), "roi_channels": (4, 8, 16, 32)},
    "tiny": {"channels": (2, 4, 4, 8), "disc_channels": (2, 2, 4, 4, 4, 4), "roi_channels": (2, 4, 8)},
}
DEFAULT_LOSS = BranchLossConfig()


def _parser() -> argparse.ArgumentParser:
    parser, sub = make_parser("femur", __doc__)
    t = add_train_arguments(sub, "femur", help="train the ROI detector and the branched network",
                            input_size=None, epochs=16, lr=1e-3,
                            input_size_help="fixed ROI patch X,Y,Z (multiples of 8) instead of --roi-scale",
                            epochs_help="epochs with L_branch only (paper: 16)")
    t.add_argument("--variant", choices=("unet-s", "unet-l", "brn", "brnd", "brndc", "brndc-d"), default="brndc-d",
                   help="Table 1-2 row: unet-s / unet-l (one branch of BRN), brn (no cross connections, gamma 0, "
                        "no GAN), brnd (+ L_CD), brndc (+ cross connections), brndc-d (+ adversarial fine-tuning)")
    t.add_argument("--config", choices=sorted(CONFIGS), default="paper", help="network widths")
    t.add_argument("--roi-scale", type=float, default=PAPER_ROI_SCALE, help="rescale each ROI by this (paper)")
    t.add_argument("--adv-epochs", type=int, default=5, help="then epochs with L_branch + L_gan (paper: 5)")
    t.add_argument("--adv-weight", type=float, default=1.0, help="weight of L_gan in fine-tuning")
    t.add_argument("--gamma", type=float, default=DEFAULT_LOSS.gamma, help="weight of L_CD in Eq. 2")
    t.add_argument("--theta", type=float, default=DEFAULT_LOSS.theta, help="weight of L_DSC in L_hybrid (paper)")
    t.add_argument("--roi-epochs", type=int, default=2, help="epochs of the 2D ROI detector (0: skip)")
    t.add_argument("--roi-size", type=parse_shape, default="64,64,64", help="volume size the ROI detector works at")
    t.add_argument("--roi-margin", type=int, default=ROI_MARGIN_VOX, help="voxels added to each side of the ROI")
    t.add_argument("--sigma", type=float, default=2.0, help="std of the endpoint Gaussian heatmaps, patch voxels")
    t.add_argument("--no-compile", action="store_true", help="train the plain model (no memplan)")
    t.add_argument("--no-augment", action="store_true", help="no flips, rotations or scaling")
    e = add_evaluate_arguments(sub, "femur", help="score a checkpoint on a dataset")
    e.add_argument("--gt-roi", action="store_true", help="crop the ground-truth ROI instead of detecting it")
    e.add_argument("--json", default=None, help="also write per-case metrics and the summary here")
    return parser


def _train(args: argparse.Namespace) -> int:
    from models.femur.train import VARIANTS, TrainConfig, train
    cross, gamma, adv, branches = VARIANTS[args.variant]
    loss = BranchLossConfig(gamma=args.gamma if gamma is None else gamma, theta=args.theta)
    config = TrainConfig(
        data_dir=args.data, out_dir=args.out, patch_size=args.input_size,
        roi_scale=None if args.input_size else args.roi_scale, **CONFIGS[args.config], cross=cross, branches=branches,
        schedule=AdversarialSchedule(args.epochs, args.adv_epochs if adv is None else adv, args.adv_weight), loss=loss,
        batch_size=args.batch_size, lr=args.lr, roi_epochs=args.roi_epochs, roi_volume_size=args.roi_size,
        roi_margin_vox=args.roi_margin, sigma_vox=args.sigma, budget=args.budget, compile=not args.no_compile,
        augment=not args.no_augment, seed=args.seed, device=args.device, progress=not args.quiet, amp=args.amp)
    result = train(config)
    first, last = result.branch_history[0]["total"], result.branch_history[-1]["total"]
    print(f"trained {len(result.branch_history)} epochs: L_branch {first:.4g} -> {last:.4g}; "
          f"checkpoint {result.checkpoint}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from models.femur.evaluate import evaluate
    results, summary = evaluate(args.checkpoint, args.data, use_detector=not args.gt_roi, progress=not args.quiet)
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
    return main_of(_parser, {"train": _train, "evaluate": _evaluate}, argv)


if __name__ == "__main__":
    sys.exit(main())
