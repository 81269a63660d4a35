"""Transform output shapes and box geometry."""

from __future__ import annotations

import numpy as np
import pytest

from data_modules.transforms import apply_transform, build_eval_transform, build_train_transform, denormalize


@pytest.mark.parametrize("resize, crop", [(512, 384), (112, 96)])
def test_shapes(resize, crop):
    img = np.random.default_rng(0).integers(0, 255, (300, 420, 3), dtype=np.uint8)
    for tf in (build_train_transform(resize, crop), build_eval_transform(resize, crop)):
        out, box = apply_transform(tf, img, (10.0, 20.0, 200.0, 250.0))
        assert out.shape == (3, crop, crop)
        assert box.shape == (4,)


def test_eval_box_follows_resize_and_centre_crop():
    img = np.zeros((100, 200, 3), dtype=np.uint8)
    out, box = apply_transform(build_eval_transform(100, 80), img, (50.0, 25.0, 150.0, 75.0))
    # resize 200x100 -> 100x100 halves x; centre crop 80 removes 10 pixels each side
    np.testing.assert_allclose(box, [25 - 10, 25 - 10, 75 - 10, 75 - 10], atol=1e-3)


def test_no_box_gives_nan():
    img = np.zeros((64, 64, 3), dtype=np.uint8)
    _, box = apply_transform(build_eval_transform(64, 64), img, None)
    assert np.isnan(box).all()


def test_normalise_roundtrip():
    img = np.full((32, 32, 3), 128, dtype=np.uint8)
    out, _ = apply_transform(build_eval_transform(32, 32), img, None)
    np.testing.assert_allclose(denormalize(out).numpy(), 128 / 255, atol=1e-3)


def test_crop_larger_than_resize_is_refused():
    with pytest.raises(ValueError, match="crop_size"):
        build_train_transform(64, 96)
