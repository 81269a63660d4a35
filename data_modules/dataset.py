"""A map-style dataset over :class:`Sample` records: decode, transform, return a dict."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, default_collate

from data_modules.errors import BadImageError
from data_modules.image_io import DEFAULT_MAX_IMAGE_PIXELS, DecodedImage, load_rgb, orient_box, read_image
from data_modules.samples import Sample

log = logging.getLogger("mgff")

OnBadImage = Literal["raise", "skip"]

__all__ = ["FineGrainedDataset", "OnBadImage", "collate_skip_none", "displayed_box", "load_rgb", "load_sample"]


class FineGrainedDataset(Dataset):
    """Images of one split.

    Each item is a dict: ``image`` ``(3, h, w)`` float tensor, ``label`` int64, ``box`` ``(4,)`` float
    ``(x1, y1, x2, y2)`` in pixels of the transformed image (NaN when unknown), ``index`` int64 (position
    in ``samples``) and ``path`` (relative to the root). With ``on_bad_image="skip"`` a corrupt image,
    or one above ``max_image_pixels``, yields ``None`` (dropped by :func:`collate_skip_none`) and a
    warning naming the file.

    Images are decoded by :func:`~data_modules.image_io.read_image` (EXIF orientation applied,
    16-bit scaled). Metadata boxes are in the stored frame of the image the metadata describes
    (``Sample.size`` when known): a box is scaled to the decoded file's stored size, then moved to
    the displayed frame with the file's EXIF orientation, then clipped to the image.

    Args:
        root: dataset root (or the resized cache's root; paths in ``samples`` are relative to it).
        samples: the split's records.
        transform: ``fn(image (H, W, 3) uint8, box | None) -> (tensor, box array)``, or ``(tensor, box array,
            source)`` where the item also gets ``source``: the same view at a higher resolution, ``(3, S, S)`` uint8.
        on_bad_image: ``"raise"`` (default) or ``"skip"``.
        crop_to_box: crop each image to its ground-truth box before the transform (oracle baseline).
        max_image_pixels: images with more pixels are bad images (decompression bombs); ``None``: no limit.
    """

    def __init__(
        self,
        root: str | Path,
        samples: Sequence[Sample],
        transform: Callable[[np.ndarray, Any], tuple[torch.Tensor, np.ndarray] | tuple[torch.Tensor, np.ndarray, torch.Tensor]],
        on_bad_image: OnBadImage = "raise",
        crop_to_box: bool = False,
        max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    ) -> None:
        if on_bad_image not in ("raise", "skip"):
            raise ValueError(f"on_bad_image must be 'raise' or 'skip', got {on_bad_image!r}")
        self.root = Path(root)
        self.samples = list(samples)
        self.transform = transform
        self.on_bad_image = on_bad_image
        self.crop_to_box = crop_to_box
        self.max_image_pixels = max_image_pixels
        self.resized_boxes = 0  # boxes scaled because the image's size disagreed with the metadata's
        self._warned_resized = False

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        sample = self.samples[index]
        path = self.root / sample.path
        try:
            decoded = read_image(path, self.max_image_pixels)
        except BadImageError as err:
            if self.on_bad_image == "raise":
                raise
            log.warning("skipping bad image (on_bad_image=skip): %s", err)
            return None
        image = decoded.pixels
        box = self._displayed_box(sample, decoded)
        if self.crop_to_box and box is not None:
            image, box = _crop_to_box(image, box)
        tensor, new_box, *source = self.transform(image, box)
        item = {
            "image": tensor,
            "label": torch.tensor(sample.label, dtype=torch.long),
            "box": torch.from_numpy(np.asarray(new_box, dtype=np.float32)),
            "index": torch.tensor(index, dtype=torch.long),
            "path": sample.path,
        }
        if source:  # the same view at a higher resolution, uint8 (data_modules.transforms.ViewWithSource)
            item["source"] = source[0]
        return item

    def _displayed_box(self, sample: Sample, decoded: DecodedImage):
        """:func:`displayed_box`, warning once (per dataset and loader worker) when it had to scale."""
        if _metadata_size_differs(sample, decoded):
            self.resized_boxes += 1
            if not self._warned_resized:
                self._warned_resized = True
                (meta_w, meta_h), (w, h) = sample.size, decoded.stored_size
                log.warning(
                    "image %s is %dx%d but the metadata says %dx%d: its box (and any other such image's) is scaled by the ratio",
                    sample.path, w, h, meta_w, meta_h,
                )
        return displayed_box(sample, decoded)


def load_sample(root: str | Path, sample: Sample, max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS):
    """``(image, box)``: a sample's image ``(H, W, 3)`` uint8 as displayed and its box in those pixels
    (``None`` without one), exactly as :class:`FineGrainedDataset` gets them before its transform --
    what a figure that draws the metadata boxes needs. Raises :class:`BadImageError` naming the file."""
    decoded = read_image(Path(root) / sample.path, max_image_pixels)
    return decoded.pixels, displayed_box(sample, decoded)


def displayed_box(sample: Sample, decoded: DecodedImage):
    """``sample.box`` in pixels of ``decoded.pixels``: scaled from ``sample.size`` to the file's stored
    size (a resized copy of the dataset), oriented by EXIF, clipped; ``None`` if absent or empty.

    Metadata whose size is the stored size turned by a 90-degree EXIF orientation was written in the
    displayed frame: its box is taken as it is."""
    box = sample.box
    if box is None:
        return None
    if sample.size is not None and decoded.orientation >= 5 and tuple(sample.size) == tuple(decoded.stored_size)[::-1]:
        return _clip_box(box, decoded.pixels)
    if _metadata_size_differs(sample, decoded):
        (meta_w, meta_h), (w, h) = sample.size, decoded.stored_size
        sx, sy = w / meta_w, h / meta_h
        box = (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)
    box = orient_box(box, decoded.orientation, decoded.stored_size)
    return _clip_box(box, decoded.pixels)


def _metadata_size_differs(sample: Sample, decoded: DecodedImage) -> bool:
    """The metadata gives a size that is neither the file's stored size nor (90-degree EXIF) its displayed one."""
    if sample.size is None or sample.box is None:
        return False
    size, stored = tuple(sample.size), tuple(decoded.stored_size)
    return size != stored and not (decoded.orientation >= 5 and size == stored[::-1])


def _clip_box(box, image: np.ndarray):
    """Clip the box to the decoded image (metadata boxes can overhang by a pixel); ``None`` if empty."""
    h, w = image.shape[:2]
    x1, y1, x2, y2 = box
    x1, x2 = min(max(x1, 0.0), w), min(max(x2, 0.0), w)
    y1, y2 = min(max(y1, 0.0), h), min(max(y2, 0.0), h)
    if x2 - x1 < 1 or y2 - y1 < 1:
        return None
    return (x1, y1, x2, y2)


def _crop_to_box(image: np.ndarray, box):
    x1, y1, x2, y2 = (int(round(v)) for v in box)
    crop = image[y1:y2, x1:x2]
    return crop, (0.0, 0.0, float(crop.shape[1]), float(crop.shape[0]))


def collate_skip_none(batch: list[dict[str, Any] | None]) -> dict[str, Any]:
    """``default_collate`` after dropping the ``None`` items of skipped corrupt images."""
    kept = [item for item in batch if item is not None]
    if not kept:
        return {}
    return default_collate(kept)
