"""Oxford-IIIT Pets reader: breed names from image names, XML boxes (trainval only), consistency
checks, and every bad-input path."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data_modules.dataset import load_rgb
from data_modules.errors import DatasetFormatError, DatasetNotFoundError
from data_modules.oxford_pets import OxfordPetsDataModule, read_oxford_pets
from data_modules.synthetic import SyntheticSpec
from data_modules.synthetic_layouts import write_synthetic_layout
from data_modules.transforms import apply_transform, build_eval_transform
from datamodule_helpers import tiny_datamodule

SPEC = SyntheticSpec(num_classes=4, images_per_class=6, min_side=64, max_side=96)


@pytest.fixture(scope="module")
def pets_root(tmp_path_factory) -> Path:
    return write_synthetic_layout("oxford_pets", tmp_path_factory.mktemp("data") / "oxford-iiit-pet", SPEC)


@pytest.fixture
def pets_copy(pets_root, tmp_path) -> Path:
    target = tmp_path / "oxford-iiit-pet"
    shutil.copytree(pets_root, target)
    return target


def _dm(root, **kw):
    return tiny_datamodule(OxfordPetsDataModule, root, **kw)


def _set_line(path: Path, index: int, text: str | None) -> None:
    lines = path.read_text().splitlines()
    if text is None:
        del lines[index]
    else:
        lines[index] = text
    path.write_text("\n".join(lines) + "\n")


def _trainval(root: Path) -> Path:
    return root / "annotations" / "trainval.txt"


def test_breed_names_labels_and_boxes(pets_root):
    splits = read_oxford_pets(pets_root)
    assert splits.class_names == ["Crimson_Patched", "azure_patched", "Golden_Patched", "violet_patched"]
    assert len(splits.train) == 12 and len(splits.test) == 12
    first = splits.train[0]
    assert first.path == "images/Crimson_Patched_4.jpg" and first.label == 0
    xml = (pets_root / "annotations" / "xmls" / "Crimson_Patched_4.xml").read_text()
    values = [float(xml.split(f"<{tag}>")[1].split("<")[0]) for tag in ("xmin", "ymin", "xmax", "ymax")]
    assert first.box == tuple(values)
    # the real set has boxes for trainval only
    assert all(s.box is not None for s in splits.train) and all(s.box is None for s in splits.test)


def test_comment_lines_are_skipped(pets_copy):
    path = _trainval(pets_copy)
    path.write_text("#Image CLASS-ID SPECIES BREED ID\n# another comment\n" + path.read_text())
    assert len(read_oxford_pets(pets_copy).train) == 12


def test_missing_xml_means_no_box(pets_copy):
    (pets_copy / "annotations" / "xmls" / "Golden_Patched_5.xml").unlink()
    sample = next(s for s in read_oxford_pets(pets_copy).train if s.path == "images/Golden_Patched_5.jpg")
    assert sample.box is None


def test_boxes_travel_in_the_batch_and_crop_to_box(pets_root):
    dm = _dm(pets_root, crop_to_box=True)
    dm.setup("fit")
    # validation images come from trainval: they have boxes, and are cropped to them
    sample = dm.splits.val[0]
    x1, y1, x2, y2 = (int(round(v)) for v in sample.box)
    expected, _ = apply_transform(build_eval_transform(72, 64), load_rgb(pets_root / sample.path)[y1:y2, x1:x2], None)
    item = dm.datasets["val"][0]
    assert torch.allclose(item["image"], expected) and item["box"].tolist() == [0.0, 0.0, 64.0, 64.0]
    assert torch.isfinite(next(iter(dm.train_dataloader()))["box"]).all()
    # test images have no box: NaN in the batch, and crop_to_box leaves them whole
    test_item = dm.datasets["test"][0]
    whole, _ = apply_transform(build_eval_transform(72, 64), load_rgb(pets_root / dm.splits.test[0].path), None)
    assert torch.isnan(test_item["box"]).all() and torch.allclose(test_item["image"], whole)


def test_missing_root(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="does not exist") as err:
        _dm(tmp_path / "nowhere").num_classes
    assert "annotations/trainval.txt" in str(err.value) and "robots.ox.ac.uk" in str(err.value)


@pytest.mark.parametrize("name", ["trainval.txt", "test.txt"])
def test_missing_list_file(pets_copy, name):
    (pets_copy / "annotations" / name).unlink()
    with pytest.raises(DatasetNotFoundError, match=name):
        read_oxford_pets(pets_copy)


def test_short_line(pets_copy):
    _set_line(_trainval(pets_copy), 2, "Crimson_Patched_6 1 1")
    with pytest.raises(DatasetFormatError, match=r"trainval.txt:3: expected 4 fields '<Image> <CLASS-ID> <SPECIES> <BREED-ID>'"):
        read_oxford_pets(pets_copy)


def test_value_that_does_not_parse(pets_copy):
    _set_line(_trainval(pets_copy), 0, "Crimson_Patched_4 one 1 1")
    with pytest.raises(DatasetFormatError, match=r"trainval.txt:1: class id 'one' is not a valid int"):
        read_oxford_pets(pets_copy)


def test_bad_species(pets_copy):
    _set_line(_trainval(pets_copy), 0, "Crimson_Patched_4 1 3 1")
    with pytest.raises(DatasetFormatError, match=r"trainval.txt:1: species must be 1 \(cat\) or 2 \(dog\), got 3"):
        read_oxford_pets(pets_copy)


def test_class_id_that_disagrees_with_the_breed(pets_copy):
    # line 4 is azure_patched (class 2): give it class 1, which line 1 gave to Crimson_Patched
    _set_line(_trainval(pets_copy), 3, "azure_patched_4 1 2 1")
    match = r"trainval.txt:4: class id 1 is breed 'azure_patched' species 2 here but 'Crimson_Patched' species 1 at .*trainval.txt:1"
    with pytest.raises(DatasetFormatError, match=match):
        read_oxford_pets(pets_copy)


def test_breed_with_two_class_ids(pets_copy):
    _set_line(_trainval(pets_copy), 1, "Crimson_Patched_5 3 1 2")
    with pytest.raises(DatasetFormatError, match=r"trainval.txt:2: breed 'Crimson_Patched' has class id 3 here but 1 at .*trainval.txt:1"):
        read_oxford_pets(pets_copy)


def test_species_that_disagrees_within_a_class(pets_copy):
    _set_line(_trainval(pets_copy), 1, "Crimson_Patched_5 1 2 1")
    with pytest.raises(DatasetFormatError, match=r"trainval.txt:2: class id 1 is breed 'Crimson_Patched' species 2 here"):
        read_oxford_pets(pets_copy)


def test_a_subset_of_breeds_with_other_ids_keeps_names_in_id_order(pets_root, pets_copy):
    full = read_oxford_pets(pets_root)
    for name in ("trainval.txt", "test.txt"):  # keep breeds 2 and 4 only, breed 4 listed as id 30
        path = pets_copy / "annotations" / name
        kept = [line for line in path.read_text().splitlines() if line.startswith("#") or line.split()[1] in ("2", "4")]
        path.write_text("\n".join(line.replace(" 4 2 2", " 30 2 2") for line in kept) + "\n")
    subset = read_oxford_pets(pets_copy)
    assert subset.class_names == [full.class_names[1], full.class_names[3]]
    by_path = {s.path: s for s in full.train + full.test}
    assert len(subset.train) + len(subset.test) == sum(s.label in (1, 3) for s in by_path.values())
    for sample in subset.train + subset.test:
        assert subset.class_names[sample.label] == full.class_names[by_path[sample.path].label]
        assert sample.box == by_path[sample.path].box


def test_image_listed_twice(pets_copy):
    test_list = pets_copy / "annotations" / "test.txt"
    test_list.write_text(test_list.read_text() + "Crimson_Patched_4 1 1 1\n")
    with pytest.raises(DatasetFormatError, match=r"test.txt:13: image Crimson_Patched_4 is listed twice \(first at .*trainval.txt:1\)"):
        read_oxford_pets(pets_copy)


def test_image_name_without_number(pets_copy):
    _set_line(_trainval(pets_copy), 0, "CrimsonPatched 1 1 1")
    with pytest.raises(DatasetFormatError, match=r"trainval.txt:1: image name 'CrimsonPatched' is not '<breed>_<number>'"):
        read_oxford_pets(pets_copy)


@pytest.mark.parametrize("bad", ["../../../etc/Crimson_Patched_1", "/etc/Crimson_Patched_1"])
def test_path_escaping_root_is_refused(pets_copy, bad):
    path = _trainval(pets_copy)
    path.write_text(path.read_text().replace("Crimson_Patched_4 ", f"{bad} "))
    with pytest.raises(DatasetFormatError, match=r"trainval.txt:1: image path"):
        read_oxford_pets(pets_copy)


def _box_xml(bndbox: str) -> str:
    return f"<annotation><object><bndbox>{bndbox}</bndbox></object></annotation>"


@pytest.mark.parametrize(
    "content, match",
    [
        ("<annotation><object><bndbox><xmin>3", r"Crimson_Patched_4.xml: not valid XML"),
        ("<annotation><size><width>90</width></size></annotation>", r"Crimson_Patched_4.xml: expected <object><bndbox>"),
        (_box_xml("<xmin>a</xmin><ymin>1</ymin><xmax>9</xmax><ymax>9</ymax>"), r"<bndbox><xmin> must be a number, got 'a'"),
        (_box_xml("<xmin>5</xmin><ymin>1</ymin><ymax>9</ymax>"), r"<bndbox><xmax> must be a number, got None"),
        (_box_xml("<xmin>9</xmin><ymin>1</ymin><xmax>9</xmax><ymax>9</ymax>"), r"box must have xmax > xmin"),
    ],
)
def test_bad_xml_names_the_file(pets_copy, content, match):
    (pets_copy / "annotations" / "xmls" / "Crimson_Patched_4.xml").write_text(content)
    with pytest.raises(DatasetFormatError, match=match):
        read_oxford_pets(pets_copy)


def test_resized_copy_of_an_image_gets_its_box_scaled_by_the_xml_size(pets_copy):
    sample = next(s for s in read_oxford_pets(pets_copy).train if s.box is not None)
    with Image.open(pets_copy / sample.path) as img:
        assert img.size == sample.size  # <size> of the XML
        half = (img.width // 2, img.height // 2)
        img.resize(half).save(pets_copy / sample.path, format="JPEG", quality=95)
    dm = _dm(pets_copy)
    dm.setup("fit")
    dataset = dm.datasets["train"] if any(s.path == sample.path for s in dm.datasets["train"].samples) else dm.datasets["val"]
    dataset.transform = lambda image, box: (torch.from_numpy(image.copy()), np.asarray(box, dtype=np.float32))
    item = dataset[next(i for i, s in enumerate(dataset.samples) if s.path == sample.path)]
    expected = np.asarray(sample.box) * np.asarray([half[0] / sample.size[0], half[1] / sample.size[1]] * 2)
    np.testing.assert_allclose(item["box"].numpy(), expected, atol=1e-3)


def test_xml_size_that_is_not_two_integers(pets_copy):
    xml = next((pets_copy / "annotations" / "xmls").glob("*.xml"))
    xml.write_text(xml.read_text().replace("<width>", "<width>wide", 1))
    with pytest.raises(DatasetFormatError, match=r"<size> must hold integer <width> and <height>"):
        read_oxford_pets(pets_copy)
