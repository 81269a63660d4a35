"""All augmentation code of mgff, in one module (albumentations is archived upstream: keep it swappable).

Train: resize to ``resize_size`` (square, as the paper), random crop ``crop_size``, horizontal flip,
normalise. Eval: resize, centre crop, normalise. Boxes ``(x1, y1, x2, y2)`` in pixels travel through
the same geometry (pascal_voc format) so the batch's ground-truth box matches the tensor.

With a ``source_size`` the pipeline also returns the *same view* at a higher resolution, as uint8: the
paper cuts the object "从原图中" (from the original image) for its second stage, and a crop cut from the
``crop_size`` network input holds no more detail than that input. The geometry (resize, crop, flip) runs
once, at ``source_size``; the network's view is that source view resized to ``crop_size``. So both
frames show exactly the same region with the same flip, and a box maps between them by the factor
``source_size / crop_size`` (:class:`ViewWithSource`).
"""

from __future__ import annotations

from typing import Sequence

import albumentations as A
import cv2
import numpy as np
import torch
from albumentations.pytorch import ToTensorV2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _bbox_params() -> A.BboxParams:
    # clip: boxes slightly outside the image after rounding are clipped instead of rejected;
    # min_visibility 0 keeps a partly cropped box (a fully cropped one is dropped -> NaN box).
    return A.BboxParams(format="pascal_voc", label_fields=["box_labels"], clip=True, min_visibility=0.0)


def _check_sizes(resize_size: int, crop_size: int, source_size: int | None) -> None:
    if crop_size > resize_size:
        raise ValueError(f"crop_size {crop_size} must not exceed resize_size {resize_size}")
    if source_size is not None and source_size < crop_size:
        raise ValueError(f"source_size {source_size} must be at least crop_size {crop_size} (it is the same view at a higher resolution)")


def build_train_transform(
    resize_size: int = 512,
    crop_size: int = 384,
    hflip: float = 0.5,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    source_size: int | None = None,
) -> A.Compose | ViewWithSource:
    """Training pipeline: ``(H, W, 3) uint8`` -> ``(3, crop_size, crop_size)`` float tensor (and, with a
    ``source_size``, the same view as a ``(3, source_size, source_size)`` uint8 tensor)."""
    _check_sizes(resize_size, crop_size, source_size)
    if source_size is not None:
        return ViewWithSource(_train_geometry(_scaled(resize_size, source_size, crop_size), source_size, hflip), crop_size, mean, std)
    steps = _train_geometry(resize_size, crop_size, hflip) + [A.Normalize(mean=mean, std=std), ToTensorV2()]
    return A.Compose(steps, bbox_params=_bbox_params())


def build_eval_transform(
    resize_size: int = 512,
    crop_size: int = 384,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    source_size: int | None = None,
) -> A.Compose | ViewWithSource:
    """Evaluation pipeline: resize, centre crop, normalise -> ``(3, crop_size, crop_size)`` (and the
    source view with a ``source_size``, see :func:`build_train_transform`)."""
    _check_sizes(resize_size, crop_size, source_size)
    if source_size is not None:
        return ViewWithSource(_eval_geometry(_scaled(resize_size, source_size, crop_size), source_size), crop_size, mean, std)
    steps = _eval_geometry(resize_size, crop_size) + [A.Normalize(mean=mean, std=std), ToTensorV2()]
    return A.Compose(steps, bbox_params=_bbox_params())


def _train_geometry(resize_size: int, crop_size: int, hflip: float) -> list[A.BasicTransform]:
    steps = [A.Resize(resize_size, resize_size), A.RandomCrop(crop_size, crop_size)]
    if hflip > 0:
        steps.append(A.HorizontalFlip(p=hflip))
    return steps


def _eval_geometry(resize_size: int, crop_size: int) -> list[A.BasicTransform]:
    return [A.Resize(resize_size, resize_size), A.CenterCrop(crop_size, crop_size)]


def _scaled(resize_size: int, source_size: int, crop_size: int) -> int:
    """The resize that makes a ``source_size`` crop cover what a ``crop_size`` crop of ``resize_size`` covers."""
    return int(round(resize_size * source_size / crop_size))


class ViewWithSource:
    """A view at ``crop_size`` and the same view at ``source_size`` (uint8), from one geometry pass.

    ``geometry`` (resize, crop, flip) produces the source view; the network's view is it resized to
    ``crop_size`` (area interpolation, i.e. anti-aliased) and normalised. Called through
    :func:`apply_transform`; :meth:`set_random_state` lets :class:`~data_modules.resumable.SeededTransform`
    seed it like an ``A.Compose``.

    Args:
        geometry: albumentations steps ending at ``(source_size, source_size)``.
        crop_size: side of the network's view.
        mean / std: the view's normalisation.
    """

    def __init__(self, geometry: list[A.BasicTransform], crop_size: int, mean: Sequence[float], std: Sequence[float]) -> None:
        self.geometry = A.Compose(geometry, bbox_params=_bbox_params())
        self.crop_size = crop_size
        self.to_view = A.Compose([A.Resize(crop_size, crop_size, interpolation=cv2.INTER_AREA), A.Normalize(mean=mean, std=std), ToTensorV2()])

    def set_random_state(self, *args, **kwargs) -> None:
        self.geometry.set_random_state(*args, **kwargs)

    def __call__(self, image: np.ndarray, bboxes: np.ndarray, box_labels: list[int]) -> dict:
        """``A.Compose``'s call convention -> ``{"image": view, "bboxes": in the view's pixels, "source": uint8 (3, S, S)}``."""
        out = self.geometry(image=image, bboxes=bboxes, box_labels=box_labels)
        source = out["image"]
        scale = self.crop_size / source.shape[0]
        boxes = np.asarray(out["bboxes"], dtype=np.float32).reshape(-1, 4) * scale
        source_tensor = torch.from_numpy(np.ascontiguousarray(source.transpose(2, 0, 1)))
        return {"image": self.to_view(image=source)["image"], "bboxes": boxes, "source": source_tensor}


def apply_transform(transform: A.Compose | ViewWithSource, image: np.ndarray, box: tuple[float, float, float, float] | None):
    """Run ``transform`` on an image and its optional box.

    Returns:
        ``(image (3, h, w) float tensor, box (4,) float32 array)``; the box is NaN when the image has
        none or the crop removed it. A :class:`ViewWithSource` adds a third item, the source view
        ``(3, S, S)`` uint8 tensor (the box stays in the view's pixels).
    """
    boxes = [box] if box is not None else []
    out = transform(image=image, bboxes=np.asarray(boxes, dtype=np.float32).reshape(-1, 4), box_labels=[0] * len(boxes))
    out_boxes = np.asarray(out["bboxes"], dtype=np.float32).reshape(-1, 4)
    new_box = out_boxes[0] if len(out_boxes) else np.full(4, np.nan, dtype=np.float32)
    if "source" in out:
        return out["image"], new_box, out["source"]
    return out["image"], new_box


def denormalize(images, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
    """Undo :func:`A.Normalize` on a ``(B, 3, H, W)`` or ``(3, H, W)`` tensor -> values in ``[0, 1]``."""
    m = torch.as_tensor(mean, dtype=images.dtype, device=images.device).view(-1, 1, 1)
    s = torch.as_tensor(std, dtype=images.dtype, device=images.device).view(-1, 1, 1)
    return (images * s + m).clamp(0, 1)
