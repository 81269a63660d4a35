"""Helpers shared by the DataModule tests (imported by name: pytest puts tests/ on sys.path)."""

from __future__ import annotations

from typing import Any

TINY_LOADER = {"resize_size": 72, "crop_size": 64, "num_workers": 0, "batch_size": 4}


def tiny_datamodule(cls: type, root: Any, **kwargs: Any):
    """``cls(root=root, ...)`` with small images, batches of 4 and no loader workers unless overridden."""
    return cls(root=root, **{**TINY_LOADER, **kwargs})
