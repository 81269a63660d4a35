"""Errors raised for bad dataset input: each names the file, line or value and what was expected."""

from __future__ import annotations


class DatasetFormatError(ValueError):
    """A dataset's metadata does not parse or disagrees with itself (names the file and line)."""


class DatasetNotFoundError(FileNotFoundError):
    """A dataset root or one of its metadata files is missing (says what the layout must be)."""


class MissingImagesError(FileNotFoundError):
    """Images listed in the metadata are not on disk (lists them)."""


class BadImageError(OSError):
    """An image file exists but cannot be decoded (names the file)."""
