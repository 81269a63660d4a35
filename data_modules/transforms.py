"""All augmentation code of mgff, in one module (albumentations is archived upstream: keep it swappable).

Train: resize to ``resize_size`` (square, as the paper), random crop ``crop_size``, horizontal flip,
normalise. Eval: resize, centre crop, normalise. Boxes ``(x1, y1, x2, y2)`` in pixels travel through
the same geometry (pascal_voc format) so the batch's ground-truth box matches the tensor.
"""

from __future__ import annotations

from typing import Sequence

import albumentations as A
import numpy as np
from albumentations.pytorch import ToTensorV2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _bbox_params() -> A.BboxParams:
    # clip: boxes slightly outside the image after rounding are clipped instead of rejected;
    # min_visibility 0 keeps a partly cropped box (a fully cropped one is dropped -> NaN box).
    return A.BboxParams(format="pascal_voc", label_fields=["box_labels"], clip=True, min_visibility=0.0)


def build_train_transform(
    resize_size: int = 512,
    crop_size: int = 384,
    hflip: float = 0.5,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> A.Compose:
    """Training pipeline: ``(H, W, 3) uint8`` -> ``(3, crop_size, crop_size)`` float tensor."""
    if crop_size > resize_size:
        raise ValueError(f"crop_size {crop_size} must not exceed resize_size {resize_size}")
    steps = [A.Resize(resize_size, resize_size), A.RandomCrop(crop_size, crop_size)]
    if hflip > 0:
        steps.append(A.HorizontalFlip(p=hflip))
    steps += [A.Normalize(mean=mean, std=std), ToTensorV2()]
    return A.Compose(steps, bbox_params=_bbox_params())


def build_eval_transform(
    resize_size: int = 512,
    crop_size: int = 384,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> A.Compose:
    """Evaluation pipeline: resize, centre crop, normalise -> ``(3, crop_size, crop_size)``."""
    if crop_size > resize_size:
        raise ValueError(f"crop_size {crop_size} must not exceed resize_size {resize_size}")
    steps = [A.Resize(resize_size, resize_size), A.CenterCrop(crop_size, crop_size), A.Normalize(mean=mean, std=std), ToTensorV2()]
    return A.Compose(steps, bbox_params=_bbox_params())


def apply_transform(transform: A.Compose, image: np.ndarray, box: tuple[float, float, float, float] | None):
    """Run ``transform`` on an image and its optional box.

    Returns:
        ``(image (3, h, w) float tensor, box (4,) float32 array)``; the box is NaN when the image has
        none or the crop removed it.
    """
    boxes = [box] if box is not None else []
    out = transform(image=image, bboxes=np.asarray(boxes, dtype=np.float32).reshape(-1, 4), box_labels=[0] * len(boxes))
    out_boxes = np.asarray(out["bboxes"], dtype=np.float32).reshape(-1, 4)
    new_box = out_boxes[0] if len(out_boxes) else np.full(4, np.nan, dtype=np.float32)
    return out["image"], new_box


def denormalize(images, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
    """Undo :func:`A.Normalize` on a ``(B, 3, H, W)`` or ``(3, H, W)`` tensor -> values in ``[0, 1]``."""
    import torch

    m = torch.as_tensor(mean, dtype=images.dtype, device=images.device).view(-1, 1, 1)
    s = torch.as_tensor(std, dtype=images.dtype, device=images.device).view(-1, 1, 1)
    return (images * s + m).clamp(0, 1)
