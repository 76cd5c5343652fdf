"""Fetal pose estimation (FetusMap, FetusMapV2): a 3D U-Net landmark detector trained through memplan.

Public names: the networks (``PoseUNet``, ``fetusmap_v2``, ``fetusmap``), heatmaps and decoding, the losses
(Eq. 3-8), the left/right rule (Eq. 7), registration and SSL refinement (Eq. 9-11), metrics, the
dataset and the training entry points. Command line: ``python -m models.pose train|evaluate|refine``.
"""
from models.pose.dataset import PoseDataset
from models.pose.heatmaps import SIGMA_VOX, decode_argmax, gaussian_heatmaps, mm_to_voxel, voxel_to_mm
from models.pose.landmarks import FETUSMAP_LANDMARKS, V2_LANDMARKS, LandmarkSet
from models.pose.losses import FetusMapV2Loss, HeatmapL2Loss, kl_term, pair_l1, pair_l2, pair_loss
from models.pose.lr_rule import assign_sides, side_angle
from models.pose.metrics import (PCK_MAX_MM, clinical_measures, crown_rump_length, distance_errors_mm, fit_plane,
                                 long_bone_lengths, pck_auc, pck_curve, plane_errors)
from models.pose.net import PoseUNet, fetusmap, fetusmap_v2
from models.pose.refine import FETUSMAP_SSL, V2_SSL, RefineResult, SSLConfig, refine_case
from models.pose.registration import PoseLibrary, SimilarityTransform, fit_similarity
from models.pose.train import TrainConfig, compile_detector, evaluate, load_checkpoint, predict_landmarks, train

__all__ = [
    "PoseDataset", "SIGMA_VOX", "decode_argmax", "gaussian_heatmaps", "mm_to_voxel", "voxel_to_mm",
    "FETUSMAP_LANDMARKS", "V2_LANDMARKS", "LandmarkSet", "FetusMapV2Loss", "HeatmapL2Loss", "kl_term", "pair_l1",
    "pair_l2", "pair_loss", "assign_sides", "side_angle", "PCK_MAX_MM", "clinical_measures", "crown_rump_length",
    "distance_errors_mm", "fit_plane", "long_bone_lengths", "pck_auc", "pck_curve", "plane_errors", "PoseUNet",
    "fetusmap", "fetusmap_v2", "FETUSMAP_SSL", "V2_SSL", "RefineResult", "SSLConfig", "refine_case", "PoseLibrary",
    "SimilarityTransform", "fit_similarity", "TrainConfig", "compile_detector", "evaluate", "load_checkpoint",
    "predict_landmarks", "train",
]
