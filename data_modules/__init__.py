"""Where data comes from: one LightningDataModule per dataset, plus the generated demo data."""

from data_modules.base import FineGrainedDataModule
from data_modules.cub import CUB200DataModule
from data_modules.demo import SyntheticCUBDataModule

__all__ = ["FineGrainedDataModule", "CUB200DataModule", "SyntheticCUBDataModule"]
