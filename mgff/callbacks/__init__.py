"""Lightning callbacks of mgff: prediction CSVs (``predict``'s and the run's own test's), attention-map images."""

from mgff.callbacks.attention_maps import AttentionMapLogger
from mgff.callbacks.prediction_writer import PredictionCSVWriter
from mgff.callbacks.test_predictions import TestPredictionWriter

__all__ = ["AttentionMapLogger", "PredictionCSVWriter", "TestPredictionWriter"]
