"""Any dataset stored one folder per class.

Layout::

    root/
      train/<class name>/<any sub-folders>/<image>   (required)
      val/<class name>/...                           (optional; else a stratified split of train)
      test/<class name>/...                          (optional; else the test split is empty)

Classes are the sorted folder names of ``train/`` (label = position). ``val/`` and ``test/`` may hold
fewer classes but none that ``train/`` lacks. Images are the files with an extension in
:data:`IMAGE_EXTENSIONS` (case-insensitive); hidden files and folders are skipped, other files are
ignored. Symbolic links to files and to class folders are followed wherever they point (DVC,
git-annex, subsets built from links into a shared store); links to deeper sub-folders are not
(no loops). No boxes.
"""

from __future__ import annotations

import os
from pathlib import Path

from data_modules.base import FineGrainedDataModule, Splits
from data_modules.errors import DatasetFormatError, DatasetNotFoundError
from data_modules.samples import Sample

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
IMAGE_FOLDER_LAYOUT = (
    "Expected a class-per-folder tree: train/<class>/<images> (required), val/<class>/... and "
    f"test/<class>/... (optional); images are {', '.join(IMAGE_EXTENSIONS)} files."
)


def read_image_folder(root: Path) -> Splits:
    """Parse a class-per-folder tree into train/val/test samples and class names.

    Raises :class:`DatasetNotFoundError` without ``train/``, :class:`DatasetFormatError` for a
    ``train/`` class folder without images, for ``val/``/``test/`` class folders that ``train/`` lacks
    (naming them).
    """
    train_dir = root / "train"
    if not train_dir.is_dir():
        raise DatasetNotFoundError(f"missing folder {train_dir}\n{IMAGE_FOLDER_LAYOUT}")
    class_names = _class_folders(train_dir)
    if not class_names:
        raise DatasetFormatError(f"{train_dir}: no class folders\n{IMAGE_FOLDER_LAYOUT}")
    label_of = {name: label for label, name in enumerate(class_names)}

    splits: dict[str, list[Sample] | None] = {}
    for split in ("train", "val", "test"):
        split_dir = root / split
        if not split_dir.is_dir():
            splits[split] = None
            continue
        folders = _class_folders(split_dir)
        unknown = [name for name in folders if name not in label_of]
        if unknown:
            raise DatasetFormatError(
                f"{split_dir}: class folders {unknown} are not in {train_dir} (its classes: {class_names[:20]}"
                f"{' ...' if len(class_names) > 20 else ''}); {split}/ classes must be a subset of train/ classes"
            )
        samples = []
        for name in folders:
            images = _images_under(root, split_dir / name)
            if split == "train" and not images:
                raise DatasetFormatError(f"{split_dir / name}: class folder without images ({', '.join(IMAGE_EXTENSIONS)})")
            samples += [Sample(path=rel, label=label_of[name]) for rel in images]
        splits[split] = samples
    return Splits(train=splits["train"], val=splits["val"], test=splits["test"] or [], class_names=class_names)


def _class_folders(split_dir: Path) -> list[str]:
    return sorted(entry.name for entry in os.scandir(split_dir) if entry.is_dir() and not entry.name.startswith("."))


def _images_under(root: Path, folder: Path) -> list[str]:
    """Root-relative POSIX paths of the images under ``folder`` (recursive, sorted, hidden skipped)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for filename in sorted(filenames):
            if filename.startswith(".") or not filename.lower().endswith(IMAGE_EXTENSIONS):
                continue
            found.append((Path(dirpath) / filename).relative_to(root).as_posix())
    return found


class ImageFolderDataModule(FineGrainedDataModule):
    """A class-per-folder dataset (see the module docstring for the layout).

    ``root`` holds ``train/`` (and optionally ``val/``, ``test/``). Without ``val/`` the validation
    split is ``val_fraction`` of every class of ``train/`` (seeded). See
    :class:`~data_modules.base.FineGrainedDataModule` for the other arguments.
    """

    dataset_name = "image folder dataset"
    layout_hint = IMAGE_FOLDER_LAYOUT

    def read_splits(self, root: Path) -> Splits:
        return read_image_folder(root)
