"""Two-stage classifier: stage 1 on the image, a localiser finds the object, stage 2 on the enlarged
crop, the two predictions merged (the paper's ViT-based two-stage classification).

The localiser (``localization``) is the paper's ViT attention cropper (``rollout``, ``column_sum``), the
stage-1 network's own maps (``features``: no second network), or the ground-truth box (``ground_truth``,
an oracle); all send a response map through the same map -> box -> crop code (``mgff.models.cropper``)."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any, Literal, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mgff.lit.checkpoint import plain_hyperparameters
from mgff.lit.classifier import FineGrainedClassifier, with_legacy_defaults
from mgff.metrics.box_iou import BoxIoU
from mgff.models.cropper.attention_cropper import AttentionCropper
from mgff.models.cropper.crops import CropOutput, crop_and_resize, crop_from_source
from mgff.models.cropper.feature_localizer import FeatureLocalizer
from mgff.models.cropper.ground_truth import ground_truth_localization
from mgff.lit.optim import head_parameter_roles
from mgff.models.heads import HeadOutput
from mgff.models.normalization import InputNormalization

log = logging.getLogger("mgff")

VIT_LOCALIZATIONS = ("rollout", "column_sum")
LOCALIZATIONS = VIT_LOCALIZATIONS + ("features", "ground_truth")
CROP_FROM = ("auto", "view", "source")


class TwoStageClassifier(FineGrainedClassifier):
    """Stage 1 + localiser + stage 2, merged.

    Loss: stage-1 CE + ``stage2_loss_weight`` x stage-2 CE (+ the fusion heads' auxiliary losses,
    + the cropper's own CE when it is trainable). Metrics are logged for ``stage1``, ``stage2`` and the
    merged prediction (``val/acc``, on which checkpoints are selected). Where the batch has
    ground-truth boxes, the cropper's boxes are scored against them (``val/box_miou``, ``val/box_hit50``).

    Args:
        cropper: timm ViT name of the ViT localiser (paper: ViT-B/16); only for ``rollout``/``column_sum``.
        cropper_pretrained: ``True`` (hub), a local weights path, or ``False``.
        cropper_kwargs: further timm arguments of the ViT (e.g. a tiny ``embed_dim``/``depth`` for tests).
        cropper_mean / cropper_std: the input normalisation the ViT's weights expect (``None``: its timm
            ``pretrained_cfg``, e.g. 0.5/0.5 for AugReg); the batch is converted to it from ``data_mean``/``data_std``.
        crop_from: ``auto`` (the default): from ``batch["source"]`` where the batch has one (``data.source_size``
            set), else from stage 1's input; ``view``: always from stage 1's input; ``source``: always from
            ``batch["source"]``, the same view at ``data.source_size`` (uint8), the box scaled to that frame, an error
            without one. The paper cuts the object "从原始图像中" (from the original image), the name it also gives
            the network's input X, so its configs crop from the view; the source is an mgff addition. On real
            photos, over seeds, the model trained and tested with crops from a 448 px source beat the one with crops
            from the 224 px view (BENCHMARKS.md, "Crop from the source or from the view, over seeds"), so a source,
            where the data config gives one, is used.
        localize_size: side the localiser sees: for the ViT, default its native size; for ``features``,
            ``None`` reads the maps of stage 1's own forward (free), a side re-runs the stage-1 backbone
            on the image resized to it for a finer map (cost ``(side / input side)^2`` of one stage).
            Boxes are always in the input's pixels; the crop is cut from the full input (or the source).
        crop_size: side of the stage-2 input (default ``img_size``, else 384).
        localization: ``features`` (the default: a response map of the stage-1 network itself,
            :mod:`mgff.models.cropper.feature_localizer`; no second network, any backbone), ``rollout`` (ViT
            attention rollout), ``column_sum`` (the paper's per-token sums over the ViT's attention; the paper
            configs set it), or ``ground_truth`` (the batch's box; an oracle that needs boxes in every batch).
        feature_response: the ``features`` response map: ``refined`` (the default: the ``energy`` map refined on
            the finer map before it; it localised real birds best, BENCHMARKS.md "Real photos: localisation";
            needs two tapped stages), ``energy`` (channel sum of the last map, AOLM-like), ``cam`` (class
            activation map of the linear head) or ``attention`` (attention the MGFF head's positions receive).
        head_fusion: how attention heads are fused: ``mean``, ``max`` or ``min``.
        discard_ratio: share of the weakest attention dropped in rollout.
        layer_fusion: how ``column_sum`` combines the ViT's layers: ``product`` or ``mean``.
        box_threshold: ``mean`` or a quantile in (0, 1) of the response map.
        box_mode: ``largest`` connected region or ``all`` pixels above the threshold.
        box_padding: padding added around the box, as a fraction of its size.
        min_box_size: minimum box side, as a fraction of the image side.
        cropper_trainable: train the ViT with its own classification head (else frozen).
        cropper_loss_weight: weight of the trainable cropper's CE.
        shared_classifier: stage 2 uses the stage-1 backbone and head (else a second copy of both).
        shared_head: with a shared backbone, stage 2 also uses the stage-1 head (``false``: a head of its own, so
            the crops' zoomed maps and the full views' do not share the head's weights; its own fusion layers and
            classifier, same architecture).
        merge: ``mean_prob`` (mean of the two stages' probabilities) or ``sum_logits``.
        stage2_loss_weight: weight of the stage-2 CE.
        **kwargs: the stage classifier's arguments (:class:`FineGrainedClassifier`).
    """

    def __init__(
        self,
        cropper: str = "vit_base_patch16_384",
        cropper_pretrained: bool | str = False,
        cropper_kwargs: dict[str, Any] | None = None,
        cropper_mean: Sequence[float] | None = None,
        cropper_std: Sequence[float] | None = None,
        crop_from: Literal["auto", "view", "source"] = "auto",
        localize_size: int | None = None,
        crop_size: int | None = None,
        localization: Literal["rollout", "column_sum", "features", "ground_truth"] = "features",
        feature_response: Literal["refined", "energy", "cam", "attention"] = "refined",
        head_fusion: Literal["mean", "max", "min"] = "mean",
        discard_ratio: float = 0.0,
        layer_fusion: Literal["product", "mean"] = "product",
        box_threshold: str | float = "mean",
        box_mode: Literal["largest", "all"] = "largest",
        box_padding: float = 0.05,
        min_box_size: float = 0.2,
        cropper_trainable: bool = False,
        cropper_loss_weight: float = 1.0,
        shared_classifier: bool = True,
        shared_head: bool = True,
        merge: Literal["mean_prob", "sum_logits"] = "mean_prob",
        stage2_loss_weight: float = 1.0,
        **kwargs: Any,
    ) -> None:
        if merge not in ("mean_prob", "sum_logits"):
            raise ValueError(f"model.merge must be 'mean_prob' or 'sum_logits', got {merge!r}")
        if localization not in LOCALIZATIONS:
            raise ValueError(f"model.localization must be one of {LOCALIZATIONS}, got {localization!r}")
        if cropper_trainable and localization not in VIT_LOCALIZATIONS:
            raise ValueError(f"model.cropper_trainable trains the ViT localiser; localization={localization!r} has none")
        if crop_from not in CROP_FROM:
            raise ValueError(f"model.crop_from must be one of {CROP_FROM}, got {crop_from!r}")
        super().__init__(**kwargs)
        hp = self.hparams
        self.crop_size = crop_size or hp.img_size or 384
        self.check_input_size(self.crop_size, "model.init_args.crop_size")  # stage 2 runs the backbone on the crops
        # one localiser: the ViT cropper (a second network), or none stored (features, ground truth)
        self.cropper, self.cropper_norm, self.feature_localizer = None, None, None
        if localization in VIT_LOCALIZATIONS:
            self.cropper = AttentionCropper(
                cropper,
                pretrained=cropper_pretrained,
                num_classes=hp.num_classes if cropper_trainable else 0,
                localize_size=localize_size,
                out_size=self.crop_size,
                method=localization,
                head_fusion=head_fusion,
                discard_ratio=discard_ratio,
                layer_fusion=layer_fusion,
                threshold=box_threshold,
                box_mode=box_mode,
                padding=box_padding,
                min_size=min_box_size,
                freeze=not cropper_trainable,
                **(cropper_kwargs or {}),
            )
            self.cropper_norm = InputNormalization(
                self.cropper.vit, "model.cropper", hp.data_mean, hp.data_std, cropper_mean, cropper_std, cropper_pretrained
            )
        elif localization == "features":
            if localize_size is not None:
                self.check_input_size(localize_size, "model.init_args.localize_size")  # the backbone runs at that side
            self.feature_localizer = FeatureLocalizer(feature_response, box_threshold, box_mode, box_padding, min_box_size)
            if feature_response == "cam" and hp.head != "linear":
                raise ValueError(f"model.feature_response='cam' reads the linear head's weights: set model.head='linear' (got {hp.head!r})")
            if feature_response == "attention" and not (hp.head == "mgff" and hp.use_attention and hp.attention == "mhsa"):
                raise ValueError("model.feature_response='attention' reads the MGFF head's global attention: needs head='mgff', "
                                 f"use_attention=true, attention='mhsa' (got head={hp.head!r}, use_attention={hp.use_attention}, "
                                 f"attention={hp.attention!r})")
        self._warned_unused_source = False
        self.backbone2 = None if shared_classifier else self.build_backbone()
        stage2_backbone = self.backbone if self.backbone2 is None else self.backbone2
        shared = shared_classifier and shared_head
        self.head2 = None if shared else self.build_head(stage2_backbone.feature_channels, stage2_backbone.feature_reductions, hp.num_classes)
        self.box_iou = nn.ModuleDict({"val": BoxIoU(), "test": BoxIoU()})

    @classmethod
    def from_stage1_checkpoint(cls, checkpoint_path: str | Path, **overrides: Any) -> "TwoStageClassifier":
        """A two-stage model around the stage 1 of a single-stage classifier's checkpoint.

        The checkpoint's hyperparameters (plain values only, :func:`~mgff.lit.checkpoint.plain_hyperparameters`)
        build the model with ``localization='features'`` unless ``overrides`` say otherwise; its backbone, head
        and input normalisation are loaded (stage 2 shares them). For looking at a fine-tuned classifier's
        localisation (``benchmarks/box_quality.py``, notebook 02) without training a two-stage model."""
        checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
        hparams = with_legacy_defaults(plain_hyperparameters(checkpoint.get("hyper_parameters", {}), str(checkpoint_path)))
        kwargs = {k: v for k, v in hparams.items() if not k.startswith("_")}
        # the checkpoint holds the weights; a model for looking trains no keep_loc term (its reference, the initial
        # backbone, is not in the checkpoint)
        kwargs.update(pretrained=False, localization="features", keep_localization_weight=0.0)
        kwargs.update(overrides)
        model = cls(**kwargs)
        try:
            missing, _ = model.load_state_dict(checkpoint["state_dict"], strict=False)
        except RuntimeError as err:  # shapes that do not fit the hyperparameters it carries
            raise ValueError(f"{checkpoint_path}: its weights do not fit the model its hyperparameters describe: {err}") from None
        lost = [k for k in missing if k.startswith(("backbone.", "head.", "input_norm."))]
        if lost:
            raise ValueError(f"{checkpoint_path} lacks {len(lost)} stage-1 weights of this model, e.g. {lost[:3]}")
        return model

    @property
    def output_names(self) -> tuple[str, ...]:
        names = ("main", "stage1", "stage2")
        if self.trains_base_path:
            names += ("stage1_base", "stage2_base")
        return names + ("cropper",) if self.hparams.get("cropper_trainable") else names

    def classify_crops(self, crops: Tensor):
        """Stage 2 on ``crops (B, 3, S, S)``: the shared classifier, or the second backbone and / or head."""
        if self.head2 is None:
            return self(crops)
        stage2_backbone = self.backbone if self.backbone2 is None else self.backbone2
        return self.head2(stage2_backbone(self.input_norm(crops)))

    def crop_frame(self, source: Tensor | None) -> Literal["view", "source"]:
        """Which frame stage 2's crop is cut from for a batch with (or without) ``source``: ``crop_from``, with
        ``auto`` resolved to ``source`` where the batch has one."""
        crop_from = self.hparams.crop_from
        if crop_from == "auto":
            return "view" if source is None else "source"
        return crop_from

    def cut_crops(self, images: Tensor, boxes: Tensor, source: Tensor | None = None) -> Tensor:
        """Stage 2's input, in the data's normalisation: ``(B, 3, S, S)``, ``S = crop_size``.

        Args:
            images: ``(B, 3, H, W)`` stage 1's view, in the data's normalisation.
            boxes: ``(B, 4)`` xyxy in pixels of ``images``.
            source: ``(B, 3, H_s, W_s)`` uint8, the same view at a higher resolution (``batch["source"]``);
                used when ``crop_from`` is ``source`` or ``auto``: the boxes are scaled to its frame and the crops
                cut from it in one ``roi_align`` call.
        """
        if self.crop_frame(source) == "view":
            if source is not None and not self._warned_unused_source:
                log.warning("the batch has a source view but model.crop_from='view': stage 2 crops from stage 1's view")
                self._warned_unused_source = True
            return crop_and_resize(images, boxes, self.crop_size)
        if source is None:
            raise ValueError("model.crop_from='source' needs batch['source']: set data.source_size")
        if source.shape[0] != images.shape[0] or source.shape[1] != images.shape[1]:
            raise ValueError(f"batch['source'] {tuple(source.shape)} does not match the images {tuple(images.shape)}")
        crops = crop_from_source(source, boxes, tuple(images.shape[-2:]), self.crop_size)
        return self.input_norm.data_from_unit(crops).to(images.dtype)

    def stage1_with_maps(self, images: Tensor) -> tuple[HeadOutput, list[Tensor]]:
        """Stage 1 that also returns the backbone's maps ``[(B, C_i, h_i, w_i), ...]`` (what ``features`` reads);
        ``images (B, 3, H, W)`` in the data's normalisation. The same computation as ``self(images)``."""
        return self.classify_with_maps(images)

    def localize(
        self,
        images: Tensor,
        source: Tensor | None = None,
        boxes: Tensor | None = None,
        stage1: tuple[HeadOutput, list[Tensor]] | None = None,
    ) -> CropOutput:
        """The localiser alone: ``images (B, 3, H, W)`` (data normalisation) -> crops (data normalisation,
        from ``source`` when :meth:`crop_frame` says so), boxes in ``images`` pixels, response maps ``(B, H, W)``
        (and the trainable ViT's logits).

        Args:
            images: stage 1's view.
            source: ``batch["source"]`` (see :meth:`cut_crops`).
            boxes: ``batch["box"]``, read by ``ground_truth`` only.
            stage1: ``(output, maps)`` of :meth:`stage1_with_maps` on ``images`` when already computed
                (``features`` reads them instead of running stage 1 again).
        """
        size = tuple(images.shape[-2:])
        if self.cropper is not None:
            found = self.cropper.locate(self.cropper_norm(images))  # the crop is cut below, from the data
        elif self.feature_localizer is not None:
            found = self.localize_from_features(images, stage1, source)
        else:
            response, gt_boxes = ground_truth_localization(boxes, size)
            found = CropOutput(None, gt_boxes, response, None)
        return found._replace(crops=self.cut_crops(images, found.boxes, source))

    def localize_from_features(
        self,
        images: Tensor,
        stage1: tuple[HeadOutput, list[Tensor]] | None = None,
        source: Tensor | None = None,
    ) -> CropOutput:
        """``features``: the response map and box from the stage-1 network's maps (``crops`` left ``None``).

        With ``localize_size`` the stage-1 backbone runs once more, without gradients, on the view resized so
        that its longer side is ``localize_size`` (a finer map: 14x14 instead of 7x7 for a stride-32 CNN at
        448 vs 224 px); the view is read from ``source`` (the same view at a higher resolution, uint8) where
        the batch has one, else from ``images``. Without ``localize_size`` stage 1's own maps are read (free)."""
        size = tuple(images.shape[-2:])
        side = self.hparams.localize_size
        if side is not None and (side != max(size) or source is not None):
            view = images
            if source is not None:
                view = self.input_norm.data_from_unit(source.float() / 255.0).to(images.dtype)
            scale = side / max(view.shape[-2:])
            target = (round(view.shape[-2] * scale), round(view.shape[-1] * scale))
            resized = view if target == tuple(view.shape[-2:]) else F.interpolate(
                view, size=target, mode="bilinear", align_corners=False, antialias=scale < 1)
            with torch.no_grad():
                stage1 = self.stage1_with_maps(resized)
        elif stage1 is None:
            stage1 = self.stage1_with_maps(images)
        output, maps = stage1
        response, boxes = self.feature_localizer(maps, size, self.head, output.logits)
        return CropOutput(None, boxes, response, None)

    def forward_outputs(self, images: Tensor, batch: dict[str, Any] | None = None) -> tuple[dict[str, Tensor], Tensor, dict[str, Tensor]]:
        batch = batch or {}
        keep = self.keeps_localization and self.training
        if self.feature_localizer is not None or keep:
            stage1_pair = self.stage1_with_maps(images)
            stage1 = stage1_pair[0]
        else:
            stage1_pair, stage1 = None, self(images)
        extras = {"last_map": stage1_pair[1][-1]} if keep else {}  # keep_loc on stage 1's view
        crop = self.localize(images, batch.get("source"), batch.get("box"), stage1=stage1_pair)
        stage2 = self.classify_crops(crop.crops)
        if self.hparams.merge == "mean_prob":
            probs = (stage1.logits.float().softmax(-1) + stage2.logits.float().softmax(-1)) / 2
            merged = probs.clamp_min(1e-12).log()  # log-probabilities: argmax and CE behave as logits
        else:
            merged = stage1.logits + stage2.logits
        logits = {"main": merged, "stage1": stage1.logits, "stage2": stage2.logits}
        if self.trains_base_path:
            logits.update(stage1_base=stage1.base_logits, stage2_base=stage2.base_logits)
        if crop.logits is not None:
            logits["cropper"] = crop.logits
        return logits, stage1.aux_loss + stage2.aux_loss, {"box": crop.boxes, **extras}

    def loss_terms(self, logits: dict[str, Tensor], aux_loss: Tensor, labels: Tensor) -> dict[str, Tensor]:
        hp = self.hparams
        ce = lambda name: F.cross_entropy(logits[name], labels, label_smoothing=hp.label_smoothing)  # noqa: E731
        terms = {"ce1": ce("stage1"), "ce2": hp.stage2_loss_weight * ce("stage2")}
        if "stage1_base" in logits:  # the residual heads' base paths, trained on their own (fusion_training)
            terms.update(ce1_base=ce("stage1_base"), ce2_base=hp.stage2_loss_weight * ce("stage2_base"))
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
        # compute() is collective under DDP: every rank must call it once any rank saw a box, also a
        # rank whose every image of the epoch was a skipped bad file (it would otherwise hang the rest)
        if not self.trainer.strategy.reduce_boolean_decision(metric.update_called, all=False):
            return
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*compute.*before.*update.*")
            values = metric.compute()  # reduced over ranks; NaN when no image had a ground-truth box
        if not torch.isnan(values["miou"]):
            self.log(f"{split}/box_miou", values["miou"])
            self.log(f"{split}/box_hit50", values["hit_rate"])
        metric.reset()

    def on_validation_epoch_end(self) -> None:
        self._log_box_iou("val")

    def on_test_epoch_end(self) -> None:
        self._log_box_iou("test")

    def pretrained_networks(self) -> list:
        """Stage 1's backbone and stage 2's own copy, if any (the ViT cropper has its own recipe)."""
        return super().pretrained_networks() + ([self.backbone2] if self.backbone2 is not None else [])

    def optimizer_parameters(self) -> list[tuple[str, list[nn.Parameter]]]:
        """Stage 1's roles, a second stage's backbone and head in the same roles, and a trainable ViT cropper
        (with its own classification head) in ``classifier``, at the head's lr."""
        roles = super().optimizer_parameters()
        if self.backbone2 is not None:
            roles.append(("backbone", list(self.backbone2.parameters())))
        if self.head2 is not None:
            roles += head_parameter_roles(self.head2)
        if self.hparams.cropper_trainable:
            roles.append(("classifier", list(self.cropper.parameters())))
        return roles
