"""Multi-stage feature maps from any timm model, always NCHW.

The paper's fusion head needs several stages of the backbone (Swin-B: 96x96x128 ... 12x12x1024 at
384 px). timm offers two ways to get them; this wrapper prefers the one that keeps the full model:

- ``forward_intermediates`` (timm >= 1.0): the model keeps its normal module names, so hub and local
  checkpoints load as they are, and layers after the last wanted stage are pruned afterwards.
- ``features_only=True``: for models without ``forward_intermediates`` (e.g. a third-party model
  registered with only ``feature_info``). Its modules are renamed (``layers.0`` -> ``layers_0``), so
  local weights go through timm's pretrained path (``pretrained_cfg_overlay=dict(file=...)``).

**Pretrained layers after the last stage are kept.** When the model's last stage is taken, its map is
the one the pretrained classifier read, with every pretrained layer in between:

- a model with a final norm (Swin, ViT, the mgff zoo): the last map is after that norm
  (``forward_intermediates(norm=True)``; timm applies it to the last stage only, ViT to every block);
- an EfficientNet (a CNN with a head conv): the last "stage" is the map after ``conv_head`` and
  ``bn2`` (BatchNorm + activation), e.g. 1280 channels, post-activation, for EfficientNet-Lite0,
  instead of the 320-channel, pre-activation output of the last block. This is also the map a
  ``features`` localiser reads: ``TimmBackbone(..., out_indices=(-1,))(x)[-1]``.

Only layers after the last *taken* stage are pruned (with ``stages: [1, 2]`` Swin's final norm goes, it
would never be used).

**Stage inputs** (``stage_inputs``): the output of a stage's downsampling (Swin's ``PatchMerging``,
ConvNeXt's ``downsample``) before its blocks. In Microsoft's Swin code a "layer" is blocks *then*
patch merging, so its layer outputs (the sizes the paper lists, 48x48x256, 24x24x512, 12x12x1024 at
384 px) are timm's ``layers[i].downsample`` outputs for ``i = 1, 2, 3``; timm's stage outputs have the
same sizes but are taken after the stage's blocks.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import timm
import torch
from timm.models._features import feature_take_indices
from timm.models.efficientnet import EfficientNet
from torch import Tensor, nn

from mgff.models.pretrained import create_timm_model, pretrained_weights_skipped

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
        stage_inputs: stages whose *input* map (the output of their ``downsample`` module, before their
            blocks) is also returned; only for models whose stages have one (Swin, ConvNeXt), and only
            through ``forward_intermediates``. The returned list holds all taps in the order the
            network computes them (a stage's input before its output).
        model_kwargs: passed to ``timm.create_model`` (architecture overrides, ``drop_path_rate``...).

    Attributes:
        feature_channels: channels ``C_i`` of each returned map.
        feature_reductions: downsampling ``r_i`` of each returned map relative to the input.
        feature_modules: the timm module whose output each map is (``"layers.3 + norm"``,
            ``"blocks.6 + conv_head/bn2"``, ``"layers.1.downsample"``...), for reading and tests.

    Shapes:
        ``forward(x: (B, 3, H, W)) -> [ (B, C_i, H / r_i, W / r_i) for each out index ]``

    ``frozen = True`` runs the forward under ``torch.no_grad()`` (a backbone held fixed while a head trains:
    no graph, no gradients, about a third of a training step's cost); the module's train/eval mode is its
    owner's business.
    """

    frozen: bool = False

    def __init__(
        self,
        name: str,
        out_indices: Sequence[int] = (1, 2, 3),
        pretrained: bool | str = False,
        img_size: int | None = None,
        stage_inputs: Sequence[int] = (),
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
        take = list(take)
        inputs = sorted(feature_take_indices(len(info), list(stage_inputs))[0]) if stage_inputs else []
        self.uses_intermediates = hasattr(model, "forward_intermediates")
        # the last stage's map keeps the pretrained layers that follow it (final norm, head conv)
        self.keeps_final = take[-1] == len(info) - 1
        self.head_conv_last = self.keeps_final and isinstance(model, EfficientNet)
        if self.uses_intermediates:
            if hasattr(model, "prune_intermediate_layers"):
                last = max(take + inputs)
                model.prune_intermediate_layers(
                    take if last in take else take + [last],
                    prune_norm=not self.keeps_final,
                    # EfficientNet's pruning of the head also drops conv_head/bn2; other heads (ConvNeXt's
                    # norm on the pooled vector, the classifier) act after pooling and go
                    prune_head=not self.head_conv_last,
                )
        else:
            if inputs:
                raise ValueError(f"stage_inputs need a model with forward_intermediates; {name} has none")
            model = self._create_features_only(name, pretrained, take, **model_kwargs)
        self.model = model
        self.out_indices = take
        self.stage_inputs = inputs
        stage_names = [str(info[i].get("module", f"stage {i}")) for i in range(len(info))]
        self._input_modules = []
        for i in inputs:
            module = getattr(model.get_submodule(stage_names[i]), "downsample", None)
            if module is None or isinstance(module, nn.Identity):
                raise ValueError(f"stage_inputs: stage {i} ({stage_names[i]}) of {name} has no downsample module")
            self._input_modules.append(module)
        self._captured: list[Tensor] = []
        for module in self._input_modules:
            module.register_forward_hook(self._capture)
        # order of the returned maps: (stage, 0 = input, 1 = output)
        taps = sorted([(i, 0) for i in inputs] + [(i, 1) for i in take])
        self._tap_order = taps
        channels = [int(info[i]["num_chs"]) for i in range(len(info))]
        if self.head_conv_last:
            channels[-1] = int(model.conv_head.out_channels)
        self.feature_channels: list[int] = [channels[i] for i, _ in taps]
        self.feature_reductions: list[int] = [int(info[i]["reduction"]) for i, _ in taps]
        suffix = " + conv_head/bn2" if self.head_conv_last else (" + norm" if self.uses_intermediates else "")
        self.feature_modules: list[str] = [
            f"{stage_names[i]}.downsample" if kind == 0 else stage_names[i] + (suffix if i == len(info) - 1 else "")
            for i, kind in taps
        ]
        # features_only models say how they lay out their maps (Swin-like ones return NHWC).
        self._channels_last = getattr(model, "output_fmt", "NCHW") == "NHWC"

    def _capture(self, module: nn.Module, inputs, output: Tensor) -> None:
        self._captured.append(output)

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
        if pretrained is None or isinstance(pretrained, bool) or pretrained_weights_skipped():
            # (loading from a checkpoint: the initial weights file may be gone, and is not read)
            return cls._create(name, bool(pretrained), **kwargs)
        path = Path(pretrained)
        if not path.is_file():
            raise FileNotFoundError(f"pretrained weights file not found: {path}")
        # features_only renames modules, so the file is loaded by timm before the renaming.
        return cls._create(name, True, pretrained_cfg_overlay=dict(file=str(path)), **kwargs)

    def forward(self, x: Tensor) -> list[Tensor]:
        """``(B, 3, H, W) -> [(B, C_i, H / r_i, W / r_i), ...]``, one map per tap (see ``feature_modules``)."""
        if self.frozen:
            with torch.no_grad():
                return self._maps(x)
        return self._maps(x)

    def _maps(self, x: Tensor) -> list[Tensor]:
        if not self.uses_intermediates:
            features = self.model(x)
            if isinstance(features, dict):
                features = list(features.values())
            if self._channels_last:
                features = [f.permute(0, 3, 1, 2).contiguous() for f in features]
            return list(features)
        self._captured = []
        if self.head_conv_last:
            # forward_intermediates' final output is the map after conv_head/bn2 (pre-pooling)
            final, outputs = self.model.forward_intermediates(x, indices=self.out_indices, output_fmt="NCHW")
            outputs = list(outputs[:-1]) + [final]
        else:
            outputs = self.model.forward_intermediates(
                x, indices=self.out_indices, norm=self.keeps_final, intermediates_only=True, output_fmt="NCHW"
            )
        if not self.stage_inputs:
            return list(outputs)
        inputs = [m.permute(0, 3, 1, 2).contiguous() if self._channels_last else m for m in self._captured]
        self._captured = []
        stage_outputs, stage_inputs = iter(outputs), iter(inputs)
        return [next(stage_inputs) if kind == 0 else next(stage_outputs) for _, kind in self._tap_order]

    def extra_repr(self) -> str:
        return (
            f"name={self.name!r}, out_indices={self.out_indices}, stage_inputs={self.stage_inputs}, "
            f"channels={self.feature_channels}, reductions={self.feature_reductions}"
        )

