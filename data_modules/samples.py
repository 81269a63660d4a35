"""The record every dataset reader produces: one image, its class and its ground-truth box."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from data_modules.errors import DatasetFormatError, MissingImagesError

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class Sample:
    """One labelled image.

    Attributes:
        path: image path relative to the dataset root (POSIX separators).
        label: contiguous class index in ``[0, num_classes)``.
        box: ground-truth object box ``(x1, y1, x2, y2)`` in pixels of the original image as stored
            in the file (before any EXIF orientation, see :mod:`data_modules.image_io`), or ``None``.
        size: ``(w, h)`` in stored pixels of the image the box refers to, when the metadata says
            (NA-Birds' ``sizes.txt``); a decoded image of another size gets the box scaled by the ratio.
            ``None``: the box refers to the file as it is.
    """

    path: str
    label: int
    box: Box | None = None
    size: tuple[int, int] | None = None


def resolve_inside(root: Path, relative: str, *, source: str) -> Path:
    """Join ``relative`` to ``root`` and refuse paths that escape the dataset root.

    Args:
        root: dataset root.
        relative: a path as written in a metadata file.
        source: where the path was read (``"images.txt line 12"``), for the error message.
    """
    candidate = Path(relative)
    if candidate.is_absolute():
        raise DatasetFormatError(
            f"{source}: image path {relative!r} is absolute; expected a path relative to the dataset root {root}"
        )
    resolved_root = root.resolve()
    resolved = (resolved_root / candidate).resolve()
    if resolved_root not in resolved.parents:
        raise DatasetFormatError(
            f"{source}: image path {relative!r} escapes the dataset root {root}; refusing to read it"
        )
    return resolved


def check_images_exist(root: Path, samples: Sequence[Sample], *, limit: int = 20) -> None:
    """Raise :class:`MissingImagesError` listing the images (up to ``limit``) that are not on disk."""
    missing = [s.path for s in samples if not (root / s.path).is_file()]
    if missing:
        shown = "\n  ".join(missing[:limit])
        more = f"\n  ... and {len(missing) - limit} more" if len(missing) > limit else ""
        raise MissingImagesError(
            f"{len(missing)} of {len(samples)} images listed in the metadata are missing under {root}:\n  {shown}{more}"
        )
