"""NA-Birds, read by its metadata files.

Layout (all files space separated, no header; image ids are UUID strings)::

    nabirds/
      images.txt              <image_id> <relative/path.jpg>        (relative to images/, e.g. 0817/<hex>.jpg)
      classes.txt             <class_id> <class name with spaces>   (1,011 taxonomy nodes; 0 = root "Birds")
      hierarchy.txt           <child_class_id> <parent_class_id>
      image_class_labels.txt  <image_id> <class_id>
      train_test_split.txt    <image_id> <1 = train | 0 = test>
      bounding_boxes.txt      <image_id> <x> <y> <width> <height>   (integers, pixels, top-left origin)
      sizes.txt               <image_id> <width> <height>           (pixels; the frame of the boxes)
      images/<class id>/<file>.jpg

Class ids are sparse and the taxonomy holds internal nodes: only the ids that label images become
classes (555 in the real set), mapped to contiguous labels in increasing id order. Each class keeps
its parent id from ``hierarchy.txt`` (:attr:`Splits.class_parents`), which the model uses for the
parent-level accuracy ``<split>/parent_acc``.
"""

from __future__ import annotations

from pathlib import Path

from data_modules.base import FineGrainedDataModule, Splits
from data_modules.errors import DatasetFormatError
from data_modules.metadata import check_same_ids, parse_field, read_mapping, read_rows, require_file
from data_modules.samples import Box, Sample, resolve_inside

NABIRDS_LAYOUT = (
    "Expected the NA-Birds layout: images.txt, classes.txt, hierarchy.txt, image_class_labels.txt, "
    "train_test_split.txt, bounding_boxes.txt, sizes.txt and images/ in one folder.\n"
    "NA-Birds comes from https://dl.allaboutbirds.org/nabirds (nabirds.tar.gz; point data.root at the "
    "extracted nabirds folder)."
)
NABIRDS_FILES = (
    "images.txt",
    "classes.txt",
    "hierarchy.txt",
    "image_class_labels.txt",
    "train_test_split.txt",
    "bounding_boxes.txt",
    "sizes.txt",
)


def read_nabirds(root: Path) -> Splits:
    """Parse an NA-Birds folder into train/test samples, class names and class parents.

    Boxes ``x y w h`` become ``(x1, y1, x2, y2)`` pixels of the image size that ``sizes.txt`` gives
    (``Sample.size``; a resized copy of the dataset then gets its boxes scaled by the ratio when loaded,
    with one warning). Raises :class:`DatasetFormatError` naming
    the file and line for a line that does not parse, ids that disagree across files, a label or a
    hierarchy entry naming a class that ``classes.txt`` lacks, a class without a parent, and image
    paths that escape the root.
    """
    files = {name: require_file(root / name, layout_hint=NABIRDS_LAYOUT) for name in NABIRDS_FILES}
    classes = read_mapping(files["classes.txt"], str, expected="<class_id> <class name>", what="class name", key=int)
    parents = _read_hierarchy(files["hierarchy.txt"], classes)

    images = read_mapping(files["images.txt"], str, expected="<image_id> <path>", what="path")
    labels = read_mapping(files["image_class_labels.txt"], int, expected="<image_id> <class_id>", what="class id")
    is_train = read_mapping(files["train_test_split.txt"], int, expected="<image_id> <is_training_image>", what="flag")
    boxes = _read_boxes(files["bounding_boxes.txt"])
    sizes = _read_sizes(files["sizes.txt"])
    for name, table in (
        ("image_class_labels.txt", labels),
        ("train_test_split.txt", is_train),
        ("bounding_boxes.txt", boxes),
        ("sizes.txt", sizes),
    ):
        check_same_ids(images, files["images.txt"], table, files[name])

    for image_id, (line_no, class_id) in labels.items():
        if class_id not in classes:
            raise DatasetFormatError(
                f"{files['image_class_labels.txt']}:{line_no}: class id {class_id} of image {image_id} is not in classes.txt"
            )
    used_ids = sorted({class_id for _, class_id in labels.values()})
    label_of = {class_id: label for label, class_id in enumerate(used_ids)}
    class_names = [classes[class_id][1] for class_id in used_ids]
    for class_id in used_ids:
        if class_id not in parents:
            raise DatasetFormatError(
                f"{files['hierarchy.txt']}: class {class_id} ({classes[class_id][1]!r}, line {classes[class_id][0]} of "
                f"classes.txt) labels images but has no '<child> <parent>' line"
            )
    class_parents = [parents[class_id][1] for class_id in used_ids]

    image_dir = root / "images"
    train, test = [], []
    for image_id, (line_no, rel) in images.items():
        resolve_inside(image_dir, rel, source=f"{files['images.txt']}:{line_no}")
        flag_line, flag = is_train[image_id]
        if flag not in (0, 1):
            raise DatasetFormatError(f"{files['train_test_split.txt']}:{flag_line}: flag must be 1 (train) or 0 (test), got {flag}")
        sample = Sample(path=f"images/{rel}", label=label_of[labels[image_id][1]], box=boxes[image_id][1], size=sizes[image_id][1])
        (train if flag == 1 else test).append(sample)
    return Splits(train=train, test=test, class_names=class_names, class_parents=class_parents)


def _read_hierarchy(path: Path, classes: dict) -> dict[int, tuple[int, int]]:
    """``{child_id: (line_number, parent_id)}``; both ids must be in ``classes.txt``."""
    out: dict[int, tuple[int, int]] = {}
    for line_no, fields in read_rows(path, 2, expected="<child_class_id> <parent_class_id>"):
        child, parent = (parse_field(path, line_no, v, int, what="class id") for v in fields)
        for role, class_id in (("child", child), ("parent", parent)):
            if class_id not in classes:
                raise DatasetFormatError(f"{path}:{line_no}: {role} class id {class_id} is not in classes.txt")
        if child in out:
            raise DatasetFormatError(f"{path}:{line_no}: class {child} has a second parent (first at line {out[child][0]})")
        out[child] = (line_no, parent)
    return out


def _read_boxes(path: Path) -> dict[str, tuple[int, Box]]:
    """``{image_id: (line_number, (x1, y1, x2, y2))}`` from integer ``x y w h`` lines."""
    out: dict[str, tuple[int, Box]] = {}
    for line_no, fields in read_rows(path, 5, expected="<image_id> <x> <y> <width> <height>"):
        image_id = fields[0]
        x, y, w, h = (parse_field(path, line_no, v, int, what="box value") for v in fields[1:])
        if w <= 0 or h <= 0:
            raise DatasetFormatError(f"{path}:{line_no}: box width and height must be positive, got {w} x {h}")
        if image_id in out:
            raise DatasetFormatError(f"{path}:{line_no}: id {image_id} appears twice (first at line {out[image_id][0]})")
        out[image_id] = (line_no, (float(x), float(y), float(x + w), float(y + h)))
    return out


def _read_sizes(path: Path) -> dict[str, tuple[int, tuple[int, int]]]:
    """``{image_id: (line_number, (width, height))}``; sizes must be positive."""
    out: dict[str, tuple[int, tuple[int, int]]] = {}
    for line_no, fields in read_rows(path, 3, expected="<image_id> <width> <height>"):
        image_id = fields[0]
        w, h = (parse_field(path, line_no, v, int, what="size") for v in fields[1:])
        if w <= 0 or h <= 0:
            raise DatasetFormatError(f"{path}:{line_no}: image width and height must be positive, got {w} x {h}")
        if image_id in out:
            raise DatasetFormatError(f"{path}:{line_no}: id {image_id} appears twice (first at line {out[image_id][0]})")
        out[image_id] = (line_no, (w, h))
    return out


class NABirdsDataModule(FineGrainedDataModule):
    """NA-Birds (555 visual categories of North American birds, 23,929 train / 24,633 test images,
    boxes, a class hierarchy).

    ``root`` is the ``nabirds`` folder. ``class_parents`` (each class's parent node in the taxonomy)
    is linked into the model for the parent-level accuracy. The validation split is ``val_fraction``
    of every class of the official train split (seeded). See
    :class:`~data_modules.base.FineGrainedDataModule` for the other arguments.
    """

    dataset_name = "NA-Birds"
    layout_hint = NABIRDS_LAYOUT

    def read_splits(self, root: Path) -> Splits:
        return read_nabirds(root)
