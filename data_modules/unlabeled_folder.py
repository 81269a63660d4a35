"""New photos to predict on: every image file under a folder, any layout, no labels, no metadata.

The researcher's case after training: a folder of new photos (nested folders or flat, any names) and a
checkpoint. The class names come from the checkpoint, so nothing here knows about classes. Each photo
goes through the evaluation transform the model was trained behind (resize to ``resize_size`` square,
centre crop ``crop_size``, normalise), and the item says how to map the input's pixels back to the
photo's (``input_to_photo``), so that a box the model finds can be reported in the photo's own pixels.
A file that cannot be decoded does not stop the run: its item carries the ``error`` and a black image.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Sequence

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from data_modules.errors import BadImageError, DatasetNotFoundError
from data_modules.image_io import DEFAULT_MAX_IMAGE_PIXELS, load_rgb
from data_modules.transforms import IMAGENET_MEAN, IMAGENET_STD, apply_transform, build_eval_transform

__all__ = ["IMAGE_EXTENSIONS", "UnlabeledFolderDataModule", "UnlabeledImages", "find_images"]

log = logging.getLogger("mgff")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def find_images(root: str | Path, extensions: Sequence[str] = IMAGE_EXTENSIONS) -> list[Path]:
    """Image files under ``root`` (recursively, following symlinks; hidden files and folders skipped),
    as paths relative to ``root``, sorted. Files of other types are ignored."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetNotFoundError(f"data.root: {root} is not a folder of images")
    wanted = tuple(e.lower() for e in extensions)
    found = []
    for folder, dirs, files in os.walk(root, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [Path(folder, f).relative_to(root) for f in files if not f.startswith(".") and f.lower().endswith(wanted)]
    if not found:
        raise DatasetNotFoundError(f"data.root: no image files ({', '.join(wanted)}) under {root}")
    return sorted(found)


class UnlabeledImages(Dataset):
    """Items ``{"image": (3, C, C) float, "index", "path" (relative to root), "error" ("" if decoded),
    "input_to_photo": (4,) float32 (scale_x, scale_y, offset_x, offset_y)}`` with
    ``photo_pixel = input_pixel * scale + offset``; plus ``"source"`` with a ``source_size``.

    Args:
        root: the folder.
        paths: image paths relative to ``root``.
        resize_size / crop_size / mean / std / source_size: the evaluation transform
            (:func:`data_modules.transforms.build_eval_transform`).
        max_image_pixels: larger images are refused as decompression bombs (an error row).
    """

    def __init__(
        self,
        root: str | Path,
        paths: Sequence[Path],
        resize_size: int,
        crop_size: int,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        source_size: int | None = None,
        max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    ) -> None:
        self.root = Path(root)
        self.paths = list(paths)
        self.crop_size = crop_size
        self.transform = build_eval_transform(resize_size=resize_size, crop_size=crop_size, mean=mean, std=std, source_size=source_size)
        # the frame the centre crop is cut from: resize R square, crop C; with a source view the
        # geometry runs at R' = R * S / C, crops S, and the input is that crop resized to C
        self.geometry_resize = resize_size if source_size is None else int(round(resize_size * source_size / crop_size))
        self.geometry_crop = crop_size if source_size is None else source_size
        self.max_image_pixels = max_image_pixels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path = self.paths[index]
        try:
            image, error = load_rgb(self.root / path, self.max_image_pixels), ""
        except BadImageError as err:
            image, error = np.zeros((self.crop_size, self.crop_size, 3), dtype=np.uint8), str(err)
        tensor, _, *source = apply_transform(self.transform, image, None)
        item = {"image": tensor, "index": index, "path": path.as_posix(), "error": error, "input_to_photo": self.input_to_photo(image.shape[1], image.shape[0])}
        if source:
            item["source"] = source[0]
        return item

    def input_to_photo(self, width: int, height: int) -> torch.Tensor:
        """``(scale_x, scale_y, offset_x, offset_y)`` taking the input's pixels to a ``width x height`` photo's:
        undo the view's resize, add the centre crop's offset (albumentations floors it), undo the square resize."""
        r, c = self.geometry_resize, self.geometry_crop
        view = c / self.crop_size
        offset = (r - c) // 2
        sx, sy = width / r, height / r
        return torch.tensor([view * sx, view * sy, offset * sx, offset * sy], dtype=torch.float32)


class UnlabeledFolderDataModule(L.LightningDataModule):
    """``predict`` on every image under ``root`` (see :mod:`data_modules.unlabeled_folder`); no labels.

    Args:
        root: folder of photos, any layout (searched recursively).
        resize_size / crop_size: the evaluation transform's square resize and centre crop; use the
            training run's (``python -m mgff.predict_folder`` reads them from the checkpoint).
        mean / std: normalisation of the batches (the training data's).
        source_size: also return the same view at this resolution (``batch["source"]``) for a two-stage
            model with ``crop_from: source``.
        batch_size / num_workers: loader settings.
        max_image_pixels: larger images are refused as decompression bombs (an error row).
        extensions: file name endings taken for images.
    """

    def __init__(
        self,
        root: str | Path,
        resize_size: int = 512,
        crop_size: int = 384,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        source_size: int | None = None,
        batch_size: int = 32,
        num_workers: int = 4,
        max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
        extensions: Sequence[str] = IMAGE_EXTENSIONS,
    ) -> None:
        super().__init__()
        if crop_size > resize_size:
            raise ValueError(f"data.crop_size ({crop_size}) must not exceed data.resize_size ({resize_size})")
        self.root = Path(root)
        self.resize_size, self.crop_size, self.source_size = resize_size, crop_size, source_size
        self.mean, self.std = tuple(mean), tuple(std)
        self.batch_size, self.num_workers = batch_size, num_workers
        self.max_image_pixels = max_image_pixels
        self.extensions = tuple(extensions)
        self.dataset: UnlabeledImages | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.dataset is None:
            paths = find_images(self.root, self.extensions)
            self.dataset = UnlabeledImages(
                self.root, paths, self.resize_size, self.crop_size, self.mean, self.std, self.source_size, self.max_image_pixels
            )
            log.info("predicting on %d images under %s", len(paths), self.root)

    def predict_dataloader(self) -> DataLoader:
        self.setup("predict")
        return DataLoader(self.dataset, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers, persistent_workers=False)
