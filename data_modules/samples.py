"""The record every dataset reader produces: one image, its class and its ground-truth box."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePosixPath
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
    """Join ``relative`` to ``root``, refusing a path that is absolute or climbs out with ``..``.

    The check is on the path as written, not on where it leads: symbolic links inside the root are
    followed wherever they point (datasets under DVC or git-annex, or subsets built from links into
    a shared store, are laid out like that; the user made those links). What a metadata file may
    not do is name a file outside the root itself.

    Args:
        root: dataset root.
        relative: a path as written in a metadata file.
        source: where the path was read (``"images.txt line 12"``), for the error message.
    """
    candidate = PurePosixPath(relative)
    if candidate.is_absolute():
        raise DatasetFormatError(
            f"{source}: image path {relative!r} is absolute; expected a path relative to the dataset root {root}"
        )
    if ".." in candidate.parts or not candidate.parts:
        raise DatasetFormatError(
            f"{source}: image path {relative!r} escapes the dataset root {root} (contains '..'); refusing to read it"
        )
    return root / candidate


def check_images_exist(root: Path, samples: Sequence[Sample], *, limit: int = 20) -> None:
    """Raise :class:`MissingImagesError` listing the images (up to ``limit``) that are not on disk."""
    missing = [s.path for s in samples if not (root / s.path).is_file()]
    if missing:
        shown = "\n  ".join(missing[:limit])
        more = f"\n  ... and {len(missing) - limit} more" if len(missing) > limit else ""
        raise MissingImagesError(
            f"{len(missing)} of {len(samples)} images listed in the metadata are missing under {root}:\n  {shown}{more}"
        )
