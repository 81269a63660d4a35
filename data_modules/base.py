"""The base LightningDataModule of every fine-grained dataset in mgff.

A subclass only says how to read its metadata (:meth:`FineGrainedDataModule.read_splits`); this
class holds the validation split, transforms, loaders and the class facts the CLI links into the model.

Model selection happens on a validation split held out from train (seeded, class-stratified);
the test split is evaluated once, at the end. ``val_on_test=True`` validates on test instead (only
to compare with codebases that do so; results are then optimistically biased).
"""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path
from typing import Sequence

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader

from data_modules.dataset import FineGrainedDataset, OnBadImage, collate_skip_none
from data_modules.errors import DatasetNotFoundError
from data_modules.image_io import DEFAULT_MAX_IMAGE_PIXELS
from data_modules.resumable import SeededTransform, split_loader
from data_modules.samples import Sample, check_images_exist
from data_modules.transforms import IMAGENET_MEAN, IMAGENET_STD, apply_transform, build_eval_transform, build_train_transform, check_augmentations

log = logging.getLogger("mgff")


class Splits:
    """The parsed splits of a dataset: samples per split, the class names (index = label) and, for
    datasets with a class hierarchy, each class's parent id (``class_parents[label]``)."""

    def __init__(
        self,
        train: list[Sample],
        test: list[Sample],
        class_names: list[str],
        val: list[Sample] | None = None,
        class_parents: list[int] | None = None,
    ):
        self.train, self.test, self.val, self.class_names = train, test, val, class_names
        self.class_parents = class_parents


def stratified_split(labels: Sequence[int], fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split indices into ``(keep, held_out)`` with ``fraction`` of every class held out.

    Each class with at least two images gives at least one held-out image; the split depends only
    on ``seed`` and the labels (not on the machine or the number of workers).
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {fraction}")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    held = []
    for cls in np.unique(labels):
        idx = np.flatnonzero(labels == cls)
        rng.shuffle(idx)
        n = int(round(fraction * len(idx)))
        if fraction > 0 and n == 0 and len(idx) >= 2:
            n = 1
        held.append(idx[:n])
    held_out = np.sort(np.concatenate(held)) if held else np.array([], dtype=int)
    keep = np.setdiff1d(np.arange(len(labels)), held_out)
    return keep, held_out


class FineGrainedDataModule(L.LightningDataModule):
    """Base DataModule: splits, albumentations transforms, loaders, ``num_classes``/``class_names``.

    Args:
        root: dataset root folder.
        batch_size: images per batch and per device.
        num_workers: loader worker processes per device.
        resize_size: side of the square resize before cropping (paper: 512).
        crop_size: side of the random (train) / centre (eval) crop (paper: 384).
        hflip: probability of a horizontal flip in training.
        random_resized_crop_scale: ``[lo, hi]`` with ``0 < lo <= hi <= 1``: in training, replace the random
            ``crop_size`` crop of the resized image by a random resized crop: a region covering ``lo..hi``
            of the resized (``resize_size`` square) image's area, aspect ratio (width / height) 3/4..4/3,
            resized to ``crop_size``. ``None`` (default): the paper's random crop, unchanged.
        color_jitter: strength ``s >= 0`` (unitless) of a training colour jitter, applied to 80% of the
            images: brightness, contrast and saturation factors drawn from ``[max(0, 1 - s), 1 + s]`` and
            a hue shift up to ``min(s / 4, 0.1)`` of the colour wheel, in random order (e.g. 0.4).
            ``0`` (default): off. Evaluation images are never jittered.
        trivial_augment: in training, apply one TrivialAugment-Wide op per image after the crop and flip
            (shear, translate, rotate, colour, contrast, posterize...;
            :func:`~data_modules.transforms.trivial_augment_ops`; boxes follow the geometric ones).
            ``False`` (default): off.
        val_fraction: share of every class of train held out for validation (when the dataset has no
            official validation split).
        val_on_test: validate on the test split instead (only when a config asks for it).
        split_seed: seed of the validation split.
        on_bad_image: ``"raise"`` on a corrupt image (default) or ``"skip"`` it with a warning.
        crop_to_box: crop images to their ground-truth box (oracle baseline; needs boxes).
        check_images: check at setup that every listed image exists (lists the missing ones).
        pin_memory: pin host memory for faster host-to-GPU copies.
        persistent_workers: keep loader workers alive between epochs.
        predict_split: which split ``predict`` runs on.
        mean: normalisation mean.
        std: normalisation std.
        cache_dir: read the images from a resized copy in this folder, written once by
            :meth:`prepare_data` (see :mod:`data_modules.resized_cache`); ``None`` reads the originals.
        cache_size: shorter side of the cached images in pixels.
        source_size: also yield ``batch["source"]``, the same view (same crop and flip) at this side as
            ``(B, 3, S, S)`` uint8, for a second stage that cuts its crop "from the original image"
            (:class:`~data_modules.transforms.ViewWithSource`); ``None``: no source view.
        max_image_pixels: an image declaring more pixels is a bad image (``on_bad_image`` decides),
            refused from its header before decoding, in every loader worker and in the cache builder;
            guards against decompression bombs (a 17 KB PNG can declare 20000x20000). ``None``: no limit.
    """

    dataset_name = "dataset"
    layout_hint = ""

    def __init__(
        self,
        root: str | Path,
        batch_size: int = 16,
        num_workers: int = 4,
        resize_size: int = 512,
        crop_size: int = 384,
        hflip: float = 0.5,
        val_fraction: float = 0.1,
        val_on_test: bool = False,
        split_seed: int = 0,
        on_bad_image: OnBadImage = "raise",
        crop_to_box: bool = False,
        check_images: bool = True,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        predict_split: str = "test",
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        cache_dir: str | Path | None = None,
        cache_size: int = 512,
        source_size: int | None = None,
        max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
        random_resized_crop_scale: tuple[float, float] | None = None,
        color_jitter: float = 0.0,
        trivial_augment: bool = False,
    ) -> None:
        super().__init__()
        if crop_size > resize_size:
            raise ValueError(f"data.crop_size ({crop_size}) must not exceed data.resize_size ({resize_size})")
        if predict_split not in ("train", "val", "test"):
            raise ValueError(f"predict_split must be one of 'train', 'val', 'test', got {predict_split!r}")
        if on_bad_image not in ("raise", "skip"):
            raise ValueError(f"on_bad_image must be 'raise' or 'skip', got {on_bad_image!r}")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        if max_image_pixels is not None and max_image_pixels < 1:
            raise ValueError(f"data.max_image_pixels must be a positive number of pixels or null, got {max_image_pixels}")
        if source_size is not None and source_size < crop_size:
            raise ValueError(f"data.source_size ({source_size}) must be at least data.crop_size ({crop_size}): it is the same view at a higher resolution")
        if cache_size < 1:
            raise ValueError(f"cache_size must be a positive number of pixels, got {cache_size}")
        rrc_scale = check_augmentations(random_resized_crop_scale, color_jitter, trivial_augment, prefix="data.")
        self.root = Path(root).expanduser() if root is not None else None
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.resize_size = resize_size
        self.crop_size = crop_size
        self.hflip = hflip
        self.random_resized_crop_scale = rrc_scale
        self.color_jitter = float(color_jitter)
        self.trivial_augment = trivial_augment
        self.val_fraction = val_fraction
        self.val_on_test = val_on_test
        self.split_seed = split_seed
        self.on_bad_image = on_bad_image
        self.crop_to_box = crop_to_box
        self.check_images = check_images
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers
        self.predict_split = predict_split
        self.mean, self.std = tuple(mean), tuple(std)
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else None
        self.cache_size = cache_size
        self.source_size = source_size
        self.max_image_pixels = max_image_pixels
        self._splits: Splits | None = None
        self.datasets: dict[str, FineGrainedDataset] = {}

    # ----- what a subclass provides -------------------------------------------------------------
    def read_splits(self, root: Path) -> Splits:
        """Parse the dataset's metadata under ``root`` into :class:`Splits`."""
        raise NotImplementedError

    def image_root(self) -> Path:
        """Folder the sample paths are relative to (the resized cache when one is used)."""
        return self.cache_dir if self.cache_dir is not None else self.root

    def _resized_cache(self):
        # imported here, not at the top: ``python -m data_modules.resized_cache`` would otherwise find
        # its own module already imported by the package (runpy warns)
        from data_modules.resized_cache import ResizedImageCache

        return ResizedImageCache(self.cache_dir, shorter_side=self.cache_size, max_image_pixels=self.max_image_pixels)

    # ----- class facts, linked into the model by the CLI ----------------------------------------
    @property
    def splits(self) -> Splits:
        if self._splits is None:
            self._check_root()
            self._splits = self.read_splits(self.root)
            if self._splits.val is None:
                if self.val_on_test:
                    self._splits.val = self._splits.test
                else:
                    labels = [s.label for s in self._splits.train]
                    keep, held = stratified_split(labels, self.val_fraction, self.split_seed)
                    train = self._splits.train
                    self._splits.train = [train[i] for i in keep]
                    self._splits.val = [train[i] for i in held]
            elif self.val_on_test:
                self._splits.val = self._splits.test
        return self._splits

    @property
    def num_classes(self) -> int:
        return len(self.splits.class_names)

    @property
    def class_names(self) -> list[str]:
        return list(self.splits.class_names)

    @property
    def class_parents(self) -> list[int] | None:
        """Parent id of each class where the dataset has a hierarchy (NA-Birds), else ``None``."""
        parents = self.splits.class_parents
        return list(parents) if parents is not None else None

    def _check_root(self) -> None:
        if self.root is None or not self.root.is_dir():
            raise DatasetNotFoundError(
                f"{self.dataset_name} root folder {self.root} does not exist.\n{self.layout_hint}"
            )

    # ----- Lightning hooks -------------------------------------------------------------------------
    def prepare_data(self) -> None:
        """Write the resized image cache when ``cache_dir`` is set (already cached images are skipped).

        Lightning calls this on one process per node before :meth:`setup`; it keeps no state (the
        metadata is read again by :meth:`setup`).
        """
        if self.cache_dir is None:
            return
        self._check_root()
        splits = self.read_splits(self.root)
        paths = [s.path for s in splits.train + splits.test + (splits.val or [])]
        self._resized_cache().prepare(self.root, paths, workers=self.num_workers, skip_bad_images=self.on_bad_image == "skip")

    def setup(self, stage: str | None = None) -> None:
        splits = self.splits
        if not splits.val and not self.val_on_test:
            log.warning("validation split is empty (val_fraction=%s): checkpoints cannot be selected", self.val_fraction)
        root = self.image_root()
        samples = {"train": splits.train, "val": splits.val, "test": splits.test}
        if self.cache_dir is not None:  # same paths, boxes scaled to the cached images' pixels
            if self.cache_size < self.resize_size:
                log.warning("data.cache_size (%s) is below data.resize_size (%s): cached images get enlarged", self.cache_size, self.resize_size)
            cache = self._resized_cache()
            cache.check_settings(self.root)
            samples = cache.cached_splits(samples)
        if self.check_images and not self.datasets:
            check_images_exist(root, samples["train"] + samples["val"] + samples["test"])
        # seeded per item by the training loader: augmentations that a resumed run replays exactly
        train_tf = SeededTransform(
            build_train_transform(
                self.resize_size,
                self.crop_size,
                self.hflip,
                self.mean,
                self.std,
                self.source_size,
                random_resized_crop_scale=self.random_resized_crop_scale,
                color_jitter=self.color_jitter,
                trivial_augment=self.trivial_augment,
            )
        )
        eval_tf = partial(apply_transform, build_eval_transform(self.resize_size, self.crop_size, self.mean, self.std, self.source_size))
        if self.source_size is not None and self.cache_dir is not None and self.cache_size * self.crop_size < self.source_size * self.resize_size:
            log.warning("data.cache_size (%s) holds less detail than data.source_size (%s) asks for: the source view is upsampled", self.cache_size, self.source_size)
        make = partial(
            FineGrainedDataset, root, on_bad_image=self.on_bad_image, crop_to_box=self.crop_to_box, max_image_pixels=self.max_image_pixels
        )
        self.datasets = {
            "train": make(samples["train"], train_tf),
            "val": make(samples["val"], eval_tf),
            "test": make(samples["test"], eval_tf),
        }

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        if not self.datasets:
            self.setup()
        workers = self.num_workers
        # training: a resumable, seeded order over this rank's share; evaluation: every image once over all ranks
        return split_loader(
            self.datasets[split],
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=workers,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            persistent_workers=self.persistent_workers and workers > 0,
            collate_fn=collate_skip_none,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.predict_split, shuffle=False)

    def split_samples(self, split: str) -> list[Sample]:
        """The samples of ``split`` (``train``/``val``/``test``), e.g. to map predictions to paths."""
        return list(getattr(self.splits, split))
