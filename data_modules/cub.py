"""CUB-200-2011, read by its metadata files (never by guessing from folder names).

Layout (all files space separated, ids 1-based)::

    CUB_200_2011/
      images.txt              <image_id> <relative/path.jpg>      (relative to images/)
      classes.txt             <class_id> <class_name>
      image_class_labels.txt  <image_id> <class_id>
      train_test_split.txt    <image_id> <1 = train | 0 = test>
      bounding_boxes.txt      <image_id> <x> <y> <width> <height>  (floats, top-left origin)
      images/<class folder>/<file>.jpg
"""

from __future__ import annotations

from pathlib import Path

from data_modules.base import FineGrainedDataModule, Splits
from data_modules.errors import DatasetFormatError
from data_modules.metadata import check_same_ids, parse_field, read_mapping, read_rows, require_file
from data_modules.samples import Sample, resolve_inside

CUB_LAYOUT = (
    "Expected the CUB_200_2011 layout: images.txt, classes.txt, image_class_labels.txt, "
    "train_test_split.txt, bounding_boxes.txt and images/ in one folder.\n"
    "CUB-200-2011 comes from https://www.vision.caltech.edu/datasets/cub_200_2011/ "
    "(CUB_200_2011.tgz; point data.root at the extracted CUB_200_2011 folder)."
)


def read_cub(root: Path) -> Splits:
    """Parse a ``CUB_200_2011`` folder into train/test samples and class names.

    Boxes ``x y w h`` become ``(x1, y1, x2, y2)`` pixels. The class ids that label images become
    labels ``0..C-1`` in increasing id order, with their names from ``classes.txt``: a subset of the
    classes (ids 26..50 only, or images of 50 classes under the full ``classes.txt``) is a dataset of
    those classes. Raises :class:`DatasetFormatError` naming the file and line for any line that does
    not parse, for ids that disagree across files, for a label that ``classes.txt`` lacks, and for
    image paths that are absolute or contain ``..``.
    """
    files = {
        name: require_file(root / name, layout_hint=CUB_LAYOUT)
        for name in ("images.txt", "classes.txt", "image_class_labels.txt", "train_test_split.txt", "bounding_boxes.txt")
    }
    classes = read_mapping(files["classes.txt"], str, expected="<class_id> <class_name>", what="class name", key=int)
    images = read_mapping(files["images.txt"], str, expected="<image_id> <path>", what="path", key=int)
    labels = read_mapping(files["image_class_labels.txt"], int, expected="<image_id> <class_id>", what="class id", key=int)
    is_train = read_mapping(files["train_test_split.txt"], int, expected="<image_id> <is_training_image>", what="flag", key=int)
    boxes = _read_boxes(files["bounding_boxes.txt"])
    for name, table in (("image_class_labels.txt", labels), ("train_test_split.txt", is_train), ("bounding_boxes.txt", boxes)):
        check_same_ids(images, files["images.txt"], table, files[name])

    for image_id, (label_line, class_id) in labels.items():
        if class_id not in classes:
            known = sorted(classes)
            raise DatasetFormatError(
                f"{files['image_class_labels.txt']}:{label_line}: class id {class_id} is not in classes.txt "
                f"({len(known)} ids, {known[0] if known else '-'}..{known[-1] if known else '-'})"
            )
    used_ids = sorted({class_id for _, class_id in labels.values()})
    label_of = {class_id: label for label, class_id in enumerate(used_ids)}
    class_names = [classes[class_id][1] for class_id in used_ids]

    image_dir = root / "images"
    train, test = [], []
    for image_id in sorted(images):
        line_no, rel = images[image_id]
        resolve_inside(image_dir, rel, source=f"{files['images.txt']}:{line_no}")
        class_id = labels[image_id][1]
        flag_line, flag = is_train[image_id]
        if flag not in (0, 1):
            raise DatasetFormatError(f"{files['train_test_split.txt']}:{flag_line}: flag must be 1 (train) or 0 (test), got {flag}")
        sample = Sample(path=f"images/{rel}", label=label_of[class_id], box=boxes[image_id][1])
        (train if flag == 1 else test).append(sample)
    return Splits(train=train, test=test, class_names=class_names)


def _read_boxes(path: Path) -> dict[int, tuple[int, tuple[float, float, float, float]]]:
    out = {}
    for line_no, fields in read_rows(path, 5, expected="<image_id> <x> <y> <width> <height>"):
        image_id = parse_field(path, line_no, fields[0], int, what="image id")
        x, y, w, h = (parse_field(path, line_no, v, float, what="box value") for v in fields[1:])
        if w <= 0 or h <= 0:
            raise DatasetFormatError(f"{path}:{line_no}: box width and height must be positive, got {w} x {h}")
        if image_id in out:
            raise DatasetFormatError(f"{path}:{line_no}: id {image_id} appears twice (first at line {out[image_id][0]})")
        out[image_id] = (line_no, (x, y, x + w, y + h))
    return out


class CUB200DataModule(FineGrainedDataModule):
    """CUB-200-2011 (200 bird species, 5,994 train / 5,794 test images, boxes).

    ``root`` is the ``CUB_200_2011`` folder. The validation split is ``val_fraction`` of every class
    of the official train split (seeded); the official test split is evaluated once at the end.
    See :class:`~data_modules.base.FineGrainedDataModule` for the other arguments.
    """

    dataset_name = "CUB-200-2011"
    layout_hint = CUB_LAYOUT

    def read_splits(self, root: Path) -> Splits:
        return read_cub(root)
