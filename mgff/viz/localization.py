"""Figures of the localiser: response maps with predicted and ground-truth boxes, and the crops."""

from __future__ import annotations

from typing import Sequence

import numpy as np
from matplotlib.figure import Figure
from torch import Tensor

from data_modules.transforms import IMAGENET_MEAN, IMAGENET_STD
from mgff.viz.drawing import GT_BOX_COLOR, PRED_BOX_COLOR, boxes_per_image, draw_box, grid_axes, show_image, to_display

__all__ = ["response_overlay", "crop_panel", "localization_panel", "crop_titles"]


def response_overlay(
    images: Tensor,
    responses: Tensor,
    boxes: Tensor,
    gt_boxes: Tensor | None = None,
    titles: Sequence[str] | None = None,
    ncols: int = 4,
    alpha: float = 0.45,
    mean: Sequence[float] | None = IMAGENET_MEAN,
    std: Sequence[float] | None = IMAGENET_STD,
) -> Figure:
    """Each image under its response map (``jet``, values 0..1), with the predicted box (red) and the
    ground-truth box (green, where known).

    Args:
        images: ``(B, 3, H, W)`` normalised images (the cropper's input).
        responses: ``(B, H, W)`` response maps in [0, 1] (``CropOutput.response``).
        boxes: ``(B, 4)`` predicted xyxy boxes (``CropOutput.boxes``).
        gt_boxes: ``(B, 4)`` ground-truth boxes, NaN rows for images without one.
        titles: one title per image.

    Returns:
        A figure with one axis per image; each axis holds two images (the photo, then the map).
    """
    shown = to_display(images, mean, std)
    if responses.shape != (len(shown), *shown[0].shape[:2]):
        raise ValueError(f"responses must be (B, H, W) = ({len(shown)}, {shown[0].shape[0]}, {shown[0].shape[1]}), got {tuple(responses.shape)}")
    pred_rows, gt_rows = boxes_per_image(boxes, len(shown)), boxes_per_image(gt_boxes, len(shown))
    fig, axes = grid_axes(len(shown), ncols, 2.5)
    maps = responses.detach().float().cpu().numpy()
    for i, ax in enumerate(axes):
        show_image(ax, shown[i], titles[i] if titles is not None else None)
        height, width = maps[i].shape
        ax.imshow(maps[i], cmap="jet", alpha=alpha, vmin=0.0, vmax=1.0, extent=(0, width, height, 0), interpolation="bilinear")
        draw_box(ax, gt_rows[i], GT_BOX_COLOR, linestyle="--")
        draw_box(ax, pred_rows[i], PRED_BOX_COLOR)
    return fig


def crop_panel(
    images: Tensor,
    crops: Tensor,
    boxes: Tensor,
    titles: Sequence[str] | None = None,
    mean: Sequence[float] | None = IMAGENET_MEAN,
    std: Sequence[float] | None = IMAGENET_STD,
) -> Figure:
    """The cropper's cut: top row the images with their box (red), bottom row the crops stage 2 sees.

    Args:
        images: ``(B, 3, H, W)`` normalised images.
        crops: ``(B, 3, S, S)`` crops (``CropOutput.crops``), normalised like the images.
        boxes: ``(B, 4)`` xyxy boxes the crops were cut from.
        titles: one title per image (the crop's title gives its box size).

    Returns:
        A ``2 x B`` grid: axes ``[0..B)`` the images, ``[B..2B)`` the crops.
    """
    shown, cut = to_display(images, mean, std), to_display(crops, mean, std)
    if len(cut) != len(shown):
        raise ValueError(f"got {len(cut)} crops for {len(shown)} images")
    count = len(shown)
    fig = Figure(figsize=(2.2 * count, 4.6), layout="constrained")
    axes = np.asarray(fig.subplots(2, count, squeeze=False))
    box_rows = boxes_per_image(boxes, count)
    for i in range(count):
        show_image(axes[0, i], shown[i], titles[i] if titles is not None else None)
        draw_box(axes[0, i], box_rows[i], PRED_BOX_COLOR)
        x1, y1, x2, y2 = (float(v) for v in box_rows[i])
        show_image(axes[1, i], cut[i], f"crop of {x2 - x1:.0f} x {y2 - y1:.0f} px -> {cut[i].shape[1]} px")
    return fig


def localization_panel(
    images: Tensor,
    responses: Tensor,
    boxes: Tensor,
    crops: Tensor,
    gt_boxes: Tensor | None = None,
    titles: Sequence[str] | None = None,
    crop_titles: Sequence[str] | None = None,
    alpha: float = 0.45,
    mean: Sequence[float] | None = IMAGENET_MEAN,
    std: Sequence[float] | None = IMAGENET_STD,
) -> Figure:
    """What the localiser did, one column per image: the image under its response map with the predicted
    box (red) and the ground-truth box (green, dashed, where known), and below it the crop stage 2
    classifies, drawn pixel for pixel (``interpolation='nearest'``) so its real resolution shows.

    Args:
        images: ``(B, 3, H, W)`` normalised images (stage 1's view).
        responses: ``(B, H, W)`` response maps in [0, 1].
        boxes: ``(B, 4)`` predicted xyxy boxes in pixels of ``images``.
        crops: ``(B, 3, S, S)`` the crops, normalised like the images.
        gt_boxes: ``(B, 4)`` ground-truth boxes, NaN rows for images without one.
        titles: one title per image; crop_titles: one per crop (default ``S x S px``).

    Returns:
        A ``2 x B`` grid: axes ``[0..B)`` the images with map and boxes, ``[B..2B)`` the crops.
    """
    shown, cut = to_display(images, mean, std), to_display(crops, mean, std)
    count = len(shown)
    if len(cut) != count:
        raise ValueError(f"got {len(cut)} crops for {count} images")
    if responses.shape != (count, *shown[0].shape[:2]):
        raise ValueError(f"responses must be (B, H, W) = ({count}, {shown[0].shape[0]}, {shown[0].shape[1]}), got {tuple(responses.shape)}")
    pred_rows, gt_rows = boxes_per_image(boxes, count), boxes_per_image(gt_boxes, count)
    maps = responses.detach().float().cpu().numpy()
    fig = Figure(figsize=(2.5 * count, 5.0), layout="constrained")
    axes = np.asarray(fig.subplots(2, count, squeeze=False))
    for i in range(count):
        show_image(axes[0, i], shown[i], titles[i] if titles is not None else None)
        height, width = maps[i].shape
        axes[0, i].imshow(maps[i], cmap="jet", alpha=alpha, vmin=0.0, vmax=1.0, extent=(0, width, height, 0), interpolation="bilinear")
        draw_box(axes[0, i], gt_rows[i], GT_BOX_COLOR, linestyle="--")
        draw_box(axes[0, i], pred_rows[i], PRED_BOX_COLOR)
        side = cut[i].shape[0]
        show_image(axes[1, i], cut[i], crop_titles[i] if crop_titles is not None else f"crop {side} x {cut[i].shape[1]} px")
    return fig


def crop_titles(boxes: Tensor, view_size: Sequence[int], frame_size: Sequence[int], frame: str, side: int) -> list[str]:
    """``"<w> x <h> px of the <frame>\\n-> <side> px"`` per box: the size of each ``(B, 4)`` box of an
    ``(H, W)`` ``view_size`` view in the frame it is cut from (``frame_size``, same geometry), and the crop's side."""
    scale = boxes.new_tensor([frame_size[-1] / view_size[-1], frame_size[-2] / view_size[-2]]).repeat(2)
    sizes = (boxes.float() * scale)[:, 2:] - (boxes.float() * scale)[:, :2]
    return [f"{w:.0f} x {h:.0f} px of the {frame}\n-> {side} px" for w, h in sizes.tolist()]
