"""Multi-stage feature maps from any timm model, always NCHW.

The paper's fusion head needs several stages of the backbone (Swin-B: 96x96x128 ... 12x12x1024 at
384 px). timm offers two ways to get them; this wrapper prefers the one that keeps the full model:

- ``forward_intermediates`` (timm >= 1.0): the model keeps its normal module names, so hub and local
  checkpoints load as they are, and layers after the last wanted stage are pruned afterwards.
- ``features_only=True``: for models without ``forward_intermediates`` (e.g. a third-party model
  registered with only ``feature_info``). Its modules are renamed (``layers.0`` -> ``layers_0``), so
  local weights go through timm's pretrained path (``pretrained_cfg_overlay=dict(file=...)``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import timm
from timm.models._features import feature_take_indices
from torch import Tensor, nn

from mgff.models.pretrained import create_timm_model

__all__ = ["TimmBackbone"]


def _feature_info_list(model: nn.Module) -> list[dict]:
    info = getattr(model, "feature_info", None)
    if info is None:
        raise ValueError(f"{type(model).__name__} has no feature_info: cannot pick stages from it")
    if hasattr(info, "get_dicts"):  # a timm FeatureInfo (features_only models)
        return info.get_dicts()
    return list(info)


class TimmBackbone(nn.Module):
    """A timm model returning the maps of some of its stages.

    Args:
        name: timm model name, e.g. ``swin_base_patch4_window12_384``.
        out_indices: stages to return, indices into the model's ``feature_info`` (negative counts from
            the end). The default (1, 2, 3) is the last three stages of a four-stage model (Swin,
            ConvNeXt); ResNet lists its stem first, so its last three are (2, 3, 4) or (-3, -2, -1).
            For a ViT every block is a "stage" at reduction 16.
        pretrained: ``True`` for the hub weights, a path for a local file, ``False`` for none.
        img_size: input size for models that are built for one (Swin, ViT); ignored by the others.
            Swin also needs a ``window_size`` dividing every stage's grid (``model_kwargs``).
        model_kwargs: passed to ``timm.create_model`` (architecture overrides, ``drop_path_rate``...).

    Attributes:
        feature_channels: channels ``C_i`` of each returned map.
        feature_reductions: downsampling ``r_i`` of each returned map relative to the input.

    Shapes:
        ``forward(x: (B, 3, H, W)) -> [ (B, C_i, H / r_i, W / r_i) for each out index ]``
    """

    def __init__(
        self,
        name: str,
        out_indices: Sequence[int] = (1, 2, 3),
        pretrained: bool | str = False,
        img_size: int | None = None,
        **model_kwargs,
    ) -> None:
        super().__init__()
        self.name = name
        if img_size is not None:
            model_kwargs["img_size"] = img_size
        if not timm.is_model(name):
            raise ValueError(f"unknown timm model {name!r}")

        model = self._create(name, pretrained, num_classes=0, **model_kwargs)
        info = _feature_info_list(model)
        take, _ = feature_take_indices(len(info), list(out_indices))
        self.uses_intermediates = hasattr(model, "forward_intermediates")
        if self.uses_intermediates:
            if hasattr(model, "prune_intermediate_layers"):
                # Drops the stages after the last wanted one, the final norm and the classifier.
                model.prune_intermediate_layers(take, prune_norm=True, prune_head=True)
        else:
            model = self._create_features_only(name, pretrained, take, **model_kwargs)
        self.model = model
        self.out_indices = list(take)
        self.feature_channels: list[int] = [int(info[i]["num_chs"]) for i in take]
        self.feature_reductions: list[int] = [int(info[i]["reduction"]) for i in take]
        # features_only models say how they lay out their maps (Swin-like ones return NHWC).
        self._channels_last = getattr(model, "output_fmt", "NCHW") == "NHWC"

    @staticmethod
    def _create(name: str, pretrained: bool | str, **kwargs) -> nn.Module:
        try:
            return create_timm_model(name, pretrained=pretrained, **kwargs)
        except TypeError as err:
            # CNNs take no img_size; a config sets it for every backbone, so drop it for those.
            if "img_size" not in kwargs or "img_size" not in str(err):
                raise
            kwargs = {k: v for k, v in kwargs.items() if k != "img_size"}
            return create_timm_model(name, pretrained=pretrained, **kwargs)

    @classmethod
    def _create_features_only(
        cls, name: str, pretrained: bool | str, out_indices: Sequence[int], **kwargs
    ) -> nn.Module:
        kwargs.update(features_only=True, out_indices=tuple(out_indices))
        if pretrained is None or isinstance(pretrained, bool):
            return cls._create(name, bool(pretrained), **kwargs)
        path = Path(pretrained)
        if not path.is_file():
            raise FileNotFoundError(f"pretrained weights file not found: {path}")
        # features_only renames modules, so the file is loaded by timm before the renaming.
        return cls._create(name, True, pretrained_cfg_overlay=dict(file=str(path)), **kwargs)

    def forward(self, x: Tensor) -> list[Tensor]:
        """``(B, 3, H, W) -> [(B, C_i, H / r_i, W / r_i), ...]``, one map per out index."""
        if self.uses_intermediates:
            return self.model.forward_intermediates(
                x, indices=self.out_indices, intermediates_only=True, output_fmt="NCHW"
            )
        features = self.model(x)
        if isinstance(features, dict):
            features = list(features.values())
        if self._channels_last:
            features = [f.permute(0, 3, 1, 2).contiguous() for f in features]
        return list(features)

    def extra_repr(self) -> str:
        return (
            f"name={self.name!r}, out_indices={self.out_indices}, "
            f"channels={self.feature_channels}, reductions={self.feature_reductions}"
        )

