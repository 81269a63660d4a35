"""The generated dataset: deterministic, cached, the CUB layout, the object a minority of the image."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from data_modules.cub import read_cub
from data_modules.synthetic import SyntheticSpec, generate_scenes, write_synthetic_cub


def test_deterministic_for_seed():
    spec = SyntheticSpec(num_classes=3, images_per_class=2, seed=5)
    a = [s.image for s in generate_scenes(spec)]
    b = [s.image for s in generate_scenes(spec)]
    c = [s.image for s in generate_scenes(SyntheticSpec(num_classes=3, images_per_class=2, seed=6))]
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(x.shape == y.shape and np.array_equal(x, y) for x, y in zip(a, c))


def test_object_is_a_minority_of_the_image():
    spec = SyntheticSpec(num_classes=6, images_per_class=5)
    shares = []
    for s in generate_scenes(spec):
        x1, y1, x2, y2 = s.box
        h, w = s.image.shape[:2]
        assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h
        shares.append((x2 - x1) * (y2 - y1) / (w * h))
    assert 0.03 < np.mean(shares) < 0.35 and max(shares) < 0.5


def test_written_in_cub_layout_and_reused(cub_root):
    splits = read_cub(cub_root)
    assert len(splits.class_names) == 4
    with Image.open(cub_root / splits.train[0].path) as img:
        assert img.format == "JPEG"
    stamp = (cub_root / "images.txt").stat().st_mtime_ns
    again = write_synthetic_cub(cub_root, SyntheticSpec(num_classes=4, images_per_class=12, min_side=96, max_side=128))
    assert again == cub_root and (cub_root / "images.txt").stat().st_mtime_ns == stamp


@pytest.mark.parametrize("kwargs", [{"num_classes": 1}, {"num_classes": 99}, {"images_per_class": 1}, {"min_side": 10}])
def test_bad_spec(kwargs):
    with pytest.raises(ValueError):
        SyntheticSpec(**kwargs)
