"""Class-per-folder reader: classes from train/, optional val/ and test/, and every bad-input path."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from data_modules.errors import DatasetFormatError, DatasetNotFoundError
from data_modules.image_folder import ImageFolderDataModule, read_image_folder
from data_modules.synthetic import SyntheticSpec, class_names
from data_modules.synthetic_layouts import write_synthetic_layout
from datamodule_helpers import tiny_datamodule

SPEC = SyntheticSpec(num_classes=4, images_per_class=8, min_side=64, max_side=96)
SORTED_CLASSES = sorted(class_names(4))


@pytest.fixture(scope="module")
def folder_root(tmp_path_factory) -> Path:
    return write_synthetic_layout("image_folder", tmp_path_factory.mktemp("data") / "image_folder", SPEC)


@pytest.fixture(scope="module")
def folder_with_val_root(tmp_path_factory) -> Path:
    return write_synthetic_layout("image_folder_with_val", tmp_path_factory.mktemp("data") / "image_folder", SPEC)


@pytest.fixture
def folder_copy(folder_root, tmp_path) -> Path:
    target = tmp_path / "image_folder"
    shutil.copytree(folder_root, target)
    return target


def _dm(root, **kw):
    return tiny_datamodule(ImageFolderDataModule, root, **kw)


def test_classes_are_sorted_train_folders(folder_root):
    splits = read_image_folder(folder_root)
    assert splits.class_names == SORTED_CLASSES
    assert splits.val is None and len(splits.train) == 16 and len(splits.test) == 16
    for sample in splits.train + splits.test:
        assert sample.path.split("/")[1] == SORTED_CLASSES[sample.label] and sample.box is None


def test_without_val_folder_the_split_is_stratified_from_train(folder_root):
    dm = _dm(folder_root, val_fraction=0.25)
    assert len(dm.splits.val) == 4 and {s.label for s in dm.splits.val} == {0, 1, 2, 3}
    assert len(dm.splits.train) == 12
    assert all(s.path.startswith("train/") for s in dm.splits.val)


def test_val_folder_is_used_as_is(folder_with_val_root):
    dm = _dm(folder_with_val_root, val_fraction=0.5)  # val_fraction plays no part with a val/ folder
    assert [s.path.split("/")[0] for s in dm.splits.val] == ["val"] * 4
    assert len(dm.splits.train) == 12 and len(dm.splits.test) == 16
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()))
    assert batch["image"].shape == (4, 3, 64, 64)


def test_val_and_test_may_hold_fewer_classes(folder_copy):
    shutil.rmtree(folder_copy / "test" / SORTED_CLASSES[0])
    splits = read_image_folder(folder_copy)
    assert splits.class_names == SORTED_CLASSES and {s.label for s in splits.test} == {1, 2, 3}


@pytest.mark.parametrize("split", ["val", "test"])
def test_class_folder_unknown_to_train_is_named(folder_copy, split):
    (folder_copy / split / "Mystery_Bird").mkdir(parents=True)
    with pytest.raises(DatasetFormatError, match=rf"{split}: class folders \['Mystery_Bird'\] are not in .*train.*must be a subset"):
        read_image_folder(folder_copy)


def test_no_test_folder_gives_an_empty_test_split(folder_copy):
    shutil.rmtree(folder_copy / "test")
    assert read_image_folder(folder_copy).test == []


def test_nested_uppercase_and_non_image_files(folder_copy):
    cls = folder_copy / "train" / SORTED_CLASSES[2]
    (cls / "more").mkdir()
    shutil.copy(next(cls.glob("*.jpg")), cls / "more" / "EXTRA.JPG")
    (cls / "notes.txt").write_text("not an image")
    (cls / ".hidden.jpg").write_bytes(b"")
    (folder_copy / "train" / ".cache").mkdir()
    paths = [s.path for s in read_image_folder(folder_copy).train if s.label == 2]
    assert f"train/{SORTED_CLASSES[2]}/more/EXTRA.JPG" in paths and len(paths) == 5
    assert not any(p.endswith((".txt", ".hidden.jpg")) for p in paths)


def test_missing_root_and_missing_train(tmp_path, folder_copy):
    with pytest.raises(DatasetNotFoundError, match="does not exist"):
        _dm(tmp_path / "nowhere").num_classes
    shutil.rmtree(folder_copy / "train")
    with pytest.raises(DatasetNotFoundError, match=r"missing folder .*train"):
        read_image_folder(folder_copy)


def test_train_without_class_folders(tmp_path):
    (tmp_path / "train").mkdir()
    with pytest.raises(DatasetFormatError, match="no class folders"):
        read_image_folder(tmp_path)


def test_train_class_folder_without_images(folder_copy):
    (folder_copy / "train" / "Empty_Bird").mkdir()
    (folder_copy / "train" / "Empty_Bird" / "readme.txt").write_text("no images here")
    with pytest.raises(DatasetFormatError, match=r"Empty_Bird: class folder without images"):
        read_image_folder(folder_copy)


def test_symlinked_images_and_class_folders_into_a_shared_store_are_followed(folder_copy, tmp_path):
    """A subset built from links into a store outside the root (as DVC / git-annex lay datasets out)."""
    store = tmp_path / "store"
    store.mkdir()
    linked_class = folder_copy / "train" / SORTED_CLASSES[1]
    shutil.move(linked_class, store / "class_folder")
    os.symlink(store / "class_folder", linked_class)  # a symlinked class folder
    image = next((folder_copy / "train" / SORTED_CLASSES[0]).glob("*.jpg"))
    shutil.move(image, store / "image.jpg")
    os.symlink(store / "image.jpg", image)  # a symlinked image file
    splits = read_image_folder(folder_copy)
    paths = {s.path: s.label for s in splits.train + (splits.val or [])}
    assert paths[image.relative_to(folder_copy).as_posix()] == 0
    assert sum(label == 1 for label in paths.values()) == len(list((store / "class_folder").glob("*.jpg"))) > 0
    dm = _dm(folder_copy, val_fraction=0.0)
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    assert sum(len(b["path"]) for b in batches) == len(splits.train)
