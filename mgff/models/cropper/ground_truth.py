"""The ``ground_truth`` localiser: an oracle that boxes each image with its annotated box.

Used inside the two-stage model (stage 1 still sees the whole image, stage 2 the ground-truth crop),
it bounds what a perfect localiser could give. It is not the DataModule's ``crop_to_box``, where
stage 1 also sees only the box. Only for data with boxes; never a way to train a localiser.
"""
import torch
from torch import Tensor

__all__ = ['ground_truth_localization', 'box_masks']


def box_masks(boxes: Tensor, size: tuple[int, int]) -> Tensor:
    """``(B, 4)`` xyxy boxes -> ``(B, H, W)`` float32 masks, 1 on pixels whose centre lies in the box."""
    height, width = size
    ys = torch.arange(height, device=boxes.device, dtype=torch.float32) + 0.5
    xs = torch.arange(width, device=boxes.device, dtype=torch.float32) + 0.5
    x1, y1, x2, y2 = (v.view(-1, 1, 1) for v in boxes.float().unbind(dim=1))
    inside_y = (ys.view(1, -1, 1) >= y1) & (ys.view(1, -1, 1) < y2)
    inside_x = (xs.view(1, 1, -1) >= x1) & (xs.view(1, 1, -1) < x2)
    return (inside_y & inside_x).float()


def ground_truth_localization(boxes: Tensor | None, size: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """The batch's boxes as the localisation of its images.

    Args:
        boxes: ``batch["box"]``: ``(B, 4)`` xyxy in pixels of the images (the DataModule moves the
            box through the same geometry as the image), NaN rows for images without a box.
        size: ``(H, W)`` of the images.

    Returns:
        ``response (B, H, W)`` (the box as a 0/1 mask) and ``boxes (B, 4)`` float32, clipped to the image.

    Raises:
        ValueError: no boxes in the batch, a box with NaN (an image without one), or an empty box.
    """
    if boxes is None:
        raise ValueError("model.localization='ground_truth' needs batch['box']: use a dataset with boxes "
                         "(CUB, NA-Birds, Stanford Cars, Oxford Pets)")
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"batch['box'] must be (B, 4) xyxy, got {tuple(boxes.shape)}")
    boxes = boxes.float()
    missing = torch.isnan(boxes).any(dim=1)
    if bool(missing.any()):
        raise ValueError(f"model.localization='ground_truth': {int(missing.sum())} image(s) of the batch have no "
                         f"ground-truth box (NaN rows at {missing.nonzero().flatten().tolist()})")
    height, width = size
    limits = boxes.new_tensor([width, height, width, height])
    boxes = torch.minimum(boxes.clamp_min(0), limits)
    empty = (boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])
    if bool(empty.any()):
        raise ValueError(f"model.localization='ground_truth': the box of image(s) {empty.nonzero().flatten().tolist()} "
                         f"is empty inside the {width} x {height} image: {boxes[empty].tolist()}")
    return box_masks(boxes, size), boxes
