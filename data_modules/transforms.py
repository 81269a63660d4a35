"""All augmentation code of mgff, in one module (albumentations is archived upstream: keep it swappable).

Train: resize to ``resize_size`` (square, as the paper), random crop ``crop_size``, horizontal flip,
normalise. Eval: resize, centre crop, normalise. Boxes ``(x1, y1, x2, y2)`` in pixels travel through
the same geometry (pascal_voc format) so the batch's ground-truth box matches the tensor.

Named training augmentations, all off by default (off, the pipeline and its random draws are exactly
the paper's above): ``random_resized_crop_scale`` replaces the random crop by a random resized crop of
the resized image, ``trivial_augment`` adds one TrivialAugment-Wide op per image after the flip, and
``color_jitter`` a colour jitter after that (:func:`build_train_transform`). Every geometric op moves the
box with the image, and with a ``source_size`` they all run at the source's scale, before the view is
derived from it.

With a ``source_size`` the pipeline also returns the *same view* at a higher resolution, as uint8: the
paper cuts the object "从原图中" (from the original image) for its second stage, and a crop cut from the
``crop_size`` network input holds no more detail than that input. The geometry (resize, crop, flip) runs
once, at ``source_size``; the network's view is that source view resized to ``crop_size``. So both
frames show exactly the same region with the same flip, and a box maps between them by the factor
``source_size / crop_size`` (:class:`ViewWithSource`).
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Sequence

import albumentations as A
import cv2
import numpy as np
import torch
from albumentations.pytorch import ToTensorV2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RRC_RATIO = (3 / 4, 4 / 3)  # RandomResizedCrop's aspect-ratio range (width / height), as torchvision's
COLOR_JITTER_P = 0.8  # probability that an image is colour-jittered when ``color_jitter > 0``


def _bbox_params() -> A.BboxParams:
    # clip: boxes slightly outside the image after rounding are clipped instead of rejected;
    # min_visibility 0 keeps a partly cropped box (a fully cropped one is dropped -> NaN box).
    return A.BboxParams(format="pascal_voc", label_fields=["box_labels"], clip=True, min_visibility=0.0)


def _check_sizes(resize_size: int, crop_size: int, source_size: int | None) -> None:
    if crop_size > resize_size:
        raise ValueError(f"crop_size {crop_size} must not exceed resize_size {resize_size}")
    if source_size is not None and source_size < crop_size:
        raise ValueError(f"source_size {source_size} must be at least crop_size {crop_size} (it is the same view at a higher resolution)")


def check_augmentations(
    random_resized_crop_scale: Sequence[float] | None = None,
    color_jitter: float = 0.0,
    trivial_augment: bool = False,
    prefix: str = "",
) -> tuple[float, float] | None:
    """Refuse bad augmentation arguments with an error naming the argument (``prefix`` + its name) and
    the range it must lie in; return ``random_resized_crop_scale`` as a ``(lo, hi)`` float pair (or ``None``)."""
    scale = None
    if random_resized_crop_scale is not None:
        name = f"{prefix}random_resized_crop_scale"
        try:
            lo, hi = (float(v) for v in random_resized_crop_scale)
        except (TypeError, ValueError):
            raise ValueError(f"{name} must be a pair [lo, hi] of area fractions with 0 < lo <= hi <= 1, or null; got {random_resized_crop_scale!r}") from None
        if not 0.0 < lo <= hi <= 1.0:
            raise ValueError(f"{name} must satisfy 0 < lo <= hi <= 1 (fractions of the resized image's area), got [{lo}, {hi}]")
        scale = (lo, hi)
    if isinstance(color_jitter, bool) or not isinstance(color_jitter, numbers.Real) or not (math.isfinite(color_jitter) and color_jitter >= 0):
        raise ValueError(f"{prefix}color_jitter must be a finite number >= 0 (0 = off), got {color_jitter!r}")
    if not isinstance(trivial_augment, bool):
        raise ValueError(f"{prefix}trivial_augment must be true or false, got {trivial_augment!r}")
    return scale


def build_train_transform(
    resize_size: int = 512,
    crop_size: int = 384,
    hflip: float = 0.5,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    source_size: int | None = None,
    *,
    random_resized_crop_scale: Sequence[float] | None = None,
    color_jitter: float = 0.0,
    trivial_augment: bool = False,
) -> A.Compose | ViewWithSource:
    """Training pipeline: ``(H, W, 3) uint8`` -> ``(3, crop_size, crop_size)`` float tensor (and, with a
    ``source_size``, the same view as a ``(3, source_size, source_size)`` uint8 tensor).

    Steps: square resize to ``resize_size``; random ``crop_size`` crop, or with ``random_resized_crop_scale
    = (lo, hi)`` a random resized crop (a region of ``lo..hi`` of the resized image's area, aspect ratio
    3/4..4/3, resized to ``crop_size``); horizontal flip with probability ``hflip``; with
    ``trivial_augment``, one op of :func:`trivial_augment_ops`; with ``color_jitter = s > 0``, with
    probability 0.8, ``ColorJitter(brightness=s, contrast=s, saturation=s, hue=min(s/4, 0.1))``
    (factors drawn from ``[max(0, 1-s), 1+s]``, hue shift in turns of the colour wheel, in random order);
    normalise. The defaults add nothing: the same steps and random draws as without these arguments.
    """
    _check_sizes(resize_size, crop_size, source_size)
    scale = check_augmentations(random_resized_crop_scale, color_jitter, trivial_augment)
    extra = _train_appearance(color_jitter, trivial_augment)
    if source_size is not None:
        geometry = _train_geometry(_scaled(resize_size, source_size, crop_size), source_size, hflip, scale)
        return ViewWithSource(geometry + extra, crop_size, mean, std)
    steps = _train_geometry(resize_size, crop_size, hflip, scale) + extra + [A.Normalize(mean=mean, std=std), ToTensorV2()]
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


def _train_geometry(resize_size: int, crop_size: int, hflip: float, rrc_scale: tuple[float, float] | None = None) -> list[A.BasicTransform]:
    # RandomResizedCrop's scale is a fraction of its input's area: the same at any resize, so at the
    # source's scale (``_scaled``) it draws the same region as at the view's
    if rrc_scale is None:
        crop = A.RandomCrop(crop_size, crop_size)
    else:
        crop = A.RandomResizedCrop(size=(crop_size, crop_size), scale=rrc_scale, ratio=RRC_RATIO)
    steps = [A.Resize(resize_size, resize_size), crop]
    if hflip > 0:
        steps.append(A.HorizontalFlip(p=hflip))
    return steps


def _train_appearance(color_jitter: float, trivial_augment: bool) -> list[A.BasicTransform]:
    """The steps after the crop and flip: TrivialAugment (geometric ops move the box), then colour jitter."""
    steps: list[A.BasicTransform] = []
    if trivial_augment:
        steps.append(A.OneOf(trivial_augment_ops(), p=1.0))
    if color_jitter > 0:
        s = float(color_jitter)
        steps.append(A.ColorJitter(brightness=s, contrast=s, saturation=s, hue=min(s / 4, 0.1), p=COLOR_JITTER_P))
    return steps


def trivial_augment_ops() -> list[A.BasicTransform]:
    """TrivialAugment-Wide (Müller & Hutter 2021; torchvision's ``TrivialAugmentWide``) in albumentations.

    One of these 14 ops, uniformly, per image, with a magnitude drawn uniformly from its range (signed ops
    either way): identity; shear x / y up to atan(0.99) = 44.7 degrees; translate x / y up to 1/7 of the
    side (torchvision's 32 pixels at 224, a fraction so that it is the same at the source's scale);
    rotate up to 135 degrees; brightness, colour (saturation), contrast and sharpness factors in
    ``[0.01, 1.99]``; posterize to 2..8 bits; solarize above a threshold anywhere in ``[0, 255]``;
    autocontrast; equalize. Geometric ops fill with black and move the box (the box of the transformed
    corners, clipped to the image). Differences from torchvision: magnitudes are continuous instead of
    31 bins; shears are about the image centre instead of its corner.
    """
    shear = math.degrees(math.atan(0.99))
    translate = 1 / 7

    def affine(**kw: Any) -> A.Affine:
        return A.Affine(**kw, border_mode=cv2.BORDER_CONSTANT, fill=0, rotate_method="largest_box", p=1.0)

    def factor(kind: str) -> A.ColorJitter:
        ranges = {"brightness": (1.0, 1.0), "contrast": (1.0, 1.0), "saturation": (1.0, 1.0), "hue": (0.0, 0.0)}
        ranges[kind] = (0.01, 1.99)
        return A.ColorJitter(**ranges, p=1.0)

    return [
        A.NoOp(p=1.0),
        affine(shear={"x": (-shear, shear), "y": (0.0, 0.0)}),
        affine(shear={"x": (0.0, 0.0), "y": (-shear, shear)}),
        affine(translate_percent={"x": (-translate, translate), "y": (0.0, 0.0)}),
        affine(translate_percent={"x": (0.0, 0.0), "y": (-translate, translate)}),
        affine(rotate=(-135.0, 135.0)),
        factor("brightness"),
        factor("saturation"),
        factor("contrast"),
        Sharpness(factor=(0.01, 1.99), p=1.0),
        A.Posterize(num_bits=(2, 8), p=1.0),
        A.Solarize(threshold_range=(0.0, 1.0), p=1.0),
        A.AutoContrast(method="pil", p=1.0),
        A.Equalize(mode="pil", p=1.0),
    ]


class Sharpness(A.ImageOnlyTransform):
    """PIL's / torchvision's sharpness: blend the image with its 3x3-smoothed copy (border pixels kept);
    a factor above 1 sharpens, below 1 blurs, 1 is the identity. ``factor``: the range it is drawn from."""

    def __init__(self, factor: tuple[float, float] = (0.01, 1.99), p: float = 0.5) -> None:
        super().__init__(p=p)
        self.factor = (float(factor[0]), float(factor[1]))

    def get_params(self) -> dict[str, Any]:
        return {"factor": self.py_random.uniform(*self.factor)}

    def apply(self, img: np.ndarray, factor: float = 1.0, **params: Any) -> np.ndarray:
        if img.shape[0] < 3 or img.shape[1] < 3:
            return img
        x = img.astype(np.float32)
        kernel = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], dtype=np.float32) / 13
        smooth = x.copy()
        smooth[1:-1, 1:-1] = np.round(cv2.filter2D(x, -1, kernel, borderType=cv2.BORDER_REFLECT_101)[1:-1, 1:-1])
        return np.clip(factor * x + (1 - factor) * smooth, 0, 255).astype(img.dtype)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("factor",)


def _eval_geometry(resize_size: int, crop_size: int) -> list[A.BasicTransform]:
    return [A.Resize(resize_size, resize_size), A.CenterCrop(crop_size, crop_size)]


def _scaled(resize_size: int, source_size: int, crop_size: int) -> int:
    """The resize that makes a ``source_size`` crop cover what a ``crop_size`` crop of ``resize_size`` covers."""
    return int(round(resize_size * source_size / crop_size))


class ViewWithSource:
    """A view at ``crop_size`` and the same view at ``source_size`` (uint8), from one geometry pass.

    ``geometry`` (resize, crop, flip, and any training augmentation) produces the source view; the
    network's view is it resized to ``crop_size`` (area interpolation, i.e. anti-aliased) and
    normalised, so the two differ only in resolution, colour changes included. Called through
    :func:`apply_transform`; :meth:`set_random_state` lets :class:`~data_modules.resumable.SeededTransform`
    seed it like an ``A.Compose``.

    Args:
        geometry: albumentations steps ending at ``(source_size, source_size)`` (photometric steps
            may follow the geometric ones: they change the source and hence the view alike).
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
