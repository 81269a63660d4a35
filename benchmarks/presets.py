"""The models the benchmarks measure: presets of backbone, head and cropper, built as the CLI builds them.

Three models per backbone, from the cheapest to the full paper model:

``linear``     :class:`~mgff.lit.FineGrainedClassifier` with ``head="linear"`` (the paper's baseline)
``mgff``       :class:`~mgff.lit.FineGrainedClassifier` with the MGFF fusion head (single stage)
``two_stage``  :class:`~mgff.lit.TwoStageClassifier`: ViT cropper + the ``mgff`` classifier run on the
               image and on the crop (shared weights, as in ``experiments/cub.yaml``)

Presets:

``paper``  the model section of ``experiments/cub.yaml`` as it stands (Swin-B 384 + MGFF head, ViT-B/16
           localising at 224, crops at 384), with ``pretrained`` off (weights do not change the cost).
``tiny``   CPU-sized stand-ins with the same structure: a tiny Swin (the test suite's, 96 px) and
           ``resnet10t`` (a CNN, where channels-last matters), each with a small MGFF head and a
           4-block ``vit_tiny_patch16_224`` cropper at 96 px.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import timm.layers
import yaml

from mgff.lit import FineGrainedClassifier, TwoStageClassifier

__all__ = [
    "ATTENTION_CHOICES", "MODEL_KINDS", "PRESETS", "REPO_ROOT", "backbones", "build_model", "image_size", "preset_kwargs",
    "set_timm_attention",
]

REPO_ROOT = Path(__file__).resolve().parents[1]
PAPER_CONFIG = REPO_ROOT / "experiments" / "cub.yaml"
MODEL_KINDS = ("linear", "mgff", "two_stage")
PRESETS = ("tiny", "paper")
ATTENTION_CHOICES = ("default", "fused")
NUM_CLASSES = 200  # CUB-200-2011

_TINY_HEAD = dict(
    head="mgff", fusion_dim=64, attention="mhsa", num_heads=4, graph_nodes="concat", gcn_layers=2,
    adjacency="similarity", pool="mincut", num_super_nodes=8, dropout=0.1, aux_loss_weight=0.1,
)
_TINY_CROPPER = dict(
    cropper="vit_tiny_patch16_224", cropper_kwargs=dict(depth=4), localize_size=96, crop_size=96,
    localization="rollout", box_threshold="mean", box_mode="largest", merge="mean_prob",
)
_TINY = {
    "swin": dict(
        backbone="swin_base_patch4_window12_384",
        img_size=96,
        backbone_kwargs=dict(window_size=6, embed_dim=24, depths=(1, 1, 2, 1), num_heads=(1, 2, 3, 4)),
        stages=(1, 2, 3),
        **_TINY_HEAD,
        **_TINY_CROPPER,
    ),
    "resnet10t": dict(
        backbone="resnet10t",
        img_size=96,  # dropped by TimmBackbone for CNNs; sets the crop size and the input size here
        stages=(-3, -2, -1),  # reductions 8, 16, 32: the last three, as Swin's (1, 2, 3)
        **_TINY_HEAD,
        **_TINY_CROPPER,
    ),
}


def _paper_kwargs() -> dict[str, Any]:
    """``model.init_args`` of ``experiments/cub.yaml``, weights off."""
    config = yaml.safe_load(PAPER_CONFIG.read_text())
    kwargs = dict(config["model"]["init_args"])
    kwargs.update(pretrained=False, cropper_pretrained=False)
    return kwargs


def preset_kwargs(preset: str) -> dict[str, dict[str, Any]]:
    """``{backbone label: TwoStageClassifier kwargs}`` of a preset (``num_classes`` not included)."""
    if preset == "tiny":
        return {label: dict(kwargs) for label, kwargs in _TINY.items()}
    if preset == "paper":
        kwargs = _paper_kwargs()
        return {_label(kwargs["backbone"]): kwargs}
    raise ValueError(f"unknown preset {preset!r}; choose one of {PRESETS}")


def _label(backbone: str) -> str:
    return "swin_b_384" if backbone == "swin_base_patch4_window12_384" else backbone


def backbones(preset: str) -> list[str]:
    """Backbone labels of a preset (``tiny``: ``swin``, ``resnet10t``; ``paper``: ``swin_b_384``)."""
    return list(preset_kwargs(preset))


def _classifier_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Keep the arguments :class:`FineGrainedClassifier` takes (drop the cropper's)."""
    accepted = inspect.signature(FineGrainedClassifier.__init__).parameters
    return {k: v for k, v in kwargs.items() if k in accepted}


def build_model(
    preset: str,
    backbone: str,
    kind: str,
    *,
    num_classes: int = NUM_CLASSES,
    channels_last: bool = False,
    compile: bool = False,
    overrides: dict[str, Any] | None = None,
) -> FineGrainedClassifier:
    """One benchmark model, on the CPU in fp32, in train mode.

    Args:
        preset: ``tiny`` or ``paper``.
        backbone: a label from :func:`backbones`.
        kind: ``linear``, ``mgff`` or ``two_stage``.
        num_classes: classifier size (CUB: 200).
        channels_last / compile: the modules' own switches (``FineGrainedClassifier`` hparams), so the
            benchmark measures what a training run with those settings gets.
        overrides: further ``TwoStageClassifier`` arguments replacing the preset's (what-if runs, e.g.
            ``{"localize_size": 192}``); those of the cropper are ignored by single-stage models.
    """
    presets = preset_kwargs(preset)
    if backbone not in presets:
        raise ValueError(f"preset {preset!r} has no backbone {backbone!r}; choose one of {list(presets)}")
    if kind not in MODEL_KINDS:
        raise ValueError(f"unknown model kind {kind!r}; choose one of {MODEL_KINDS}")
    kwargs = dict(presets[backbone], **(overrides or {}))
    kwargs.update(num_classes=num_classes, channels_last=channels_last, compile=compile)
    if kind == "two_stage":
        return TwoStageClassifier(**kwargs)
    kwargs = _classifier_kwargs(kwargs)
    if kind == "linear":
        kwargs["head"] = "linear"
    return FineGrainedClassifier(**kwargs)


def image_size(preset: str, backbone: str) -> int:
    """Side of the square input images of a preset (the paper: 384)."""
    return int(preset_kwargs(preset)[backbone].get("img_size") or 384)


def set_timm_attention(choice: str) -> None:
    """How timm builds attention from now on. ``default``: timm's own choice, fused
    ``scaled_dot_product_attention`` in ViT blocks but an explicit softmax in Swin's window attention
    (timm marks fused Swin attention experimental); ``fused``: fused everywhere (``TIMM_FUSED_ATTN=2``).
    The cropper computes its attention explicitly either way (it needs the probabilities)."""
    if choice not in ATTENTION_CHOICES:
        raise ValueError(f"attention must be one of {ATTENTION_CHOICES}, got {choice!r}")
    if choice == "fused":
        timm.layers.set_fused_attn(True, experimental=True)
