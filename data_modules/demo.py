"""The demo DataModule: the generated dataset, written once in the CUB_200_2011 layout and read by
exactly the same code as real CUB (:class:`~data_modules.cub.CUB200DataModule`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from data_modules.cub import CUB200DataModule
from data_modules.synthetic import SyntheticSpec, write_synthetic_cub


class SyntheticCUBDataModule(CUB200DataModule):
    """CUB-layout generated data; the folder is written on first use (cached, atomic) then reused.

    Args:
        root: where to write it; default ``$MGFF_CACHE_DIR/synthetic/cub-<hash>/CUB_200_2011``.
        num_classes: classes to generate (2-15).
        images_per_class: images per class (half train, half test).
        min_side / max_side: range of the generated images' sides in pixels.
        seed: generation seed.
        **kwargs: :class:`~data_modules.base.FineGrainedDataModule` arguments (sizes, batch size...).
    """

    dataset_name = "generated CUB-layout demo data"

    def __init__(
        self,
        root: str | Path | None = None,
        num_classes: int = 8,
        images_per_class: int = 40,
        min_side: int = 128,
        max_side: int = 192,
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        spec = SyntheticSpec(num_classes=num_classes, images_per_class=images_per_class, min_side=min_side, max_side=max_side, seed=seed)
        super().__init__(root=write_synthetic_cub(root, spec), **kwargs)
        self.spec = spec
