"""Keep the pretrained backbone's localisation while fine-tuning on class labels.

Measured on real CUB photos (BENCHMARKS.md, "Keeping the boxes through fine-tuning", in "Real photos:
localisation"): the ``features`` localiser's boxes from the frozen ImageNet EfficientNet-Lite0 at 384 px find most
birds; after a short fine-tune at 384 px the same model's own maps find far fewer, and no response or box rule
chosen on the training and validation photos brought them back. Fine-tuning on class labels sharpens the last map
on what tells the classes apart and loses the object's extent.

The term here keeps the *spatial pattern* of the last map's activation energy (its channel sum, the seed of the
``energy`` and ``refined`` responses) close to that of the backbone's initial weights, on the same training
images. It uses class labels only (no boxes, as the paper: "此方法仅使用类标签"); the reference backbone is a frozen
copy used in training alone, never saved and never run at inference, so the trained model localises with its own
maps and no second network. Not in the paper: an mgff addition, off by default (``keep_localization_weight: 0``).

Measured in the same section (EfficientNet-Lite0 at 384 px; the weight chosen on the validation boxes of one seed,
then run over seeds): at weight 3 the model's own boxes stay at the frozen map's level on every seed, and its test
top-1 rises too. Swin-B and the term inside two-stage are unmeasured. It costs one more forward of the backbone per
training step, without gradients.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

__all__ = ["energy_correlation_loss", "FrozenReference"]


def energy_correlation_loss(student: Tensor, reference: Tensor, eps: float = 1e-6) -> Tensor:
    """``1 - r``, averaged over the batch, with ``r`` the Pearson correlation over positions of the two maps'
    activation energies (channel sums).

    Args:
        student: ``(B, C, h, w)`` the trained backbone's last map.
        reference: ``(B, C', h, w)`` the reference backbone's last map on the same images (no gradient needed).

    Returns:
        A scalar in ``[0, 2]`` (float32): 0 when the energies are an increasing affine function of each other,
        whatever their scale. A flat map (no spatial pattern) counts as uncorrelated.
    """
    if student.ndim != 4 or reference.ndim != 4 or student.shape[0] != reference.shape[0] or student.shape[-2:] != reference.shape[-2:]:
        raise ValueError(f"student and reference must be (B, C, h, w) maps of the same images and grid, got "
                         f"{tuple(student.shape)} and {tuple(reference.shape)}")
    s = student.float().sum(dim=1).flatten(1)
    r = reference.float().sum(dim=1).flatten(1)
    s = s - s.mean(dim=1, keepdim=True)
    r = r - r.mean(dim=1, keepdim=True)
    corr = (s * r).sum(dim=1) / (s.norm(dim=1) * r.norm(dim=1) + eps)
    return (1.0 - corr).mean()


class FrozenReference:
    """A frozen copy of a backbone as it is now (its pretrained weights, at construction), for the reference maps.

    A plain object, not an :class:`~torch.nn.Module` attribute of the model: it is not in the state dict (never
    saved in checkpoints), not in the optimiser, not wrapped by DDP. It follows the input's device on first use and
    runs in eval mode without gradients (autocast applies as it does to the model).
    """

    def __init__(self, backbone: nn.Module) -> None:
        self.backbone = copy.deepcopy(backbone).eval().requires_grad_(False)

    @torch.no_grad()
    def last_map(self, images: Tensor) -> Tensor:
        """``images (B, 3, H, W)`` in the backbone's normalisation -> its last map ``(B, C, h, w)``."""
        if next(self.backbone.parameters()).device != images.device:
            self.backbone.to(images.device)
        return self.backbone(images)[-1]
