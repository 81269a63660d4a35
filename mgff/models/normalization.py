"""Input normalisation per network: the data's convention in, the weights' own convention out.

Every pretrained network was trained on inputs ``(x - mean) / std`` with its own ``mean``/``std``
(``x`` in ``[0, 1]``): ImageNet statistics for most timm CNNs and Swin, ``0.5``/``0.5`` for the
AugReg ViTs and for the TF-Lite EfficientNet weights in ``../shared/weights``. One DataModule
normalises once, with its ``data.mean``/``data.std``; each network of a model (the stage classifier,
the cropper's ViT) converts that batch to its own convention with one affine map per channel::

    x_net = (x_data * std_data + mean_data - mean_net) / std_net

The network's ``mean``/``std`` default to its timm ``pretrained_cfg`` and can be set in the config
(a local weights file may follow another convention than timm's hub weights of the same name). They
are persistent buffers, so they travel with the weights in every checkpoint; a checkpoint whose
values differ from the configured ones is refused. The data's ``mean``/``std`` are not saved: they
describe the batches of the current DataModule (linked by the CLI, ``data.mean`` -> ``data_mean``).
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import torch
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import Tensor, nn

__all__ = ["IMAGENET_DEFAULT_MEAN", "IMAGENET_DEFAULT_STD", "check_normalization", "pretrained_normalization", "InputNormalization"]

log = logging.getLogger("mgff")


def check_normalization(what: str, mean: Sequence[float], std: Sequence[float], channels: int = 3) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Validate one ``(mean, std)`` pair -> two tuples of ``channels`` floats.

    Raises ``ValueError`` naming ``what`` (e.g. ``model.backbone_mean``) for a wrong length or a
    non-positive / non-finite std.
    """
    mean, std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
    if len(mean) != channels or len(std) != channels:
        raise ValueError(f"{what}: mean and std need {channels} values (one per channel), got mean={mean}, std={std}")
    if not all(torch.isfinite(torch.tensor(mean + std))):
        raise ValueError(f"{what}: mean and std must be finite, got mean={mean}, std={std}")
    if min(std) <= 0:
        raise ValueError(f"{what}: std must be positive, got std={std}")
    return mean, std


def pretrained_normalization(model: nn.Module, name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The ``(mean, std)`` of a timm model's ``pretrained_cfg``; ``ValueError`` naming ``name`` if it has none."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if cfg.get("mean") is None or cfg.get("std") is None:
        raise ValueError(f"{name}: timm model {type(model).__name__} has no mean/std in its pretrained_cfg; set them in the config")
    return tuple(cfg["mean"]), tuple(cfg["std"])


class InputNormalization(nn.Module):
    """Converts ``(B, C, H, W)`` images from the data's normalisation to a network's own.

    Args:
        network: the timm model (or a module holding it as ``.model``) whose ``pretrained_cfg`` gives
            the default ``mean``/``std``.
        name: the network's config prefix for messages, e.g. ``model.backbone`` or ``model.cropper``.
        data_mean / data_std: how the DataModule normalised the batch.
        mean / std: the network's normalisation; ``None`` takes its ``pretrained_cfg`` (both or neither).
        pretrained: the network's ``pretrained`` setting; a local file with ``mean`` unset gets a warning,
            since timm's cfg describes the hub weights of that name, not the file.

    Buffers: ``mean``/``std`` ``(1, C, 1, 1)`` (persistent, in checkpoints), ``data_mean``/``data_std``
    (not saved: they belong to the DataModule in use).

    The conversion and where its numbers come from are logged once, at construction.
    """

    def __init__(
        self,
        network: nn.Module,
        name: str,
        data_mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
        data_std: Sequence[float] = IMAGENET_DEFAULT_STD,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        pretrained: bool | str = False,
    ) -> None:
        super().__init__()
        if (mean is None) != (std is None):
            raise ValueError(f"{name}_mean and {name}_std must be set together (got mean={mean}, std={std}): half of a normalisation from the config and half from timm is never right")
        data_mean, data_std = check_normalization("data normalisation (data.mean / data.std)", data_mean, data_std)
        if mean is None:
            mean, std = pretrained_normalization(getattr(network, "model", network), name)
            source = "timm pretrained_cfg"
            if isinstance(pretrained, str):
                log.warning(
                    "%s: local weights %s with the normalisation of timm's pretrained_cfg (mean=%s, std=%s); "
                    "set %s_mean / %s_std if the file expects another one", name, pretrained, _fmt(mean), _fmt(std), name, name,
                )
        else:
            source = "config"
        mean, std = check_normalization(f"{name}_mean / {name}_std", mean, std)
        self.name = name
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))
        self.register_buffer("data_mean", torch.tensor(data_mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("data_std", torch.tensor(data_std).view(1, -1, 1, 1), persistent=False)
        if self.is_identity():
            log.info("%s input: data normalisation mean=%s std=%s is the network's (%s): no conversion", name, _fmt(mean), _fmt(std), source)
        else:
            log.info("%s input: converting data normalisation mean=%s std=%s -> network mean=%s std=%s (%s)",
                     name, _fmt(data_mean), _fmt(data_std), _fmt(mean), _fmt(std), source)

    def is_identity(self) -> bool:
        """Whether data and network use the same normalisation."""
        return bool(torch.equal(self.mean, self.data_mean) and torch.equal(self.std, self.data_std))

    def forward(self, images: Tensor) -> Tensor:
        """``(B, C, H, W)`` in the data's normalisation -> the same in the network's, in ``images.dtype``."""
        scale = (self.data_std / self.std).to(images.dtype)
        shift = ((self.data_mean - self.mean) / self.std).to(images.dtype)
        return images * scale + shift

    def data_from_unit(self, images: Tensor) -> Tensor:
        """``(B, C, H, W)`` values in ``[0, 1]`` (e.g. a uint8 source view / 255) -> the data's normalisation."""
        return (images - self.data_mean.to(images.dtype)) / self.data_std.to(images.dtype)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        for key in ("mean", "std"):
            saved = state_dict.get(prefix + key)
            own = getattr(self, key)
            if saved is None:  # a checkpoint written before the normalisation was saved
                log.warning("%s: checkpoint has no %s%s; keeping the configured %s=%s", self.name, prefix, key, key, _fmt(own.flatten().tolist()))
                state_dict[prefix + key] = own.clone()
            elif saved.shape != own.shape or not torch.allclose(saved.to(own), own):
                raise ValueError(
                    f"{self.name}: checkpoint's input {key} {_fmt(saved.flatten().tolist())} differs from the configured "
                    f"{_fmt(own.flatten().tolist())}: the weights were trained with the checkpoint's; set {self.name}_{key} to it"
                )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"{self.name}: data mean={_fmt(self.data_mean.flatten().tolist())} std={_fmt(self.data_std.flatten().tolist())} -> mean={_fmt(self.mean.flatten().tolist())} std={_fmt(self.std.flatten().tolist())}"


def _fmt(values: Sequence[float]) -> str:
    return "(" + ", ".join(f"{float(v):.4g}" for v in values) + ")"
