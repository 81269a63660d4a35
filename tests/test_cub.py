"""CUB-200-2011 reader: parsing, the validation split, and every bad-input path."""

from __future__ import annotations

import os
import shutil

import pytest

from data_modules.cub import CUB200DataModule, read_cub
from data_modules.errors import BadImageError, DatasetFormatError, DatasetNotFoundError, MissingImagesError
from datamodule_helpers import tiny_datamodule


def _dm(root, **kw):
    return tiny_datamodule(CUB200DataModule, root, **kw)


def test_reads_metadata_files(cub_root):
    splits = read_cub(cub_root)
    assert splits.class_names == ["001.Crimson_Patched_Bird", "002.Azure_Patched_Bird", "003.Golden_Patched_Bird", "004.Violet_Patched_Bird"]
    assert len(splits.train) + len(splits.test) == 48
    # labels are 0-based, images.txt paths become root-relative under images/
    first = splits.test[0]
    assert first.label == 0 and first.path.startswith("images/001.Crimson_Patched_Bird/")
    # x y w h -> x1 y1 x2 y2
    line = (cub_root / "bounding_boxes.txt").read_text().splitlines()[0].split()
    x, y, w, h = map(float, line[1:])
    assert first.box == pytest.approx((x, y, x + w, y + h))


def test_labels_follow_image_class_labels_not_folders(cub_copy):
    # move image 1 to class 2 in the metadata only: the reader must follow image_class_labels.txt
    path = cub_copy / "image_class_labels.txt"
    lines = path.read_text().splitlines()
    lines[0] = "1 2"
    path.write_text("\n".join(lines) + "\n")
    sample = next(s for s in read_cub(cub_copy).test if s.path.endswith("_0001.jpg"))
    assert sample.label == 1


def test_validation_split_is_stratified_seeded_and_disjoint(cub_root):
    a, b = _dm(cub_root, val_fraction=0.34, split_seed=3), _dm(cub_root, val_fraction=0.34, split_seed=3)
    assert [s.path for s in a.splits.val] == [s.path for s in b.splits.val]
    assert {s.label for s in a.splits.val} == set(range(4))
    assert not {s.path for s in a.splits.val} & {s.path for s in a.splits.train}
    assert len(a.splits.val) + len(a.splits.train) == 24
    c = _dm(cub_root, val_fraction=0.34, split_seed=4)
    assert [s.path for s in c.splits.val] != [s.path for s in a.splits.val]


def test_val_on_test_only_when_asked(cub_root):
    dm = _dm(cub_root, val_on_test=True)
    assert [s.path for s in dm.splits.val] == [s.path for s in dm.splits.test]
    assert len(dm.splits.train) == 24


def test_num_classes_and_loader_batch(cub_root):
    dm = _dm(cub_root)
    assert dm.num_classes == 4 and len(dm.class_names) == 4
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 3, 64, 64)
    assert batch["label"].dtype.is_floating_point is False
    assert batch["box"].shape == (4, 4)
    assert len(batch["path"]) == 4


def test_missing_root_says_layout_and_source(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="does not exist") as err:
        _dm(tmp_path / "nowhere").num_classes
    assert "images.txt" in str(err.value) and "caltech" in str(err.value)


@pytest.mark.parametrize("name", ["images.txt", "classes.txt", "image_class_labels.txt", "train_test_split.txt", "bounding_boxes.txt"])
def test_missing_metadata_file(cub_copy, name):
    (cub_copy / name).unlink()
    with pytest.raises(DatasetNotFoundError, match=name):
        read_cub(cub_copy)


def test_line_that_does_not_parse_names_file_and_line(cub_copy):
    path = cub_copy / "image_class_labels.txt"
    lines = path.read_text().splitlines()
    lines[4] = "5 five"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetFormatError, match=r"image_class_labels.txt:5: class id 'five'"):
        read_cub(cub_copy)


def test_short_line_names_expected_fields(cub_copy):
    path = cub_copy / "bounding_boxes.txt"
    lines = path.read_text().splitlines()
    lines[2] = "3 1.0 2.0"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetFormatError, match=r"bounding_boxes.txt:3: expected 5 fields"):
        read_cub(cub_copy)


def test_ids_that_do_not_match_across_files(cub_copy):
    path = cub_copy / "train_test_split.txt"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(DatasetFormatError, match="do not match images.txt"):
        read_cub(cub_copy)


def test_unknown_class_id(cub_copy):
    path = cub_copy / "image_class_labels.txt"
    lines = path.read_text().splitlines()
    lines[0] = "1 99"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetFormatError, match="class id 99 is not in classes.txt"):
        read_cub(cub_copy)


def test_a_subset_of_classes_with_other_ids_keeps_names_in_id_order(cub_root, cub_copy):
    """Classes renumbered 26..29 (a subset of a larger set), and no image of class 27 at all."""
    full = read_cub(cub_root)
    classes = cub_copy / "classes.txt"
    classes.write_text("".join(f"{int(i) + 25} {name}\n" for i, name in (line.split() for line in classes.read_text().splitlines())))
    labels = [line.split() for line in (cub_copy / "image_class_labels.txt").read_text().splitlines()]
    dropped = {image_id for image_id, class_id in labels if class_id == "2"}
    for name in ("images.txt", "image_class_labels.txt", "train_test_split.txt", "bounding_boxes.txt"):
        path = cub_copy / name
        lines = [line for line in path.read_text().splitlines() if line.split()[0] not in dropped]
        if name == "image_class_labels.txt":
            lines = [f"{image_id} {int(class_id) + 25}" for image_id, class_id in (line.split() for line in lines)]
        path.write_text("\n".join(lines) + "\n")
    subset = read_cub(cub_copy)
    assert subset.class_names == [full.class_names[0], full.class_names[2], full.class_names[3]]
    by_path = {s.path: s for s in full.train + full.test}
    assert len(subset.train) + len(subset.test) == len(by_path) - len(dropped)
    for sample in subset.train + subset.test:
        assert subset.class_names[sample.label] == full.class_names[by_path[sample.path].label]
    assert tiny_datamodule(CUB200DataModule, cub_copy).num_classes == 3


@pytest.mark.parametrize("bad", ["../../etc/passwd", "/etc/passwd"])
def test_path_escaping_root_is_refused(cub_copy, bad):
    path = cub_copy / "images.txt"
    lines = path.read_text().splitlines()
    lines[0] = f"1 {bad}"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetFormatError, match="images.txt:1"):
        read_cub(cub_copy)


def test_symlinked_image_folder_is_followed(cub_copy, tmp_path):
    """images/<class> a link into a shared store outside the root: read, checked and decoded."""
    sample = read_cub(cub_copy).test[0]
    folder = (cub_copy / sample.path).parent
    shutil.move(folder, tmp_path / "store")
    os.symlink(tmp_path / "store", folder)
    dm = tiny_datamodule(CUB200DataModule, cub_copy)
    dm.setup("test")
    index = next(i for i, s in enumerate(dm.datasets["test"].samples) if s.path == sample.path)
    assert dm.datasets["test"][index]["image"].shape == (3, 64, 64)


def test_missing_images_are_listed_at_setup(cub_copy):
    victims = sorted((cub_copy / "images").rglob("*.jpg"))[:2]
    for v in victims:
        v.unlink()
    dm = _dm(cub_copy)
    with pytest.raises(MissingImagesError, match="2 of 48 images") as err:
        dm.setup("fit")
    assert all(v.name in str(err.value) for v in victims)


def _corrupt_first_test_image(root):
    sample = read_cub(root).test[0]
    (root / sample.path).write_bytes(b"this is not a jpeg")
    return sample


def test_corrupt_image_is_named_when_loaded(cub_copy):
    sample = _corrupt_first_test_image(cub_copy)
    dm = _dm(cub_copy)
    dm.setup("test")
    with pytest.raises(BadImageError, match=sample.path.split("/")[-1]):
        dm.datasets["test"][0]


def test_corrupt_image_skipped_when_configured(cub_copy, caplog):
    _corrupt_first_test_image(cub_copy)
    dm = _dm(cub_copy, on_bad_image="skip")
    dm.setup("test")
    batch = next(iter(dm.test_dataloader()))
    assert batch["image"].shape[0] == 3  # one of the first four dropped, nothing else lost
    assert "skipping bad image" in caplog.text and "Crimson_Patched_Bird_0001.jpg" in caplog.text


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"crop_size": 128, "resize_size": 64}, "crop_size"),
        ({"on_bad_image": "ignore"}, "on_bad_image"),
        ({"val_fraction": 1.5}, "val_fraction"),
        ({"predict_split": "holdout"}, "predict_split"),
    ],
)
def test_bad_config_values(cub_root, kwargs, match):
    with pytest.raises(ValueError, match=match):
        _dm(cub_root, **kwargs)
