"""Decoding one image file: the only place mgff opens image files (datasets, resized cache, predict).

:func:`load_rgb` is what callers want: path in, ``(H, W, 3)`` uint8 RGB array out, displayed the
way a photo viewer shows it. On the way it

- refuses images above ``max_image_pixels`` (decompression bombs: a 17 KB PNG can declare
  20000x20000) from the header alone, before anything is decoded;
- scales 16-bit images (PIL modes ``I;16*`` and ``I``) to 8 bits (``v / 257``, rounded) instead of
  clipping them to white;
- applies the EXIF orientation tag (a phone photo stored landscape with "rotate 90" is returned
  portrait);
- raises :class:`~data_modules.errors.BadImageError` naming the file for anything that goes wrong.

Frames: the *stored* frame is the pixel grid as written in the file; the *displayed* frame is that
grid after the EXIF orientation. Dataset metadata (boxes, NA-Birds' ``sizes.txt``) is in the stored
frame -- those sets were annotated in browsers and tools that ignored EXIF -- so a box is moved to
the displayed frame with :func:`orient_box` and the ``orientation`` :func:`read_image` reports.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from data_modules.errors import BadImageError

DEFAULT_MAX_IMAGE_PIXELS = 100_000_000  # 100 megapixels: ~10000x10000; a 24 MP camera photo is far below
DECODE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning)

# EXIF orientation tag (0x0112) -> the PIL transpose that displays the stored pixels (as ImageOps.exif_transpose)
ORIENTATION_TAG = 0x0112
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


@dataclass(frozen=True)
class DecodedImage:
    """A decoded image: ``pixels`` ``(H, W, 3)`` uint8 in the displayed frame, the EXIF
    ``orientation`` (1..8, 1 = none) that was applied and the ``stored_size`` ``(w, h)`` in pixels
    of the file before it was applied."""

    pixels: np.ndarray
    orientation: int
    stored_size: tuple[int, int]


def open_checked(path: str | Path, max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """``Image.open`` that refuses more than ``max_image_pixels`` pixels (``None``: no limit) from
    the header alone and raises :class:`BadImageError` naming ``path``. Use as a context manager."""
    # PIL's own check (a warning above its global limit, an error above twice it) runs inside open();
    # it is set to our limit here, in the process that decodes, so loader workers and cache workers
    # (fresh interpreters under spawn) apply the configured limit and not PIL's default 89 MP
    Image.MAX_IMAGE_PIXELS = max_image_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(path)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise BadImageError(f"image {path} is above data.max_image_pixels = {_megapixels(max_image_pixels)} megapixels: {err}") from err
    except DECODE_ERRORS as err:
        raise BadImageError(f"cannot decode image {path}: {type(err).__name__}: {err}") from err
    width, height = img.size
    if max_image_pixels is not None and width * height > max_image_pixels:
        img.close()
        raise BadImageError(
            f"image {path} declares {width}x{height} = {width * height / 1e6:.0f} megapixels, above "
            f"data.max_image_pixels = {_megapixels(max_image_pixels)} megapixels (a decompression bomb, or raise the limit)"
        )
    return img


def _megapixels(pixels: int | None) -> str:
    return "unlimited" if pixels is None else f"{pixels / 1e6:g}"


def exif_orientation(img: Image.Image) -> int:
    """The EXIF orientation (1..8) of an open image; 1 when absent or invalid."""
    try:
        value = int(img.getexif().get(ORIENTATION_TAG, 1))
    except Exception:  # a malformed EXIF block is not worth refusing the image for
        return 1
    return value if value in _TRANSPOSE else 1


def to_rgb(img: Image.Image) -> Image.Image:
    """An RGB copy of ``img``; 16-bit images are scaled (``v / 257``, rounded) rather than clipped.

    Mode ``I`` (32-bit integers: how PIL decodes some 16-bit files) is taken as 16-bit, unless no
    value exceeds 255 (8-bit data in a wide container, kept as it is)."""
    if img.mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(img, dtype=np.float64)
        if img.mode != "I" or values.max(initial=0) > 255:
            values = values / 257.0
        eight = np.clip(np.rint(values), 0, 255).astype(np.uint8)
        return Image.fromarray(eight).convert("RGB")
    return img.convert("RGB")


def orient(img: Image.Image, orientation: int) -> Image.Image:
    """``img`` in the displayed frame of EXIF ``orientation``."""
    method = _TRANSPOSE.get(orientation)
    return img.transpose(method) if method is not None else img


def read_image(path: str | Path, max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> DecodedImage:
    """Decode ``path`` to RGB in the displayed frame (see the module docstring).

    Raises :class:`BadImageError` naming the file when it cannot be decoded or is above
    ``max_image_pixels`` (``None``: no limit).
    """
    try:
        with open_checked(path, max_image_pixels) as img:
            orientation = exif_orientation(img)
            stored_size = img.size
            pixels = np.asarray(orient(to_rgb(img), orientation))
    except BadImageError:
        raise
    except DECODE_ERRORS as err:
        raise BadImageError(f"cannot decode image {path}: {type(err).__name__}: {err}") from err
    return DecodedImage(pixels=pixels, orientation=orientation, stored_size=stored_size)


def load_rgb(path: str | Path, max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> np.ndarray:
    """Decode ``path`` to an ``(H, W, 3)`` uint8 RGB array in the displayed frame (EXIF applied,
    16-bit scaled, above ``max_image_pixels`` refused); raise :class:`BadImageError` naming it."""
    return read_image(path, max_image_pixels).pixels


def orient_box(box, orientation: int, stored_size: tuple[int, int]):
    """Move an ``(x1, y1, x2, y2)`` pixel box from the stored frame of a ``stored_size`` ``(w, h)``
    image to the displayed frame of EXIF ``orientation`` (the same transpose :func:`orient` applies)."""
    w, h = stored_size
    x1, y1, x2, y2 = box
    return {
        1: (x1, y1, x2, y2),
        2: (w - x2, y1, w - x1, y2),  # mirrored left-right
        3: (w - x2, h - y2, w - x1, h - y1),  # rotated 180
        4: (x1, h - y2, x2, h - y1),  # mirrored top-bottom
        5: (y1, x1, y2, x2),  # transposed
        6: (h - y2, x1, h - y1, x2),  # rotated 90 clockwise
        7: (h - y2, w - x2, h - y1, w - x1),  # transversed
        8: (y1, w - x2, y2, w - x1),  # rotated 90 counter-clockwise
    }.get(orientation, (x1, y1, x2, y2))
