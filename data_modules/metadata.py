"""Readers for the space-separated metadata files of fine-grained datasets (CUB, NA-Birds, Pets).

Every error names the file and the 1-based line, and says what the line should look like.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, TypeVar

from data_modules.errors import DatasetFormatError, DatasetNotFoundError

T = TypeVar("T")


def require_file(path: Path, *, layout_hint: str) -> Path:
    """Return ``path`` if it is a file, else raise :class:`DatasetNotFoundError` with ``layout_hint``."""
    if not path.is_file():
        raise DatasetNotFoundError(f"missing metadata file {path}\n{layout_hint}")
    return path


def read_rows(path: Path, num_fields: int, *, expected: str, comment: str | None = None) -> list[tuple[int, list[str]]]:
    """Read a whitespace-separated file into ``(line_number, fields)`` rows.

    Args:
        path: the file.
        num_fields: fields per line; the last field takes the rest of the line (names with spaces).
        expected: what a line should look like (``"<image_id> <class_id>"``), for the error message.
        comment: lines starting with this prefix are skipped (``"#"`` for Pets' ``list.txt``).

    Blank lines are skipped. A line with fewer fields raises :class:`DatasetFormatError`.
    """
    rows = []
    with open(path, encoding="utf-8") as f:
        for line_no, raw in enumerate(f, start=1):
            line = raw.strip()
            if not line or (comment is not None and line.startswith(comment)):
                continue
            fields = line.split(maxsplit=num_fields - 1)
            if len(fields) != num_fields:
                raise DatasetFormatError(
                    f"{path}:{line_no}: expected {num_fields} fields '{expected}', got {line!r}"
                )
            rows.append((line_no, fields))
    return rows


def parse_field(path: Path, line_no: int, value: str, convert: Callable[[str], T], *, what: str) -> T:
    """Convert one field, raising :class:`DatasetFormatError` naming the file, line and field."""
    try:
        return convert(value)
    except ValueError:
        raise DatasetFormatError(f"{path}:{line_no}: {what} {value!r} is not a valid {convert.__name__}") from None


def read_mapping(
    path: Path, convert: Callable[[str], T], *, expected: str, what: str, key: Callable[[str], object] = str
) -> dict[object, tuple[int, T]]:
    """Read a two-column ``<id> <value>`` file into ``{id: (line_number, value)}``; duplicate ids raise."""
    out: dict[object, tuple[int, T]] = {}
    for line_no, (raw_id, raw_value) in read_rows(path, 2, expected=expected):
        image_id = parse_field(path, line_no, raw_id, key, what="id") if key is not str else raw_id
        if image_id in out:
            raise DatasetFormatError(f"{path}:{line_no}: id {raw_id} appears twice (first at line {out[image_id][0]})")
        out[image_id] = (line_no, parse_field(path, line_no, raw_value, convert, what=what))
    return out


def check_same_ids(reference: dict, reference_name: Path, other: dict, other_name: Path) -> None:
    """Raise :class:`DatasetFormatError` if two metadata files do not list the same image ids."""
    if reference.keys() == other.keys():
        return
    only_ref = sorted(map(str, set(reference) - set(other)))[:10]
    only_other = sorted(map(str, set(other) - set(reference)))[:10]
    raise DatasetFormatError(
        f"image ids of {other_name.name} do not match {reference_name.name} in {reference_name.parent}: "
        f"missing from {other_name.name}: {only_ref or 'none'}; not in {reference_name.name}: {only_other or 'none'}"
    )
