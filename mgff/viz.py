"""Figures and tables for looking at mgff's data, its two stages, its fusion head and its errors.

The notebooks in ``notebooks/`` and the :class:`~mgff.callbacks.AttentionMapLogger` call these; each
function returns a matplotlib :class:`~matplotlib.figure.Figure` or a pandas ``DataFrame`` and never
shows anything itself. Figures are built without ``pyplot`` (no global figure registry, nothing to
close in a training loop); in Jupyter they display as the cell's value once ``%matplotlib inline``
is active.

In the order a reader needs them:

1. **data**: :func:`image_grid`, :func:`sample_grid`, :func:`augmentation_grid`,
   :func:`class_counts`, :func:`image_sizes`, :func:`plot_class_counts`, :func:`plot_image_sizes`,
   :func:`sample_batch`;
2. **the cropper**: :func:`response_overlay`, :func:`crop_panel`;
3. **the two stages**: :func:`stage_logits`, :func:`stage_predictions`, :func:`plot_stage_predictions`;
4. **the fusion head**: :func:`attention_received`, :func:`super_node_labels`, :func:`fusion_maps`,
   :func:`plot_fusion_maps`;
5. **errors** from a ``predictions.csv``: :func:`read_predictions`, :func:`confusion_matrix`,
   :func:`plot_confusion_matrix`, :func:`per_class_accuracy`, :func:`plot_per_class_accuracy`,
   :func:`most_confused_pairs`, :func:`plot_confused_examples`.

Conventions: ``B`` images; image tensors are ``(B, 3, H, W)`` normalised with ``mean``/``std`` as
the DataModules produce them (ImageNet statistics by default) and are denormalised for display;
boxes are ``(x1, y1, x2, y2)`` in continuous pixel coordinates (pixel ``i`` spans ``[i, i + 1)``),
drawn exactly there because every image is shown with ``extent=(0, W, H, 0)``; a box of NaNs
(an image without a ground-truth box) is not drawn.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, Sequence

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from PIL import Image
from torch import Tensor
from torchmetrics.classification import MulticlassConfusionMatrix

from data_modules.dataset import collate_skip_none, load_rgb
from data_modules.transforms import IMAGENET_MEAN, IMAGENET_STD, apply_transform, build_train_transform, denormalize

if TYPE_CHECKING:
    from data_modules.base import FineGrainedDataModule
    from mgff.lit.classifier import FineGrainedClassifier

__all__ = [
    "GT_BOX_COLOR", "PRED_BOX_COLOR", "OUTPUT_LABELS",
    "to_display", "image_grid", "sample_grid", "augmentation_grid", "class_counts", "image_sizes",
    "plot_class_counts", "plot_image_sizes", "sample_batch",
    "response_overlay", "crop_panel",
    "stage_logits", "stage_predictions", "plot_stage_predictions",
    "FusionMaps", "attention_received", "super_node_labels", "fusion_maps", "plot_fusion_maps",
    "read_predictions", "confusion_matrix", "prediction_class_names", "plot_confusion_matrix",
    "per_class_accuracy", "plot_per_class_accuracy", "most_confused_pairs", "plot_confused_examples",
]

GT_BOX_COLOR = "#00ff00"  # ground truth: pure green
PRED_BOX_COLOR = "#ff0000"  # the cropper's box: pure red
SPLITS = ("train", "val", "test")
# names of the model's outputs (``forward_outputs``) as the tables and figures call them
OUTPUT_LABELS = {"stage1": "stage1", "stage2": "stage2", "main": "merged", "cropper": "cropper"}


# ---------------------------------------------------------------------------------------------
# shared drawing helpers


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


def _grid_axes(count: int, ncols: int, panel_size: float):
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


def _show(ax, image: np.ndarray, title: str | None = None, fontsize: float = 8) -> None:
    """``imshow`` an ``(H, W, 3)`` or ``(H, W)`` array with pixel ``i`` spanning ``[i, i + 1)``."""
    height, width = image.shape[:2]
    ax.imshow(image, extent=(0, width, height, 0), interpolation="nearest")
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=fontsize)


def _draw_box(ax, box, color: str, linewidth: float = 2.0, linestyle: str = "-") -> bool:
    """Draw an xyxy box on ``ax``; skip it (return False) when it is missing or NaN."""
    if box is None:
        return False
    x1, y1, x2, y2 = (float(v) for v in (box.tolist() if isinstance(box, (Tensor, np.ndarray)) else box))
    if any(math.isnan(v) for v in (x1, y1, x2, y2)):
        return False
    ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=color, linewidth=linewidth, linestyle=linestyle))
    return True


def _as_array(image) -> np.ndarray:
    """An ``(H, W, 3)`` uint8/float array or a ``(3, H, W)`` tensor in [0, 1] -> ``(H, W, 3)`` array."""
    if isinstance(image, Tensor):
        return image.detach().float().cpu().permute(1, 2, 0).clamp(0, 1).numpy()
    return np.asarray(image)


def _box_rows(boxes, count: int) -> list:
    if boxes is None:
        return [None] * count
    rows = list(boxes)
    if len(rows) != count:
        raise ValueError(f"got {len(rows)} boxes for {count} images")
    return rows


# ---------------------------------------------------------------------------------------------
# 1. data


def image_grid(
    images: Sequence,
    boxes: Sequence | Tensor | None = None,
    titles: Sequence[str] | None = None,
    ncols: int = 4,
    box_color: str = GT_BOX_COLOR,
    panel_size: float = 2.5,
) -> Figure:
    """Images in a grid, each with its box.

    Args:
        images: ``(H, W, 3)`` arrays (uint8 or floats in [0, 1]; sizes may differ) or ``(3, H, W)``
            tensors in [0, 1] (use :func:`to_display` for normalised batches).
        boxes: one xyxy box per image (``(B, 4)`` tensor/array or a list; ``None``/NaN rows are skipped).
        titles: one title per image.
        ncols: panels per row.
        box_color: edge colour of the boxes.
        panel_size: inches per panel.

    Returns:
        A figure with one axis per image, in order.
    """
    images = list(images)
    box_rows = _box_rows(boxes, len(images))
    if titles is not None and len(titles) != len(images):
        raise ValueError(f"got {len(titles)} titles for {len(images)} images")
    fig, axes = _grid_axes(len(images), ncols, panel_size)
    for i, (ax, image) in enumerate(zip(axes, images)):
        _show(ax, _as_array(image), titles[i] if titles is not None else None)
        _draw_box(ax, box_rows[i], box_color)
    return fig


def _stored_samples(datamodule: FineGrainedDataModule, split: str) -> tuple[Path, list]:
    """``(root, samples)`` of a split exactly as its dataset reads them: with a resized image cache,
    the cache's root and the samples with boxes scaled to the cached images."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not datamodule.datasets:
        datamodule.setup()
    dataset = datamodule.datasets[split]
    return Path(dataset.root), list(dataset.samples)


def sample_grid(
    datamodule: FineGrainedDataModule,
    split: str = "train",
    num_images: int = 8,
    ncols: int = 4,
    seed: int = 0,
) -> Figure:
    """Random images of a split as stored on disk, each with its ground-truth box and class name.

    Images are drawn without replacement (seeded) and shown sorted by class; the title is the class
    name and the image size ``W x H``.
    """
    root, samples = _stored_samples(datamodule, split)
    if not samples:
        raise ValueError(f"split {split!r} has no images")
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(samples), size=min(num_images, len(samples)), replace=False)
    chosen = sorted(chosen, key=lambda i: (samples[i].label, i))
    names = datamodule.class_names
    images, boxes, titles = [], [], []
    for i in chosen:
        image = load_rgb(root / samples[i].path)
        images.append(image)
        boxes.append(samples[i].box)
        titles.append(f"{names[samples[i].label]}\n{image.shape[1]} x {image.shape[0]}")
    return image_grid(images, boxes, titles, ncols=ncols)


def augmentation_grid(
    datamodule: FineGrainedDataModule,
    index: int = 0,
    num_views: int = 7,
    ncols: int = 4,
    seed: int = 0,
) -> Figure:
    """One training image as stored, then ``num_views`` draws of the DataModule's train augmentation.

    The augmentation is the DataModule's own pipeline (:func:`~data_modules.transforms.build_train_transform`
    with its ``resize_size``, ``crop_size``, ``hflip``, ``mean``, ``std``), seeded with ``seed``; the
    ground-truth box goes through the same geometry and is drawn on every view.

    Returns:
        ``num_views + 1`` axes: ``original W x H``, then ``view 1 .. view N`` (each ``crop_size`` square).
    """
    root, samples = _stored_samples(datamodule, "train")
    if not 0 <= index < len(samples):
        raise IndexError(f"index {index} outside the train split (0..{len(samples) - 1})")
    sample = samples[index]
    image = load_rgb(root / sample.path)
    transform = build_train_transform(datamodule.resize_size, datamodule.crop_size, datamodule.hflip, datamodule.mean, datamodule.std)
    transform.set_random_seed(seed)
    views, boxes = [image], [sample.box]
    for _ in range(num_views):
        tensor, box = apply_transform(transform, image, sample.box)
        views.append(to_display(tensor, datamodule.mean, datamodule.std)[0])
        boxes.append(box)
    titles = [f"original {image.shape[1]} x {image.shape[0]}"] + [f"view {k}" for k in range(1, num_views + 1)]
    return image_grid(views, boxes, titles, ncols=ncols)


def class_counts(datamodule: FineGrainedDataModule) -> pd.DataFrame:
    """Images per class and split.

    Returns:
        One row per class, index ``label`` (0..C-1), columns ``name``, ``train``, ``val``, ``test``
        and ``total`` (ints; val is the held-out part of train unless the dataset has its own).
    """
    names = datamodule.class_names
    table = pd.DataFrame({"name": names}, index=pd.RangeIndex(len(names), name="label"))
    for split in SPLITS:
        labels = [s.label for s in datamodule.split_samples(split)]
        table[split] = np.bincount(np.asarray(labels, dtype=np.int64), minlength=len(names))[: len(names)]
    table["total"] = table[list(SPLITS)].sum(axis=1)
    return table


def image_sizes(datamodule: FineGrainedDataModule, splits: Sequence[str] = ("train", "val", "test")) -> pd.DataFrame:
    """Size of every image as the DataModule reads it (from the file headers, not decoded; the
    resized copies where the DataModule uses an image cache).

    Returns:
        One row per image: ``split``, ``path``, ``label``, ``width``, ``height``. ``.groupby("split")
        [["width", "height"]].describe()`` gives the usual summary.
    """
    rows = []
    for split in splits:
        root, samples = _stored_samples(datamodule, split)
        for sample in samples:
            with Image.open(root / sample.path) as img:
                width, height = img.size
            rows.append({"split": split, "path": sample.path, "label": sample.label, "width": width, "height": height})
    return pd.DataFrame(rows, columns=["split", "path", "label", "width", "height"])


def plot_class_counts(counts: pd.DataFrame) -> Figure:
    """Horizontal stacked bars of :func:`class_counts`: one bar per class, one segment per split."""
    height = max(2.5, 0.25 * len(counts) + 1.0)
    fig = Figure(figsize=(6, height), layout="constrained")
    ax = fig.subplots()
    left = np.zeros(len(counts))
    y = np.arange(len(counts))
    for split in SPLITS:
        ax.barh(y, counts[split].to_numpy(), left=left, label=split)
        left += counts[split].to_numpy()
    ax.set_yticks(y, counts["name"].tolist(), fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("images")
    ax.set_title(f"images per class ({int(counts['total'].sum())} in {len(counts)} classes)")
    ax.legend(fontsize=7)
    return fig


def plot_image_sizes(sizes: pd.DataFrame) -> Figure:
    """Width against height of every image in :func:`image_sizes`, one colour per split."""
    fig = Figure(figsize=(5, 4), layout="constrained")
    ax = fig.subplots()
    for split, part in sizes.groupby("split", sort=False):
        ax.scatter(part["width"], part["height"], s=8, alpha=0.6, label=f"{split} ({len(part)})")
    ax.set_xlabel("width (px)")
    ax.set_ylabel("height (px)")
    ax.set_title("stored image sizes")
    ax.legend(fontsize=7)
    return fig


def sample_batch(datamodule: FineGrainedDataModule, split: str = "test", num_images: int = 8, seed: int = 0) -> dict[str, Any]:
    """A batch of ``num_images`` random images of ``split`` (seeded, in dataset order), transformed as
    the DataModule transforms them: ``image (B, 3, S, S)``, ``label (B,)``, ``box (B, 4)``, ``index``, ``path``."""
    if not datamodule.datasets:
        datamodule.setup()
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    dataset = datamodule.datasets[split]
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(len(dataset), size=min(num_images, len(dataset)), replace=False))
    return collate_skip_none([dataset[int(i)] for i in chosen])


# ---------------------------------------------------------------------------------------------
# 2. the cropper


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
    pred_rows, gt_rows = _box_rows(boxes, len(shown)), _box_rows(gt_boxes, len(shown))
    fig, axes = _grid_axes(len(shown), ncols, 2.5)
    maps = responses.detach().float().cpu().numpy()
    for i, ax in enumerate(axes):
        _show(ax, shown[i], titles[i] if titles is not None else None)
        height, width = maps[i].shape
        ax.imshow(maps[i], cmap="jet", alpha=alpha, vmin=0.0, vmax=1.0, extent=(0, width, height, 0), interpolation="bilinear")
        _draw_box(ax, gt_rows[i], GT_BOX_COLOR, linestyle="--")
        _draw_box(ax, pred_rows[i], PRED_BOX_COLOR)
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
    box_rows = _box_rows(boxes, count)
    for i in range(count):
        _show(axes[0, i], shown[i], titles[i] if titles is not None else None)
        _draw_box(axes[0, i], box_rows[i], PRED_BOX_COLOR)
        x1, y1, x2, y2 = (float(v) for v in box_rows[i])
        _show(axes[1, i], cut[i], f"crop of {x2 - x1:.0f} x {y2 - y1:.0f} px -> {cut[i].shape[1]} px")
    return fig


# ---------------------------------------------------------------------------------------------
# 3. the two stages


@torch.no_grad()
def stage_logits(model: FineGrainedClassifier, images: Tensor) -> dict[str, Tensor]:
    """Every prediction the model makes for ``images (B, 3, H, W)``, in eval mode without gradients.

    Returns:
        ``{output: logits (B, C)}`` on the CPU: ``main`` (the final, merged prediction), and for a
        :class:`~mgff.lit.two_stage.TwoStageClassifier` also ``stage1``, ``stage2`` (and ``cropper``
        when the ViT has its own head). The model's train/eval mode is restored afterwards.
    """
    was_training = model.training
    model.eval()
    try:
        logits, _, _ = model.forward_outputs(images.to(model.device))
    finally:
        model.train(was_training)
    return {name: value.detach().float().cpu() for name, value in logits.items()}


def stage_predictions(logits: dict[str, Tensor], labels: Tensor, class_names: Sequence[str] | None = None) -> pd.DataFrame:
    """Per image, what each output predicts and whether it is right.

    Args:
        logits: ``{output: (B, C)}`` as :func:`stage_logits` returns (log-probabilities are fine:
            the softmax of log-probabilities is the probabilities).
        labels: ``(B,)`` ground-truth classes.
        class_names: names by class index (default the indices as strings).

    Returns:
        One row per image: ``label``, ``label_name``, then for each output, in the order ``stage1``,
        ``stage2``, ``merged``, ``cropper`` (those present; ``main`` is called ``merged``):
        ``<out>_pred``, ``<out>_name``, ``<out>_prob`` (softmax probability of the predicted class)
        and ``<out>_correct`` (bool).
    """
    labels = labels.detach().cpu().long()
    names = list(class_names) if class_names is not None else [str(i) for i in range(next(iter(logits.values())).shape[1])]
    table = pd.DataFrame({"label": labels.numpy(), "label_name": [names[i] for i in labels.tolist()]})
    for key in sorted(logits, key=lambda k: list(OUTPUT_LABELS).index(k) if k in OUTPUT_LABELS else len(OUTPUT_LABELS)):
        values = logits[key].detach().float().cpu()
        if values.shape[0] != len(labels):
            raise ValueError(f"logits[{key!r}] has {values.shape[0]} rows for {len(labels)} labels")
        prob, pred = values.softmax(dim=-1).max(dim=-1)
        out = OUTPUT_LABELS.get(key, key)
        table[f"{out}_pred"] = pred.numpy()
        table[f"{out}_name"] = [names[i] for i in pred.tolist()]
        table[f"{out}_prob"] = prob.numpy()
        table[f"{out}_correct"] = (pred == labels).numpy()
    return table


def _output_columns(table: pd.DataFrame) -> list[str]:
    return [column[: -len("_correct")] for column in table.columns if column.endswith("_correct")]


def plot_stage_predictions(
    images: Tensor,
    table: pd.DataFrame,
    ncols: int = 4,
    mean: Sequence[float] | None = IMAGENET_MEAN,
    std: Sequence[float] | None = IMAGENET_STD,
) -> Figure:
    """The batch with each output's prediction in the title, and a bar chart of their accuracies.

    Args:
        images: ``(B, 3, H, W)`` normalised images.
        table: :func:`stage_predictions` of the same images.

    Returns:
        ``B`` image axes (title: true class, then one ``✓``/``✗`` line per output, red when the merged
        prediction is wrong), then one bar axis titled ``accuracy on these B images`` with one bar
        per output (height = share of correct rows).
    """
    shown = to_display(images, mean, std)
    if len(table) != len(shown):
        raise ValueError(f"table has {len(table)} rows for {len(shown)} images")
    outputs = _output_columns(table)
    ncols = max(1, min(ncols, len(shown)))
    nrows = math.ceil(len(shown) / ncols) + 1
    fig = Figure(figsize=(2.6 * ncols, 3.0 * nrows), layout="constrained")
    grid = fig.add_gridspec(nrows, ncols)
    for i, image in enumerate(shown):
        ax = fig.add_subplot(grid[i // ncols, i % ncols])
        row = table.iloc[i]
        lines = [f"true: {row['label_name']}"]
        lines += [f"{'✓' if row[f'{out}_correct'] else '✗'} {out}: {row[f'{out}_name']} {row[f'{out}_prob']:.2f}" for out in outputs]
        _show(ax, image, "\n".join(lines), fontsize=6)
        final = "merged" if "merged" in outputs else outputs[-1]
        ax.title.set_color("black" if row[f"{final}_correct"] else "red")
    bar_ax = fig.add_subplot(grid[nrows - 1, :])
    accuracy = [float(table[f"{out}_correct"].mean()) for out in outputs]
    bars = bar_ax.bar(outputs, accuracy, color=["C0", "C1", "C2", "C3"][: len(outputs)])
    bar_ax.bar_label(bars, labels=[f"{a:.2f}" for a in accuracy], fontsize=7)
    bar_ax.set_ylim(0, 1.1)
    bar_ax.set_ylabel("accuracy")
    bar_ax.set_title(f"accuracy on these {len(shown)} images")
    return fig


# ---------------------------------------------------------------------------------------------
# 4. the fusion head


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
        stage: ``2`` uses the two-stage model's second classifier where it has one
            (``shared_classifier=False``); with a shared classifier both stages are one network.
    """
    if stage not in (1, 2):
        raise ValueError(f"stage must be 1 or 2, got {stage}")
    backbone, head = model.backbone, getattr(model, "head", None)
    if stage == 2 and getattr(model, "backbone2", None) is not None:
        backbone, head = model.backbone2, model.head2
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
        _show(row[0], image, "image" if b == 0 else None)
        for col, scale in enumerate(attention_scales, start=1):
            _show(row[col], image, f"attention {names[scale]}" if b == 0 else None)
            row[col].imshow(maps.attention[scale][b].numpy(), cmap="magma", alpha=alpha, extent=extent, interpolation="nearest")
        for s in range(node_scales):
            col = 1 + len(attention_scales) + s
            title = "super-nodes" if node_scales == 1 else f"super-nodes {names[s]}"
            _show(row[col], image, title if b == 0 else None)
            row[col].imshow(
                maps.super_nodes[b, s].numpy(), cmap="tab10", vmin=-0.5, vmax=9.5 if maps.num_super_nodes <= 10 else maps.num_super_nodes - 0.5,
                alpha=alpha, extent=extent, interpolation="nearest",
            )
    return fig


# ---------------------------------------------------------------------------------------------
# 5. errors from predictions.csv


def read_predictions(path: str | Path) -> pd.DataFrame:
    """Read a ``predictions.csv`` written by :class:`~mgff.callbacks.PredictionCSVWriter` (columns
    ``index, path, label, label_name, pred, pred_name, prob`` [``, box_x1..box_y2``])."""
    # no NA parsing: a class may well be called "NA" or "None", and an empty name means "no names"
    table = pd.read_csv(path, keep_default_na=False)
    missing = {"path", "label", "pred"} - set(table.columns)
    if missing:
        raise ValueError(f"{path} is not a predictions CSV: no column(s) {sorted(missing)}")
    return table


def _as_predictions(predictions: pd.DataFrame | str | Path) -> pd.DataFrame:
    return predictions if isinstance(predictions, pd.DataFrame) else read_predictions(predictions)


def prediction_class_names(predictions: pd.DataFrame | str | Path, num_classes: int | None = None) -> list[str]:
    """Class names by index from a predictions table's ``label_name``/``pred_name`` columns; a class
    that never appears (or a CSV without names) is named by its index."""
    table = _as_predictions(predictions)
    num_classes = num_classes or int(max(table["label"].max(), table["pred"].max())) + 1
    names = [str(i) for i in range(num_classes)]
    for index_column, name_column in (("label", "label_name"), ("pred", "pred_name")):
        if name_column in table:
            for index, name in zip(table[index_column], table[name_column]):
                if isinstance(name, str) and name:
                    names[int(index)] = name
    return names


def confusion_matrix(predictions: pd.DataFrame | str | Path, num_classes: int | None = None, normalize: str | None = None) -> Tensor:
    """Confusion matrix of a predictions table (or CSV path), with torchmetrics' ``MulticlassConfusionMatrix``.

    Args:
        predictions: :func:`read_predictions` output or the CSV's path.
        num_classes: ``C``; default one more than the largest class index in ``label``/``pred``.
        normalize: ``None`` (counts), ``"true"`` (rows sum to 1), ``"pred"`` or ``"all"``.

    Returns:
        ``(C, C)`` tensor, row = true class, column = predicted class (int64 counts when not normalised).
    """
    table = _as_predictions(predictions)
    num_classes = num_classes or int(max(table["label"].max(), table["pred"].max())) + 1
    metric = MulticlassConfusionMatrix(num_classes, normalize=normalize or "none")
    metric.update(torch.tensor(table["pred"].to_numpy(), dtype=torch.long), torch.tensor(table["label"].to_numpy(), dtype=torch.long))
    return metric.compute()


def plot_confusion_matrix(matrix: Tensor, class_names: Sequence[str] | None = None, normalize: bool = True, annotate: bool | None = None) -> Figure:
    """Heat map of a ``(C, C)`` count matrix (rows true, columns predicted).

    ``normalize``: colour by the share of each true class (rows sum to 1), else by count. Cells carry
    their count when ``annotate`` (default: for at most 20 classes).
    """
    counts = matrix.detach().cpu().double()
    num_classes = counts.shape[0]
    names = list(class_names) if class_names is not None else [str(i) for i in range(num_classes)]
    shown = counts / counts.sum(dim=1, keepdim=True).clamp_min(1) if normalize else counts
    side = min(12.0, 2.5 + 0.45 * num_classes)
    fig = Figure(figsize=(side + 1.0, side), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(shown.numpy(), cmap="Blues", vmin=0, vmax=1 if normalize else None)
    fig.colorbar(image, ax=ax, label="share of true class" if normalize else "images")
    ticks = np.arange(num_classes)
    fontsize = 7 if num_classes <= 20 else 4
    ax.set_xticks(ticks, names, rotation=90, fontsize=fontsize)
    ax.set_yticks(ticks, names, fontsize=fontsize)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"confusion matrix ({int(counts.sum())} images, accuracy {float(counts.diag().sum() / counts.sum().clamp_min(1)):.3f})")
    if annotate if annotate is not None else num_classes <= 20:
        for (i, j), count in np.ndenumerate(counts.numpy().astype(int)):
            if count:
                ax.text(j, i, str(count), ha="center", va="center", fontsize=fontsize, color="white" if shown[i, j] > 0.5 * float(shown.max()) else "black")
    return fig


def per_class_accuracy(matrix: Tensor, class_names: Sequence[str] | None = None) -> pd.DataFrame:
    """Recall of every class from a ``(C, C)`` count matrix.

    Returns:
        One row per class, index ``label``: ``name``, ``support`` (true images), ``correct`` and
        ``accuracy`` (``correct / support``, NaN for a class without images), sorted by index.
    """
    counts = matrix.detach().cpu().long()
    support = counts.sum(dim=1)
    correct = counts.diag()
    names = list(class_names) if class_names is not None else [str(i) for i in range(counts.shape[0])]
    accuracy = np.where(support.numpy() > 0, correct.numpy() / np.maximum(support.numpy(), 1), np.nan)
    return pd.DataFrame(
        {"name": names, "support": support.numpy(), "correct": correct.numpy(), "accuracy": accuracy},
        index=pd.RangeIndex(counts.shape[0], name="label"),
    )


def plot_per_class_accuracy(table: pd.DataFrame) -> Figure:
    """Horizontal bars of :func:`per_class_accuracy`, worst class first, with the mean over classes
    (classes without images left out) as a dashed line."""
    ordered = table.dropna(subset=["accuracy"]).sort_values("accuracy", kind="stable")
    fig = Figure(figsize=(6, max(2.5, 0.25 * len(ordered) + 1.0)), layout="constrained")
    ax = fig.subplots()
    y = np.arange(len(ordered))
    ax.barh(y, ordered["accuracy"].to_numpy(), color="C0")
    ax.set_yticks(y, [f"{n} ({s})" for n, s in zip(ordered["name"], ordered["support"])], fontsize=7)
    mean_accuracy = float(ordered["accuracy"].mean())
    ax.axvline(mean_accuracy, color="black", linestyle="--", linewidth=1)
    ax.set_xlim(0, 1)
    ax.set_xlabel("accuracy (images of the class)")
    ax.set_title(f"per-class accuracy, mean {mean_accuracy:.3f}")
    return fig


def most_confused_pairs(matrix: Tensor, class_names: Sequence[str] | None = None, top_k: int = 5) -> pd.DataFrame:
    """The ``top_k`` largest off-diagonal cells of a ``(C, C)`` count matrix.

    Returns:
        Rows sorted by ``count`` (descending; ties by true then predicted index), zero cells left
        out: ``true``, ``true_name``, ``pred``, ``pred_name``, ``count`` and ``share`` (``count``
        over the true class's images).
    """
    counts = matrix.detach().cpu().long().clone()
    names = list(class_names) if class_names is not None else [str(i) for i in range(counts.shape[0])]
    support = counts.sum(dim=1)
    counts.fill_diagonal_(0)
    true, pred = np.nonzero(counts.numpy())
    rows = [(int(t), int(p), int(counts[t, p])) for t, p in zip(true, pred)]
    rows.sort(key=lambda r: (-r[2], r[0], r[1]))
    rows = rows[:top_k]
    return pd.DataFrame(
        {
            "true": [t for t, _, _ in rows],
            "true_name": [names[t] for t, _, _ in rows],
            "pred": [p for _, p, _ in rows],
            "pred_name": [names[p] for _, p, _ in rows],
            "count": [c for _, _, c in rows],
            "share": [c / int(support[t]) for t, _, c in rows],
        }
    )


def plot_confused_examples(
    predictions: pd.DataFrame | str | Path,
    pairs: pd.DataFrame,
    image_root: str | Path,
    examples_per_pair: int = 4,
    panel_size: float = 2.2,
) -> Figure:
    """For each confused pair (a :func:`most_confused_pairs` row), the misclassified images, then one
    correctly classified image of the predicted class to compare with.

    Args:
        predictions: the predictions table (or CSV path); its ``path`` column is relative to ``image_root``.
        pairs: :func:`most_confused_pairs` output (one figure row per pair).
        image_root: the dataset root the paths are relative to (``datamodule.image_root()``).
        examples_per_pair: misclassified images per row (the most confident mistakes first).

    Returns:
        A ``len(pairs) x (examples_per_pair + 1)`` grid; an image axis is titled
        ``<true> -> <pred> p=<prob>``, the last column ``a real <pred>`` (left empty when there is none).
    """
    table = _as_predictions(predictions)
    if len(pairs) == 0:
        raise ValueError("no confused pairs to show (every prediction is right)")
    root = Path(image_root)
    fig = Figure(figsize=(panel_size * (examples_per_pair + 1), (panel_size + 0.4) * len(pairs)), layout="constrained")
    axes = np.asarray(fig.subplots(len(pairs), examples_per_pair + 1, squeeze=False))
    for r, pair in enumerate(pairs.itertuples(index=False)):
        wrong = table[(table["label"] == pair.true) & (table["pred"] == pair.pred)]
        if "prob" in wrong:
            wrong = wrong.sort_values("prob", ascending=False, kind="stable")
        for c in range(examples_per_pair):
            ax = axes[r, c]
            ax.set_axis_off()
            if c < len(wrong):
                row = wrong.iloc[c]
                prob = f" p={float(row['prob']):.2f}" if "prob" in row else ""
                _show(ax, load_rgb(root / row["path"]), f"{pair.true_name}\n-> {pair.pred_name}{prob}", fontsize=6)
        reference = table[(table["label"] == pair.pred) & (table["pred"] == pair.pred)]
        ax = axes[r, examples_per_pair]
        ax.set_axis_off()
        if len(reference):
            _show(ax, load_rgb(root / reference.iloc[0]["path"]), f"a real\n{pair.pred_name}", fontsize=6)
    return fig
