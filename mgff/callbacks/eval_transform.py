"""Record the evaluation transform's geometry and normalisation in every checkpoint.

A checkpoint that travels alone must be usable on new photos (``python -m mgff.predict_folder``) with
the same resize, centre crop and normalisation it was trained behind, without the run's config; and, for
a two-stage model that cuts stage 2's crops from the source view (``data.source_size``, see
:class:`~data_modules.transforms.ViewWithSource`), with that view at the same size.
"""

from __future__ import annotations

from typing import Any

import lightning as L

__all__ = ["EVAL_TRANSFORM_KEY", "EvalTransformInCheckpoint"]

EVAL_TRANSFORM_KEY = "mgff_eval_transform"
# what build_eval_transform(resize_size, crop_size, mean, std, source_size) is built from
_FIELDS = ("resize_size", "crop_size", "mean", "std", "source_size")
# recorded also when None: "no source view" is a fact the reader needs (a two-stage model with crop_from auto
# crops from the view then); a record without the key says nothing either way
_NONE_IS_A_VALUE = ("source_size",)


class EvalTransformInCheckpoint(L.Callback):
    """Store ``{resize_size, crop_size, mean, std, source_size}`` of the trainer's DataModule (those it
    has) under ``checkpoint["mgff_eval_transform"]``, as plain numbers and lists; ``source_size`` is
    ``None`` for a DataModule without a source view."""

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        datamodule = getattr(trainer, "datamodule", None)
        record = {}
        for field in _FIELDS:
            if not hasattr(datamodule, field):
                continue
            value = getattr(datamodule, field)
            if value is not None:
                record[field] = [float(v) for v in value] if isinstance(value, (tuple, list)) else value
            elif field in _NONE_IS_A_VALUE:
                record[field] = None
        if record:
            checkpoint[EVAL_TRANSFORM_KEY] = record
