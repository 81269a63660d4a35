"""Response map -> one object box per image: threshold, connected regions, padding, minimum size.

Boxes are ``(x1, y1, x2, y2)`` in continuous pixel coordinates: pixel ``i`` spans ``[i, i + 1)``,
so the whole ``H x W`` image is ``(0, 0, W, H)``.
"""
import torch
import torch.nn.functional as F
from torch import Tensor

from mgff.models.cropper.choices import check_choice

__all__ = ['BOX_MODES', 'check_box_options', 'connected_components', 'boxes_from_response_map']

BOX_MODES = ('largest', 'all')


def connected_components(mask: Tensor, connectivity: int = 8) -> Tensor:
    """Label the connected foreground regions of a batch of binary masks, all images at once.

    Every foreground pixel starts with its own label (1 + its flat index) and repeatedly takes
    the largest label among its neighbours (a 3x3 max-pool for 8-connectivity, a plus-shaped one
    for 4), then jumps to the label its label's pixel already holds (pointer jumping: labels only
    grow and stay inside the component, and long regions converge in far fewer steps than their
    length). It stops once no label changes; each region ends labelled by its largest flat index
    + 1.

    Args:
        mask: ``(B, h, w)`` bool foreground.
        connectivity: 4 or 8.

    Returns:
        ``(B, h, w)`` int64 labels, 0 on the background.
    """
    if connectivity not in (4, 8):
        raise ValueError(f'connectivity must be 4 or 8, got {connectivity}')
    batch, h, w = mask.shape
    # float labels because max_pool2d has no integer kernel on CPU; exact up to 2**24 pixels
    foreground = mask.to(torch.float32).unsqueeze(1)
    labels = torch.arange(1, h * w + 1, dtype=torch.float32, device=mask.device).view(1, 1, h, w) * foreground
    background = torch.zeros(batch, 1, dtype=torch.float32, device=mask.device)
    for _ in range(h * w):  # the longest possible path: a bound, never reached in practice
        if connectivity == 8:
            grown = F.max_pool2d(labels, 3, stride=1, padding=1)
        else:
            grown = torch.maximum(F.max_pool2d(labels, (3, 1), stride=1, padding=(1, 0)),
                                  F.max_pool2d(labels, (1, 3), stride=1, padding=(0, 1)))
        grown = (grown * foreground).view(batch, h * w)
        # label L names pixel L - 1; index 0 of the lookup is the background's label 0
        jumped = torch.cat([background, grown], dim=1).gather(1, grown.long()).view_as(labels)
        if torch.equal(jumped, labels):
            break
        labels = jumped
    return labels.squeeze(1).long()


def _mask_boxes(mask: Tensor) -> tuple[Tensor, Tensor]:
    """Tight xyxy pixel box around the ``True`` pixels of each ``(B, H, W)`` mask -> ``(B, 4)``
    float, and ``(B,)`` whether the mask had any pixel (the box is meaningless where not)."""
    _, height, width = mask.shape
    rows, cols = mask.any(dim=2), mask.any(dim=1)
    ys = torch.arange(height, device=mask.device)
    xs = torch.arange(width, device=mask.device)
    y1 = torch.where(rows, ys, height).amin(dim=1)
    y2 = torch.where(rows, ys + 1, 0).amax(dim=1)
    x1 = torch.where(cols, xs, width).amin(dim=1)
    x2 = torch.where(cols, xs + 1, 0).amax(dim=1)
    return torch.stack([x1, y1, x2, y2], dim=1).to(torch.float32), rows.any(dim=1)


def boxes_from_response_map(
        maps: Tensor,
        threshold: str | float = 'mean',
        box_mode: str = 'largest',
        padding: float = 0.0,
        min_size: float = 0.0,
        connectivity: int = 8,
        label_size: int | tuple[int, int] = 32,
) -> Tensor:
    """One object box per response map, all images at once.

    1. Threshold: a pixel is foreground where ``map >= t``, with ``t`` the image's mean
       (``'mean'``) or its ``threshold``-quantile (a float in ``(0, 1)``, nearest rank).
    2. Box: ``'all'`` boxes every foreground pixel; ``'largest'`` boxes the largest connected
       region (:func:`connected_components`). Regions are labelled on the map average-pooled
       down to ``label_size`` (labelling costs area times region length, and a response map is
       an upsampled token grid, so its grid loses little); the chosen region is brought back to
       full resolution and intersected with the full-resolution foreground before boxing, so
       the box edges stay pixel-accurate.
    3. Padding: each side grows by ``padding`` times the box's width (left/right) or height
       (top/bottom); the box is then clipped to the image.
    4. Minimum size: width and height grow to at least ``min_size`` times the image's, around
       the box centre, shifted back inside the image where needed.

    A flat map (no structure to threshold) gives the whole image.

    Args:
        maps: ``(B, H, W)`` response maps.
        threshold: ``'mean'`` or a quantile in ``(0, 1)``.
        box_mode: ``'largest' | 'all'``.
        padding: ``>= 0``, fraction of the box size added on each side.
        min_size: in ``[0, 1]``, fraction of the image side.
        connectivity: 4 or 8, for ``'largest'``.
        label_size: ``(h, w)`` grid the regions are labelled on (e.g. the token grid), or an
            int: the longest side, keeping the aspect ratio. Never upsampled.

    Returns:
        ``(B, 4)`` float32 ``(x1, y1, x2, y2)`` in pixels of the maps, ``0 <= x1 < x2 <= W``.
    """
    check_box_options(box_mode, threshold, padding, min_size)
    if min(label_size if isinstance(label_size, tuple) else (label_size,)) < 1:
        raise ValueError(f'label_size must be >= 1, got {label_size}')
    maps = maps.to(torch.float32)  # pixel coordinates and quantiles want float32, not bf16
    batch, height, width = maps.shape
    flat_maps = maps.reshape(batch, -1)

    if threshold == 'mean':
        cut = flat_maps.mean(dim=1)
    else:
        # kthvalue rather than torch.quantile, which refuses inputs over 16M elements
        rank = min(max(round(threshold * (flat_maps.shape[1] - 1)) + 1, 1), flat_maps.shape[1])
        cut = flat_maps.kthvalue(rank, dim=1).values
    cut = cut.view(batch, 1, 1)
    foreground = maps >= cut

    if box_mode == 'largest':
        if isinstance(label_size, int):
            scale = min(1.0, label_size / max(height, width))
            label_size = (max(1, round(height * scale)), max(1, round(width * scale)))
        label_size = (min(label_size[0], height), min(label_size[1], width))
        if label_size != (height, width):
            small = F.adaptive_avg_pool2d(maps.unsqueeze(1), label_size).squeeze(1) >= cut
        else:
            small = foreground
        labels = connected_components(small, connectivity)
        sizes = torch.zeros(batch, labels[0].numel() + 1, dtype=torch.float32, device=maps.device)
        sizes = sizes.scatter_add(1, labels.view(batch, -1), torch.ones_like(labels.view(batch, -1), dtype=torch.float32))
        sizes[:, 0] = 0  # the background is not a region
        largest = labels == sizes.argmax(dim=1).view(batch, 1, 1)
        largest = largest & small
        if largest.shape[-2:] != (height, width):
            largest = F.interpolate(largest.unsqueeze(1).to(torch.float32), size=(height, width),
                                    mode='nearest').squeeze(1).bool()
        refined = largest & foreground
        # an averaged cell above the cut always has a full-resolution pixel above it, but that
        # pixel can sit on a cell border that nearest upsampling gives to the neighbour
        region = torch.where(refined.flatten(1).any(dim=1).view(batch, 1, 1), refined, largest)
    else:
        region = foreground

    boxes, found = _mask_boxes(region)
    flat = (flat_maps.amax(dim=1) - flat_maps.amin(dim=1)) <= 1e-6
    whole = torch.tensor([0.0, 0.0, width, height], dtype=torch.float32, device=maps.device)
    boxes = torch.where((found & ~flat).unsqueeze(1), boxes, whole)

    x1, y1, x2, y2 = boxes.unbind(dim=1)
    pad_x, pad_y = padding * (x2 - x1), padding * (y2 - y1)
    x1, x2 = (x1 - pad_x).clamp(min=0), (x2 + pad_x).clamp(max=width)
    y1, y2 = (y1 - pad_y).clamp(min=0), (y2 + pad_y).clamp(max=height)
    box_w = (x2 - x1).clamp(min=min_size * width)
    box_h = (y2 - y1).clamp(min=min_size * height)
    cx = torch.clamp((x1 + x2) / 2, min=box_w / 2, max=width - box_w / 2)
    cy = torch.clamp((y1 + y2) / 2, min=box_h / 2, max=height - box_h / 2)
    return torch.stack([cx - box_w / 2, cy - box_h / 2, cx + box_w / 2, cy + box_h / 2], dim=1)


def check_box_options(box_mode: str, threshold, padding: float, min_size: float) -> None:
    """Check the map -> box options every localiser shares (see :func:`boxes_from_response_map`)."""
    check_choice('box_mode', box_mode, BOX_MODES)
    if not (threshold == 'mean' or (isinstance(threshold, float) and 0.0 < threshold < 1.0)):
        raise ValueError(f"threshold must be 'mean' or a float quantile in (0, 1), got {threshold!r}")
    if padding < 0:
        raise ValueError(f'padding must be >= 0, got {padding}')
    if not 0.0 <= min_size <= 1.0:
        raise ValueError(f'min_size must lie in [0, 1], got {min_size}')
