"""Lightning callbacks of mgff: prediction CSVs, attention-map images."""

from mgff.callbacks.attention_maps import AttentionMapLogger
from mgff.callbacks.prediction_writer import PredictionCSVWriter

__all__ = ["AttentionMapLogger", "PredictionCSVWriter"]
