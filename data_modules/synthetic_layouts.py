"""The generated dataset of :mod:`data_modules.synthetic`, written in the on-disk layouts of NA-Birds,
Stanford Cars (official devkit and the CSV re-host), Oxford-IIIT Pets and a class-per-folder tree.

Each writer puts the same scenes (:func:`~data_modules.synthetic.generate_scenes`) into one real
layout, so every reader is tested on files shaped exactly like the real ones (the formats are in
the docstrings of the readers). :func:`write_synthetic_layout` writes a layout once into a folder
(atomic, cached like :func:`~data_modules.synthetic.write_synthetic_cub`) and returns it.

Boxes are written as each real format stores them: NA-Birds ``x y w h`` integers, Stanford Cars
``x1 y1 x2 y2`` integers, Oxford-IIIT Pets PASCAL-VOC XML ``xmin ymin xmax ymax`` (trainval images
only, as in the real set); the class-per-folder tree has none.
"""

from __future__ import annotations

import csv
import hashlib
import json
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from data_modules.synthetic import MARK_COLORS, MARK_PATTERNS, SyntheticSpec, default_cache_dir, generate_scenes, write_atomically

JPEG_QUALITY = 92


def _mark_name(label: int) -> tuple[str, str]:
    """``(colour, pattern)`` of a class, in the order of :func:`data_modules.synthetic.class_names`."""
    colors = list(MARK_COLORS)
    return colors[label % len(colors)], MARK_PATTERNS[label // len(colors)]


def _save_jpeg(image: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path, format="JPEG", quality=JPEG_QUALITY)


def _int_box(box: tuple[float, float, float, float]) -> tuple[int, int, int, int]:
    """``(x1, y1, x2, y2)`` float pixels -> the enclosing integer box."""
    x1, y1, x2, y2 = box
    return int(np.floor(x1)), int(np.floor(y1)), int(np.ceil(x2)), int(np.ceil(y2))


def _write_lines(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")


def _write_spec(folder: Path, spec: SyntheticSpec, layout: str) -> None:
    (folder / "synthetic_spec.json").write_text(json.dumps({"layout": layout, **asdict(spec)}, indent=2))


# ----- NA-Birds --------------------------------------------------------------------------------------

NABIRDS_ROOT_ID = 0
NABIRDS_FIRST_GROUP_ID = 10
NABIRDS_FIRST_LEAF_ID = 300
NABIRDS_LEAF_STRIDE = 17  # sparse leaf ids, as in the real taxonomy (555 leaves among 1,011 nodes)


def nabirds_leaf_id(label: int) -> int:
    """The taxonomy id of generated class ``label`` (sparse: 300, 317, 334, ...)."""
    return NABIRDS_FIRST_LEAF_ID + NABIRDS_LEAF_STRIDE * label


def nabirds_group_id(label: int) -> int:
    """The parent node of generated class ``label``: classes are grouped in pairs (10, 10, 11, 11, ...)."""
    return NABIRDS_FIRST_GROUP_ID + label // 2


def write_nabirds_layout(folder: Path, spec: SyntheticSpec) -> None:
    """Write ``spec``'s scenes in the NA-Birds layout.

    ``classes.txt`` lists the root ``0 Birds``, one internal node per pair of classes, the leaf
    classes (sparse ids, names with spaces) and one leaf that no image uses; ``hierarchy.txt`` links
    leaves to their pair's node and nodes to the root. Image ids are UUID strings; images lie at
    ``images/<4-digit class id>/<uuid hex>.jpg``; boxes are integer ``x y w h``.
    """
    classes = [f"{NABIRDS_ROOT_ID} Birds"]
    hierarchy = []
    groups = sorted({nabirds_group_id(c) for c in range(spec.num_classes)})
    for group in groups:
        classes.append(f"{group} Marked Birds Group {group - NABIRDS_FIRST_GROUP_ID + 1}")
        hierarchy.append(f"{group} {NABIRDS_ROOT_ID}")
    for label in range(spec.num_classes):
        color, pattern = _mark_name(label)
        classes.append(f"{nabirds_leaf_id(label)} {color} {pattern} Bird (Adult)")
        hierarchy.append(f"{nabirds_leaf_id(label)} {nabirds_group_id(label)}")
    unused = nabirds_leaf_id(spec.num_classes)  # a leaf without images: must not become a class
    classes.append(f"{unused} Grey Unmarked Bird")
    hierarchy.append(f"{unused} {groups[0]}")

    images, labels, split, boxes, sizes = [], [], [], [], []
    for index, scene in enumerate(generate_scenes(spec)):
        image_id = uuid.UUID(bytes=hashlib.md5(f"nabirds-{spec.seed}-{index}".encode()).digest())
        class_id = nabirds_leaf_id(scene.label)
        rel = f"{class_id:04d}/{image_id.hex}.jpg"
        _save_jpeg(scene.image, folder / "images" / rel)
        x1, y1, x2, y2 = _int_box(scene.box)
        h, w = scene.image.shape[:2]
        images.append(f"{image_id} {rel}")
        labels.append(f"{image_id} {class_id}")
        split.append(f"{image_id} {int(scene.is_train)}")
        boxes.append(f"{image_id} {x1} {y1} {x2 - x1} {y2 - y1}")
        sizes.append(f"{image_id} {w} {h}")
    for name, lines in (
        ("classes.txt", classes),
        ("hierarchy.txt", hierarchy),
        ("images.txt", images),
        ("image_class_labels.txt", labels),
        ("train_test_split.txt", split),
        ("bounding_boxes.txt", boxes),
        ("sizes.txt", sizes),
    ):
        _write_lines(folder / name, lines)
    _write_spec(folder, spec, "nabirds")


# ----- Stanford Cars ----------------------------------------------------------------------------------

CAR_BODIES = ("Sedan", "C/V Cargo Van", "Coupe", "SUV")  # one name with a slash, like "Ram C/V Cargo Van Minivan 2012"


def car_class_names(num_classes: int) -> list[str]:
    """``Crimson Patched Sedan 2012``, ``Azure Patched C/V Cargo Van 2012``, ... (as ``cars_meta.mat``)."""
    names = []
    for label in range(num_classes):
        color, pattern = _mark_name(label)
        names.append(f"{color} {pattern} {CAR_BODIES[label % len(CAR_BODIES)]} 2012")
    return names


def car_class_folder(name: str) -> str:
    """The folder of a class in the CSV re-host (a slash in a name becomes a hyphen)."""
    return name.replace("/", "-")


def _car_records(spec: SyntheticSpec) -> dict[str, list[tuple[str, tuple[int, int, int, int], int, np.ndarray]]]:
    """``{"train": [(fname, (x1, y1, x2, y2), class 1..C, image)], "test": [...]}``; file names are
    numbered per split from ``00001.jpg`` (train and test reuse names, as in the real set)."""
    records: dict[str, list] = {"train": [], "test": []}
    for scene in generate_scenes(spec):
        split = "train" if scene.is_train else "test"
        fname = f"{len(records[split]) + 1:05d}.jpg"
        records[split].append((fname, _int_box(scene.box), scene.label + 1, scene.image))
    return records


def _annotations_struct(records, with_class: bool) -> np.ndarray:
    """A MATLAB 1xN struct array like the devkit's ``annotations`` (values as 1x1 uint16 matrices)."""
    fields = ["bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2"] + (["class"] if with_class else []) + ["fname"]
    out = np.zeros((1, len(records)), dtype=[(f, object) for f in fields])
    for i, (fname, box, class_id, _) in enumerate(records):
        values = [*box] + ([class_id] if with_class else [])
        for field, value in zip(fields, values):
            out[0, i][field] = np.array([[value]], dtype=np.uint16)
        out[0, i]["fname"] = np.array([fname])
    return out


def write_stanford_cars_devkit_layout(folder: Path, spec: SyntheticSpec) -> None:
    """Write ``spec``'s scenes in the official Stanford Cars layout.

    ``devkit/cars_meta.mat`` (``class_names``, 1xC cell), ``devkit/cars_train_annos.mat`` and
    ``devkit/cars_test_annos.mat`` (``annotations`` struct arrays; the test one without ``class``),
    ``cars_test_annos_withlabels.mat`` (test labels, released later, beside the image folders),
    ``cars_train/00001.jpg ...``, ``cars_test/00001.jpg ...``.
    """
    from scipy.io import savemat

    names = car_class_names(spec.num_classes)
    records = _car_records(spec)
    (folder / "devkit").mkdir(parents=True, exist_ok=True)
    class_cell = np.empty((1, len(names)), dtype=object)
    for i, name in enumerate(names):
        class_cell[0, i] = np.array([name])
    savemat(folder / "devkit" / "cars_meta.mat", {"class_names": class_cell})
    savemat(folder / "devkit" / "cars_train_annos.mat", {"annotations": _annotations_struct(records["train"], True)})
    savemat(folder / "devkit" / "cars_test_annos.mat", {"annotations": _annotations_struct(records["test"], False)})
    savemat(folder / "cars_test_annos_withlabels.mat", {"annotations": _annotations_struct(records["test"], True)})
    for split in ("train", "test"):
        for fname, _, _, image in records[split]:
            _save_jpeg(image, folder / f"cars_{split}" / fname)
    _write_spec(folder, spec, "stanford_cars_devkit")


def write_stanford_cars_csv_layout(folder: Path, spec: SyntheticSpec) -> None:
    """Write ``spec``'s scenes in the common CSV re-host of Stanford Cars.

    ``names.csv`` (one class name a line), ``anno_train.csv`` / ``anno_test.csv``
    (``fname,x1,y1,x2,y2,class``, no header, class 1..C) and the images in class folders
    ``car_data/car_data/<train|test>/<class name, '/' -> '-'>/<fname>``.
    """
    names = car_class_names(spec.num_classes)
    records = _car_records(spec)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "names.csv", "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([name] for name in names)
    for split in ("train", "test"):
        with open(folder / f"anno_{split}.csv", "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            for fname, box, class_id, image in records[split]:
                writer.writerow([fname, *box, class_id])
                _save_jpeg(image, folder / "car_data" / "car_data" / split / car_class_folder(names[class_id - 1]) / fname)
    _write_spec(folder, spec, "stanford_cars_csv")


# ----- Oxford-IIIT Pets -------------------------------------------------------------------------------


def pet_breed_names(num_classes: int) -> list[str]:
    """Breed names as the image names spell them: "cats" (even classes) capitalised, "dogs" lowercase."""
    names = []
    for label in range(num_classes):
        color, pattern = _mark_name(label)
        name = f"{color}_{pattern}"
        names.append(name if label % 2 == 0 else name.lower())
    return names


def pet_species(label: int) -> int:
    """1 = cat (even classes), 2 = dog (odd classes)."""
    return 1 if label % 2 == 0 else 2


def _pet_xml(image_name: str, width: int, height: int, species: int, box: tuple[int, int, int, int]) -> str:
    x1, y1, x2, y2 = box
    return (
        "<annotation><folder>OXIIIT</folder>"
        f"<filename>{image_name}.jpg</filename>"
        "<source><database>OXFORD-IIIT Pet Dataset</database><annotation>OXIIIT</annotation><image>flickr</image></source>"
        f"<size><width>{width}</width><height>{height}</height><depth>3</depth></size>"
        "<segmented>0</segmented>"
        f"<object><name>{'cat' if species == 1 else 'dog'}</name><pose>Frontal</pose><truncated>0</truncated><occluded>0</occluded>"
        f"<bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox>"
        "<difficult>0</difficult></object></annotation>\n"
    )


def write_oxford_pets_layout(folder: Path, spec: SyntheticSpec) -> None:
    """Write ``spec``'s scenes in the Oxford-IIIT Pets layout.

    ``images/<Breed>_<n>.jpg``; ``annotations/trainval.txt`` and ``annotations/test.txt`` with lines
    ``Image CLASS-ID SPECIES BREED-ID`` (class 1..C, species 1 cat / 2 dog, breed id counted within
    the species); ``annotations/list.txt`` (all images, ``#`` comment header);
    ``annotations/xmls/<Image>.xml`` (PASCAL VOC box) for trainval images only, as in the real set.
    """
    breeds = pet_breed_names(spec.num_classes)
    breed_ids = {}
    for label in range(spec.num_classes):
        breed_ids[label] = sum(1 for other in range(label + 1) if pet_species(other) == pet_species(label))
    counters = [0] * spec.num_classes
    trainval, test = [], []
    for scene in generate_scenes(spec):
        counters[scene.label] += 1
        name = f"{breeds[scene.label]}_{counters[scene.label]}"
        _save_jpeg(scene.image, folder / "images" / f"{name}.jpg")
        species = pet_species(scene.label)
        line = f"{name} {scene.label + 1} {species} {breed_ids[scene.label]}"
        (trainval if scene.is_train else test).append(line)
        if scene.is_train:
            h, w = scene.image.shape[:2]
            xml_path = folder / "annotations" / "xmls" / f"{name}.xml"
            xml_path.parent.mkdir(parents=True, exist_ok=True)
            xml_path.write_text(_pet_xml(name, w, h, species, _int_box(scene.box)), encoding="utf-8")
    header = [
        "#Image CLASS-ID SPECIES BREED ID",
        "#ID: 1:37 Class ids",
        "#SPECIES: 1:Cat 2:Dog",
        "#BREED ID: 1-25:Cat 1:12:Dog",
        "#All images with 1st letter as captial are cat images",
        "#images with small first letter are dog images",
    ]
    _write_lines(folder / "annotations" / "trainval.txt", trainval)
    _write_lines(folder / "annotations" / "test.txt", test)
    _write_lines(folder / "annotations" / "list.txt", header + sorted(trainval + test))
    _write_spec(folder, spec, "oxford_pets")


# ----- class-per-folder tree --------------------------------------------------------------------------


def write_image_folder_layout(folder: Path, spec: SyntheticSpec, val_fraction: float = 0.0) -> None:
    """Write ``spec``'s scenes as ``train/<class>/*.jpg`` and ``test/<class>/*.jpg``.

    With ``val_fraction > 0`` that share of every class's train images goes to ``val/<class>/``.
    Class folders are the names of :func:`data_modules.synthetic.class_names`.
    """
    from data_modules.synthetic import class_names

    names = class_names(spec.num_classes)
    train_seen = [0] * spec.num_classes
    n_test = max(1, int(round(spec.test_fraction * spec.images_per_class)))  # as generate_scenes splits
    n_val = int(round(val_fraction * (spec.images_per_class - n_test)))
    for index, scene in enumerate(generate_scenes(spec)):
        if scene.is_train:
            split = "val" if train_seen[scene.label] < n_val else "train"
            train_seen[scene.label] += 1
        else:
            split = "test"
        _save_jpeg(scene.image, folder / split / names[scene.label] / f"{index:05d}.jpg")
    _write_spec(folder, spec, "image_folder")


# ----- one entry point ------------------------------------------------------------------------------

LAYOUT_WRITERS: dict[str, tuple[str, Callable[[Path, SyntheticSpec], None]]] = {
    # layout: (folder name of the real dataset, writer)
    "nabirds": ("nabirds", write_nabirds_layout),
    "stanford_cars_devkit": ("stanford_cars", write_stanford_cars_devkit_layout),
    "stanford_cars_csv": ("stanford-car-dataset-by-classes-folder", write_stanford_cars_csv_layout),
    "oxford_pets": ("oxford-iiit-pet", write_oxford_pets_layout),
    "image_folder": ("image_folder", write_image_folder_layout),
    "image_folder_with_val": ("image_folder", lambda folder, spec: write_image_folder_layout(folder, spec, val_fraction=0.25)),
}


def write_synthetic_layout(layout: str, root: str | Path | None = None, spec: SyntheticSpec | None = None) -> Path:
    """Write (once) the generated dataset in ``layout`` and return its folder.

    Args:
        layout: one of :data:`LAYOUT_WRITERS` (``nabirds``, ``stanford_cars_devkit``,
            ``stanford_cars_csv``, ``oxford_pets``, ``image_folder``, ``image_folder_with_val``).
        root: target folder; default ``<cache>/synthetic/<layout>-<hash of spec>/<real folder name>``.
        spec: what to generate (default :class:`~data_modules.synthetic.SyntheticSpec`).
    """
    if layout not in LAYOUT_WRITERS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {sorted(LAYOUT_WRITERS)}")
    spec = spec or SyntheticSpec()
    folder_name, writer = LAYOUT_WRITERS[layout]
    if root is None:
        root = default_cache_dir() / "synthetic" / f"{layout}-{spec.key()}" / folder_name
    return write_atomically(Path(root), lambda tmp: writer(tmp, spec))


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Write a generated fine-grained dataset in a real dataset's layout.")
    parser.add_argument("layout", choices=sorted(LAYOUT_WRITERS))
    parser.add_argument("root", nargs="?", default=None)
    parser.add_argument("--num-classes", type=int, default=8)
    parser.add_argument("--images-per-class", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    spec = SyntheticSpec(num_classes=args.num_classes, images_per_class=args.images_per_class, seed=args.seed)
    print(write_synthetic_layout(args.layout, args.root, spec))
