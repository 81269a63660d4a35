"""Stanford Cars reader: the official devkit (.mat) and the CSV re-host, the format choice, boxes,
and every bad-input path."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.io import loadmat, savemat

from data_modules.dataset import load_rgb
from data_modules.errors import DatasetFormatError, DatasetNotFoundError
from data_modules.stanford_cars import StanfordCarsDataModule, read_stanford_cars
from data_modules.synthetic import SyntheticSpec
from data_modules.synthetic_layouts import write_synthetic_layout
from data_modules.transforms import apply_transform, build_eval_transform
from datamodule_helpers import tiny_datamodule

SPEC = SyntheticSpec(num_classes=4, images_per_class=6, min_side=64, max_side=96)


@pytest.fixture(scope="module")
def devkit_root(tmp_path_factory) -> Path:
    return write_synthetic_layout("stanford_cars_devkit", tmp_path_factory.mktemp("data") / "stanford_cars", SPEC)


@pytest.fixture(scope="module")
def csv_root(tmp_path_factory) -> Path:
    return write_synthetic_layout("stanford_cars_csv", tmp_path_factory.mktemp("data") / "cars_csv", SPEC)


@pytest.fixture
def devkit_copy(devkit_root, tmp_path) -> Path:
    target = tmp_path / "stanford_cars"
    shutil.copytree(devkit_root, target)
    return target


@pytest.fixture
def csv_copy(csv_root, tmp_path) -> Path:
    target = tmp_path / "cars_csv"
    shutil.copytree(csv_root, target)
    return target


def _dm(root, **kw):
    return tiny_datamodule(StanfordCarsDataModule, root, **kw)


def _edit_mat_annotation(path: Path, index: int, field: str, value) -> None:
    """Set ``annotations[index].field`` of a devkit-style .mat file."""
    content = loadmat(path)
    content["annotations"][0, index][field] = value
    savemat(path, {"annotations": content["annotations"]})


def _set_csv_line(path: Path, index: int, text: str | None) -> None:
    lines = path.read_text().splitlines()
    if text is None:
        del lines[index]
    else:
        lines[index] = text
    path.write_text("\n".join(lines) + "\n")


NAMES = ["Crimson Patched Sedan 2012", "Azure Patched C/V Cargo Van 2012", "Golden Patched Coupe 2012", "Violet Patched SUV 2012"]


def test_devkit_names_labels_boxes_and_paths(devkit_root):
    splits = read_stanford_cars(devkit_root)
    assert splits.class_names == NAMES
    assert len(splits.train) == 12 and len(splits.test) == 12
    # train and test reuse file names: the split folder is part of the path
    assert splits.train[0].path == "cars_train/00001.jpg" and splits.test[0].path == "cars_test/00001.jpg"
    record = loadmat(devkit_root / "devkit" / "cars_train_annos.mat", squeeze_me=True)["annotations"][4]
    assert splits.train[4].label == int(record["class"]) - 1
    assert splits.train[4].box == tuple(float(record[f]) for f in ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2"))
    # test labels come from cars_test_annos_withlabels.mat
    test_record = loadmat(devkit_root / "cars_test_annos_withlabels.mat", squeeze_me=True)["annotations"][7]
    assert splits.test[7].label == int(test_record["class"]) - 1


def test_csv_rehost_gives_the_same_samples_in_class_folders(devkit_root, csv_root):
    devkit, rehost = read_stanford_cars(devkit_root), read_stanford_cars(csv_root)
    assert rehost.class_names == NAMES
    for a, b in zip(devkit.train + devkit.test, rehost.train + rehost.test):
        assert (a.label, a.box, Path(a.path).name) == (b.label, b.box, Path(b.path).name)
    assert rehost.train[0].path == "car_data/car_data/train/Crimson Patched Sedan 2012/00001.jpg"
    # a slash in a class name becomes a hyphen in its folder name
    van = next(s for s in rehost.test if s.label == 1)
    assert van.path.startswith("car_data/car_data/test/Azure Patched C-V Cargo Van 2012/")
    assert (csv_root / van.path).is_file()


def test_csv_rehost_with_flat_image_folders(csv_copy):
    for split in ("train", "test"):
        flat = csv_copy / f"cars_{split}"
        flat.mkdir()
        for image in (csv_copy / "car_data" / "car_data" / split).rglob("*.jpg"):
            image.rename(flat / image.name)
    shutil.rmtree(csv_copy / "car_data")
    splits = read_stanford_cars(csv_copy)
    assert splits.train[0].path == "cars_train/00001.jpg"
    _dm(csv_copy).setup("fit")  # every listed image is found


def test_withlabels_file_in_devkit_folder_is_accepted(devkit_copy):
    (devkit_copy / "cars_test_annos_withlabels.mat").rename(devkit_copy / "devkit" / "cars_test_annos_withlabels.mat")
    assert len(read_stanford_cars(devkit_copy).test) == 12


@pytest.mark.parametrize("root_fixture", ["devkit_root", "csv_root"])
def test_boxes_travel_in_the_batch_and_crop_to_box(root_fixture, request):
    root = request.getfixturevalue(root_fixture)
    dm = _dm(root, crop_to_box=True)
    dm.setup("test")
    batch = next(iter(dm.test_dataloader()))
    assert batch["box"].shape == (4, 4) and torch.isfinite(batch["box"]).all()
    sample = dm.splits.test[2]
    x1, y1, x2, y2 = (int(round(v)) for v in sample.box)
    expected, _ = apply_transform(build_eval_transform(72, 64), load_rgb(root / sample.path)[y1:y2, x1:x2], None)
    assert torch.allclose(dm.datasets["test"][2]["image"], expected)


def test_missing_root(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="does not exist") as err:
        _dm(tmp_path / "nowhere").num_classes
    assert "cars_meta.mat" in str(err.value) and "anno_train.csv" in str(err.value)


def test_incomplete_formats_list_what_each_expects(devkit_copy):
    (devkit_copy / "devkit" / "cars_train_annos.mat").unlink()
    (devkit_copy / "names.csv").write_text("a\n")
    with pytest.raises(DatasetNotFoundError) as err:
        read_stanford_cars(devkit_copy)
    message = str(err.value)
    assert "devkit format expects" in message and "missing: devkit/cars_train_annos.mat" in message
    assert "CSV format expects" in message and "missing: anno_train.csv, anno_test.csv" in message


def test_test_annotations_without_labels_are_not_enough(devkit_copy):
    (devkit_copy / "cars_test_annos_withlabels.mat").unlink()
    with pytest.raises(DatasetNotFoundError, match="missing: cars_test_annos_withlabels.mat"):
        read_stanford_cars(devkit_copy)
    # the unlabelled file under the labelled name: the error says which file has the labels
    shutil.copy(devkit_copy / "devkit" / "cars_test_annos.mat", devkit_copy / "cars_test_annos_withlabels.mat")
    with pytest.raises(DatasetFormatError, match=r"lack the fields \['class'\].*use cars_test_annos_withlabels.mat"):
        read_stanford_cars(devkit_copy)


def test_file_that_is_not_a_mat_file(devkit_copy):
    (devkit_copy / "devkit" / "cars_meta.mat").write_bytes(b"not a matlab file at all")
    with pytest.raises(DatasetFormatError, match=r"cars_meta.mat: not a readable MATLAB file"):
        read_stanford_cars(devkit_copy)


def test_mat_without_the_expected_variable(devkit_copy):
    savemat(devkit_copy / "devkit" / "cars_meta.mat", {"names": np.array(["x"], dtype=object)})
    with pytest.raises(DatasetFormatError, match=r"cars_meta.mat: expected a variable 'class_names'.*\['names'\]"):
        read_stanford_cars(devkit_copy)


def test_mat_class_out_of_range_names_the_annotation(devkit_copy):
    _edit_mat_annotation(devkit_copy / "devkit" / "cars_train_annos.mat", 2, "class", np.array([[9]], dtype=np.uint16))
    with pytest.raises(DatasetFormatError, match=r"cars_train_annos.mat annotation 3 \(fname '00003.jpg'\): class 9 is outside 1..4"):
        read_stanford_cars(devkit_copy)


def test_mat_value_that_is_not_an_integer(devkit_copy):
    _edit_mat_annotation(devkit_copy / "devkit" / "cars_train_annos.mat", 0, "bbox_x2", np.array(["wide"]))
    with pytest.raises(DatasetFormatError, match=r"annotation 1 \(fname '00001.jpg'\): field bbox_x2 must be one integer"):
        read_stanford_cars(devkit_copy)


@pytest.mark.parametrize("bad", ["../../../etc/passwd", "/etc/passwd"])
def test_mat_path_escaping_root_is_refused(devkit_copy, bad):
    _edit_mat_annotation(devkit_copy / "devkit" / "cars_train_annos.mat", 1, "fname", np.array([bad]))
    with pytest.raises(DatasetFormatError, match=r"annotation 2 .*image path"):
        read_stanford_cars(devkit_copy)


def test_csv_line_with_wrong_field_count(csv_copy):
    _set_csv_line(csv_copy / "anno_train.csv", 3, "00004.jpg,1,2,30")
    with pytest.raises(DatasetFormatError, match=r"anno_train.csv:4: expected 6 fields 'fname,x1,y1,x2,y2,class', got '00004.jpg,1,2,30'"):
        read_stanford_cars(csv_copy)


def test_csv_value_that_does_not_parse(csv_copy):
    _set_csv_line(csv_copy / "anno_test.csv", 0, "00001.jpg,1,2,30,x,1")
    with pytest.raises(DatasetFormatError, match=r"anno_test.csv:1: box value 'x' is not a valid int"):
        read_stanford_cars(csv_copy)


def test_csv_empty_box(csv_copy):
    _set_csv_line(csv_copy / "anno_train.csv", 5, "00006.jpg,40,2,40,30,2")
    with pytest.raises(DatasetFormatError, match=r"anno_train.csv:6: box must have x2 > x1"):
        read_stanford_cars(csv_copy)


def test_csv_class_out_of_range(csv_copy):
    _set_csv_line(csv_copy / "anno_train.csv", 0, "00001.jpg,1,2,30,40,5")
    with pytest.raises(DatasetFormatError, match=r"anno_train.csv:1: class 5 is outside 1..4"):
        read_stanford_cars(csv_copy)


def test_csv_image_listed_twice(csv_copy):
    path = csv_copy / "anno_train.csv"
    path.write_text(path.read_text() + path.read_text().splitlines()[0] + "\n")
    with pytest.raises(DatasetFormatError, match=r"anno_train.csv: image .*00001.jpg is listed twice"):
        read_stanford_cars(csv_copy)


def test_csv_names_file_with_two_columns(csv_copy):
    _set_csv_line(csv_copy / "names.csv", 1, "Azure,Patched")
    with pytest.raises(DatasetFormatError, match=r"names.csv:2: expected one class name a line"):
        read_stanford_cars(csv_copy)


@pytest.mark.parametrize("bad", ["../../../etc/passwd", "/etc/passwd"])
def test_csv_path_escaping_root_is_refused(csv_copy, bad):
    _set_csv_line(csv_copy / "anno_test.csv", 0, f"{bad},1,2,30,40,1")
    with pytest.raises(DatasetFormatError, match=r"anno_test.csv:1: image path"):
        read_stanford_cars(csv_copy)


def test_csv_without_image_folder_lists_where_it_looked(csv_copy):
    shutil.rmtree(csv_copy / "car_data")
    with pytest.raises(DatasetNotFoundError, match=r"no train image folder .* car_data/car_data/train/, car_data/train/, train/, cars_train/"):
        read_stanford_cars(csv_copy)
