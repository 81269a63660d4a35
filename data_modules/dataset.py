"""A map-style dataset over :class:`Sample` records: decode, transform, return a dict."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset, default_collate

from data_modules.errors import BadImageError
from data_modules.samples import Sample

log = logging.getLogger("mgff")

OnBadImage = Literal["raise", "skip"]


def load_rgb(path: Path) -> np.ndarray:
    """Decode an image file to an ``(H, W, 3)`` uint8 array; raise :class:`BadImageError` naming it."""
    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise BadImageError(f"cannot decode image {path}: {err}") from err


class FineGrainedDataset(Dataset):
    """Images of one split.

    Each item is a dict: ``image`` ``(3, h, w)`` float tensor, ``label`` int64, ``box`` ``(4,)`` float
    ``(x1, y1, x2, y2)`` in pixels of the transformed image (NaN when unknown), ``index`` int64 (position
    in ``samples``) and ``path`` (relative to the root). With ``on_bad_image="skip"`` a corrupt image
    yields ``None`` (dropped by :func:`collate_skip_none`) and a warning naming the file.

    Args:
        root: dataset root (or the resized cache's root; paths in ``samples`` are relative to it).
        samples: the split's records.
        transform: ``fn(image (H, W, 3) uint8, box | None) -> (tensor, box array)``, or ``(tensor, box array,
            source)`` where the item also gets ``source``: the same view at a higher resolution, ``(3, S, S)`` uint8.
        on_bad_image: ``"raise"`` (default) or ``"skip"``.
        crop_to_box: crop each image to its ground-truth box before the transform (oracle baseline).
    """

    def __init__(
        self,
        root: str | Path,
        samples: Sequence[Sample],
        transform: Callable[[np.ndarray, Any], tuple[torch.Tensor, np.ndarray] | tuple[torch.Tensor, np.ndarray, torch.Tensor]],
        on_bad_image: OnBadImage = "raise",
        crop_to_box: bool = False,
    ) -> None:
        if on_bad_image not in ("raise", "skip"):
            raise ValueError(f"on_bad_image must be 'raise' or 'skip', got {on_bad_image!r}")
        self.root = Path(root)
        self.samples = list(samples)
        self.transform = transform
        self.on_bad_image = on_bad_image
        self.crop_to_box = crop_to_box

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        sample = self.samples[index]
        path = self.root / sample.path
        try:
            image = load_rgb(path)
        except BadImageError:
            if self.on_bad_image == "raise":
                raise
            log.warning("skipping corrupt image %s (on_bad_image=skip)", path)
            return None
        box = sample.box
        if box is not None:
            box = _scale_box(box, sample, image)
            if self.crop_to_box:
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


def _scale_box(box, sample: Sample, image: np.ndarray):
    """Clip the metadata box to the decoded image (metadata boxes can overhang by a pixel)."""
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
