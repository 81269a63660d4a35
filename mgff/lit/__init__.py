"""LightningModules of mgff: what to compute (losses, metrics, optimisation)."""

from mgff.lit.classifier import FineGrainedClassifier
from mgff.lit.two_stage import TwoStageClassifier

__all__ = ["FineGrainedClassifier", "TwoStageClassifier"]
