"""Record the evaluation transform's geometry and normalisation in every checkpoint.

A checkpoint that travels alone must be usable on new photos (``python -m mgff.predict_folder``) with
the same resize, centre crop and normalisation it was trained behind, without the run's config.
"""

from __future__ import annotations

from typing import Any

import lightning as L

__all__ = ["EVAL_TRANSFORM_KEY", "EvalTransformInCheckpoint"]

EVAL_TRANSFORM_KEY = "mgff_eval_transform"
_FIELDS = ("resize_size", "crop_size", "mean", "std", "source_size")


class EvalTransformInCheckpoint(L.Callback):
    """Store ``{resize_size, crop_size, mean, std, source_size}`` of the trainer's DataModule (those it
    has) under ``checkpoint["mgff_eval_transform"]``, as plain numbers and lists."""

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        datamodule = getattr(trainer, "datamodule", None)
        record = {}
        for field in _FIELDS:
            value = getattr(datamodule, field, None)
            if value is not None:
                record[field] = [float(v) for v in value] if isinstance(value, (tuple, list)) else value
        if record:
            checkpoint[EVAL_TRANSFORM_KEY] = record
