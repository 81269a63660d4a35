"""A resized copy of a dataset's images, written once and then read instead of the full-size files.

Decoding a 1200x900 JPEG and resizing it to 512 px costs most of the data loader's time; decoding a
copy whose shorter side is already 512 px is several times faster (``benchmarks/data_pipeline.py``
measures it). The copy keeps the dataset's relative paths, so the readers do not change.

Layout of a cache folder::

    <cache_dir>/
      cache.json        {"format": 2, "shorter_side": 512, "jpeg_quality": 95, "source_root": "/abs/root"}
                        (written first; a cache is never extended with other settings or another source)
      manifest.json     {"<relative path>": [source_w, source_h, cached_w, cached_h, orientation], ...}
                        (stored pixels of the source and of the cached file, and the EXIF orientation
                        baked into the cached pixels, 1 = none; written last, atomically: an image is
                        in the cache when it is listed here)
      <relative path>   each image, RGB JPEG, shorter side ``shorter_side`` px (aspect kept), decoded
                        as :func:`data_modules.image_io.read_image` does (16-bit scaled) with its EXIF
                        orientation applied (the JPEG has none left); an image whose shorter side is
                        already at most ``shorter_side`` is copied byte for byte, EXIF included (the
                        loader applies it, as it does to originals); names and extensions are kept even
                        where the content becomes JPEG (decoders read the content, not the extension)

Boxes: a :class:`~data_modules.samples.Sample`'s box stays in the stored pixels of the ORIGINAL
image (as the metadata gives it, see :mod:`data_modules.image_io`). The manifest keeps both sizes of
every image, and :meth:`ResizedImageCache.cached_samples` moves each box into the stored pixels of
the cached file (scaled from ``Sample.size`` to the source's size when they differ, oriented when
the orientation was baked in, scaled by cached / source); the loader then treats a cached file
exactly like an original, so both paths give the same pixels and boxes. The splits never change.

Preparation runs in parallel worker processes with a progress bar and can be interrupted: every
image is written to a hidden temporary name and renamed into place (``os.replace``), so a file under
its final name is always complete and a later run skips it. Half-written temporary files of a killed
run are removed at the start of every later run, also when nothing is left to do -- but only stale
ones, since another job sharing the cache may be writing right now: a temporary file is stale when
it was last modified more than :data:`STALE_TEMP_SECONDS` ago (a live writer writes one image in
well under a second and renames it at once; an hour without a write means its writer is dead).

Images above ``max_image_pixels`` (decompression bombs) are refused from their header, in every
worker process, like undecodable ones.

Command line (one DataModule per ``--dataset``, reading the dataset's own metadata)::

    python -m data_modules.resized_cache --dataset cub --root /data/CUB_200_2011 \\
        --cache-dir /scratch/cub-512 --shorter-side 512 --workers 8 [--max-image-pixels 100000000]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from PIL import Image
from tqdm import tqdm

from data_modules.errors import BadImageError, MissingImagesError
from data_modules.image_io import DECODE_ERRORS, DEFAULT_MAX_IMAGE_PIXELS, exif_orientation, open_checked, orient, orient_box, to_rgb
from data_modules.samples import Sample

log = logging.getLogger("mgff")

CACHE_FORMAT = 2  # 2: EXIF orientation applied, 16-bit scaled, orientation in the manifest
DEFAULT_SHORTER_SIDE = 512
DEFAULT_JPEG_QUALITY = 95
TEMP_SUFFIX = ".part"
STALE_TEMP_SECONDS = 3600  # a temporary file not modified for this long belongs to a killed run

Sizes = tuple[int, int, int, int, int]  # source_w, source_h, cached_w, cached_h (stored pixels), baked EXIF orientation


class CacheMismatchError(ValueError):
    """A cache folder was written with other settings or from another dataset (names both)."""


class ResizedImageCache:
    """One cache folder of resized images (see the module docstring for its layout).

    Args:
        cache_dir: the folder (created when prepared).
        shorter_side: the cached images' shorter side in pixels (never enlarged).
        jpeg_quality: JPEG quality of the resized files (1-95 is PIL's useful range).
        max_image_pixels: larger images are bad images (refused from the header); ``None``: no limit.
    """

    def __init__(
        self,
        cache_dir: str | Path,
        shorter_side: int = DEFAULT_SHORTER_SIDE,
        jpeg_quality: int = DEFAULT_JPEG_QUALITY,
        max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    ) -> None:
        if shorter_side < 1:
            raise ValueError(f"shorter_side must be a positive number of pixels, got {shorter_side}")
        if not 1 <= jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be in 1..100, got {jpeg_quality}")
        self.cache_dir = Path(cache_dir).expanduser()
        self.shorter_side = shorter_side
        self.jpeg_quality = jpeg_quality
        self.max_image_pixels = max_image_pixels

    @property
    def info_path(self) -> Path:
        return self.cache_dir / "cache.json"

    @property
    def manifest_path(self) -> Path:
        return self.cache_dir / "manifest.json"

    # ----- reading ------------------------------------------------------------------------------------
    def read_manifest(self) -> dict[str, Sizes | None]:
        """``{relative path: (source_w, source_h, cached_w, cached_h)}`` of the cached images (``None``
        for an undecodable image copied as is); empty when nothing was prepared yet."""
        if not self.manifest_path.is_file():
            return {}
        entries = json.loads(self.manifest_path.read_text(encoding="utf-8"))
        return {path: tuple(sizes) if sizes is not None else None for path, sizes in entries.items()}

    def check_settings(self, source_root: Path | None = None) -> None:
        """Raise :class:`CacheMismatchError` if ``cache.json`` records another shorter side or JPEG
        quality; warn if it was prepared from another ``source_root`` (a moved dataset is fine)."""
        if not self.info_path.is_file():
            return
        info = json.loads(self.info_path.read_text(encoding="utf-8"))
        if info.get("format") != CACHE_FORMAT:
            raise CacheMismatchError(
                f"{self.info_path}: the cache has format {info.get('format')}, this version reads format {CACHE_FORMAT} "
                f"(format 1 ignored EXIF orientation and clipped 16-bit images); delete {self.cache_dir} to re-create it"
            )
        for key, ours in (("shorter_side", self.shorter_side), ("jpeg_quality", self.jpeg_quality)):
            if info.get(key) != ours:
                raise CacheMismatchError(
                    f"{self.info_path}: the cache was written with {key}={info.get(key)}, this run asks for {ours}; "
                    f"use another cache_dir or delete {self.cache_dir}"
                )
        if source_root is not None and info.get("source_root") != str(Path(source_root).resolve()):
            log.warning("resized cache %s was prepared from %s, the dataset root is now %s", self.cache_dir, info.get("source_root"), source_root)

    def cached_samples(self, samples: Sequence[Sample]) -> list[Sample]:
        """The same samples with their boxes scaled to the cached images' pixels.

        Raises :class:`MissingImagesError` listing the samples (up to 20) that the manifest lacks,
        with the command that prepares them.
        """
        manifest = self.read_manifest()
        missing = [s.path for s in samples if s.path not in manifest]
        if missing:
            shown = "\n  ".join(missing[:20])
            raise MissingImagesError(
                f"{len(missing)} of {len(samples)} images are not in the resized cache {self.cache_dir} "
                f"(manifest.json {'lacks them' if manifest else 'is missing'}): call the DataModule's prepare_data() "
                f"(the Trainer does) or run python -m data_modules.resized_cache:\n  {shown}"
            )
        return [_scaled(sample, manifest[sample.path]) for sample in samples]

    def cached_splits(self, splits: Mapping[str, Sequence[Sample]]) -> dict[str, list[Sample]]:
        """:meth:`cached_samples` of every split at once (one error lists what all splits lack)."""
        scaled = iter(self.cached_samples([sample for samples in splits.values() for sample in samples]))
        return {name: [next(scaled) for _ in samples] for name, samples in splits.items()}

    # ----- writing ------------------------------------------------------------------------------------
    def prepare(
        self,
        source_root: str | Path,
        paths: Iterable[str],
        workers: int = 0,
        progress: bool = True,
        skip_bad_images: bool = False,
    ) -> dict[str, Sizes | None]:
        """Write the resized copy of ``paths`` (relative to ``source_root``) that the cache lacks.

        Args:
            source_root: the dataset root the paths are relative to.
            paths: the images to cache (duplicates are fine).
            workers: worker processes (0 = in this process).
            progress: show a tqdm progress bar.
            skip_bad_images: copy an undecodable image as is (the dataset's ``on_bad_image="skip"``
                then skips it when loading) instead of raising :class:`BadImageError`.

        Returns:
            the whole manifest after preparation. Images already cached are not read again; when
            all are, only their presence is checked.
        """
        source_root = Path(source_root)
        self.check_settings()
        self._claim(source_root)
        self.remove_stale_temp_files()
        paths = list(dict.fromkeys(paths))
        manifest = self.read_manifest()
        todo = [p for p in paths if p not in manifest or not (self.cache_dir / p).is_file()]
        if not todo:
            return manifest
        missing_sources = [p for p in todo if not (source_root / p).is_file()]
        if missing_sources:
            shown = "\n  ".join(missing_sources[:20])
            raise MissingImagesError(f"{len(missing_sources)} of {len(paths)} images to cache are missing under {source_root}:\n  {shown}")
        work = partial(
            cache_image,
            source_root=source_root,
            cache_dir=self.cache_dir,
            shorter_side=self.shorter_side,
            jpeg_quality=self.jpeg_quality,
            skip_bad_images=skip_bad_images,
            max_image_pixels=self.max_image_pixels,
        )
        bar = tqdm(total=len(todo), desc=f"resizing images to {self.shorter_side}px", unit="img", disable=not progress)
        try:
            if workers > 0:
                with ProcessPoolExecutor(max_workers=workers) as pool:
                    chunk = max(1, min(64, len(todo) // (workers * 8)))
                    for path, sizes in zip(todo, pool.map(work, todo, chunksize=chunk)):
                        manifest[path] = sizes
                        bar.update()
            else:
                for path in todo:
                    manifest[path] = work(path)
                    bar.update()
        finally:
            bar.close()
            # whatever finished is written down, so an interrupted run loses no finished image
            _write_json_atomically(self.manifest_path, manifest)
        return manifest

    def _claim(self, source_root: Path) -> None:
        """Write ``cache.json`` for a new cache; refuse one prepared from another source root."""
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        resolved = str(source_root.resolve())
        if self.info_path.is_file():
            recorded = json.loads(self.info_path.read_text(encoding="utf-8")).get("source_root")
            if recorded != resolved:
                raise CacheMismatchError(
                    f"{self.info_path}: the cache holds images of {recorded}, not of {resolved}; "
                    f"use another cache_dir, or delete {self.cache_dir} to re-create it"
                )
            return
        info = {"format": CACHE_FORMAT, "shorter_side": self.shorter_side, "jpeg_quality": self.jpeg_quality, "source_root": resolved}
        _write_json_atomically(self.info_path, info)

    def remove_stale_temp_files(self, max_age_s: float = STALE_TEMP_SECONDS) -> list[Path]:
        """Remove the temporary files of killed runs: those last modified more than ``max_age_s``
        seconds ago (younger ones may belong to a job writing right now); return the removed paths."""
        removed = []
        before = time.time() - max_age_s
        for path in self.cache_dir.rglob(f".*{TEMP_SUFFIX}"):
            try:
                if path.stat().st_mtime < before:
                    path.unlink()
                    removed.append(path)
            except FileNotFoundError:
                pass  # renamed into place or removed by a concurrent writer
        if removed:
            log.info("removed %d stale temporary files of killed runs from %s", len(removed), self.cache_dir)
        return removed


def _scaled(sample: Sample, sizes: Sizes | None) -> Sample:
    """``sample`` with its box in the stored pixels of the cached file (see the module docstring)."""
    if sizes is None:  # an undecodable image copied as is: the loader skips it
        return sample
    source_w, source_h, cached_w, cached_h, orientation = sizes
    if (cached_w, cached_h, orientation) == (source_w, source_h, 1):  # a byte copy: read as the original is
        return sample
    if sample.box is None:
        return replace(sample, size=None)
    x1, y1, x2, y2 = sample.box
    if sample.size is not None and orientation >= 5 and tuple(sample.size) == (source_h, source_w):
        # metadata written in the displayed frame (see FineGrainedDataset._displayed_box): only the scale changes
        sx, sy = cached_w / source_h, cached_h / source_w
        return replace(sample, box=(x1 * sx, y1 * sy, x2 * sx, y2 * sy), size=(cached_w, cached_h))
    if sample.size is not None:  # the metadata describes an image of another size (a resized copy)
        meta_w, meta_h = sample.size
        sx, sy = source_w / meta_w, source_h / meta_h
        x1, y1, x2, y2 = x1 * sx, y1 * sy, x2 * sx, y2 * sy
    x1, y1, x2, y2 = orient_box((x1, y1, x2, y2), orientation, (source_w, source_h))
    shown_w, shown_h = (source_h, source_w) if orientation >= 5 else (source_w, source_h)
    sx, sy = cached_w / shown_w, cached_h / shown_h
    return replace(sample, box=(x1 * sx, y1 * sy, x2 * sx, y2 * sy), size=(cached_w, cached_h))


def resized_size(width: int, height: int, shorter_side: int) -> tuple[int, int]:
    """``(w, h)`` with the shorter side ``shorter_side`` and the aspect kept; never larger than the input."""
    short = min(width, height)
    if short <= shorter_side:
        return width, height
    scale = shorter_side / short
    if width <= height:
        return shorter_side, max(1, round(height * scale))
    return max(1, round(width * scale)), shorter_side


def cache_image(
    path: str,
    *,
    source_root: Path,
    cache_dir: Path,
    shorter_side: int,
    jpeg_quality: int,
    skip_bad_images: bool = False,
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
) -> Sizes | None:
    """Write one image's resized copy (unless it exists) and return its sizes (see :data:`Sizes`).

    Runs in a worker process. The file is written under a hidden temporary name in the target folder
    and renamed into place, so a killed worker never leaves a partial file under the final name.
    """
    source, target = source_root / path, cache_dir / path
    if target.is_file():  # done by an earlier, interrupted run
        try:
            (source_w, source_h), orientation = _stored_size(source, max_image_pixels)
            (cached_w, cached_h), cached_orientation = _stored_size(target, max_image_pixels)
        except BadImageError:
            if skip_bad_images:
                return None
            raise
        # a re-encoded copy has no EXIF left (its orientation is baked in); a byte copy keeps it
        return (source_w, source_h, cached_w, cached_h, orientation if cached_orientation == 1 else 1)
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = target.with_name(f".{target.name}.{os.getpid()}{TEMP_SUFFIX}")
    try:
        try:
            with open_checked(source, max_image_pixels) as img:
                width, height = img.size
                orientation = exif_orientation(img)
                new_size = resized_size(width, height, shorter_side)  # stored frame
                if new_size == (width, height):
                    img.close()
                    shutil.copyfile(source, temp)
                    sizes: Sizes | None = (width, height, width, height, 1)
                else:
                    img.draft("RGB", new_size)  # JPEG: decode at 1/2, 1/4 or 1/8 scale when that is still >= new_size
                    resized = orient(to_rgb(img).resize(new_size, Image.Resampling.LANCZOS), orientation)
                    resized.save(temp, format="JPEG", quality=jpeg_quality)
                    sizes = (width, height, *resized.size, orientation)
        except DECODE_ERRORS as err:  # BadImageError (an OSError) included
            if not skip_bad_images:
                if isinstance(err, BadImageError):
                    raise
                raise BadImageError(f"cannot decode image {source}: {err}") from err
            shutil.copyfile(source, temp)
            sizes = None
        os.replace(temp, target)
    finally:
        temp.unlink(missing_ok=True)
    return sizes


def _stored_size(path: Path, max_image_pixels: int | None) -> tuple[tuple[int, int], int]:
    """``((w, h), EXIF orientation)`` of an image file, from its header."""
    with open_checked(path, max_image_pixels) as img:
        return img.size, exif_orientation(img)


def _write_json_atomically(path: Path, content: dict) -> None:
    temp = path.with_name(f".{path.name}.{os.getpid()}{TEMP_SUFFIX}")
    temp.write_text(json.dumps(content, indent=0, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(temp, path)


# ----- command line --------------------------------------------------------------------------------------

DATAMODULES = {
    "cub": "data_modules.cub.CUB200DataModule",
    "nabirds": "data_modules.nabirds.NABirdsDataModule",
    "cars": "data_modules.stanford_cars.StanfordCarsDataModule",
    "pets": "data_modules.oxford_pets.OxfordPetsDataModule",
    "image_folder": "data_modules.image_folder.ImageFolderDataModule",
}


def main(argv: Sequence[str] | None = None) -> Path:
    """Prepare a dataset's resized cache from the command line; return the cache folder."""
    import importlib

    parser = argparse.ArgumentParser(
        prog="python -m data_modules.resized_cache",
        description="Write a resized copy of a dataset's images (shorter side in pixels, JPEG) for faster loading.",
    )
    parser.add_argument("--dataset", required=True, choices=sorted(DATAMODULES), help="which reader lists the images")
    parser.add_argument("--root", required=True, help="the dataset root (data.root of the config)")
    parser.add_argument("--cache-dir", required=True, help="where to write the copy (data.cache_dir of the config)")
    parser.add_argument("--shorter-side", type=int, default=DEFAULT_SHORTER_SIDE, help="pixels (data.cache_size)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="worker processes")
    parser.add_argument("--skip-bad-images", action="store_true", help="copy undecodable images as is instead of stopping")
    parser.add_argument(
        "--max-image-pixels", type=int, default=DEFAULT_MAX_IMAGE_PIXELS,
        help="larger images are bad images, refused from their header (data.max_image_pixels; 0: no limit)",
    )
    args = parser.parse_args(argv)

    module_name, class_name = DATAMODULES[args.dataset].rsplit(".", 1)
    datamodule_class = getattr(importlib.import_module(module_name), class_name)
    datamodule = datamodule_class(
        root=args.root,
        cache_dir=args.cache_dir,
        cache_size=args.shorter_side,
        num_workers=args.workers,
        on_bad_image="skip" if args.skip_bad_images else "raise",
        max_image_pixels=args.max_image_pixels or None,
    )
    datamodule.prepare_data()
    manifest = ResizedImageCache(args.cache_dir, args.shorter_side, max_image_pixels=args.max_image_pixels or None).read_manifest()
    print(f"{len(manifest)} images of {args.dataset} ({args.root}) cached at {args.shorter_side}px in {args.cache_dir}")
    return Path(args.cache_dir)


if __name__ == "__main__":
    main()
