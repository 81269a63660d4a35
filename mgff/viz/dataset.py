"""Figures and tables of a DataModule's data: images with their boxes, augmentations, class counts,
image sizes, and a transformed sample batch."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from PIL import Image
from torch import Tensor

from data_modules.dataset import collate_skip_none, load_rgb
from data_modules.transforms import apply_transform, build_train_transform
from mgff.viz.drawing import GT_BOX_COLOR, as_array, boxes_per_image, draw_box, grid_axes, show_image, to_display

if TYPE_CHECKING:
    from data_modules.base import FineGrainedDataModule

__all__ = [
    "image_grid", "sample_grid", "augmentation_grid", "class_counts", "image_sizes",
    "plot_class_counts", "plot_image_sizes", "sample_batch",
]

SPLITS = ("train", "val", "test")


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
    box_rows = boxes_per_image(boxes, len(images))
    if titles is not None and len(titles) != len(images):
        raise ValueError(f"got {len(titles)} titles for {len(images)} images")
    fig, axes = grid_axes(len(images), ncols, panel_size)
    for i, (ax, image) in enumerate(zip(axes, images)):
        show_image(ax, as_array(image), titles[i] if titles is not None else None)
        draw_box(ax, box_rows[i], box_color)
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
    with its ``resize_size``, ``crop_size``, ``hflip``, ``mean``, ``std`` and named augmentations), seeded with ``seed``; the
    ground-truth box goes through the same geometry and is drawn on every view.

    Returns:
        ``num_views + 1`` axes: ``original W x H``, then ``view 1 .. view N`` (each ``crop_size`` square).
    """
    root, samples = _stored_samples(datamodule, "train")
    if not 0 <= index < len(samples):
        raise IndexError(f"index {index} outside the train split (0..{len(samples) - 1})")
    sample = samples[index]
    image = load_rgb(root / sample.path)
    transform = build_train_transform(
        datamodule.resize_size, datamodule.crop_size, datamodule.hflip, datamodule.mean, datamodule.std,
        random_resized_crop_scale=getattr(datamodule, "random_resized_crop_scale", None),
        color_jitter=getattr(datamodule, "color_jitter", 0.0), trivial_augment=getattr(datamodule, "trivial_augment", False),
    )
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
