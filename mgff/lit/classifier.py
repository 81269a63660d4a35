"""Single-stage fine-grained classifier: a timm backbone's stage maps -> a head (linear or MGFF).

What to compute lives here; where data comes from is the DataModule's business. ``num_classes`` and
``class_names`` are linked from the DataModule by the CLI, never written in a config.
"""

from __future__ import annotations

import inspect
import logging
from pathlib import Path
from typing import IO, Any, Literal, Sequence

import lightning as L
import torch
import torch.nn.functional as F
from timm.layers import freeze_batch_norm_2d
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from mgff.lit.checkpoint import class_order_map, plain_hyperparameters, resolve_model_class
from mgff.lit.keep_localization import FrozenReference, energy_correlation_loss
from mgff.metrics.parent_accuracy import ParentAccuracy
from mgff.lit.optim import GroupRecipe, build_optimizer, group_lr_factors, head_parameter_roles, layer_lr_scales, param_groups
from mgff.models.backbone import TimmBackbone
from mgff.models.fusion import MGFFHead
from mgff.models.heads import HeadOutput, LinearHead
from mgff.models.normalization import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, InputNormalization
from mgff.models.pretrained import pretrained_weights_skipped, skip_pretrained_weights

log = logging.getLogger("mgff")

# hyperparameters that fix the shape of the weights: a checkpoint must agree on them to load
ARCHITECTURE_KEYS = (
    "backbone", "head", "num_classes", "stages", "stage_inputs", "align_last", "fusion_dim", "attention", "use_attention", "use_se", "use_gcn",
    "graph_nodes", "fusion_residual", "shared_classifier", "shared_head", "bn_mode",
)
BN_MODES = ("train", "eval", "frozen")
# what a checkpoint saved before an architecture key existed was trained with, for the heads the key applies to
LEGACY_DEFAULTS = {"fusion_residual": ("mgff", False)}


def with_legacy_defaults(hparams: dict[str, Any]) -> dict[str, Any]:
    """``hparams`` of a checkpoint plus the values of :data:`LEGACY_DEFAULTS` it predates (a checkpoint of the
    MGFF head from before ``fusion_residual`` holds the plain head and loads as one)."""
    out = dict(hparams)
    for key, (head, value) in LEGACY_DEFAULTS.items():
        if key not in out and out.get("head", head) == head:
            out[key] = value
    return out


class FineGrainedClassifier(L.LightningModule):
    """Backbone + head, trained with cross-entropy (+ the head's weighted auxiliary loss).

    Args:
        num_classes: number of classes (linked from ``data.num_classes``).
        class_names: class names, index = label (linked from ``data.class_names``; used by predict).
        class_parents: parent id of each class (linked from ``data.class_parents`` where the dataset has a
            hierarchy, e.g. NA-Birds); adds ``<split>/parent_acc``.
        backbone: any timm model name (Swin, ConvNeXt, ResNet, ViT, the mgff zoo's UniFormer/LiTv2...).
        pretrained: ``True`` for timm's hub weights, a path for a local ``.safetensors``/``.pth`` file.
        img_size: input size the backbone is built for (Swin/ViT need it when it is not their default).
        backbone_kwargs: further timm ``create_model`` arguments (e.g. ``window_size``, ``drop_path_rate``).
        backbone_mean / backbone_std: the input normalisation the backbone's weights expect (``None``: its timm
            ``pretrained_cfg``; set both for a local file of another convention, e.g. ``[0.5, 0.5, 0.5]``).
            Saved in checkpoints (:class:`~mgff.models.normalization.InputNormalization`).
        data_mean / data_std: how the batches are normalised (linked from ``data.mean``/``data.std``); the
            model converts them to the backbone's normalisation.
        stages: backbone stages fed to the head (``[1, 2, 3]``: the last three, as the paper's 4x4/2x2/1x1
            convs; ``[0, 1, 2, 3]`` for all four). The linear head uses the last one.
        head: ``mgff`` (multi-granularity fusion) or ``linear`` (norm + average pool + linear).
        fusion_residual: the MGFF head starts as the linear head and adds the fused path through a
            zero-initialised classifier, each fusion step a residual (``mgff/models/fusion.py``); ``false`` is
            the plain head (the fused readout alone). Checkpoints saved before this option load as ``false``.
        fusion_layer_scale: initial scale of the residual head's attention, SE and GCN branches.
        fusion_training: how the residual head's two paths are trained: ``joint`` (one cross-entropy on their
            sum) or ``detached_base`` (the base path, the linear head inside, by its own cross-entropy ``ce_base``;
            the fused path by the cross-entropy of the sum with the base path's logits held fixed; see
            ``mgff/models/fusion.py``). ``detached_base`` also logs ``<split>/base_acc``, the base path alone.
        fusion_dim: width every stage is projected to.
        attention: spatial attention of the fusion head: ``mhsa`` (relative position), ``hilo``, ``acmix``.
        num_heads: heads of that attention.
        use_attention / use_se / use_gcn: ablation switches of the fusion head.
        se_reduction: squeeze-and-excitation reduction ``r``.
        graph_nodes: ``concat`` (one node per position, scales concatenated) or ``per_scale``.
        gcn_layers: number of GCN layers.
        adjacency: ``similarity``, ``learned`` or ``both``.
        pool: super-node pooling, ``mincut`` or ``diffpool``.
        num_super_nodes: number of super-nodes ``K``.
        dropout: dropout before the classifier.
        aux_loss_weight: weight of the pooling's auxiliary losses in the training loss.
        label_smoothing: cross-entropy label smoothing.
        keep_localization_weight: weight of ``keep_loc``, ``1 -`` the correlation of the last map's activation energy
            with that of the backbone's initial (pretrained) weights on the same training images
            (:mod:`mgff.lit.keep_localization`): keeps the ``features`` localiser's boxes from the model's own maps
            while it fine-tunes; a frozen reference copy of the backbone runs in training only (never saved).
            ``0`` (the default): off. Not in the paper.
        optimizer: ``sgd`` or ``adamw``.
        lr: learning rate of the backbone.
        head_lr_scale: the classifier's lr is ``lr * head_lr_scale`` (the linear head's norm + linear layer, the
            same base path inside the residual MGFF head), and the fusion layers' unless ``fusion_lr_scale`` is set. The three parameter roles (``backbone``, ``fusion``, ``classifier``) are defined in
            :mod:`mgff.lit.optim`; every norm inside the fusion path is ``fusion``.
        fusion_lr_scale: the fusion layers' lr is ``lr * fusion_lr_scale`` (``None``: ``head_lr_scale``).
        momentum / nesterov: SGD momentum.
        weight_decay: weight decay of the backbone, and of the other roles unless set below (never on biases,
            norm weights and layer scales).
        fusion_weight_decay / classifier_weight_decay: those roles' weight decay (``None``: ``weight_decay``).
        warmup_epochs: linear warmup length in epochs (fractions allowed with ``scheduler_interval: step``), then cosine
            decay; for the backbone, and for the other roles unless set below.
        fusion_warmup_epochs / classifier_warmup_epochs: those roles' warmup (``None``: ``warmup_epochs``); each role's lr
            has its own factor, so fresh layers can warm up while the backbone and classifier train at full lr.
        min_lr_ratio: the cosine schedule ends at ``lr * min_lr_ratio``.
        scheduler_interval: ``epoch`` (the paper: "调整每轮的学习率", the lr is set once per epoch) or ``step``
            (the cosine and warmup advance every step).
        stage_inputs: backbone stages whose input map (after their patch merging) is also fused; the
            paper's reading is ``stage_inputs: [1, 2, 3]`` with ``stages: [3]`` (see ``mgff/models/fusion.py``).
        align_last: the MGFF head's conv on the last map; ``false`` feeds it as it is (the paper's
            "最后一层除外"), then ``fusion_dim`` must equal its channels.
        bn_mode: what the pretrained backbone's BatchNorm layers do while training: ``train`` (batch statistics,
            running statistics updated: PyTorch's default), ``eval`` (held in eval mode: the loaded running statistics
            normalise every batch and never move; the affine weights train) or ``frozen`` (timm's
            ``freeze_batch_norm_2d``: statistics and affine weights fixed, as ``FrozenBatchNorm2d``). Concerns
            backbones with BatchNorm (EfficientNet, ResNet, ConvNeXt-free CNNs, UniFormer's convolutional stages);
            Swin and ViT use LayerNorm and are the same under all three. The head's own norms always train.
        freeze_backbone_epochs: train the head alone for this many first epochs (linear probing, then fine-tuning:
            LP-FT): the backbone runs in eval mode without gradients (weights and BatchNorm statistics stay as loaded),
            its parameters stay in the optimiser's ``backbone`` role with lr 0, and that role's warmup and cosine run
            from the unfreeze to the end. Under DDP it needs ``strategy: ddp_find_unused_parameters_true``.
        layer_decay: layer-wise lr decay of the backbone (timm's ``param_groups_layer_decay``): the last layer trains
            at ``lr``, each earlier one at ``layer_decay`` times the next (EfficientNet-Lite0 at 0.75: the stem at
            about 0.01x). ``None``: one lr for the whole backbone.
        channels_last: run the backbone in channels-last memory format (faster convs on GPU).
        compile: ``torch.compile`` the network's forward.
    """

    @property
    def trains_base_path(self) -> bool:
        """The residual head's base path has a loss of its own (``fusion_training='detached_base'``)."""
        return self.hparams.get("fusion_training", "joint") == "detached_base"

    @property
    def output_names(self) -> tuple[str, ...]:
        """The predictions that get a loss and metrics: ``main``, and ``base`` (the residual head's base path) when it
        is trained on its own."""
        return ("main", "base") if self.trains_base_path else ("main",)

    def __init__(
        self,
        num_classes: int,
        class_names: list[str] | None = None,
        class_parents: list[int] | None = None,
        backbone: str = "swin_base_patch4_window12_384",
        pretrained: bool | str = False,
        img_size: int | None = None,
        backbone_kwargs: dict[str, Any] | None = None,
        backbone_mean: Sequence[float] | None = None,
        backbone_std: Sequence[float] | None = None,
        data_mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
        data_std: Sequence[float] = IMAGENET_DEFAULT_STD,
        stages: Sequence[int] = (1, 2, 3),
        head: Literal["mgff", "linear"] = "mgff",
        fusion_residual: bool = True,
        fusion_layer_scale: float = 0.1,
        fusion_training: Literal["joint", "detached_base"] = "joint",
        fusion_dim: int = 256,
        attention: Literal["mhsa", "hilo", "acmix"] = "mhsa",
        num_heads: int = 8,
        use_attention: bool = True,
        use_se: bool = True,
        se_reduction: int = 16,
        use_gcn: bool = True,
        graph_nodes: Literal["concat", "per_scale"] = "concat",
        gcn_layers: int = 2,
        adjacency: Literal["similarity", "learned", "both"] = "similarity",
        pool: Literal["mincut", "diffpool"] = "mincut",
        num_super_nodes: int = 8,
        dropout: float = 0.1,
        aux_loss_weight: float = 0.1,
        label_smoothing: float = 0.0,
        keep_localization_weight: float = 0.0,
        optimizer: Literal["sgd", "adamw"] = "sgd",
        lr: float = 2e-4,
        head_lr_scale: float = 1.0,
        fusion_lr_scale: float | None = None,
        momentum: float = 0.9,
        nesterov: bool = False,
        weight_decay: float = 5e-4,
        fusion_weight_decay: float | None = None,
        classifier_weight_decay: float | None = None,
        warmup_epochs: float = 0.0,
        fusion_warmup_epochs: float | None = None,
        classifier_warmup_epochs: float | None = None,
        min_lr_ratio: float = 0.0,
        scheduler_interval: Literal["epoch", "step"] = "epoch",
        stage_inputs: Sequence[int] = (),
        align_last: bool = True,
        bn_mode: Literal["train", "eval", "frozen"] = "train",
        freeze_backbone_epochs: int = 0,
        layer_decay: float | None = None,
        channels_last: bool = False,
        compile: bool = False,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"model.num_classes must be at least 2, got {num_classes}")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"model.class_names has {len(class_names)} names for num_classes={num_classes}")
        if head not in ("mgff", "linear"):
            raise ValueError(f"model.head must be 'mgff' or 'linear', got {head!r}")
        if fusion_training not in ("joint", "detached_base"):
            raise ValueError(f"model.fusion_training must be 'joint' or 'detached_base', got {fusion_training!r}")
        if fusion_training == "detached_base" and not (head == "mgff" and fusion_residual):
            raise ValueError(f"model.fusion_training='detached_base' trains the residual MGFF head's base path: needs head='mgff' and "
                             f"fusion_residual=true (got head={head!r}, fusion_residual={fusion_residual})")
        if optimizer not in ("sgd", "adamw"):
            raise ValueError(f"model.optimizer must be 'sgd' or 'adamw', got {optimizer!r}")
        if keep_localization_weight < 0:
            raise ValueError(f"model.keep_localization_weight must be >= 0, got {keep_localization_weight}")
        if bn_mode not in BN_MODES:
            raise ValueError(f"model.bn_mode must be one of {BN_MODES}, got {bn_mode!r}")
        if int(freeze_backbone_epochs) != freeze_backbone_epochs or freeze_backbone_epochs < 0:
            raise ValueError(f"model.freeze_backbone_epochs must be a whole number of epochs >= 0, got {freeze_backbone_epochs}")
        if layer_decay is not None and not 0.0 < layer_decay <= 1.0:
            raise ValueError(f"model.layer_decay must be in (0, 1] or null, got {layer_decay}")
        self.save_hyperparameters()
        try:
            self.backbone = self.build_backbone()
        except AssertionError as err:  # timm's feature_take_indices asserts on an index out of range
            if "out of range" not in str(err):
                raise
            keys = "model.init_args.stages" + (" / model.init_args.stage_inputs" if self.hparams.get("stage_inputs") else "")
            raise ValueError(f"{keys} = {list(stages)} does not fit backbone {backbone!r}: {err}") from err
        self.input_norm = InputNormalization(self.backbone, "model.backbone", data_mean, data_std, backbone_mean, backbone_std, pretrained)
        self.head = self.build_head(self.backbone.feature_channels, self.backbone.feature_reductions, num_classes)
        if class_parents is not None and len(class_parents) != num_classes:
            raise ValueError(f"model.class_parents has {len(class_parents)} entries for num_classes={num_classes}")
        self._compiled_net = None
        self._compiled_with_maps = None
        # the backbone as built (its pretrained weights), the reference of keep_loc; none when built to load a checkpoint
        self._localization_reference = None
        if keep_localization_weight > 0 and not pretrained_weights_skipped():
            if not pretrained:
                log.warning("model.keep_localization_weight keeps the maps of the backbone's initial weights, and "
                            "model.pretrained is false: the reference is a random initialisation")
            self._localization_reference = FrozenReference(self.backbone)
        # keys "<split>_<output>" ("train" alone would shadow nn.Module.train)
        self.metrics = nn.ModuleDict(
            {f"{split}_{name}": accuracy_metrics(num_classes, class_parents) for split in ("train", "val", "test") for name in self.output_names}
        )

    def check_input_size(self, size: int, key: str) -> None:
        """Refuse, naming the config ``key``, an input side ``size`` the backbone cannot take: Swin and ViT
        are built for one ``img_size`` (timm's ``strict_img_size``) and would fail in an assertion mid-run."""
        patch_embed = getattr(getattr(self.backbone, "model", None), "patch_embed", None)
        fixed = getattr(patch_embed, "img_size", None) if getattr(patch_embed, "strict_img_size", False) else None
        if fixed is not None and tuple(fixed) != (size, size):
            raise ValueError(
                f"{key} = {size} does not match the {fixed[0]}x{fixed[1]} input the backbone {self.hparams.backbone!r} is built for "
                f"(model.init_args.img_size = {self.hparams.img_size}); set them equal"
            )

    # ----- network ------------------------------------------------------------------------------
    def build_backbone(self) -> TimmBackbone:
        """The timm backbone returning the maps the head fuses (``stages``, ``stage_inputs``), from the hparams."""
        hp = self.hparams
        backbone = TimmBackbone(
            hp.backbone,
            out_indices=tuple(hp.stages),
            pretrained=hp.pretrained,
            img_size=hp.img_size,
            stage_inputs=tuple(hp.get("stage_inputs", ())),
            **(hp.backbone_kwargs or {}),
        )
        if hp.get("bn_mode", "train") == "frozen":  # after the pretrained weights: their statistics are kept
            backbone = freeze_batch_norm_2d(backbone)
        return backbone

    # ----- the pretrained networks while training: BatchNorm policy and the head-first phase -------
    def pretrained_networks(self) -> list[TimmBackbone]:
        """The pretrained backbones ``bn_mode`` and ``freeze_backbone_epochs`` act on (subclasses add theirs)."""
        return [self.backbone]

    @property
    def backbone_frozen(self) -> bool:
        """The current epoch is one of the first ``freeze_backbone_epochs`` (the head trains alone)."""
        epochs = self.hparams.get("freeze_backbone_epochs", 0)
        return epochs > 0 and self._trainer is not None and self.trainer.state.fn == "fit" and self.current_epoch < epochs

    def train(self, mode: bool = True):
        """``nn.Module.train``, then the pretrained networks' policy: all of a frozen backbone in eval mode, or its
        BatchNorm layers with ``bn_mode='eval'``."""
        super().train(mode)
        if mode:
            frozen = self.backbone_frozen
            for net in self.pretrained_networks():
                if frozen:
                    net.eval()
                elif self.hparams.get("bn_mode", "train") == "eval":
                    for module in net.modules():
                        if isinstance(module, _BatchNorm):
                            module.eval()
        return self

    def on_train_epoch_start(self) -> None:
        """Enter or leave the head-first phase at the epoch's start (the epoch counter has moved by now)."""
        frozen = self.backbone_frozen
        for net in self.pretrained_networks():
            net.frozen = frozen
        self.train(self.training)

    def on_train_end(self) -> None:
        for net in self.pretrained_networks():
            net.frozen = False

    def on_fit_start(self) -> None:
        """Refuse the head-first phase under DDP without ``find_unused_parameters`` (its backbone gets no gradients,
        and DDP would fail at the second step with a message about unused parameters)."""
        if self.hparams.get("freeze_backbone_epochs", 0) > 0 and self.trainer.world_size > 1:
            ddp_kwargs = getattr(self.trainer.strategy, "_ddp_kwargs", None)
            if ddp_kwargs is not None and not ddp_kwargs.get("find_unused_parameters", False):
                raise ValueError(
                    "model.init_args.freeze_backbone_epochs > 0 leaves the backbone without gradients in the first epochs; "
                    "under DDP set trainer.strategy: ddp_find_unused_parameters_true"
                )

    def build_head(self, channels: Sequence[int], reductions: Sequence[int], num_classes: int) -> nn.Module:
        """The classification head on the backbone's stage maps (linear or MGFF, from the hparams)."""
        hp = self.hparams
        if hp.head == "linear":
            return LinearHead(channels, reductions, num_classes, dropout=hp.dropout)
        return MGFFHead(
            channels,
            reductions,
            num_classes,
            dim=hp.fusion_dim,
            attention=hp.attention,
            num_heads=hp.num_heads,
            use_attention=hp.use_attention,
            use_se=hp.use_se,
            se_reduction=hp.se_reduction,
            use_gcn=hp.use_gcn,
            nodes=hp.graph_nodes,
            gcn_layers=hp.gcn_layers,
            adjacency=hp.adjacency,
            pool=hp.pool,
            num_super_nodes=hp.num_super_nodes,
            dropout=hp.dropout,
            align_last=hp.get("align_last", True),
            residual=hp.get("fusion_residual", False),
            layer_scale=hp.get("fusion_layer_scale", 0.1),
            detach_base=hp.get("fusion_training", "joint") == "detached_base",
        )

    def backbone_input(self, images: Tensor) -> Tensor:
        """``images (B, 3, H, W)`` in the data's normalisation -> the backbone's normalisation (and memory format)."""
        images = self.input_norm(images)
        if self.hparams.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images

    def classify(self, images: Tensor) -> HeadOutput:
        """Backbone and head on ``images (B, 3, H, W)`` (in the data's normalisation) -> :class:`HeadOutput`
        (logits ``(B, C)``)."""
        images = self.backbone_input(images)
        return self.head(self.backbone(images))

    def forward(self, images: Tensor) -> HeadOutput:
        if self.hparams.compile:
            if self._compiled_net is None:
                self._compiled_net = torch.compile(self.classify)
            return self._compiled_net(images)
        return self.classify(images)

    def _classify_with_maps(self, images: Tensor) -> tuple[HeadOutput, list[Tensor]]:
        images = self.backbone_input(images)
        maps = self.backbone(images)
        return self.head(maps), maps

    def classify_with_maps(self, images: Tensor) -> tuple[HeadOutput, list[Tensor]]:
        """:meth:`classify` that also returns the backbone's maps ``[(B, C_i, h_i, w_i), ...]``; the same computation."""
        if self.hparams.compile:
            if self._compiled_with_maps is None:
                self._compiled_with_maps = torch.compile(self._classify_with_maps)
            return self._compiled_with_maps(images)
        return self._classify_with_maps(images)

    @property
    def keeps_localization(self) -> bool:
        """Training adds the ``keep_loc`` term (``keep_localization_weight > 0``)."""
        return self.hparams.get("keep_localization_weight", 0.0) > 0

    def classify_for_step(self, images: Tensor) -> tuple[HeadOutput, dict[str, Tensor]]:
        """``self(images)`` and the extras the step's loss needs: ``{"last_map": (B, C, h, w)}`` while training with
        ``keep_localization_weight``, else ``{}``."""
        if self.keeps_localization and self.training:
            out, maps = self.classify_with_maps(images)
            return out, {"last_map": maps[-1]}
        return self(images), {}

    def keep_localization_term(self, images: Tensor, last_map: Tensor) -> Tensor:
        """``keep_localization_weight x`` :func:`~mgff.lit.keep_localization.energy_correlation_loss` of
        ``last_map`` (the backbone's on ``images``) against the reference backbone's on the same ``images``."""
        if self._localization_reference is None:
            raise RuntimeError("model.keep_localization_weight compares the maps with the backbone's initial weights, and this "
                               "model was built to load a checkpoint (load_from_checkpoint), without them: train it from its "
                               "config (model.pretrained) instead")
        images = self.backbone_input(images)
        reference = self._localization_reference.last_map(images)
        return self.hparams.keep_localization_weight * energy_correlation_loss(last_map, reference)

    def forward_outputs(self, images: Tensor, batch: dict[str, Any] | None = None) -> tuple[dict[str, Tensor], Tensor, dict[str, Tensor]]:
        """All predictions of one batch: ``({name: logits (B, C)}, aux_loss, extras)``; ``main`` is the final one.
        ``batch`` holds the rest of the batch for models that use more than the images (e.g. ``source``)."""
        out, extras = self.classify_for_step(images)
        logits = {"main": out.logits}
        if self.trains_base_path:
            logits["base"] = out.base_logits
        return logits, out.aux_loss, extras

    def loss_terms(self, logits: dict[str, Tensor], aux_loss: Tensor, labels: Tensor) -> dict[str, Tensor]:
        """The weighted terms that sum to the training loss."""
        terms = {"ce": F.cross_entropy(logits["main"], labels, label_smoothing=self.hparams.label_smoothing)}
        if "base" in logits:
            terms["ce_base"] = F.cross_entropy(logits["base"], labels, label_smoothing=self.hparams.label_smoothing)
        if self.hparams.aux_loss_weight:
            terms["aux"] = self.hparams.aux_loss_weight * aux_loss
        return terms

    # ----- steps --------------------------------------------------------------------------------
    def _shared_step(self, batch: dict[str, Any], split: str) -> Tensor | None:
        if not batch:  # every image of the batch was a skipped bad image (data.on_bad_image: skip)
            if self._trainer is None or self.trainer.world_size == 1:
                return None  # nothing to learn or count; Lightning skips the step
            # Under DDP the other ranks still reduce gradients every step and logged values at the epoch's
            # end (in the order the keys were first logged): take part in both with nothing. The keys are
            # logged as below, in the same order, with weight 0 (metrics registered, not updated); a zero
            # loss reaching every trainable weight sends zero gradients (averaged in).
            zero = torch.zeros((), device=self.device)
            if split != "train":  # train/loss is not reduced over ranks (sync_dist=False)
                self.log(f"{split}/loss", zero, on_step=False, on_epoch=True, prog_bar=True, sync_dist=True, batch_size=0.0)
            placeholder = {name: torch.zeros(1, self.hparams.num_classes, device=self.device) for name in self.output_names}
            terms = self.loss_terms(placeholder, zero, torch.zeros(1, dtype=torch.long, device=self.device))
            if split == "train" and self.keeps_localization:
                terms["keep_loc"] = zero
            if len(terms) > 1:
                for name in terms:
                    self.log(f"{split}/loss_{name}", zero, on_step=False, on_epoch=True, sync_dist=True, batch_size=0.0)
            for name in self.output_names:
                prefix = f"{split}/" if name == "main" else f"{split}/{name}_"
                metrics = self.metrics[f"{split}_{name}"]
                self.log_dict({prefix + k: m for k, m in metrics.items()}, on_step=False, on_epoch=True, prog_bar=name == "main" and split != "train", batch_size=0.0)
            return sum(p.sum() for p in self.parameters() if p.requires_grad) * 0.0 if split == "train" else None
        labels = batch["label"]
        logits, aux_loss, extras = self.forward_outputs(batch["image"], batch)
        terms = self.loss_terms(logits, aux_loss, labels)
        if "last_map" in extras:  # training with keep_localization_weight
            terms["keep_loc"] = self.keep_localization_term(batch["image"], extras.pop("last_map"))
        if split == "train":  # named by StopOnNonFiniteLoss when the loss is not finite
            self.last_loss_terms = {name: value.detach() for name, value in terms.items()}
        loss = torch.stack(list(terms.values())).sum()
        # a float: Lightning keeps the count of a logged mean in an integer tensor when given an int, and its
        # mean over ranks truncates it (1 image + 0 on a rank whose batch was skipped -> 0 -> val/loss inf)
        batch_size = float(labels.shape[0])
        on_step = split == "train"
        self.log(f"{split}/loss", loss, on_step=on_step, on_epoch=True, prog_bar=True, sync_dist=not on_step, batch_size=batch_size)
        if len(terms) > 1:
            for name, value in terms.items():
                self.log(f"{split}/loss_{name}", value, on_step=False, on_epoch=True, sync_dist=True, batch_size=batch_size)
        for name, out in logits.items():
            metrics = self.metrics[f"{split}_{name}"]
            metrics.update(out.detach().float(), labels)
            prefix = f"{split}/" if name == "main" else f"{split}/{name}_"
            self.log_dict({prefix + k: m for k, m in metrics.items()}, on_step=False, on_epoch=True, prog_bar=name == "main" and split != "train", batch_size=batch_size)
        self.log_extras(extras, batch, split)
        return loss

    def log_extras(self, extras: dict[str, Tensor], batch: dict[str, Any], split: str) -> None:
        """Hook for subclasses to log metrics of their extra outputs (e.g. the cropper's boxes)."""

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor | None:
        return self._shared_step(batch, "train")

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._shared_step(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._shared_step(batch, "test")

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        """Per image: ``index``, ``path``, ``pred`` and its ``prob``, ``probs`` ``(B, C)`` over the classes (in the
        order of ``hparams.class_names``); ``label`` (ground truth) and ``error`` (a file that could not be
        decoded) when the batch has them; plus extras (the two-stage model's ``box`` ``(B, 4)`` in input pixels,
        and ``photo_box`` in the photo's own pixels when the batch says how the input was cut from it)."""
        if not batch:
            return {}
        logits, _, extras = self.forward_outputs(batch["image"], batch)
        probs = logits["main"].float().softmax(dim=-1)
        prob, pred = probs.max(dim=-1)
        out = {"index": batch["index"], "path": batch["path"], "pred": pred, "prob": prob, "probs": probs, **extras}
        out.update({k: batch[k] for k in ("label", "error") if k in batch})
        if "box" in extras and "input_to_photo" in batch:
            out["photo_box"] = input_box_to_photo(extras["box"], batch["input_to_photo"])
        return out

    # ----- optimisation -------------------------------------------------------------------------
    def optimizer_parameters(self) -> list[tuple[str, list[nn.Parameter]]]:
        """``(role, parameters)`` pairs to optimise (roles of :mod:`mgff.lit.optim`); subclasses add theirs."""
        return [("backbone", list(self.backbone.parameters())), *head_parameter_roles(self.head)]

    def group_recipes(self) -> dict[str, GroupRecipe]:
        """lr, weight decay and warmup of each parameter role, from the hparams (see the class docstring)."""
        hp = self.hparams
        default = lambda key, fallback: fallback if hp.get(key) is None else hp.get(key)  # noqa: E731
        return {
            "backbone": GroupRecipe(hp.lr, hp.weight_decay, hp.warmup_epochs, float(hp.get("freeze_backbone_epochs", 0))),
            "fusion": GroupRecipe(
                hp.lr * default("fusion_lr_scale", hp.head_lr_scale), default("fusion_weight_decay", hp.weight_decay),
                default("fusion_warmup_epochs", hp.warmup_epochs),
            ),
            "classifier": GroupRecipe(
                hp.lr * hp.head_lr_scale, default("classifier_weight_decay", hp.weight_decay), default("classifier_warmup_epochs", hp.warmup_epochs)
            ),
        }

    def optimizer_param_groups(self) -> list[dict]:
        """The optimiser's parameter groups: every trainable parameter once, in the group of its role (and, with
        ``layer_decay``, of its backbone layer's lr scale)."""
        scales: dict[int, float] = {}
        if self.hparams.get("layer_decay") is not None:
            for net in self.pretrained_networks():
                scales.update(layer_lr_scales(net.model, self.hparams.layer_decay))
        return param_groups(self.optimizer_parameters(), self.group_recipes(), scales)

    def configure_optimizers(self):
        hp = self.hparams
        groups = self.optimizer_param_groups()
        optimizer = build_optimizer(hp.optimizer, groups, hp.lr, hp.momentum, hp.nesterov)
        factors, interval = group_lr_factors(
            groups, hp.get("scheduler_interval", "epoch"), self.trainer.estimated_stepping_batches, self.trainer.max_epochs, hp.min_lr_ratio
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factors)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": interval}}

    # ----- checkpoints --------------------------------------------------------------------------
    @classmethod
    def load_from_checkpoint(
        cls,
        checkpoint_path: str | Path | IO,
        map_location: Any = "cpu",
        hparams_file: str | Path | None = None,
        strict: bool | None = None,
        weights_only: bool | None = None,
        **kwargs: Any,
    ):
        """The model a checkpoint holds, safe for a checkpoint from anywhere and independent of the files
        it was first built from.

        Unlike Lightning's: the hyperparameters must be plain values (:func:`~mgff.lit.checkpoint.plain_hyperparameters`)
        and the model is built by calling ``cls`` on them -- never through jsonargparse or an ``_instantiator``
        the checkpoint names, so no object the checkpoint names is built; and the initial ``pretrained`` /
        ``cropper_pretrained`` weights are not loaded (the checkpoint's weights replace them), so a moved
        weights file or an offline node does not matter. ``kwargs`` override hyperparameters, as in Lightning.
        """
        from lightning.fabric.utilities.cloud_io import _load as pl_load
        from lightning.pytorch.core.saving import load_hparams_from_yaml

        source = str(checkpoint_path) if isinstance(checkpoint_path, (str, Path)) else "checkpoint"
        checkpoint = pl_load(checkpoint_path, map_location=map_location, weights_only=True if weights_only is None else weights_only)
        if hparams_file is not None:
            checkpoint["hyper_parameters"] = load_hparams_from_yaml(hparams_file, use_omegaconf=False)
        hparams = with_legacy_defaults(plain_hyperparameters(checkpoint.get("hyper_parameters", {}), source))
        class_path = hparams.pop("_class_path", None)
        if class_path is not None:
            resolve_model_class(class_path, FineGrainedClassifier, source)
        hparams.update(kwargs)
        accepted = _init_parameters(cls)
        with skip_pretrained_weights():
            model = cls(**{k: v for k, v in hparams.items() if k in accepted})
        model.on_load_checkpoint(checkpoint)
        model.load_state_dict(checkpoint["state_dict"], strict=True if strict is None else strict)
        return model

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint of another architecture or class count with an error naming both, or one
        trained on other classes (listing them); adopt its class order when only the order differs."""
        saved = with_legacy_defaults(plain_hyperparameters(checkpoint.get("hyper_parameters", {}), "checkpoint"))
        saved_names, current_names = saved.get("class_names"), self.hparams.get("class_names")
        if saved_names is not None and current_names is not None:
            data_names = self._data_class_names or list(current_names)
            class_order_map(saved_names, data_names, "checkpoint")  # raises on another set of classes
        check_compatible_hparams(type(self).__name__, dict(self.hparams), saved)
        if saved_names is not None and current_names is not None and list(saved_names) != list(current_names):
            self.hparams.class_names = list(saved_names)
            if self.hparams.get("class_parents") is not None and saved.get("class_parents") is not None:
                self.hparams.class_parents = list(saved["class_parents"])
            self._match_data_classes(data_names)

    # ----- class order --------------------------------------------------------------------------
    _data_class_names: list[str] | None = None
    _label_map: Tensor | None = None

    def setup(self, stage: str) -> None:
        """Compare the DataModule's class names with the model's (see :meth:`_match_data_classes`)."""
        names = getattr(getattr(self.trainer, "datamodule", None), "class_names", None)
        if names is not None and self.hparams.get("class_names") is not None:
            self._match_data_classes(list(names), "the model")

    def _match_data_classes(self, data_names: list[str], source: str = "checkpoint") -> None:
        """Map the data's labels to the model's outputs: same names in another order are remapped (and
        said so), another set of names is refused with the differences listed (``source`` names the model's side)."""
        self._data_class_names = list(data_names)
        model_names = list(self.hparams.class_names)
        mapping = class_order_map(model_names, data_names, source)
        if mapping is None:
            self._label_map = None
            return
        self._label_map = torch.as_tensor(mapping, dtype=torch.long)
        moved = [f"{name!r}: data {i} -> model {j}" for i, (name, j) in enumerate(zip(data_names, mapping)) if i != j]
        log.warning(
            "the model's classes come in another order than the data's: the data's labels are remapped to the model's "
            "(%d of %d classes move: %s%s); names in predictions are the model's",
            len(moved), len(mapping), ", ".join(moved[:5]), ", ..." if len(moved) > 5 else "",
        )
        parents = self.hparams.get("class_parents")
        if parents is not None:
            for metrics in self.metrics.values():
                if "parent_acc" in metrics:
                    metrics["parent_acc"].parent_of.copy_(torch.as_tensor(list(parents), dtype=torch.long))

    def _remap_labels(self, batch: Any) -> None:
        """Labels in the model's class order (when the data lists the same classes in another order), in place."""
        if self._label_map is not None and isinstance(batch, dict) and "label" in batch:
            labels = batch["label"]
            mapping = self._label_map.to(labels.device)
            batch["label"] = torch.where(labels >= 0, mapping[labels.clamp_min(0)], labels)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._remap_labels(batch)

    def on_validation_batch_start(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._remap_labels(batch)

    def on_test_batch_start(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._remap_labels(batch)

    def on_predict_batch_start(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._remap_labels(batch)


def accuracy_metrics(num_classes: int, class_parents: Sequence[int] | None = None) -> MetricCollection:
    """Top-1 and top-5 (or top-``C`` for fewer classes) accuracy, micro-averaged, reduced over ranks;
    plus ``parent_acc`` when the classes have parents."""
    metrics = {
        "acc": MulticlassAccuracy(num_classes, top_k=1, average="micro"),
        "acc5": MulticlassAccuracy(num_classes, top_k=min(5, num_classes), average="micro"),
    }
    if class_parents is not None:
        metrics["parent_acc"] = ParentAccuracy(class_parents)
    return MetricCollection(metrics)


def check_compatible_hparams(model_name: str, current: dict[str, Any], saved: dict[str, Any]) -> None:
    """Raise ``ValueError`` naming every architecture hyperparameter on which a checkpoint differs,
    and the model class when the checkpoint was saved by another one (the CLI stores ``_class_path``)."""
    saved_class = str(saved.get("_class_path", "")).rsplit(".", 1)[-1]
    if saved_class and saved_class != model_name:
        raise ValueError(f"checkpoint was saved by a {saved_class} ({saved['_class_path']}), not by this {model_name}")
    diffs = []
    for key in ARCHITECTURE_KEYS:
        if key in saved and key in current and _normalise(saved[key]) != _normalise(current[key]):
            diffs.append(f"{key}: checkpoint {saved[key]!r} vs this model {current[key]!r}")
    if diffs:
        raise ValueError(f"checkpoint does not fit this {model_name}: " + "; ".join(diffs))


def input_box_to_photo(boxes: Tensor, input_to_photo: Tensor) -> Tensor:
    """Boxes ``(B, 4)`` ``(x1, y1, x2, y2)`` in input pixels -> the photo's pixels, by the per-image affine map
    ``input_to_photo (B, 4)`` = ``(scale_x, scale_y, offset_x, offset_y)``: ``photo = input * scale + offset``."""
    m = input_to_photo.to(boxes.device, torch.float32)
    scale, offset = m[:, [0, 1, 0, 1]], m[:, [2, 3, 2, 3]]
    return boxes.float() * scale + offset


def _init_parameters(cls: type) -> set[str]:
    """Names ``cls(...)`` accepts, following ``**kwargs`` up to the parent classes that take them."""
    names: set[str] = set()
    for klass in cls.__mro__:
        if "__init__" not in vars(klass) or klass is L.LightningModule:
            continue
        params = inspect.signature(klass.__init__).parameters.values()
        names |= {p.name for p in params if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and p.name != "self"}
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            break
    return names


def _normalise(value):
    return list(value) if isinstance(value, (tuple, list)) else value
