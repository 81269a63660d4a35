"""Drawing helpers every figure shares: denormalised display arrays, image panels in a grid, boxes.

Conventions: ``B`` images; image tensors are ``(B, 3, H, W)`` normalised with ``mean``/``std`` as
the DataModules produce them (ImageNet statistics by default) and are denormalised for display;
boxes are ``(x1, y1, x2, y2)`` in continuous pixel coordinates (pixel ``i`` spans ``[i, i + 1)``),
drawn exactly there because every image is shown with ``extent=(0, W, H, 0)``; a box of NaNs
(an image without a ground-truth box) is not drawn.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from torch import Tensor

from data_modules.transforms import IMAGENET_MEAN, IMAGENET_STD, denormalize

__all__ = ["GT_BOX_COLOR", "PRED_BOX_COLOR", "to_display", "grid_axes", "show_image", "draw_box", "as_array", "boxes_per_image"]

GT_BOX_COLOR = "#00ff00"  # ground truth: pure green
PRED_BOX_COLOR = "#ff0000"  # the cropper's box: pure red


def to_display(
    images: Tensor,
    mean: Sequence[float] | None = IMAGENET_MEAN,
    std: Sequence[float] | None = IMAGENET_STD,
) -> list[np.ndarray]:
    """Normalised ``(B, 3, H, W)`` (or one ``(3, H, W)``) tensor -> list of ``(H, W, 3)`` float arrays in [0, 1].

    ``mean``/``std`` ``None``: the tensor already holds values in [0, 1] (they are only clipped).
    """
    images = images.detach().float().cpu()
    if images.ndim == 3:
        images = images.unsqueeze(0)
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
    images = denormalize(images, mean, std) if mean is not None and std is not None else images.clamp(0, 1)
    return list(images.permute(0, 2, 3, 1).numpy())


def grid_axes(count: int, ncols: int, panel_size: float):
    """A constrained-layout figure with ``count`` image panels in rows of ``ncols`` (unused ones removed)."""
    if count < 1:
        raise ValueError("nothing to draw: no images")
    ncols = max(1, min(ncols, count))
    nrows = math.ceil(count / ncols)
    fig = Figure(figsize=(panel_size * ncols, panel_size * nrows), layout="constrained")
    axes = np.asarray(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    for ax in axes[count:]:
        fig.delaxes(ax)
    return fig, list(axes[:count])


def show_image(ax, image: np.ndarray, title: str | None = None, fontsize: float = 8) -> None:
    """``imshow`` an ``(H, W, 3)`` or ``(H, W)`` array with pixel ``i`` spanning ``[i, i + 1)``."""
    height, width = image.shape[:2]
    ax.imshow(image, extent=(0, width, height, 0), interpolation="nearest")
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=fontsize)


def draw_box(ax, box, color: str, linewidth: float = 2.0, linestyle: str = "-") -> bool:
    """Draw an xyxy box on ``ax``; skip it (return False) when it is missing or NaN."""
    if box is None:
        return False
    x1, y1, x2, y2 = (float(v) for v in (box.tolist() if isinstance(box, (Tensor, np.ndarray)) else box))
    if any(math.isnan(v) for v in (x1, y1, x2, y2)):
        return False
    ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=color, linewidth=linewidth, linestyle=linestyle))
    return True


def as_array(image) -> np.ndarray:
    """An ``(H, W, 3)`` uint8/float array or a ``(3, H, W)`` tensor in [0, 1] -> ``(H, W, 3)`` array."""
    if isinstance(image, Tensor):
        return image.detach().float().cpu().permute(1, 2, 0).clamp(0, 1).numpy()
    return np.asarray(image)


def boxes_per_image(boxes, count: int) -> list:
    """One box (or ``None``) per image from a ``(B, 4)`` tensor/array, a list, or ``None``; refuses a count mismatch."""
    if boxes is None:
        return [None] * count
    rows = list(boxes)
    if len(rows) != count:
        raise ValueError(f"got {len(rows)} boxes for {count} images")
    return rows
