"""Femur client (shared/seeds/002_*): 2D ROI detector, branched 3D network for joint femur
segmentation and endpoint localization, hybrid / heatmap / center-distance losses, adversarial pair
refinement, metrics, training and evaluation (``python -m models.femur train|evaluate``).
"""
from models.femur.adversarial import AdversarialSchedule, PairDiscriminator
from models.femur.losses import BranchLossConfig, branch_loss
from models.femur.net import PAPER_CONFIG, TINY_CONFIG, BranchConfig, BranchedFemurNet
from models.femur.roi import Box3D, RoiUNet, detect_roi

__all__ = ["AdversarialSchedule", "PairDiscriminator", "BranchLossConfig", "branch_loss", "PAPER_CONFIG",
           "TINY_CONFIG", "BranchConfig", "BranchedFemurNet", "Box3D", "RoiUNet", "detect_roi"]
