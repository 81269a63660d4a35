"""Transform output shapes and box geometry."""

from __future__ import annotations

import numpy as np
import pytest
import torch

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


# ----- the source view: the same view at a higher resolution (issue 13 §3) ---------------------------


def bird_photo(height: int = 300, width: int = 420) -> tuple[np.ndarray, tuple[float, float, float, float]]:
    """A dark photo with a bright, left-right asymmetric "bird" and its box."""
    img = np.full((height, width, 3), 20, dtype=np.uint8)
    x1, y1, x2, y2 = 60, 90, 240, 230
    img[y1:y2, x1:x2] = 230
    img[y1:y2, x1 : x1 + 30, 0] = 0  # a cyan stripe on the bird's left edge: shows a flip
    return img, (float(x1), float(y1), float(x2), float(y2))


def bright_box(channel_max: np.ndarray, level: float) -> np.ndarray:
    ys, xs = np.nonzero(channel_max > level)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=np.float32)


@pytest.mark.parametrize("train", [False, True])
def test_source_view_shows_the_same_region_and_flip(train):
    img, box = bird_photo()
    # train: resize = crop so the random crop cannot move, flip always: the geometry is deterministic
    plain = build_train_transform(224, 224, hflip=1.0) if train else build_eval_transform(256, 224)
    with_source = build_train_transform(224, 224, hflip=1.0, source_size=448) if train else build_eval_transform(256, 224, source_size=448)
    view, view_box = apply_transform(plain, img, box)
    view2, view_box2, source = apply_transform(with_source, img, box)
    assert view2.shape == view.shape and source.shape == (3, 448, 448) and source.dtype == torch.uint8
    # the network's view is the plain pipeline's, up to resize interpolation
    assert (view2 - view).abs().mean() < 0.05
    np.testing.assert_allclose(view_box2, view_box, atol=0.5)
    # the box maps to the source frame by source_size / crop_size, where the bright bird is
    src = source.numpy().max(axis=0)
    np.testing.assert_allclose(bright_box(src, 128), view_box2 * 2, atol=2.0)
    # same flip: the cyan stripe (red channel dark) is on the same side in both
    stripe_view = (denormalize(view2)[0] < 0.3) & (denormalize(view2)[1] > 0.6)
    stripe_src = (source[0] < 80) & (source[1] > 160)
    side = lambda mask: mask.float().nonzero()[:, 1].float().mean() / mask.shape[1]  # noqa: E731
    assert abs(side(stripe_view) - side(stripe_src)) < 0.02
    assert (side(stripe_view) > 0.5) == train  # flipped: the stripe moved to the right


def test_source_view_is_seeded_like_the_plain_pipeline():
    from data_modules.resumable import SeededTransform

    img, box = bird_photo()
    tf = SeededTransform(build_train_transform(256, 224, source_size=336))
    tf.reseed(7)
    first = tf(img, box)
    tf.reseed(7)
    again = tf(img, box)
    assert torch.equal(first[2], again[2]) and torch.equal(first[0], again[0])
    tf.reseed(8)
    other = tf(img, box)
    assert not torch.equal(first[2], other[2])


def test_source_smaller_than_view_is_refused():
    with pytest.raises(ValueError, match="source_size 128 must be at least crop_size 224"):
        build_eval_transform(256, 224, source_size=128)
