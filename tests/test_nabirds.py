"""NA-Birds reader: sparse taxonomy ids, class parents, boxes in the batch, and every bad-input path."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data_modules.dataset import load_rgb
from data_modules.errors import DatasetFormatError, DatasetNotFoundError
from data_modules.nabirds import NABIRDS_FILES, NABirdsDataModule, read_nabirds
from data_modules.synthetic import SyntheticSpec
from data_modules.synthetic_layouts import write_synthetic_layout
from data_modules.transforms import apply_transform, build_eval_transform
from datamodule_helpers import tiny_datamodule

SPEC = SyntheticSpec(num_classes=4, images_per_class=6, min_side=64, max_side=96)


@pytest.fixture(scope="module")
def nabirds_root(tmp_path_factory) -> Path:
    return write_synthetic_layout("nabirds", tmp_path_factory.mktemp("data") / "nabirds", SPEC)


@pytest.fixture
def nabirds_copy(nabirds_root, tmp_path) -> Path:
    target = tmp_path / "nabirds"
    shutil.copytree(nabirds_root, target)
    return target


def _dm(root, **kw):
    return tiny_datamodule(NABirdsDataModule, root, **kw)


def _set_line(path: Path, index: int, text: str | None) -> None:
    """Replace (or with ``None`` delete) the 0-based line ``index`` of ``path``."""
    lines = path.read_text().splitlines()
    if text is None:
        del lines[index]
    else:
        lines[index] = text
    path.write_text("\n".join(lines) + "\n")


def _first_field(path: Path, index: int) -> str:
    return path.read_text().splitlines()[index].split()[0]


def test_sparse_leaf_ids_become_contiguous_labels_with_parents(nabirds_root):
    splits = read_nabirds(nabirds_root)
    # only the four leaves that label images are classes (not the root, the groups, or the unused leaf 368)
    assert splits.class_names == [
        "Crimson Patched Bird (Adult)",
        "Azure Patched Bird (Adult)",
        "Golden Patched Bird (Adult)",
        "Violet Patched Bird (Adult)",
    ]
    assert splits.class_parents == [10, 10, 11, 11]
    assert len(splits.train) + len(splits.test) == 24
    folder_to_label = {"0300": 0, "0317": 1, "0334": 2, "0351": 3}
    for sample in splits.train + splits.test:
        assert sample.path.startswith("images/")
        assert sample.label == folder_to_label[sample.path.split("/")[1]]


def test_boxes_are_x_y_w_h_integers(nabirds_root):
    splits = read_nabirds(nabirds_root)
    by_uuid_hex = {Path(s.path).stem: s for s in splits.train + splits.test}
    image_id, x, y, w, h = (nabirds_root / "bounding_boxes.txt").read_text().splitlines()[5].split()
    sample = by_uuid_hex[image_id.replace("-", "")]
    assert sample.box == (float(x), float(y), float(x) + float(w), float(y) + float(h))


def test_labels_follow_image_class_labels_not_folders(nabirds_copy):
    path = nabirds_copy / "image_class_labels.txt"
    image_id = _first_field(path, 0)
    _set_line(path, 0, f"{image_id} 334")
    splits = read_nabirds(nabirds_copy)
    relabelled = next(s for s in splits.train + splits.test if Path(s.path).stem == image_id.replace("-", ""))
    assert relabelled.label == 2 and relabelled.path.startswith("images/0300/")  # its folder says class 300


def test_class_parents_reach_the_model_through_the_cli(nabirds_root, tmp_path):
    from mgff.cli import MGFFCLI

    demo = str(Path(__file__).resolve().parents[1] / "experiments" / "demo.yaml")
    cli = MGFFCLI(
        run=False,
        args=[
            "--config", demo,
            "--data.class_path", "data_modules.NABirdsDataModule",
            "--data.init_args.root", str(nabirds_root),
            "--data.init_args.num_workers", "0",
            "--trainer.logger", "false",
            "--trainer.default_root_dir", str(tmp_path),
        ],
    )
    assert cli.model.hparams.num_classes == 4
    assert list(cli.model.hparams.class_parents) == [10, 10, 11, 11]
    assert all("parent_acc" in collection for collection in cli.model.metrics.values())


def test_boxes_travel_in_the_batch(nabirds_root):
    dm = _dm(nabirds_root)
    dm.setup("test")
    item = dm.datasets["test"][0]
    sample = dm.splits.test[0]
    h, w = load_rgb(nabirds_root / sample.path).shape[:2]
    x1, y1, x2, y2 = sample.box
    # resize to 72x72, centre crop 64: shift by 4, clip to the crop
    expected = np.clip([x1 * 72 / w - 4, y1 * 72 / h - 4, x2 * 72 / w - 4, y2 * 72 / h - 4], 0, 64)
    assert item["box"].numpy() == pytest.approx(expected, abs=1e-3)
    batch = next(iter(dm.test_dataloader()))
    assert batch["box"].shape == (4, 4) and torch.isfinite(batch["box"]).all()


def test_crop_to_box_crops_the_ground_truth_box(nabirds_root):
    dm = _dm(nabirds_root, crop_to_box=True)
    dm.setup("test")
    item = dm.datasets["test"][1]
    sample = dm.splits.test[1]
    x1, y1, x2, y2 = (int(round(v)) for v in sample.box)
    crop = load_rgb(nabirds_root / sample.path)[y1:y2, x1:x2]
    expected, _ = apply_transform(build_eval_transform(72, 64), crop, None)
    assert torch.allclose(item["image"], expected)
    assert item["box"].tolist() == [0.0, 0.0, 64.0, 64.0]


def test_missing_root_says_layout_and_source(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="does not exist") as err:
        _dm(tmp_path / "nowhere").num_classes
    assert "hierarchy.txt" in str(err.value) and "allaboutbirds" in str(err.value)


@pytest.mark.parametrize("name", NABIRDS_FILES)
def test_missing_metadata_file(nabirds_copy, name):
    (nabirds_copy / name).unlink()
    with pytest.raises(DatasetNotFoundError, match=name):
        read_nabirds(nabirds_copy)


def test_short_line_names_file_line_and_expected_fields(nabirds_copy):
    path = nabirds_copy / "bounding_boxes.txt"
    _set_line(path, 2, f"{_first_field(path, 2)} 1 2")
    with pytest.raises(DatasetFormatError, match=r"bounding_boxes.txt:3: expected 5 fields '<image_id> <x> <y> <width> <height>'"):
        read_nabirds(nabirds_copy)


def test_float_box_is_refused(nabirds_copy):
    path = nabirds_copy / "bounding_boxes.txt"
    _set_line(path, 0, f"{_first_field(path, 0)} 1.5 2 10 10")
    with pytest.raises(DatasetFormatError, match=r"bounding_boxes.txt:1: box value '1.5'"):
        read_nabirds(nabirds_copy)


def test_empty_box_is_refused(nabirds_copy):
    path = nabirds_copy / "bounding_boxes.txt"
    _set_line(path, 3, f"{_first_field(path, 3)} 1 2 0 10")
    with pytest.raises(DatasetFormatError, match=r"bounding_boxes.txt:4: box width and height must be positive"):
        read_nabirds(nabirds_copy)


@pytest.mark.parametrize("name", ["image_class_labels.txt", "train_test_split.txt", "bounding_boxes.txt", "sizes.txt"])
def test_ids_that_do_not_match_images_txt(nabirds_copy, name):
    path = nabirds_copy / name
    dropped = _first_field(path, 4)
    _set_line(path, 4, None)
    with pytest.raises(DatasetFormatError, match=f"image ids of {name} do not match images.txt") as err:
        read_nabirds(nabirds_copy)
    assert dropped in str(err.value)


def test_label_naming_unknown_class(nabirds_copy):
    path = nabirds_copy / "image_class_labels.txt"
    _set_line(path, 6, f"{_first_field(path, 6)} 999")
    with pytest.raises(DatasetFormatError, match=r"image_class_labels.txt:7: class id 999 .* is not in classes.txt"):
        read_nabirds(nabirds_copy)


def test_hierarchy_naming_unknown_class(nabirds_copy):
    path = nabirds_copy / "hierarchy.txt"
    path.write_text(path.read_text() + "777 10\n")
    with pytest.raises(DatasetFormatError, match=r"hierarchy.txt:\d+: child class id 777 is not in classes.txt"):
        read_nabirds(nabirds_copy)


def test_class_with_images_but_no_parent(nabirds_copy):
    path = nabirds_copy / "hierarchy.txt"
    lines = path.read_text().splitlines()
    path.write_text("".join(f"{line}\n" for line in lines if not line.startswith("317 ")))
    with pytest.raises(DatasetFormatError, match=r"class 317 \('Azure Patched Bird \(Adult\)'.* has no '<child> <parent>' line"):
        read_nabirds(nabirds_copy)


def test_class_with_two_parents(nabirds_copy):
    path = nabirds_copy / "hierarchy.txt"
    path.write_text(path.read_text() + "300 11\n")
    with pytest.raises(DatasetFormatError, match=r"hierarchy.txt:\d+: class 300 has a second parent \(first at line \d+\)"):
        read_nabirds(nabirds_copy)


def test_bad_split_flag(nabirds_copy):
    path = nabirds_copy / "train_test_split.txt"
    _set_line(path, 1, f"{_first_field(path, 1)} 2")
    with pytest.raises(DatasetFormatError, match=r"train_test_split.txt:2: flag must be 1 \(train\) or 0 \(test\), got 2"):
        read_nabirds(nabirds_copy)


@pytest.mark.parametrize("bad", ["../../etc/passwd", "/etc/passwd"])
def test_path_escaping_root_is_refused(nabirds_copy, bad):
    path = nabirds_copy / "images.txt"
    _set_line(path, 0, f"{_first_field(path, 0)} {bad}")
    with pytest.raises(DatasetFormatError, match=r"images.txt:1: image path"):
        read_nabirds(nabirds_copy)


def test_resized_copy_of_an_image_gets_its_box_scaled_by_sizes_txt(nabirds_copy, tmp_path, caplog):
    """An image stored at half the size ``sizes.txt`` gives: the box follows, with and without the cache."""
    splits = read_nabirds(nabirds_copy)
    sample = next(s for s in splits.test if s.box is not None)
    with Image.open(nabirds_copy / sample.path) as img:
        assert img.size == sample.size
        img.resize((img.width // 2, img.height // 2)).save(nabirds_copy / sample.path, format="JPEG", quality=95)
    half = np.asarray(sample.box) * np.asarray([img.width // 2 / img.width, img.height // 2 / img.height] * 2)

    def identity(image, box):
        return torch.from_numpy(image.copy()), np.asarray(box, dtype=np.float32)

    for cache_dir in (None, tmp_path / "cache"):
        dm = _dm(nabirds_copy, cache_dir=cache_dir, cache_size=40)
        dm.prepare_data()
        dm.setup("test")
        dataset = dm.datasets["test"]
        dataset.transform = identity
        item = dataset[next(i for i, s in enumerate(dataset.samples) if s.path == sample.path)]
        h, w = item["image"].shape[:2]
        scale = np.asarray([w / (img.width // 2), h / (img.height // 2)] * 2)  # 1 without the cache
        np.testing.assert_allclose(item["box"].numpy(), half * scale, atol=0.01)
    assert "but the metadata says" in caplog.text  # the original path warns (once); the cache scaled it
