"""Named training augmentations (random resized crop, colour jitter, TrivialAugment): off by default and then
exactly the paper's pipeline; on, every geometric op moves the box and keeps the source view and the
network's view the same region; bad values are refused by name; the DataModule takes them from a config."""

from __future__ import annotations

from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import pytest
import torch
from albumentations.pytorch import ToTensorV2

from data_modules.cub import CUB200DataModule
from data_modules.resumable import SeededTransform
from data_modules.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ViewWithSource,
    _bbox_params,
    apply_transform,
    build_eval_transform,
    build_train_transform,
    denormalize,
    trivial_augment_ops,
)
from datamodule_helpers import tiny_datamodule

BOX = (60.0, 90.0, 240.0, 230.0)


def bird_photo() -> np.ndarray:
    """A dark 300 x 420 photo with a bright rectangle exactly filling :data:`BOX`."""
    img = np.full((300, 420, 3), 20, dtype=np.uint8)
    x1, y1, x2, y2 = (int(v) for v in BOX)
    img[y1:y2, x1:x2] = 230
    return img


def bright_box(gray: np.ndarray, level: float) -> np.ndarray | None:
    """The box of the pixels above ``level`` (``None`` when there are none)."""
    ys, xs = np.nonzero(gray > level)
    if len(xs) == 0:
        return None
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=np.float32)


def view_gray(view: torch.Tensor) -> np.ndarray:
    return denormalize(view).numpy().mean(axis=0) * 255


def assert_box_fits_bright_region(box: np.ndarray, gray: np.ndarray, atol: float = 2.0) -> None:
    """The box covers the bright region and is no bigger than it (the object fills its box exactly)."""
    found = bright_box(gray, 128)
    if found is None:  # the object left the image: so did its box
        assert np.isnan(box).all()
        return
    assert not np.isnan(box).any()
    np.testing.assert_allclose(box, found, atol=atol)


def seeded(transform, seed: int, img: np.ndarray, box=BOX):
    tf = SeededTransform(transform)
    tf.reseed(seed)
    return tf(img, box)


# ----- defaults: the paper's pipeline, draw for draw ---------------------------------------------------


def test_defaults_are_the_previous_pipeline_draw_for_draw():
    img = bird_photo()
    before = A.Compose(
        [A.Resize(256, 256), A.RandomCrop(224, 224), A.HorizontalFlip(p=0.5), A.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD), ToTensorV2()],
        bbox_params=_bbox_params(),
    )
    default = build_train_transform(256, 224)
    explicit = build_train_transform(256, 224, random_resized_crop_scale=None, color_jitter=0.0, trivial_augment=False)
    assert [type(t) for t in default.transforms] == [type(t) for t in before.transforms]
    for seed in range(6):
        want, want_box = seeded(before, seed, img)
        for tf in (default, explicit):
            got, got_box = seeded(tf, seed, img)
            assert torch.equal(got, want)
            np.testing.assert_array_equal(got_box, want_box)


def test_defaults_with_a_source_view_are_unchanged():
    img = bird_photo()
    before = ViewWithSource([A.Resize(512, 512), A.RandomCrop(448, 448), A.HorizontalFlip(p=0.5)], 224, IMAGENET_MEAN, IMAGENET_STD)
    now = build_train_transform(256, 224, source_size=448)
    for seed in range(4):
        want, got = seeded(before, seed, img), seeded(now, seed, img)
        assert torch.equal(got[0], want[0]) and torch.equal(got[2], want[2])
        np.testing.assert_array_equal(got[1], want[1])


def test_datamodule_defaults_build_the_previous_pipeline(cub_root):
    dm = tiny_datamodule(CUB200DataModule, cub_root)
    assert (dm.random_resized_crop_scale, dm.color_jitter, dm.trivial_augment) == (None, 0.0, False)
    dm.setup()
    steps = [type(t).__name__ for t in dm.datasets["train"].transform.compose.transforms]
    assert steps == ["Resize", "RandomCrop", "HorizontalFlip", "Normalize", "ToTensorV2"]


# ----- random resized crop ---------------------------------------------------------------------------


def test_random_resized_crop_changes_the_view_and_moves_the_box():
    img = bird_photo()
    plain = build_train_transform(256, 224, hflip=0.5)
    rrc = build_train_transform(256, 224, hflip=0.5, random_resized_crop_scale=(0.25, 0.6))
    assert any(isinstance(t, A.RandomResizedCrop) for t in rrc.transforms)
    assert not any(isinstance(t, A.RandomCrop) for t in rrc.transforms)
    boxes = []
    for seed in range(12):
        view, box = seeded(rrc, seed, img)
        assert view.shape == (3, 224, 224)
        assert_box_fits_bright_region(box, view_gray(view))
        plain_view, _ = seeded(plain, seed, img)
        assert not torch.equal(view, plain_view)
        boxes.append(box)
    found = np.array([b for b in boxes if not np.isnan(b).any()])
    assert len(found) >= 6
    widths = found[:, 2] - found[:, 0]
    assert widths.max() - widths.min() > 20  # the crop's scale varies, and the box with it


def test_random_resized_crop_draws_a_region_of_the_asked_area():
    # a full-area crop of a square image with ratio 1 is the identity: scale (1, 1) keeps the whole box
    img = bird_photo()
    view, box = seeded(build_train_transform(256, 256, hflip=0.0, random_resized_crop_scale=(1.0, 1.0)), 0, img)
    want, want_box = seeded(build_eval_transform(256, 256), 0, img)
    np.testing.assert_allclose(box, want_box, atol=1.0)
    assert (view - want).abs().mean() < 0.05


@pytest.mark.parametrize("augment", [{"random_resized_crop_scale": (0.3, 0.8)}, {"random_resized_crop_scale": (0.3, 0.8), "color_jitter": 0.4}])
def test_with_a_source_view_the_crop_runs_at_the_source_scale(augment):
    img = bird_photo()
    tf = build_train_transform(256, 224, hflip=0.5, source_size=448, **augment)
    assert isinstance(tf, ViewWithSource)
    assert any(isinstance(t, A.RandomResizedCrop) and t.size == (448, 448) for t in tf.geometry.transforms)
    for seed in range(8):
        view, box, source = seeded(tf, seed, img)
        assert view.shape == (3, 224, 224) and source.shape == (3, 448, 448) and source.dtype == torch.uint8
        # the source resized down is the view, up to normalisation
        down = cv2.resize(source.numpy().transpose(1, 2, 0), (224, 224), interpolation=cv2.INTER_AREA)
        np.testing.assert_allclose(denormalize(view).numpy().transpose(1, 2, 0), down / 255, atol=2 / 255)
        # the view's box, scaled by source_size / crop_size, is where the bright object is in the source
        if "color_jitter" not in augment:  # (jittered: see the next test)
            assert_box_fits_bright_region(box * 448 / 224, source.numpy().astype(np.float32).mean(axis=0), atol=2.5)
            assert_box_fits_bright_region(box, view_gray(view), atol=2.0)


def test_with_a_source_view_the_colour_jittered_box_still_covers_the_object():
    # the object stays brighter than the background under any jitter of strength 0.3 (factors 0.7..1.3)
    img = bird_photo()
    tf = build_train_transform(256, 224, source_size=448, random_resized_crop_scale=(0.3, 0.8), color_jitter=0.3)
    for seed in range(8):
        _, box, source = seeded(tf, seed, img)
        gray = source.numpy().astype(np.float32).mean(axis=0)
        level = (gray.max() + gray.min()) / 2
        found = bright_box(gray, level) if gray.max() - gray.min() > 50 else None
        if found is None:
            assert np.isnan(box).all() or gray.max() - gray.min() <= 50
            continue
        np.testing.assert_allclose(box * 2, found, atol=2.5)


# ----- colour jitter ---------------------------------------------------------------------------------


def test_colour_jitter_changes_pixels_but_not_the_box():
    img = bird_photo()
    plain = build_train_transform(256, 224, random_resized_crop_scale=(0.3, 0.9))
    jitter = build_train_transform(256, 224, random_resized_crop_scale=(0.3, 0.9), color_jitter=0.4)
    cj = [t for t in jitter.transforms if isinstance(t, A.ColorJitter)]
    assert len(cj) == 1 and cj[0].p == 0.8
    assert cj[0].brightness == pytest.approx((0.6, 1.4)) and cj[0].hue == pytest.approx((-0.1, 0.1))
    changed = 0
    for seed in range(10):
        a, box_a = seeded(plain, seed, img)
        b, box_b = seeded(jitter, seed, img)
        np.testing.assert_array_equal(box_a, box_b)  # same crop and flip draws: jitter comes after them
        changed += not torch.allclose(a, b)
    assert changed >= 5  # p = 0.8


def test_colour_jitter_only_in_training(cub_root):
    dm = tiny_datamodule(CUB200DataModule, cub_root, color_jitter=0.5, random_resized_crop_scale=(0.5, 1.0))
    dm.setup()
    train_steps = [type(t).__name__ for t in dm.datasets["train"].transform.compose.transforms]
    assert train_steps == ["Resize", "RandomResizedCrop", "HorizontalFlip", "ColorJitter", "Normalize", "ToTensorV2"]
    eval_tf = dm.datasets["val"].transform.args[0]
    assert [type(t).__name__ for t in eval_tf.transforms] == ["Resize", "CenterCrop", "Normalize", "ToTensorV2"]


# ----- TrivialAugment ----------------------------------------------------------------------------------

GEOMETRIC = (A.Affine,)


@pytest.mark.parametrize("index", range(14))
def test_every_trivial_augment_op_keeps_the_box_on_the_object(index):
    img = bird_photo()
    op = trivial_augment_ops()[index]
    tf = A.Compose([A.Resize(256, 256), op, A.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD), ToTensorV2()], bbox_params=_bbox_params())
    _, resized_box = apply_transform(build_eval_transform(256, 256), img, BOX)
    moved = 0
    for seed in range(6):
        view, box = seeded(tf, seed, img)
        if isinstance(op, GEOMETRIC):
            assert_box_fits_bright_region(box, view_gray(view), atol=3.0)
            moved += not np.allclose(box, resized_box, atol=1.0)
        else:  # photometric: the box does not move
            np.testing.assert_allclose(box, resized_box, atol=1e-3)
    assert moved >= 4 if isinstance(op, GEOMETRIC) else moved == 0


@pytest.mark.parametrize("index", [i for i, op in enumerate(trivial_augment_ops()) if isinstance(op, GEOMETRIC)])
def test_trivial_augment_geometric_ops_at_the_source_scale(index):
    img = bird_photo()
    geometry = [A.Resize(512, 512), A.RandomResizedCrop(size=(448, 448), scale=(0.5, 1.0)), trivial_augment_ops()[index]]
    tf = ViewWithSource(geometry, 224, IMAGENET_MEAN, IMAGENET_STD)
    for seed in range(5):
        view, box, source = seeded(tf, seed, img)
        assert_box_fits_bright_region(box * 2, source.numpy().astype(np.float32).mean(axis=0), atol=4.0)
        assert_box_fits_bright_region(box, view_gray(view), atol=3.0)


def test_trivial_augment_in_the_pipeline_is_seeded_and_keeps_view_and_source_together():
    img = bird_photo()
    tf = build_train_transform(256, 224, source_size=448, random_resized_crop_scale=(0.5, 1.0), color_jitter=0.2, trivial_augment=True)
    names = [type(t).__name__ for t in tf.geometry.transforms]
    assert names == ["Resize", "RandomResizedCrop", "HorizontalFlip", "OneOf", "ColorJitter"]
    assert len(tf.geometry.transforms[3].transforms) == 14
    seeded_tf = SeededTransform(tf)
    outputs = []
    for seed in (3, 3, 4):
        seeded_tf.reseed(seed)
        outputs.append(seeded_tf(img, BOX))
    (v1, b1, s1), (v2, b2, s2), (v3, _, s3) = outputs
    assert torch.equal(v1, v2) and torch.equal(s1, s2) and np.array_equal(b1, b2, equal_nan=True)
    assert not torch.equal(s1, s3)
    for seed in range(10):
        view, box, source = seeded(tf, seed, img)
        down = cv2.resize(source.numpy().transpose(1, 2, 0), (224, 224), interpolation=cv2.INTER_AREA)
        np.testing.assert_allclose(denormalize(view).numpy().transpose(1, 2, 0), down / 255, atol=2 / 255)
        assert np.isnan(box).all() or (0 <= box[0] < box[2] <= 224 and 0 <= box[1] < box[3] <= 224)


def test_sharpness_is_the_identity_at_factor_one_and_sharpens_above():
    from data_modules.transforms import Sharpness

    img = np.random.default_rng(0).integers(0, 256, (32, 40, 3), dtype=np.uint8)
    same = Sharpness(factor=(1.0, 1.0), p=1.0)(image=img)["image"]
    np.testing.assert_array_equal(same, img)
    blurred = Sharpness(factor=(0.0, 0.0), p=1.0)(image=img)["image"]
    sharper = Sharpness(factor=(1.9, 1.9), p=1.0)(image=img)["image"]
    assert blurred[1:-1, 1:-1].astype(float).std() < img[1:-1, 1:-1].std() < sharper[1:-1, 1:-1].astype(float).std()
    np.testing.assert_array_equal(blurred[0], img[0])  # border pixels are kept, as PIL does


# ----- bad values --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"random_resized_crop_scale": (0.0, 1.0)}, "random_resized_crop_scale"),
        ({"random_resized_crop_scale": (0.8, 0.5)}, "random_resized_crop_scale"),
        ({"random_resized_crop_scale": (0.5, 1.2)}, "random_resized_crop_scale"),
        ({"random_resized_crop_scale": (0.5,)}, "random_resized_crop_scale"),
        ({"random_resized_crop_scale": 0.5}, "random_resized_crop_scale"),
        ({"color_jitter": -0.1}, "color_jitter"),
        ({"color_jitter": float("nan")}, "color_jitter"),
        ({"color_jitter": float("inf")}, "color_jitter"),
        ({"trivial_augment": "yes"}, "trivial_augment"),
    ],
)
def test_bad_values_are_refused_by_name(kwargs, name, cub_root):
    with pytest.raises(ValueError, match=name) as err:
        build_train_transform(256, 224, **kwargs)
    if name == "random_resized_crop_scale":
        assert "0 < lo <= hi <= 1" in str(err.value)
    if name == "color_jitter":
        assert ">= 0" in str(err.value)
    with pytest.raises(ValueError, match=f"data.{name}"):
        tiny_datamodule(CUB200DataModule, cub_root, **kwargs)


# ----- the DataModule and the CLI ----------------------------------------------------------------------

DEMO = str(Path(__file__).resolve().parents[1] / "experiments" / "demo.yaml")


def tiny_args(tmp_path: Path, cub_root: Path, *extra: str) -> list[str]:
    """The demo config on the session's generated CUB-layout data, outputs under ``tmp_path``."""
    data = ["--data.class_path", "data_modules.CUB200DataModule", "--data.init_args.root", str(cub_root)]
    sizes = ["--data.init_args.resize_size", "80", "--data.init_args.crop_size", "64", "--data.init_args.num_workers", "0"]
    out = ["--trainer.default_root_dir", str(tmp_path), "--trainer.logger.init_args.save_dir", str(tmp_path)]
    return ["--config", DEMO, *data, *sizes, *out, *extra]



def test_datamodule_batches_with_every_augmentation(cub_root):
    dm = tiny_datamodule(CUB200DataModule, cub_root, random_resized_crop_scale=(0.4, 1.0), color_jitter=0.4, trivial_augment=True, source_size=96)
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 3, 64, 64) and batch["source"].shape == (4, 3, 96, 96)
    boxes = batch["box"]
    ok = ~torch.isnan(boxes).any(dim=1)
    assert ((boxes[ok] >= 0) & (boxes[ok] <= 64)).all()


def test_the_cli_config_path_passes_the_arguments(cub_root, tmp_path, capsys):
    from mgff.cli import MGFFCLI
    from mgff.fit import run as fit_run

    extra = ["--data.init_args.random_resized_crop_scale", "[0.5, 1.0]", "--data.init_args.color_jitter", "0.4", "--data.init_args.trivial_augment", "true"]
    with pytest.raises(SystemExit):
        fit_run(tiny_args(tmp_path, cub_root, *extra, "--print_config"))
    out = capsys.readouterr().out
    assert "random_resized_crop_scale:\n    - 0.5\n    - 1.0" in out and "color_jitter: 0.4" in out and "trivial_augment: true" in out

    class ParseOnlyCLI(MGFFCLI):
        def instantiate_classes(self) -> None:
            pass

    cli = ParseOnlyCLI(run=False, args=tiny_args(tmp_path, cub_root, *extra))
    data = cli.config.as_dict()["data"]
    dm = CUB200DataModule(**data["init_args"])
    assert dm.random_resized_crop_scale == (0.5, 1.0) and dm.color_jitter == 0.4 and dm.trivial_augment is True
    # a value out of range passes the type check and is refused, by name, when the DataModule is built
    bad = cli.parser.parse_args(tiny_args(tmp_path, cub_root, "--data.init_args.random_resized_crop_scale", "[0.0, 1.0]")).as_dict()
    with pytest.raises(ValueError, match="data.random_resized_crop_scale must satisfy 0 < lo <= hi <= 1"):
        CUB200DataModule(**bad["data"]["init_args"])
