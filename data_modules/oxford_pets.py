"""Oxford-IIIT Pets, read by its annotation lists.

Layout::

    oxford-iiit-pet/
      annotations/trainval.txt     <Image> <CLASS-ID 1..37> <SPECIES 1 cat | 2 dog> <BREED-ID>
      annotations/test.txt         the same; lines starting with '#' are comments
      annotations/xmls/<Image>.xml PASCAL VOC box <bndbox><xmin/><ymin/><xmax/><ymax/></bndbox> (pixels);
                                   the real set has them for trainval images only, and the box is
                                   the pet's HEAD, not the whole animal
      images/<Image>.jpg

Class names come from the image names: ``Abyssinian_100`` -> ``Abyssinian``, ``american_bulldog_12``
-> ``american_bulldog`` (cats are capitalised, dogs lowercase). Every class id must always go with
the same name and species. An image without an XML file has no box (``Sample.box`` is ``None``).
"""

from __future__ import annotations

import xml.etree.ElementTree as ElementTree
from pathlib import Path

from data_modules.base import FineGrainedDataModule, Splits
from data_modules.errors import DatasetFormatError
from data_modules.metadata import parse_field, read_rows, require_file
from data_modules.samples import Box, Sample, resolve_inside

PETS_LAYOUT = (
    "Expected the Oxford-IIIT Pets layout: annotations/trainval.txt, annotations/test.txt, "
    "annotations/xmls/ (boxes, optional) and images/ in one folder.\n"
    "Oxford-IIIT Pets comes from https://www.robots.ox.ac.uk/~vgg/data/pets/ (images.tar.gz and "
    "annotations.tar.gz; point data.root at the folder holding images/ and annotations/)."
)
LIST_LINE = "<Image> <CLASS-ID> <SPECIES> <BREED-ID>"


def read_oxford_pets(root: Path) -> Splits:
    """Parse an Oxford-IIIT Pets folder into trainval/test samples and breed names.

    Raises :class:`DatasetFormatError` naming the file and line for a line that does not parse, a
    species other than 1/2, an image listed twice, a class id that goes with two names or species
    (or a name with two class ids), an image name that is absolute or contains ``..``, and an XML
    file without a valid box. The class ids present become labels ``0..C-1`` in increasing id order,
    so a subset of the breeds (ids 3, 17, 30) is a 3-class dataset keeping the breed names.
    """
    lists = {split: require_file(root / "annotations" / f"{split}.txt", layout_hint=PETS_LAYOUT) for split in ("trainval", "test")}
    class_of_name: dict[str, tuple[int, str]] = {}  # breed name -> (class id, where first seen)
    name_of_class: dict[int, tuple[str, int, str]] = {}  # class id -> (breed name, species, where first seen)
    seen_images: dict[str, str] = {}
    rows: dict[str, list[tuple[str, int]]] = {}
    for split, path in lists.items():
        rows[split] = []
        for line_no, (image, raw_class, raw_species, raw_breed) in read_rows(path, 4, expected=LIST_LINE, comment="#"):
            where = f"{path}:{line_no}"
            class_id = parse_field(path, line_no, raw_class, int, what="class id")
            species = parse_field(path, line_no, raw_species, int, what="species")
            parse_field(path, line_no, raw_breed, int, what="breed id")
            if species not in (1, 2):
                raise DatasetFormatError(f"{where}: species must be 1 (cat) or 2 (dog), got {species}")
            if image in seen_images:
                raise DatasetFormatError(f"{where}: image {image} is listed twice (first at {seen_images[image]})")
            seen_images[image] = where
            name = breed_name(image, where)
            if name in class_of_name and class_of_name[name][0] != class_id:
                first_id, first_where = class_of_name[name]
                raise DatasetFormatError(f"{where}: breed {name!r} has class id {class_id} here but {first_id} at {first_where}")
            if class_id in name_of_class and name_of_class[class_id][:2] != (name, species):
                first_name, first_species, first_where = name_of_class[class_id]
                raise DatasetFormatError(
                    f"{where}: class id {class_id} is breed {name!r} species {species} here but "
                    f"{first_name!r} species {first_species} at {first_where}"
                )
            class_of_name.setdefault(name, (class_id, where))
            name_of_class.setdefault(class_id, (name, species, where))
            resolve_inside(root / "images", f"{image}.jpg", source=where)
            rows[split].append((image, class_id))

    class_ids = sorted(name_of_class)  # a subset of the 37 breeds is fine: ids map to 0..C-1 in id order
    label_of = {class_id: label for label, class_id in enumerate(class_ids)}
    class_names = [name_of_class[i][0] for i in class_ids]

    xml_dir = root / "annotations" / "xmls"
    splits = {
        split: [
            Sample(f"images/{image}.jpg", label_of[class_id], *read_pet_xml(xml_dir / f"{image}.xml"))
            for image, class_id in split_rows
        ]
        for split, split_rows in rows.items()
    }
    return Splits(train=splits["trainval"], test=splits["test"], class_names=class_names)


def breed_name(image: str, where: str) -> str:
    """``Abyssinian_100`` -> ``Abyssinian``; raise naming ``where`` if the name has no ``_<number>``."""
    name, _, number = image.rpartition("_")
    if not name or not number.isdigit():
        raise DatasetFormatError(f"{where}: image name {image!r} is not '<breed>_<number>'")
    return name


def read_pet_box(path: Path) -> Box | None:
    """The ``(x1, y1, x2, y2)`` pixel box of a PASCAL VOC XML file, or ``None`` if the file is absent
    (see :func:`read_pet_xml`)."""
    return read_pet_xml(path)[0]


def read_pet_xml(path: Path) -> tuple[Box | None, tuple[int, int] | None]:
    """``(box, size)`` of a PASCAL VOC XML file: the ``(x1, y1, x2, y2)`` pixel box and the
    ``(width, height)`` of the image it was drawn on (``<size>``, ``None`` when absent; a resized
    copy of the image then gets its box scaled by the ratio); ``(None, None)`` if the file is absent.

    The first ``<object><bndbox>`` is used (the real files hold one). A file that does not parse, a
    box without the four numbers or with ``xmax <= xmin`` / ``ymax <= ymin``, or a ``<size>`` that is
    not two positive integers, raises :class:`DatasetFormatError` naming the file.
    """
    if not path.is_file():
        return None, None
    try:
        tree = ElementTree.parse(path)
    except ElementTree.ParseError as err:
        raise DatasetFormatError(f"{path}: not valid XML ({err})") from err
    bndbox = tree.getroot().find("object/bndbox")
    if bndbox is None:
        raise DatasetFormatError(f"{path}: expected <object><bndbox> with xmin, ymin, xmax, ymax")
    values = []
    for tag in ("xmin", "ymin", "xmax", "ymax"):
        text = bndbox.findtext(tag)
        try:
            values.append(float(text))
        except (TypeError, ValueError):
            raise DatasetFormatError(f"{path}: <bndbox><{tag}> must be a number, got {text!r}") from None
    x1, y1, x2, y2 = values
    if x2 <= x1 or y2 <= y1:
        raise DatasetFormatError(f"{path}: box must have xmax > xmin and ymax > ymin, got ({x1}, {y1}, {x2}, {y2})")
    size = None
    if tree.getroot().find("size") is not None:
        width, height = (tree.getroot().findtext(f"size/{tag}") for tag in ("width", "height"))
        try:
            size = (int(width), int(height))
        except (TypeError, ValueError):
            raise DatasetFormatError(f"{path}: <size> must hold integer <width> and <height>, got {width!r} x {height!r}") from None
        if min(size) <= 0:
            raise DatasetFormatError(f"{path}: <size> must be positive, got {size[0]} x {size[1]}")
    return (x1, y1, x2, y2), size


class OxfordPetsDataModule(FineGrainedDataModule):
    """Oxford-IIIT Pets (37 cat and dog breeds, 3,680 trainval / 3,669 test images, head boxes on
    trainval).

    ``root`` holds ``images/`` and ``annotations/``. The validation split is ``val_fraction`` of every
    class of trainval (seeded). With ``crop_to_box`` only images with a box are cropped (to the
    head). See :class:`~data_modules.base.FineGrainedDataModule` for the other arguments.
    """

    dataset_name = "Oxford-IIIT Pets"
    layout_hint = PETS_LAYOUT

    def read_splits(self, root: Path) -> Splits:
        return read_oxford_pets(root)
