"""LightningModules of mgff: what to compute (losses, metrics, optimisation)."""

from mgff.lit.classifier import FineGrainedClassifier
from mgff.lit.two_stage import TwoStageClassifier
from mgff.lit.two_view import TwoViewClassifier

__all__ = ["FineGrainedClassifier", "TwoStageClassifier", "TwoViewClassifier"]
