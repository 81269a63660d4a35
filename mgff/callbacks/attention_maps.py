"""Saves what the localiser sees on validation images, every few epochs, as pictures."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn

from data_modules.transforms import IMAGENET_MEAN, IMAGENET_STD
from mgff.metrics.box_iou import paired_box_iou
from mgff.viz.localization import crop_titles, localization_panel


class AttentionMapLogger(Callback):
    """Every ``every_n_epochs`` epochs, draw the localiser's response map, boxes and crops on validation images.

    The first ``num_images`` images of the validation loader are drawn side by side under their response
    map (``jet``: the ViT's attention, the stage-1 network's own map for ``localization='features'``, the
    box itself for ``ground_truth``), with the predicted box (red) and the ground-truth box (green, dashed,
    where the dataset has one), titled with their class and the IoU; below each, the crop stage 2
    classifies, pixel for pixel, titled with the box's size in the frame it was cut from (stage 1's view
    or the source view) and the crop's side. The figure is saved as
    ``<log_dir>/attention_maps/epoch_XXX.png`` (``XXX`` the 0-based epoch) and, for a
    ``TensorBoardLogger``, added as the figure ``val/attention_maps`` at the global step; loggers with a
    ``log_image(key, images, step)`` method (W&B) get the PNG; others (CSV) only the file.

    Only models with ``localize(images) -> CropOutput`` (:class:`~mgff.lit.two_stage.TwoStageClassifier`)
    have a cropper; for any other model the callback warns once and does nothing. Only rank 0 collects
    and draws; the sanity-check validation is skipped.

    Args:
        every_n_epochs: draw after the validation of every N-th epoch (epochs N-1, 2N-1, ...).
        num_images: images in the grid (fewer if the validation split is smaller).
        dirname: sub-folder of the log directory for the PNGs.
    """

    def __init__(self, every_n_epochs: int = 1, num_images: int = 8, dirname: str = "attention_maps") -> None:
        super().__init__()
        if every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be >= 1, got {every_n_epochs}")
        if num_images < 1:
            raise ValueError(f"num_images must be >= 1, got {num_images}")
        self.every_n_epochs = every_n_epochs
        self.num_images = num_images
        self.dirname = dirname
        self.saved_paths: list[Path] = []
        self._supported: bool | None = None
        self._images: list[torch.Tensor] = []
        self._boxes: list[torch.Tensor] = []
        self._labels: list[torch.Tensor] = []
        self._sources: list[torch.Tensor] = []

    # ----- when to act --------------------------------------------------------------------------
    def _supports(self, pl_module: L.LightningModule) -> bool:
        if self._supported is None:
            self._supported = callable(getattr(pl_module, "localize", None))
            if not self._supported:
                rank_zero_warn(
                    f"AttentionMapLogger: {type(pl_module).__name__} has no localize() (no attention cropper); "
                    "no attention maps will be saved. Use mgff.lit.TwoStageClassifier."
                )
        return self._supported

    def _active(self, trainer: L.Trainer, pl_module: L.LightningModule) -> bool:
        return (
            trainer.is_global_zero
            and not trainer.sanity_checking
            and (trainer.current_epoch + 1) % self.every_n_epochs == 0
            and self._supports(pl_module)
        )

    def _collected(self) -> int:
        return sum(len(images) for images in self._images)

    # ----- hooks --------------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._supports(pl_module)  # warn at the start of the run, not after the first epoch

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._images, self._boxes, self._labels, self._sources = [], [], [], []

    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if dataloader_idx != 0 or not batch or not self._active(trainer, pl_module):
            return
        missing = self.num_images - self._collected()
        if missing <= 0:
            return
        images = batch["image"][:missing].detach()
        self._images.append(images.cpu())
        box = batch.get("box")
        self._boxes.append(box[:missing].detach().float().cpu() if box is not None else torch.full((len(images), 4), float("nan")))
        label = batch.get("label")
        self._labels.append(label[:missing].detach().cpu() if label is not None else torch.full((len(images),), -1))
        source = batch.get("source")
        if source is not None:
            self._sources.append(source[:missing].detach().cpu())

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._images or not self._active(trainer, pl_module):
            return
        images = torch.cat(self._images)
        gt_boxes, labels = torch.cat(self._boxes), torch.cat(self._labels)
        source = torch.cat(self._sources) if len(self._sources) == len(self._images) else None
        self._images, self._boxes, self._labels, self._sources = [], [], [], []
        device = pl_module.device
        with torch.no_grad():
            crop = pl_module.localize(
                images.to(device), None if source is None else source.to(device), boxes=gt_boxes.to(device)
            )
        boxes = crop.boxes.float().cpu()
        names = getattr(pl_module.hparams, "class_names", None) if hasattr(pl_module, "hparams") else None
        iou = paired_box_iou(boxes, gt_boxes.nan_to_num(0.0))
        known = ~torch.isnan(gt_boxes).any(dim=1)
        titles = [
            (names[i] if names and i >= 0 else (str(i) if i >= 0 else "")) + (f"\nIoU {float(v):.2f}" if has_box else "")
            for i, v, has_box in zip(labels.tolist(), iou, known.tolist())
        ]
        mean, std = self._normalization(trainer)
        figure = localization_panel(
            images, crop.response.float().cpu(), boxes, crop.crops.float().cpu(), gt_boxes, titles=titles,
            crop_titles=self._crop_titles(pl_module, boxes, images, source, crop.crops.shape[-1]), mean=mean, std=std,
        )
        figure.suptitle(f"epoch {trainer.current_epoch}: response map, predicted box (red), ground truth (green); the crops", fontsize=9)
        out_dir = Path(trainer.log_dir or trainer.default_root_dir) / self.dirname
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"epoch_{trainer.current_epoch:03d}.png"
        figure.savefig(path, dpi=100)
        self.saved_paths.append(path)
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_figure("val/attention_maps", figure, global_step=trainer.global_step, close=False)
            elif callable(getattr(logger, "log_image", None)):
                logger.log_image(key="val/attention_maps", images=[str(path)], step=trainer.global_step)

    @staticmethod
    def _crop_titles(pl_module: L.LightningModule, boxes: torch.Tensor, images: torch.Tensor, source: torch.Tensor | None, side: int) -> list[str]:
        """The box of each crop in the frame it is cut from (the source view where the model crops from it)."""
        crop_frame = getattr(pl_module, "crop_frame", None)
        from_source = source is not None and callable(crop_frame) and crop_frame(source) == "source"
        frame = source if from_source else images
        return crop_titles(boxes, images.shape[-2:], frame.shape[-2:], "source" if from_source else "view", side)

    @staticmethod
    def _normalization(trainer: L.Trainer) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """The DataModule's normalisation (to show the images as they were), else ImageNet's."""
        datamodule = getattr(trainer, "datamodule", None)
        mean, std = getattr(datamodule, "mean", None), getattr(datamodule, "std", None)
        if mean is None or std is None:
            return IMAGENET_MEAN, IMAGENET_STD
        return tuple(mean), tuple(std)
