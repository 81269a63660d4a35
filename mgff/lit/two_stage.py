"""Two-stage classifier: stage 1 on the image, a ViT attention cropper finds the object, stage 2 on
the enlarged crop, the two predictions merged (the paper's ViT-based two-stage classification)."""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mgff.lit.classifier import FineGrainedClassifier
from mgff.metrics.box_iou import BoxIoU
from mgff.models.backbone import TimmBackbone
from mgff.models.cropper.attention_cropper import AttentionCropper
from mgff.models.cropper.crops import CropOutput


class TwoStageClassifier(FineGrainedClassifier):
    """Stage 1 + attention cropper + stage 2, merged.

    Loss: stage-1 CE + ``stage2_loss_weight`` x stage-2 CE (+ the fusion heads' auxiliary losses,
    + the cropper's own CE when it is trainable). Metrics are logged for ``stage1``, ``stage2`` and the
    merged prediction (``val/acc``, on which checkpoints are selected). Where the batch has
    ground-truth boxes, the cropper's boxes are scored against them (``val/box_miou``, ``val/box_hit50``).

    Args:
        cropper: timm ViT name of the localiser (paper: ViT-B/16).
        cropper_pretrained: ``True`` (hub), a local weights path, or ``False``.
        cropper_kwargs: further timm arguments of the ViT (e.g. a tiny ``embed_dim``/``depth`` for tests).
        localize_size: side the ViT sees (default its native size); the crop is cut from the full input.
        crop_size: side of the stage-2 input (default ``img_size``, else 384).
        localization: ``rollout`` (attention rollout) or ``column_sum`` (the paper's per-token sums).
        head_fusion: how attention heads are fused: ``mean``, ``max`` or ``min``.
        discard_ratio: share of the weakest attention dropped in rollout.
        box_threshold: ``mean`` or a quantile in (0, 1) of the response map.
        box_mode: ``largest`` connected region or ``all`` pixels above the threshold.
        box_padding: padding added around the box, as a fraction of its size.
        min_box_size: minimum box side, as a fraction of the image side.
        cropper_trainable: train the ViT with its own classification head (else frozen).
        cropper_loss_weight: weight of the trainable cropper's CE.
        shared_classifier: stage 2 uses the stage-1 backbone and head (else a second copy).
        merge: ``mean_prob`` (mean of the two stages' probabilities) or ``sum_logits``.
        stage2_loss_weight: weight of the stage-2 CE.
        **kwargs: the stage classifier's arguments (:class:`FineGrainedClassifier`).
    """

    def __init__(
        self,
        cropper: str = "vit_base_patch16_384",
        cropper_pretrained: bool | str = False,
        cropper_kwargs: dict[str, Any] | None = None,
        localize_size: int | None = None,
        crop_size: int | None = None,
        localization: Literal["rollout", "column_sum"] = "rollout",
        head_fusion: Literal["mean", "max", "min"] = "mean",
        discard_ratio: float = 0.0,
        box_threshold: str | float = "mean",
        box_mode: Literal["largest", "all"] = "largest",
        box_padding: float = 0.05,
        min_box_size: float = 0.2,
        cropper_trainable: bool = False,
        cropper_loss_weight: float = 1.0,
        shared_classifier: bool = True,
        merge: Literal["mean_prob", "sum_logits"] = "mean_prob",
        stage2_loss_weight: float = 1.0,
        **kwargs: Any,
    ) -> None:
        if merge not in ("mean_prob", "sum_logits"):
            raise ValueError(f"model.merge must be 'mean_prob' or 'sum_logits', got {merge!r}")
        super().__init__(**kwargs)
        hp = self.hparams
        self.cropper = AttentionCropper(
            cropper,
            pretrained=cropper_pretrained,
            num_classes=hp.num_classes if cropper_trainable else 0,
            localize_size=localize_size,
            out_size=crop_size or hp.img_size or 384,
            method=localization,
            head_fusion=head_fusion,
            discard_ratio=discard_ratio,
            threshold=box_threshold,
            box_mode=box_mode,
            padding=box_padding,
            min_size=min_box_size,
            freeze=not cropper_trainable,
            **(cropper_kwargs or {}),
        )
        if shared_classifier:
            self.backbone2, self.head2 = None, None
        else:
            self.backbone2 = TimmBackbone(
                hp.backbone, out_indices=tuple(hp.stages), pretrained=hp.pretrained, img_size=hp.img_size, **(hp.backbone_kwargs or {})
            )
            self.head2 = self.build_head(self.backbone2.feature_channels, self.backbone2.feature_reductions, hp.num_classes)
        self.box_iou = nn.ModuleDict({"val": BoxIoU(), "test": BoxIoU()})

    @property
    def output_names(self) -> tuple[str, ...]:
        names = ("main", "stage1", "stage2")
        return names + ("cropper",) if self.hparams.get("cropper_trainable") else names

    def classify_crops(self, crops: Tensor):
        """Stage 2 on ``crops (B, 3, S, S)`` with the shared or the second classifier."""
        if self.backbone2 is None:
            return self(crops)
        return self.head2(self.backbone2(crops))

    def localize(self, images: Tensor) -> CropOutput:
        """The cropper alone: ``images (B, 3, H, W)`` -> crops, boxes, response maps (and logits)."""
        return self.cropper(images)

    def forward_outputs(self, images: Tensor) -> tuple[dict[str, Tensor], Tensor, dict[str, Tensor]]:
        crop = self.localize(images)
        stage1 = self(images)
        stage2 = self.classify_crops(crop.crops)
        if self.hparams.merge == "mean_prob":
            probs = (stage1.logits.float().softmax(-1) + stage2.logits.float().softmax(-1)) / 2
            merged = probs.clamp_min(1e-12).log()  # log-probabilities: argmax and CE behave as logits
        else:
            merged = stage1.logits + stage2.logits
        logits = {"main": merged, "stage1": stage1.logits, "stage2": stage2.logits}
        if crop.logits is not None:
            logits["cropper"] = crop.logits
        return logits, stage1.aux_loss + stage2.aux_loss, {"box": crop.boxes}

    def loss_terms(self, logits: dict[str, Tensor], aux_loss: Tensor, labels: Tensor) -> dict[str, Tensor]:
        hp = self.hparams
        ce = lambda name: F.cross_entropy(logits[name], labels, label_smoothing=hp.label_smoothing)  # noqa: E731
        terms = {"ce1": ce("stage1"), "ce2": hp.stage2_loss_weight * ce("stage2")}
        if "cropper" in logits:
            terms["ce_cropper"] = hp.cropper_loss_weight * ce("cropper")
        if hp.aux_loss_weight:
            terms["aux"] = hp.aux_loss_weight * aux_loss
        return terms

    def log_extras(self, extras: dict[str, Tensor], batch: dict[str, Any], split: str) -> None:
        if split in self.box_iou and "box" in batch:
            self.box_iou[split].update(extras["box"].float(), batch["box"].float())

    def _log_box_iou(self, split: str) -> None:
        metric = self.box_iou[split]
        if not metric.update_called:
            return
        values = metric.compute()  # reduced over ranks; NaN when no image had a ground-truth box
        if not torch.isnan(values["miou"]):
            self.log(f"{split}/box_miou", values["miou"])
            self.log(f"{split}/box_hit50", values["hit_rate"])
        metric.reset()

    def on_validation_epoch_end(self) -> None:
        self._log_box_iou("val")

    def on_test_epoch_end(self) -> None:
        self._log_box_iou("test")

    def optimizer_modules(self) -> list[tuple[nn.Module, float]]:
        hp = self.hparams
        modules = super().optimizer_modules()
        if self.backbone2 is not None:
            modules += [(self.backbone2, hp.lr), (self.head2, hp.lr * hp.head_lr_scale)]
        if hp.cropper_trainable:
            modules.append((self.cropper, hp.lr * hp.head_lr_scale))
        return modules
