"""Decoding real-world image files (data_modules.image_io): decompression bombs, 16-bit PNGs and EXIF
orientation, through the loader (with workers) and through the resized cache. Every crafted file is
generated here: a PNG header declaring 20000x20000 (235 bytes), a 16-bit PNG, an EXIF-rotated JPEG."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data_modules.cub import CUB200DataModule, read_cub
from data_modules.errors import BadImageError
from data_modules.image_io import load_rgb, orient_box, read_image
from data_modules.resized_cache import ResizedImageCache, main
from datamodule_helpers import tiny_datamodule


def write_png_bomb(path: Path, width: int = 20000, height: int = 20000) -> Path:
    """A tiny PNG whose header declares ``width x height`` gray pixels (400 MB decoded at 20000x20000)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    rows = zlib.compress(b"\x00" * (width + 1) * 4)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b""))
    return path


def identity(image: np.ndarray, box):
    """A transform that keeps the decoded pixels and the box as they are."""
    return torch.from_numpy(image.copy()), np.asarray(box if box is not None else [np.nan] * 4, dtype=np.float32)


# ----- decompression bombs ---------------------------------------------------------------------------
def test_bomb_is_refused_from_its_header_with_the_file_named(tmp_path):
    bomb = write_png_bomb(tmp_path / "bomb.png")
    assert bomb.stat().st_size < 1000
    with pytest.raises(BadImageError, match=r"bomb\.png.*max_image_pixels = 100 megapixels"):
        load_rgb(bomb)
    with pytest.raises(BadImageError, match=r"bomb\.png.*max_image_pixels = 300 megapixels"):
        load_rgb(bomb, max_image_pixels=300_000_000)


def test_max_image_pixels_applies_in_loader_workers_and_skip_drops_the_bomb(cub_copy, caplog):
    sample = read_cub(cub_copy).test[0]
    write_png_bomb(cub_copy / sample.path)  # the name stays .jpg: decoders read the content
    skipping = tiny_datamodule(CUB200DataModule, cub_copy, on_bad_image="skip", num_workers=1, persistent_workers=False)
    skipping.setup("test")
    batch = next(iter(skipping.test_dataloader()))
    assert batch["image"].shape[0] == 3 and sample.path not in batch["path"]
    raising = tiny_datamodule(CUB200DataModule, cub_copy, num_workers=1, persistent_workers=False)
    raising.setup("test")
    with pytest.raises(BadImageError, match=sample.path.split("/")[-1]):
        next(iter(raising.test_dataloader()))
    # the configured limit reaches the worker processes: 96-128 px images are above 5000 pixels
    strict = tiny_datamodule(CUB200DataModule, cub_copy, num_workers=1, persistent_workers=False, max_image_pixels=5000)
    strict.setup("test")
    with pytest.raises(BadImageError, match=r"above data.max_image_pixels = 0.005 megapixels"):
        next(iter(strict.test_dataloader()))


def test_cache_builder_refuses_or_skips_a_bomb(cub_copy, tmp_path):
    splits = read_cub(cub_copy)
    paths = [s.path for s in splits.train + splits.test]
    write_png_bomb(cub_copy / paths[0])
    with pytest.raises(BadImageError, match=paths[0].split("/")[-1]):
        ResizedImageCache(tmp_path / "raise", 80).prepare(cub_copy, paths, workers=1, progress=False)
    manifest = ResizedImageCache(tmp_path / "skip", 80).prepare(cub_copy, paths, workers=1, progress=False, skip_bad_images=True)
    assert manifest[paths[0]] is None and all(manifest[p] is not None for p in paths[1:])
    # python -m data_modules.resized_cache takes the limit too: 96-128 px images are above 5000 pixels
    with pytest.raises(BadImageError, match="max_image_pixels = 0.005 megapixels"):
        main(["--dataset", "cub", "--root", str(cub_copy), "--cache-dir", str(tmp_path / "cli"), "--workers", "0", "--max-image-pixels", "5000"])


# ----- 16-bit PNGs -----------------------------------------------------------------------------------
def write_16bit_png(path: Path) -> np.ndarray:
    """A 16-bit grayscale PNG of a 0..255 ramp (value ``v * 257 + 100``); returns its 8-bit rendering."""
    eight = np.tile(np.arange(0, 256, 4, dtype=np.uint16), (48, 1))  # (48, 64)
    Image.fromarray(eight * 257 + 100).save(path)  # +100 (< 257 / 2) still rounds to v
    with Image.open(path) as img:
        assert img.mode.startswith("I")
    return eight.astype(np.uint8)


def test_16bit_png_is_scaled_to_8_bits_not_clipped(tmp_path):
    expected = write_16bit_png(tmp_path / "deep.png")
    rgb = load_rgb(tmp_path / "deep.png")
    assert rgb.dtype == np.uint8 and rgb.shape == (48, 64, 3)
    np.testing.assert_array_equal(rgb, np.repeat(expected[..., None], 3, axis=2))


def test_32bit_integer_images_are_read_as_16_bit_unless_they_hold_8_bit_values(tmp_path):
    ramp = np.arange(0, 256, 4, dtype=np.int32)[None].repeat(8, axis=0)  # (8, 64)
    Image.fromarray(ramp * 257, mode="I").save(tmp_path / "wide16.tif")
    Image.fromarray(ramp, mode="I").save(tmp_path / "wide8.tif")
    for name in ("wide16.tif", "wide8.tif"):
        with Image.open(tmp_path / name) as img:
            assert img.mode == "I"
        np.testing.assert_array_equal(load_rgb(tmp_path / name)[..., 1], ramp)


def test_16bit_png_is_scaled_in_the_resized_cache(tmp_path):
    (tmp_path / "src").mkdir()
    expected = write_16bit_png(tmp_path / "src" / "deep.png")
    ResizedImageCache(tmp_path / "cache", 24).prepare(tmp_path / "src", ["deep.png"], progress=False)
    cached = load_rgb(tmp_path / "cache" / "deep.png")
    assert cached.shape[:2] == (24, 32)
    assert abs(float(cached.mean()) - float(expected.mean())) < 3  # ~126, not 255


# ----- EXIF orientation ------------------------------------------------------------------------------
STORED_BOX = (70.0, 10.0, 110.0, 30.0)  # (x1, y1, x2, y2) of the red patch in the stored 120x80 pixels


def write_rotated_jpeg(path: Path, orientation: int = 6) -> None:
    """A 120x80 stored JPEG (gray, red patch at :data:`STORED_BOX`) tagged with EXIF ``orientation``."""
    pixels = np.full((80, 120, 3), 128, dtype=np.uint8)
    x1, y1, x2, y2 = (int(v) for v in STORED_BOX)
    pixels[y1:y2, x1:x2] = (220, 20, 20)
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=95, exif=exif)
    path.write_bytes(buffer.getvalue())


def red_extent(pixels: np.ndarray) -> tuple[int, int, int, int]:
    red = (pixels[..., 0] > 150) & (pixels[..., 1] < 100)
    ys, xs = np.nonzero(red)
    return xs.min(), ys.min(), xs.max() + 1, ys.max() + 1


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_moves_pixels_and_box_together(tmp_path, orientation):
    write_rotated_jpeg(tmp_path / "photo.jpg", orientation)
    decoded = read_image(tmp_path / "photo.jpg")
    assert decoded.orientation == orientation and decoded.stored_size == (120, 80)
    assert decoded.pixels.shape[:2] == ((120, 80) if orientation >= 5 else (80, 120))
    box = orient_box(STORED_BOX, decoded.orientation, decoded.stored_size)
    np.testing.assert_allclose(red_extent(decoded.pixels), box, atol=1)


def test_exif_rotated_jpeg_same_pixels_and_box_with_and_without_the_cache(cub_copy, tmp_path):
    sample = read_cub(cub_copy).test[0]
    write_rotated_jpeg(cub_copy / sample.path, orientation=6)  # displayed portrait, 80 wide x 120 high
    image_id = next(line.split()[0] for line in (cub_copy / "images.txt").read_text().splitlines() if line.split()[1] == sample.path[len("images/"):])
    x1, y1, x2, y2 = STORED_BOX
    lines = [f"{image_id} {x1} {y1} {x2 - x1} {y2 - y1}" if line.split()[0] == image_id else line for line in (cub_copy / "bounding_boxes.txt").read_text().splitlines()]
    (cub_copy / "bounding_boxes.txt").write_text("\n".join(lines) + "\n")

    items = {}
    for name, cache_dir in (("originals", None), ("cache", tmp_path / "cache")):
        dm = tiny_datamodule(CUB200DataModule, cub_copy, cache_dir=cache_dir, cache_size=60)
        dm.prepare_data()
        dm.setup("test")
        dataset = dm.datasets["test"]
        dataset.transform = identity
        items[name] = next(dataset[i] for i in range(len(dataset)) if dataset.samples[i].path == sample.path)
    original, cached = items["originals"], items["cache"]
    assert original["image"].shape[:2] == (120, 80)  # portrait, as displayed
    np.testing.assert_allclose(original["box"].numpy(), red_extent(original["image"].numpy()), atol=1)
    assert cached["image"].shape[:2] == (90, 60)  # shorter side 60, same orientation
    np.testing.assert_allclose(cached["box"].numpy(), red_extent(cached["image"].numpy()), atol=1.5)
    np.testing.assert_allclose(cached["box"].numpy() * 80 / 60, original["box"].numpy(), atol=1.5)


@pytest.mark.parametrize("cache_side", [None, 60, 200])  # originals, a resized cache, a byte-copy cache
@pytest.mark.parametrize("frame", ["stored", "displayed"])
def test_metadata_sizes_say_the_frame_of_their_box(tmp_path, cache_side, frame):
    """``Sample.size`` (NA-Birds' sizes.txt) in the stored frame (120x80) or the displayed one (80x120)
    of an EXIF-rotated photo: either way the box lands on the red patch."""
    from data_modules.dataset import FineGrainedDataset, load_sample
    from data_modules.samples import Sample

    (tmp_path / "src").mkdir()
    write_rotated_jpeg(tmp_path / "src" / "photo.jpg", orientation=6)
    if frame == "stored":
        sample = Sample("photo.jpg", 0, STORED_BOX, size=(120, 80))
    else:
        sample = Sample("photo.jpg", 0, orient_box(STORED_BOX, 6, (120, 80)), size=(80, 120))
    root, samples = tmp_path / "src", [sample]
    if cache_side is not None:
        cache = ResizedImageCache(tmp_path / "cache", cache_side)
        cache.prepare(root, ["photo.jpg"], progress=False)
        root, samples = cache.cache_dir, cache.cached_samples(samples)
    item = FineGrainedDataset(root, samples, identity)[0]
    np.testing.assert_allclose(item["box"].numpy(), red_extent(item["image"].numpy()), atol=1.5)
    pixels, box = load_sample(root, samples[0])  # what a figure of the dataset draws
    np.testing.assert_array_equal(pixels, item["image"].numpy())
    np.testing.assert_allclose(box, item["box"].numpy(), atol=1e-4)
