"""A control for the two-stage model: one stage trained on two views of every image, tested on the full view.

The two-stage model trains its shared network with two losses, one on the full view and one on the crop its
localiser cuts; its own stage 1 scores above a single-stage model trained alone. Is that the second loss, or the
zoom? This control gets the second loss without the localiser: every training step adds a cross-entropy term on a
*random* crop of each image (areas like the localiser's boxes, cut from the same source view and resized to the same
side), and evaluation sees the full view only, as a single-stage model does. Its test top-1 against two-stage's own
stage 1 says what the extra loss is worth; against two-stage merged, what the zoom at test adds beyond it
(BENCHMARKS.md, "The second loss, or the crop?").
"""

from __future__ import annotations

from typing import Any, Literal, Sequence

import torch.nn.functional as F
from torch import Tensor

from mgff.lit.classifier import FineGrainedClassifier
from mgff.models.cropper.crops import crop_and_resize, crop_from_source
from mgff.models.cropper.random_boxes import random_boxes

__all__ = ["TwoViewClassifier"]


class TwoViewClassifier(FineGrainedClassifier):
    """Single-stage classifier whose training loss also covers a random crop of each image.

    Loss: CE(full view) + ``crop_loss_weight`` x CE(random crop) (+ the head's auxiliary losses, averaged over the
    two views). Validation and test: the full view alone (``val/acc`` is the full view's).

    Args:
        crop_size: side of the crop's input (default ``img_size``).
        crop_from: ``source``: cut from ``batch["source"]`` (``data.source_size``), as the two-stage model with
            ``crop_from: source``; ``view``: from the network's input.
        crop_area: range of the crop's area as a fraction of the view (the ``features`` boxes of the two-stage
            runs cover about this; :func:`~mgff.models.cropper.random_boxes.random_boxes`).
        crop_ratio: range of the crop's width / height.
        crop_loss_weight: weight of the crop's CE.
        **kwargs: the stage classifier's arguments (:class:`FineGrainedClassifier`).
    """

    def __init__(
        self,
        crop_size: int | None = None,
        crop_from: Literal["view", "source"] = "source",
        crop_area: Sequence[float] = (0.35, 0.75),
        crop_ratio: Sequence[float] = (3 / 4, 4 / 3),
        crop_loss_weight: float = 1.0,
        **kwargs: Any,
    ) -> None:
        if crop_from not in ("view", "source"):
            raise ValueError(f"model.crop_from must be 'view' or 'source', got {crop_from!r}")
        if len(crop_area) != 2 or len(crop_ratio) != 2:
            raise ValueError(f"model.crop_area and model.crop_ratio are (low, high) pairs, got {list(crop_area)} and {list(crop_ratio)}")
        random_boxes(1, 8, 8, tuple(crop_area), tuple(crop_ratio))  # refuses bad ranges now, naming them
        super().__init__(**kwargs)
        self.crop_size = crop_size or self.hparams.img_size or 384
        self.check_input_size(self.crop_size, "model.init_args.crop_size")

    @property
    def output_names(self) -> tuple[str, ...]:
        """``crop`` while training only (evaluation sees the full view): what every rank logs agrees with
        :meth:`forward_outputs`, also on a rank whose batch was all skipped images."""
        names = ("main", "crop") if self.training else ("main",)
        if self.trains_base_path:  # the residual head's base path, trained on its own (fusion_training)
            names += tuple(f"{n}_base" if n != "main" else "base" for n in names)
        return names

    def random_crops(self, images: Tensor, source: Tensor | None) -> Tensor:
        """``(B, 3, S, S)`` random crops of ``images (B, 3, H, W)`` (from ``source`` when ``crop_from='source'``), in the
        data's normalisation."""
        hp = self.hparams
        boxes = random_boxes(images.shape[0], images.shape[-2], images.shape[-1], tuple(hp.crop_area), tuple(hp.crop_ratio), device=images.device)
        if hp.crop_from == "view":
            return crop_and_resize(images, boxes, self.crop_size)
        if source is None:
            raise ValueError("model.crop_from='source' needs batch['source']: set data.source_size")
        return self.input_norm.data_from_unit(crop_from_source(source, boxes, tuple(images.shape[-2:]), self.crop_size)).to(images.dtype)

    def forward_outputs(self, images: Tensor, batch: dict[str, Any] | None = None) -> tuple[dict[str, Tensor], Tensor, dict[str, Tensor]]:
        """Training: ``{"main": full view, "crop": random crop}``; evaluation: ``{"main": full view}`` only."""
        out, extras = self.classify_for_step(images)  # keep_loc (if set) on the full view
        logits = {"main": out.logits} | ({"base": out.base_logits} if self.trains_base_path else {})
        if not self.training:
            return logits, out.aux_loss, extras
        crop = self(self.random_crops(images, (batch or {}).get("source")))
        logits["crop"] = crop.logits
        if self.trains_base_path:
            logits["crop_base"] = crop.base_logits
        return logits, (out.aux_loss + crop.aux_loss) / 2, extras

    def loss_terms(self, logits: dict[str, Tensor], aux_loss: Tensor, labels: Tensor) -> dict[str, Tensor]:
        hp = self.hparams
        terms = {"ce": F.cross_entropy(logits["main"], labels, label_smoothing=hp.label_smoothing)}
        if "base" in logits:
            terms["ce_base"] = F.cross_entropy(logits["base"], labels, label_smoothing=hp.label_smoothing)
        if "crop" in logits:
            terms["ce_crop"] = hp.crop_loss_weight * F.cross_entropy(logits["crop"], labels, label_smoothing=hp.label_smoothing)
        if "crop_base" in logits:
            terms["ce_crop_base"] = hp.crop_loss_weight * F.cross_entropy(logits["crop_base"], labels, label_smoothing=hp.label_smoothing)
        if hp.aux_loss_weight:
            terms["aux"] = hp.aux_loss_weight * aux_loss
        return terms

