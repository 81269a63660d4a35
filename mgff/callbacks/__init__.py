"""Lightning callbacks of mgff: prediction CSVs (``predict``'s and the run's own test's), attention-map images, the
EMA of the weights."""

from mgff.callbacks.attention_maps import AttentionMapLogger
from mgff.callbacks.ema import EMAWeights
from mgff.callbacks.prediction_writer import PredictionCSVWriter
from mgff.callbacks.test_predictions import TestPredictionWriter

__all__ = ["AttentionMapLogger", "EMAWeights", "PredictionCSVWriter", "TestPredictionWriter"]
