"""Where data comes from: one LightningDataModule per dataset, plus the generated demo data."""

from data_modules.base import FineGrainedDataModule
from data_modules.cub import CUB200DataModule
from data_modules.demo import SyntheticCUBDataModule
from data_modules.image_folder import ImageFolderDataModule
from data_modules.nabirds import NABirdsDataModule
from data_modules.oxford_pets import OxfordPetsDataModule
from data_modules.stanford_cars import StanfordCarsDataModule

__all__ = [
    "FineGrainedDataModule",
    "CUB200DataModule",
    "SyntheticCUBDataModule",
    "NABirdsDataModule",
    "StanfordCarsDataModule",
    "OxfordPetsDataModule",
    "ImageFolderDataModule",
]
