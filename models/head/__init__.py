"""Whole-fetal-head segmenter (head paper, shared/seeds/004_*): USegNet-DS-HAS in an auto-context cascade.

``python -m models.head train|evaluate``; modules: net (backbone + deep supervision + hybrid
attention), attention (the AM of Fig. 3), losses, autocontext, augment, dataset, train, evaluate.
"""
from models.head.attention import AttentionModule
from models.head.autocontext import AutoContext
from models.head.net import PAPER_CONFIG, PAPER_INPUT_SIZE, TINY_CONFIG, HeadNetConfig, USegNetHAS

__all__ = ["AttentionModule", "AutoContext", "HeadNetConfig", "USegNetHAS", "PAPER_CONFIG", "TINY_CONFIG",
           "PAPER_INPUT_SIZE"]
