"""Shared fixtures: a generated CUB-layout dataset written once per test session."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

# One intra-op thread: the suite's ops are small, and on a 2-core machine with any other load two
# OpenMP threads spin against each other (the learning test ran 10x slower with two).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def cub_root(tmp_path_factory) -> Path:
    """A small generated dataset in the exact CUB_200_2011 layout (4 classes x 12 images)."""
    from data_modules.synthetic import SyntheticSpec, write_synthetic_cub

    root = tmp_path_factory.mktemp("data") / "CUB_200_2011"
    return write_synthetic_cub(root, SyntheticSpec(num_classes=4, images_per_class=12, min_side=96, max_side=128))


@pytest.fixture
def cub_copy(cub_root, tmp_path) -> Path:
    """A private copy of :func:`cub_root` that a test may break."""
    target = tmp_path / "CUB_200_2011"
    shutil.copytree(cub_root, target)
    return target


@pytest.fixture(scope="session")
def weights(tmp_path_factory) -> Path:
    """Anyone's EfficientNet-Lite0 weights for the real-photo benchmarks' tests: a random state dict under timm's
    names (seed 0, the global generators left as they were), saved as .safetensors."""
    import timm
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("weights") / "lite0.safetensors"
    with torch.random.fork_rng():
        torch.manual_seed(0)
        save_file(timm.create_model("efficientnet_lite0").state_dict(), path)
    return path
