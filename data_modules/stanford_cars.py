"""Stanford Cars, read from the official devkit (MATLAB files) or from the common CSV re-host.

Official layout (``scipy.io.loadmat``)::

    stanford_cars/
      devkit/cars_meta.mat               class_names: 1x196 cell of names
      devkit/cars_train_annos.mat        annotations: struct array, fields bbox_x1 bbox_y1 bbox_x2 bbox_y2
                                         (pixels, inclusive corners) class (1..196) fname
      cars_test_annos_withlabels.mat     the same for the test images, with class (released after the
                                         devkit; also accepted in devkit/)
      cars_train/00001.jpg ...
      cars_test/00001.jpg ...

CSV re-host (e.g. Kaggle "stanford-car-dataset-by-classes-folder")::

    names.csv                            one class name a line (line k = class k)
    anno_train.csv, anno_test.csv        fname,x1,y1,x2,y2,class   (no header, class 1..196)
    car_data/car_data/<train|test>/<class name, '/' -> '-'>/<fname>

In the CSV format the images of a split are looked for, in this order, in class folders under
``car_data/car_data/<split>``, ``car_data/<split>`` or ``<split>``, or flat in ``cars_<split>``: the
first of those folders that exists is used. The format is chosen by the metadata files present
(devkit first); train and test reuse file names, so the split folder is part of every path.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from data_modules.base import FineGrainedDataModule, Splits
from data_modules.errors import DatasetFormatError, DatasetNotFoundError
from data_modules.metadata import parse_field
from data_modules.samples import Box, Sample, resolve_inside

CARS_SOURCE = (
    "Stanford Cars comes from https://ai.stanford.edu/~jkrause/cars/car_dataset.html (cars_train.tgz, "
    "cars_test.tgz, car_devkit.tgz and cars_test_annos_withlabels.mat); re-hosts with anno_train.csv, "
    "anno_test.csv and names.csv also work. Point data.root at the folder that holds them."
)
DEVKIT_META = "devkit/cars_meta.mat"
DEVKIT_TRAIN = "devkit/cars_train_annos.mat"
DEVKIT_TEST = ("cars_test_annos_withlabels.mat", "devkit/cars_test_annos_withlabels.mat")
CSV_FILES = ("names.csv", "anno_train.csv", "anno_test.csv")
CSV_CLASS_FOLDER_ROOTS = ("car_data/car_data/{split}", "car_data/{split}", "{split}")
ANNOTATION_FIELDS = ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname")
CARS_LAYOUT = (
    "Expected one of the two Stanford Cars layouts:\n"
    f"  devkit: {DEVKIT_META}, {DEVKIT_TRAIN}, {DEVKIT_TEST[0]} (or {DEVKIT_TEST[1]}), cars_train/, cars_test/\n"
    f"  CSV re-host: {', '.join(CSV_FILES)}, images in car_data/car_data/<train|test>/<class name>/\n" + CARS_SOURCE
)


def read_stanford_cars(root: Path) -> Splits:
    """Parse a Stanford Cars folder (devkit or CSV re-host, chosen by the files present).

    Raises :class:`DatasetNotFoundError` listing, for each format, the expected files and those
    missing when neither is complete; :class:`DatasetFormatError` naming the file and the
    annotation (or line) for a value that does not parse, a class outside ``1..C``, an empty box,
    a file name listed twice, or a path escaping the root.
    """
    devkit_missing = _missing_devkit_files(root)
    if not devkit_missing:
        return read_devkit(root)
    csv_missing = [name for name in CSV_FILES if not (root / name).is_file()]
    if not csv_missing:
        return read_csv_rehost(root)
    raise DatasetNotFoundError(
        f"no complete Stanford Cars metadata under {root}:\n"
        f"  devkit format expects {DEVKIT_META}, {DEVKIT_TRAIN}, {DEVKIT_TEST[0]} (or {DEVKIT_TEST[1]}); "
        f"missing: {', '.join(devkit_missing)}\n"
        f"  CSV format expects {', '.join(CSV_FILES)}; missing: {', '.join(csv_missing)}\n" + CARS_SOURCE
    )


def _missing_devkit_files(root: Path) -> list[str]:
    missing = [name for name in (DEVKIT_META, DEVKIT_TRAIN) if not (root / name).is_file()]
    if not any((root / name).is_file() for name in DEVKIT_TEST):
        missing.append(DEVKIT_TEST[0])
    return missing


# ----- devkit (.mat) ------------------------------------------------------------------------------------


def read_devkit(root: Path) -> Splits:
    """Parse the official devkit files; images are ``cars_train/<fname>`` and ``cars_test/<fname>``."""
    class_names = _read_mat_class_names(root / DEVKIT_META)
    test_mat = next(root / name for name in DEVKIT_TEST if (root / name).is_file())
    splits = {}
    for split, mat in (("train", root / DEVKIT_TRAIN), ("test", test_mat)):
        samples = []
        for where, fname, box, class_id in _read_mat_annotations(mat):
            _check_class(class_id, len(class_names), where)
            resolve_inside(root / f"cars_{split}", fname, source=where)
            samples.append(Sample(path=f"cars_{split}/{fname}", label=class_id - 1, box=box))
        splits[split] = _no_duplicates(samples, mat)
    return Splits(train=splits["train"], test=splits["test"], class_names=class_names)


def _loadmat(path: Path) -> dict:
    from scipy.io import loadmat

    try:
        return loadmat(path, squeeze_me=True)
    except Exception as err:  # scipy raises ValueError, TypeError or its own MatReadError on a bad file
        raise DatasetFormatError(f"{path}: not a readable MATLAB file ({type(err).__name__}: {err})") from err


def _read_mat_class_names(path: Path) -> list[str]:
    content = _loadmat(path)
    if "class_names" not in content:
        raise DatasetFormatError(f"{path}: expected a variable 'class_names' (cell of names), found {_variables(content)}")
    names = [str(name) for name in np.atleast_1d(content["class_names"]).ravel()]
    if not names:
        raise DatasetFormatError(f"{path}: 'class_names' is empty")
    return names


def _read_mat_annotations(path: Path) -> list[tuple[str, str, Box, int]]:
    """``[(where, fname, (x1, y1, x2, y2), class_id)]``; ``where`` names the file and annotation."""
    content = _loadmat(path)
    if "annotations" not in content:
        raise DatasetFormatError(f"{path}: expected a variable 'annotations' (struct array), found {_variables(content)}")
    records = np.atleast_1d(content["annotations"]).ravel()
    fields = records.dtype.names or ()
    missing = [f for f in ANNOTATION_FIELDS if f not in fields]
    if missing:
        hint = " (cars_test_annos.mat has no labels: use cars_test_annos_withlabels.mat)" if missing == ["class"] else ""
        raise DatasetFormatError(f"{path}: annotations lack the fields {missing}; found {list(fields)}{hint}")
    out = []
    for index, record in enumerate(records, start=1):
        fname = record["fname"]
        where = f"{path} annotation {index} (fname {fname!r})"
        if not isinstance(fname, str) or not fname:
            raise DatasetFormatError(f"{where}: field fname must be a file name")
        x1, y1, x2, y2, class_id = (_mat_int(record[f], where, f) for f in ANNOTATION_FIELDS[:5])
        out.append((where, fname, _check_box((x1, y1, x2, y2), where), class_id))
    return out


def _mat_int(value, where: str, field: str) -> int:
    array = np.asarray(value)
    if array.size == 1 and np.issubdtype(array.dtype, np.number):
        number = float(array.item())
        if number.is_integer():
            return int(number)
    raise DatasetFormatError(f"{where}: field {field} must be one integer, got {value!r}")


def _variables(content: dict) -> list[str]:
    return sorted(k for k in content if not k.startswith("__"))


# ----- CSV re-host ----------------------------------------------------------------------------------------


def read_csv_rehost(root: Path) -> Splits:
    """Parse ``names.csv`` and ``anno_<split>.csv``; find each split's image folder (see module doc)."""
    class_names = _read_csv_names(root / "names.csv")
    splits = {}
    for split in ("train", "test"):
        path = root / f"anno_{split}.csv"
        image_dir, class_folders = _csv_image_dir(root, split)
        samples = []
        for line_no, fname, box, class_id in _read_csv_annotations(path):
            where = f"{path}:{line_no}"
            _check_class(class_id, len(class_names), where)
            folder = f"{image_dir}/{class_names[class_id - 1].replace('/', '-')}" if class_folders else image_dir
            resolve_inside(root / folder, fname, source=where)
            samples.append(Sample(path=f"{folder}/{fname}", label=class_id - 1, box=box))
        splits[split] = _no_duplicates(samples, path)
    return Splits(train=splits["train"], test=splits["test"], class_names=class_names)


def _csv_image_dir(root: Path, split: str) -> tuple[str, bool]:
    """``(folder relative to root, whether it holds class folders)`` for ``split``'s images."""
    candidates = [(pattern.format(split=split), True) for pattern in CSV_CLASS_FOLDER_ROOTS] + [(f"cars_{split}", False)]
    for folder, class_folders in candidates:
        if (root / folder).is_dir():
            return folder, class_folders
    raise DatasetNotFoundError(
        f"no {split} image folder under {root} for anno_{split}.csv: looked for "
        + ", ".join(f"{folder}/" for folder, _ in candidates)
        + "\n"
        + CARS_LAYOUT
    )


def _read_csv_names(path: Path) -> list[str]:
    names = []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        for row in reader:
            if not row or not "".join(row).strip():
                continue
            if len(row) != 1 or not row[0].strip():
                raise DatasetFormatError(f"{path}:{reader.line_num}: expected one class name a line, got {row!r}")
            names.append(row[0].strip())
    if not names:
        raise DatasetFormatError(f"{path}: no class names")
    return names


def _read_csv_annotations(path: Path) -> list[tuple[int, str, Box, int]]:
    """``[(line_number, fname, (x1, y1, x2, y2), class_id)]`` from ``fname,x1,y1,x2,y2,class`` rows."""
    out = []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        for row in reader:
            if not row or not "".join(row).strip():
                continue
            line_no = reader.line_num
            if len(row) != 6:
                raise DatasetFormatError(f"{path}:{line_no}: expected 6 fields 'fname,x1,y1,x2,y2,class', got {','.join(row)!r}")
            fname = row[0].strip()
            x1, y1, x2, y2 = (parse_field(path, line_no, v.strip(), int, what="box value") for v in row[1:5])
            class_id = parse_field(path, line_no, row[5].strip(), int, what="class id")
            out.append((line_no, fname, _check_box((x1, y1, x2, y2), f"{path}:{line_no}"), class_id))
    return out


# ----- shared checks --------------------------------------------------------------------------------------


def _check_box(box: tuple[int, int, int, int], where: str) -> Box:
    x1, y1, x2, y2 = box
    if x2 <= x1 or y2 <= y1:
        raise DatasetFormatError(f"{where}: box must have x2 > x1 and y2 > y1, got ({x1}, {y1}, {x2}, {y2})")
    return (float(x1), float(y1), float(x2), float(y2))


def _check_class(class_id: int, num_classes: int, where: str) -> None:
    if not 1 <= class_id <= num_classes:
        raise DatasetFormatError(f"{where}: class {class_id} is outside 1..{num_classes} (the number of class names)")


def _no_duplicates(samples: list[Sample], source: Path) -> list[Sample]:
    seen: set[str] = set()
    for sample in samples:
        if sample.path in seen:
            raise DatasetFormatError(f"{source}: image {sample.path} is listed twice")
        seen.add(sample.path)
    return samples


class StanfordCarsDataModule(FineGrainedDataModule):
    """Stanford Cars (196 make/model/year classes, 8,144 train / 8,041 test images, boxes).

    ``root`` holds the devkit layout or the CSV re-host (see the module docstring). The validation
    split is ``val_fraction`` of every class of the official train split (seeded). See
    :class:`~data_modules.base.FineGrainedDataModule` for the other arguments.
    """

    dataset_name = "Stanford Cars"
    layout_hint = CARS_LAYOUT

    def read_splits(self, root: Path) -> Splits:
        return read_stanford_cars(root)
