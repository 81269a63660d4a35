"""Random boxes shaped like a localiser's: the crops of a control that trains on a second view without looking."""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["random_boxes"]


def random_boxes(
    batch: int,
    height: int,
    width: int,
    area: tuple[float, float] = (0.35, 0.75),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """One random box per image, as torchvision's ``RandomResizedCrop`` draws them, all at once.

    The box covers a fraction ``a ~ U(area)`` of the ``height x width`` view, with aspect ratio ``w / h = r``,
    ``log r ~ U(log ratio)``; a side that would leave the view is cut to it; its position is uniform over the
    places where it fits.

    Args:
        batch: ``B``, the number of boxes.
        height, width: the view's size in pixels.
        area: range of the box's area as a fraction of the view's, within ``(0, 1]``.
        ratio: range of ``w / h``, positive, ``low <= high``.
        generator: for reproducible boxes (``None``: torch's global generator).
        device: where the boxes are made.

    Returns:
        ``(B, 4)`` float32 ``(x1, y1, x2, y2)`` in pixels, inside ``[0, width] x [0, height]``.
    """
    if not 0 < area[0] <= area[1] <= 1:
        raise ValueError(f"area must satisfy 0 < low <= high <= 1 (fractions of the view), got {tuple(area)}")
    if not 0 < ratio[0] <= ratio[1]:
        raise ValueError(f"ratio must satisfy 0 < low <= high, got {tuple(ratio)}")
    u = torch.rand(batch, 4, generator=generator, device=device)
    fraction = area[0] + (area[1] - area[0]) * u[:, 0]
    aspect = torch.exp(math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[:, 1])
    pixels = fraction * height * width
    w = torch.sqrt(pixels * aspect).clamp(max=width)
    h = torch.sqrt(pixels / aspect).clamp(max=height)
    x1 = (width - w) * u[:, 2]
    y1 = (height - h) * u[:, 3]
    return torch.stack([x1, y1, x1 + w, y1 + h], dim=1)
