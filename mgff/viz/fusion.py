"""Figures of the MGFF fusion head: the attention each grid position receives, and the super-nodes."""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple, Sequence

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import Tensor

from data_modules.transforms import IMAGENET_MEAN, IMAGENET_STD
from mgff.viz.drawing import show_image, to_display

if TYPE_CHECKING:
    from mgff.lit.classifier import FineGrainedClassifier

__all__ = ["FusionMaps", "attention_received", "super_node_labels", "fusion_maps", "plot_fusion_maps"]


class FusionMaps(NamedTuple):
    """What :func:`fusion_maps` returns (``S`` scales on an ``H x W`` grid, ``K`` super-nodes).

    Attributes:
        attention: per scale, ``(B, H, W)`` attention each grid position receives (rows of the
            softmax averaged over heads and queries: each map sums to 1), or ``None`` for a scale
            whose attention kind has no global map (HiLo, ACmix); empty without spatial attention.
        super_nodes: ``(B, S_n, H, W)`` index of the super-node each node is assigned to most
            (``S_n = 1`` for ``concat`` nodes, ``S`` for ``per_scale``), or ``None`` without GCN pooling.
        assignment: ``(B, N, K)`` the soft assignment itself, or ``None``.
        grid: ``(H, W)``.
        num_super_nodes: ``K`` (0 without pooling).
    """

    attention: list[Tensor | None]
    super_nodes: Tensor | None
    assignment: Tensor | None
    grid: tuple[int, int]
    num_super_nodes: int


def attention_received(attention: Tensor, grid: tuple[int, int]) -> Tensor:
    """``(B, heads, N, N)`` row-softmax attention -> ``(B, H, W)`` mean attention each key position
    receives, averaged over heads and queries (``N = H * W``; each output map sums to 1)."""
    batch, _, queries, keys = attention.shape
    height, width = grid
    if queries != keys or keys != height * width:
        raise ValueError(f"attention must be (B, heads, N, N) with N = {height} * {width}, got {tuple(attention.shape)}")
    return attention.float().mean(dim=(1, 2)).reshape(batch, height, width)


def super_node_labels(assignment: Tensor, grid: tuple[int, int]) -> Tensor:
    """``(B, N, K)`` soft assignment -> ``(B, S, H, W)`` index of each node's strongest super-node,
    with nodes ordered (scale, row, column) and ``S = N / (H * W)`` (1 for concatenated scales)."""
    batch, nodes, _ = assignment.shape
    height, width = grid
    if nodes % (height * width):
        raise ValueError(f"{nodes} nodes are not a whole number of {height} x {width} grids")
    return assignment.argmax(dim=-1).reshape(batch, nodes // (height * width), height, width)


@torch.no_grad()
def fusion_maps(model: FineGrainedClassifier, images: Tensor, stage: int = 1) -> FusionMaps:
    """Run a stage classifier's backbone and MGFF head on ``images (B, 3, H, W)`` and keep the
    per-scale attention and the super-node assignment (eval mode, restored afterwards).

    Args:
        model: a :class:`~mgff.lit.classifier.FineGrainedClassifier` or
            :class:`~mgff.lit.two_stage.TwoStageClassifier` with ``head='mgff'``.
        images: what that stage sees: the images for stage 1, the cropper's crops for stage 2.
        stage: ``2`` uses the two-stage model's second backbone and / or head where it has them
            (``shared_classifier=False``, ``shared_head=False``); shared, both stages are one network.
    """
    if stage not in (1, 2):
        raise ValueError(f"stage must be 1 or 2, got {stage}")
    backbone, head = model.backbone, getattr(model, "head", None)
    if stage == 2 and getattr(model, "head2", None) is not None:
        head = model.head2
        if getattr(model, "backbone2", None) is not None:
            backbone = model.backbone2
    if not callable(getattr(head, "forward_details", None)):
        raise TypeError(f"the model's head ({type(head).__name__}) has no forward_details: use head='mgff'")
    was_training = model.training
    model.eval()
    try:
        details = head.forward_details(backbone(images.to(model.device)))
    finally:
        model.train(was_training)
    grid = tuple(details["grid"])
    attention = [attention_received(a.cpu(), grid) if a is not None else None for a in details.get("attention", [])]
    assignment = details["assignment"]
    if assignment is None:
        return FusionMaps(attention, None, None, grid, 0)
    assignment = assignment.detach().float().cpu()
    return FusionMaps(attention, super_node_labels(assignment, grid), assignment, grid, assignment.shape[-1])


def plot_fusion_maps(
    images: Tensor,
    maps: FusionMaps,
    scale_names: Sequence[str] | None = None,
    alpha: float = 0.55,
    mean: Sequence[float] | None = IMAGENET_MEAN,
    std: Sequence[float] | None = IMAGENET_STD,
) -> Figure:
    """One row per image: the image, the attention received at each scale (``magma``, scaled per
    map), and the super-node assignment of the nodes (one colour per super-node), over the image.

    Args:
        images: ``(B, 3, H, W)`` normalised images the maps were computed on.
        maps: :func:`fusion_maps` of those images.
        scale_names: names of the scales (default ``scale 1..S``), e.g. the backbone stages.

    Returns:
        A ``B x (1 + A + S_n)`` grid (``A`` scales with an attention map, ``S_n`` assignment maps);
        column titles: ``image``, ``attention <scale>``, ``super-nodes`` (or ``super-nodes <scale>``).
    """
    shown = to_display(images, mean, std)
    attention_scales = [i for i, a in enumerate(maps.attention) if a is not None]
    node_scales = 0 if maps.super_nodes is None else maps.super_nodes.shape[1]
    num_scales = max(len(maps.attention), node_scales, 1)
    names = list(scale_names) if scale_names is not None else [f"scale {i + 1}" for i in range(num_scales)]
    columns = 1 + len(attention_scales) + node_scales
    fig = Figure(figsize=(2.2 * columns, 2.3 * len(shown)), layout="constrained")
    axes = np.asarray(fig.subplots(len(shown), columns, squeeze=False))
    height, width = shown[0].shape[:2]
    extent = (0, width, height, 0)
    for b, image in enumerate(shown):
        row = axes[b]
        show_image(row[0], image, "image" if b == 0 else None)
        for col, scale in enumerate(attention_scales, start=1):
            show_image(row[col], image, f"attention {names[scale]}" if b == 0 else None)
            row[col].imshow(maps.attention[scale][b].numpy(), cmap="magma", alpha=alpha, extent=extent, interpolation="nearest")
        for s in range(node_scales):
            col = 1 + len(attention_scales) + s
            title = "super-nodes" if node_scales == 1 else f"super-nodes {names[s]}"
            show_image(row[col], image, title if b == 0 else None)
            row[col].imshow(
                maps.super_nodes[b, s].numpy(), cmap="tab10", vmin=-0.5, vmax=9.5 if maps.num_super_nodes <= 10 else maps.num_super_nodes - 0.5,
                alpha=alpha, extent=extent, interpolation="nearest",
            )
    return fig
