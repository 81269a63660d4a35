"""``python -m mgff.predict_folder --ckpt_path best.ckpt --images photos/``: predictions for new photos.

One command from a checkpoint and a folder of photos (any layout, nested folders, no labels, no dataset
metadata) to ``predictions.csv``: one row per image file with its ``path``, the ``top_k`` most probable
class names with their probabilities (``top1_name``, ``top1_prob``, ...), for the two-stage model the
box it found in the photo's own pixels (``photo_box_x1`` ... ``photo_box_y2``), and an ``error`` column
for files that could not be decoded (their rows have no prediction; a warning counts them).

Class names and the model come from the checkpoint (loaded safely, without the initial pretrained
weights: :meth:`~mgff.lit.FineGrainedClassifier.load_from_checkpoint`); the evaluation transform
(resize, centre crop, normalisation) from the record the CLI puts in every checkpoint
(:class:`~mgff.callbacks.eval_transform.EvalTransformInCheckpoint`), or from ``--resize_size`` /
``--crop_size`` for a checkpoint without one.

A two-stage model trained with ``data.source_size`` cut stage 2's crops from the source view (the same
view at a higher resolution, ``batch["source"]``; ``crop_from: auto`` or ``source``): the photos then go
through the same pipeline as the run's test split (:func:`~data_modules.transforms.build_eval_transform`
with the recorded ``source_size``), so a folder of the run's test photos gets the run's test predictions.
``--source_size`` gives it for a checkpoint without the record (and overrides the record). A model with
``crop_from: source`` and no source size from either is refused; one with ``crop_from: auto`` in a checkpoint
that does not say whether its run had a source view crops from the view, with a warning.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional

import lightning as L
import torch
from jsonargparse import auto_cli

import mgff.models.zoo  # noqa: F401  (registers the zoo's models with timm)
from data_modules.unlabeled_folder import UnlabeledFolderDataModule
from mgff.callbacks.eval_transform import EVAL_TRANSFORM_KEY
from mgff.callbacks.prediction_writer import PredictionCSVWriter
from mgff.cli import setup_logging
from mgff.lit import FineGrainedClassifier, TwoStageClassifier
from mgff.lit.checkpoint import plain_hyperparameters, resolve_model_class

__all__ = ["default_num_workers", "predict_folder", "source_size_for"]

log = logging.getLogger("mgff")


def default_num_workers(at_most: int = 4) -> int:
    """Loader workers when none are asked for: ``at_most``, but no more than the CPUs this process may run on
    (``os.sched_getaffinity``: a SLURM or ``taskset`` allocation, not the machine's count; PyTorch warns when a
    loader starts more workers than that)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(at_most, cpus))


def predict_folder(
    *,
    ckpt_path: str,
    images: str,
    output: str = "predictions.csv",
    top_k: int = 5,
    batch_size: int = 32,
    num_workers: Optional[int] = None,
    resize_size: Optional[int] = None,
    crop_size: Optional[int] = None,
    source_size: Optional[int] = None,
    accelerator: str = "auto",
    devices: int = 1,
    precision: str = "32-true",
) -> Path:
    """Predict every image under ``images`` with the model in ``ckpt_path``; write the CSV ``output``.

    Args:
        ckpt_path: a checkpoint written by ``mgff`` training (``best-*.ckpt``, ``last.ckpt``).
        images: folder of photos, searched recursively.
        output: the CSV to write.
        top_k: how many of the most probable classes to list per image.
        batch_size: images per batch.
        num_workers: loader worker processes (default: 4, or fewer when this process may use fewer CPUs).
        resize_size: square resize before the centre crop (default: the checkpoint's record).
        crop_size: centre crop, the model's input side (default: the checkpoint's record).
        source_size: side of the source view a two-stage model cuts stage 2's crops from (the run's
            ``data.source_size``; default: the checkpoint's record). Used only by a model that crops from
            the source (``crop_from: source``, or ``auto`` where there is a source size).
        accelerator: ``auto``, ``cpu``, ``gpu``...
        devices: devices to predict on.
        precision: Lightning precision, e.g. ``bf16-mixed`` on a recent GPU.

    Returns:
        the path of the written CSV.
    """
    setup_logging()
    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    hparams = plain_hyperparameters(checkpoint.get("hyper_parameters", {}), ckpt_path)
    if "_class_path" in hparams:
        model_class = resolve_model_class(hparams["_class_path"], FineGrainedClassifier, ckpt_path)
    else:  # saved outside the CLI: the two-stage model is the one with a cropper
        model_class = TwoStageClassifier if "cropper" in hparams else FineGrainedClassifier
    model = model_class.load_from_checkpoint(ckpt_path, map_location="cpu")

    record = checkpoint.get(EVAL_TRANSFORM_KEY, {})
    resize_size = resize_size or record.get("resize_size")
    crop_size = crop_size or record.get("crop_size")
    if resize_size is None or crop_size is None:
        raise ValueError(
            f"{ckpt_path} does not record its evaluation transform (saved before mgff recorded it): "
            "pass --resize_size and --crop_size (and --source_size for a two-stage model trained with data.source_size) "
            "as in the training run's data config"
        )
    datamodule = UnlabeledFolderDataModule(
        images,
        resize_size=resize_size,
        crop_size=crop_size,
        mean=record.get("mean", hparams.get("data_mean")) or (0.485, 0.456, 0.406),
        std=record.get("std", hparams.get("data_std")) or (0.229, 0.224, 0.225),
        # the source view the model cut its crops from in training (crop_from auto/source with data.source_size)
        source_size=source_size_for(model, checkpoint, source_size, crop_size, ckpt_path),
        batch_size=batch_size,
        num_workers=default_num_workers() if num_workers is None else num_workers,
    )
    output_path = Path(output)
    writer = PredictionCSVWriter(output_dir=str(output_path.parent), filename=output_path.name, top_k=top_k)
    trainer = L.Trainer(
        accelerator=accelerator,
        devices=devices,
        precision=precision,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        callbacks=[writer],
    )
    trainer.predict(model, datamodule=datamodule, return_predictions=False)
    if trainer.is_global_zero:
        print(f"mgff: predictions for {len(datamodule.dataset)} images written to {writer.path}")
    return output_path


def source_size_for(
    model: FineGrainedClassifier, checkpoint: dict, source_size: Optional[int], crop_size: int, ckpt_path: str
) -> Optional[int]:
    """The side of the source view to give ``model`` (``batch["source"]``), or ``None`` for none.

    Only a two-stage model that cuts stage 2's crops from the source gets one: ``crop_from: source``, or
    ``auto`` where a source size is known (``source_size``, the ``--source_size`` option, else the
    checkpoint's record), which is what ``auto`` resolved to in its run. A ``crop_from: source`` model with no
    source size is refused, naming ``ckpt_path`` and the option. An ``auto`` one crops from the view: silently
    where the record says its run had no source view (``source_size: None``), with a warning where the
    checkpoint does not say (no record, or one from before ``None`` was recorded).
    """
    record = checkpoint.get(EVAL_TRANSFORM_KEY) or {}
    size = source_size if source_size is not None else record.get("source_size")
    crop_from = model.hparams.get("crop_from") if isinstance(model, TwoStageClassifier) else None
    if crop_from not in ("auto", "source"):
        if source_size is not None:
            log.warning("--source_size %s ignored: the model in %s does not crop from a source view", source_size, ckpt_path)
        return None
    if size is None:
        if crop_from == "source":
            raise ValueError(
                f"{ckpt_path}: the two-stage model cuts stage 2's crops from a source view (model.crop_from='source'), "
                "and the checkpoint does not record its size (saved before mgff recorded it, or without the mgff CLI): "
                "pass --source_size as the training run's data.source_size"
            )
        if "source_size" not in record:
            log.warning(
                "%s does not record whether its training run had a source view: stage 2 crops from the view "
                "(model.crop_from='auto' without one); if the run set data.source_size, pass --source_size as it did",
                ckpt_path,
            )
        return None
    size = int(size)
    if size < crop_size:
        given = "--source_size" if source_size is not None else f"the source_size recorded in {ckpt_path}"
        raise ValueError(f"{given} ({size}) must be at least the crop size ({crop_size}): it is the same view at a higher resolution")
    return size


def main(args: list[str] | None = None) -> None:
    auto_cli(predict_folder, args=args)


if __name__ == "__main__":
    main()
