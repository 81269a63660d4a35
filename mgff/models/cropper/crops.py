"""Boxes -> crops: every image's box cut out and resized in one ``roi_align`` call, and the
:class:`CropOutput` every localiser returns."""
from typing import NamedTuple

import torch
from torch import Tensor
from torchvision.ops import roi_align

__all__ = ['crop_and_resize', 'crop_from_source', 'CropOutput']


def crop_and_resize(images: Tensor, boxes: Tensor, out_size: int | tuple[int, int]) -> Tensor:
    """Cut one box out of each image and resize it, in one ``roi_align`` call.

    ``aligned=True`` puts pixel centres at half-integers, so a box reads exactly what a slice
    plus ``F.interpolate(mode='bilinear', align_corners=False)`` reads, including its edges
    (where roi_align reads the neighbouring pixels outside the box instead of repeating the
    border). ``sampling_ratio=0`` lets each box average ``ceil(box side / out side)`` samples per
    output pixel: one bilinear sample when enlarging, an anti-aliasing average when shrinking.

    Args:
        images: ``(B, C, H, W)``.
        boxes: ``(B, 4)`` xyxy in pixels of ``images``, one per image.
        out_size: ``S`` or ``(S_h, S_w)``.

    Returns:
        ``(B, C, S_h, S_w)`` crops in ``images.dtype`` (computed in float32 for half types,
        which roi_align lacks on CPU).
    """
    if boxes.ndim != 2 or boxes.shape != (images.shape[0], 4):
        raise ValueError(f'boxes must be (B, 4) = ({images.shape[0]}, 4), got {tuple(boxes.shape)}')
    size = (out_size, out_size) if isinstance(out_size, int) else tuple(out_size)
    compute_dtype = images.dtype if images.dtype in (torch.float32, torch.float64) else torch.float32
    index = torch.arange(images.shape[0], device=images.device, dtype=compute_dtype).unsqueeze(1)
    rois = torch.cat([index, boxes.to(compute_dtype)], dim=1)  # (B, 5): image index, x1, y1, x2, y2
    crops = roi_align(images.to(compute_dtype), rois, output_size=size, spatial_scale=1.0,
                      sampling_ratio=0, aligned=True)
    return crops.to(images.dtype)


def crop_from_source(source: Tensor, boxes: Tensor, view_size: tuple[int, int], out_size: int) -> Tensor:
    """Crops cut from a higher-resolution copy of the view (the paper cuts "从原始图像中", from the original image).

    Args:
        source: ``(B, 3, H_s, W_s)`` uint8, the same view as the network's input at a higher resolution
            (``batch["source"]``).
        boxes: ``(B, 4)`` xyxy in pixels of the ``view_size`` view; scaled to the source's frame here.
        view_size: ``(H, W)`` of the view the boxes are in.
        out_size: side ``S`` of the crops.

    Returns:
        ``(B, 3, S, S)`` float32 crops in ``[0, 1]``, in one ``roi_align`` call.
    """
    scale_y, scale_x = source.shape[-2] / view_size[0], source.shape[-1] / view_size[1]
    source_boxes = boxes.float() * boxes.new_tensor([scale_x, scale_y, scale_x, scale_y], dtype=torch.float32)
    return crop_and_resize(source.float(), source_boxes, out_size) / 255.0


class CropOutput(NamedTuple):
    """What :class:`AttentionCropper` returns.

    Attributes:
        crops: ``(B, 3, S, S)`` object crops from the full-resolution input, in its dtype (``None`` from
            :meth:`AttentionCropper.locate`).
        boxes: ``(B, 4)`` float32 xyxy boxes in input-image pixels.
        response: ``(B, H, W)`` float32 response maps in ``[0, 1]`` at the input size.
        logits: ``(B, num_classes)`` from the ViT's head, or ``None`` without one.
    """
    crops: Tensor
    boxes: Tensor
    response: Tensor
    logits: Tensor | None
