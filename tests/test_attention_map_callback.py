"""AttentionMapLogger: PNGs every N epochs in the run directory, TensorBoard/`log_image` loggers get
the figure, models without a cropper get one warning, only rank 0 draws, the sanity check is skipped."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import matplotlib

matplotlib.use("Agg")

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from matplotlib.image import imread

from data_modules.cub import CUB200DataModule
from mgff.callbacks import AttentionMapLogger
from mgff.lit import FineGrainedClassifier, TwoStageClassifier

torch.set_num_threads(1)

TINY = dict(backbone="resnet10t", img_size=64, stages=[2, 3, 4], fusion_dim=32, num_heads=2, num_super_nodes=3)
TINY_CROPPER = dict(localization="rollout", cropper="vit_tiny_patch16_224", cropper_kwargs={"depth": 2}, localize_size=64, crop_size=64)


def datamodule(cub_root):
    # val: 1 image per class (4 images), 2 per batch
    return CUB200DataModule(cub_root, resize_size=72, crop_size=64, batch_size=2, num_workers=0)


def two_stage(num_classes=4):
    torch.manual_seed(0)
    return TwoStageClassifier(num_classes=num_classes, **TINY, **TINY_CROPPER)


def trainer(tmp_path, callbacks, logger, max_epochs=2):
    return L.Trainer(
        max_epochs=max_epochs,
        limit_train_batches=1,
        limit_val_batches=2,
        num_sanity_val_steps=1,
        callbacks=callbacks,
        logger=logger,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        accelerator="cpu",
    )


def test_pngs_every_n_epochs_in_the_run_directory(tmp_path, cub_root):
    every_epoch = AttentionMapLogger(every_n_epochs=1, num_images=3, dirname="every1")
    every_second = AttentionMapLogger(every_n_epochs=2, num_images=8, dirname="every2")
    logger = CSVLogger(tmp_path, name="run")
    fit = trainer(tmp_path, [every_epoch, every_second], logger, max_epochs=2)
    fit.fit(two_stage(), datamodule=datamodule(cub_root))

    run_dir = tmp_path / "run" / "version_0"
    assert sorted(p.name for p in (run_dir / "every1").iterdir()) == ["epoch_000.png", "epoch_001.png"]
    assert sorted(p.name for p in (run_dir / "every2").iterdir()) == ["epoch_001.png"]
    assert every_epoch.saved_paths == [run_dir / "every1" / "epoch_000.png", run_dir / "every1" / "epoch_001.png"]
    # 3 images in one row of 2.5-inch columns (map over crop, 5 inches) at 100 dpi; 8 requested but the
    # val split has 4: 4 columns
    first = imread(every_epoch.saved_paths[0])
    assert first.shape[:2] == (500, 750)
    assert imread(every_second.saved_paths[0]).shape[:2] == (500, 1000)
    assert first[..., :3].std() > 0.05  # a picture, not a blank canvas


class ImageLogger(CSVLogger):
    """A logger with a W&B-like ``log_image`` that records its calls."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.images = []

    def log_image(self, key, images, step=None):
        self.images.append((key, images, step))


def test_tensorboard_gets_the_figure_and_log_image_loggers_the_png(tmp_path, cub_root):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    callback = AttentionMapLogger(every_n_epochs=1, num_images=2)
    tensorboard = TensorBoardLogger(tmp_path, name="tb")
    image_logger = ImageLogger(tmp_path, name="img")
    fit = trainer(tmp_path, [callback], [tensorboard, image_logger], max_epochs=1)
    fit.fit(two_stage(), datamodule=datamodule(cub_root))

    png = callback.saved_paths[0]
    assert png == tmp_path / "tb" / "version_0" / "attention_maps" / "epoch_000.png"  # the first logger's dir
    events = EventAccumulator(tensorboard.log_dir)
    events.Reload()
    assert events.Tags()["images"] == ["val/attention_maps"]
    image = events.Images("val/attention_maps")[0]
    assert image.step == fit.global_step == 1 and (image.width, image.height) == (500, 500)
    assert image_logger.images == [("val/attention_maps", [str(png)], 1)]


def test_model_without_cropper_warns_once_and_saves_nothing(tmp_path, cub_root):
    callback = AttentionMapLogger(every_n_epochs=1, num_images=2)
    fit = trainer(tmp_path, [callback], CSVLogger(tmp_path, name="run"), max_epochs=2)
    model = FineGrainedClassifier(num_classes=4, head="linear", **TINY)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit.fit(model, datamodule=datamodule(cub_root))
    ours = [w for w in caught if "AttentionMapLogger" in str(w.message)]
    assert len(ours) == 1 and "FineGrainedClassifier has no localize()" in str(ours[0].message)
    assert not (tmp_path / "run" / "version_0" / "attention_maps").exists()
    assert callback.saved_paths == []


def fake_trainer(tmp_path, **overrides):
    values = dict(
        is_global_zero=True, sanity_checking=False, current_epoch=0, global_step=7, log_dir=str(tmp_path),
        default_root_dir=str(tmp_path), loggers=[], datamodule=None,
    )  # fmt: skip
    values.update(overrides)
    return SimpleNamespace(**values)


def batch(n=3):
    boxes = torch.tensor([[4.0, 4.0, 40.0, 50.0]]).repeat(n, 1)
    boxes[0] = float("nan")
    return {"image": torch.randn(n, 3, 64, 64), "label": torch.arange(n), "box": boxes}


@pytest.mark.parametrize(
    "state",
    [dict(is_global_zero=False), dict(sanity_checking=True), dict(current_epoch=0, every_n_epochs=2)],
    ids=["rank1", "sanity-check", "off-epoch"],
)
def test_nothing_collected_or_drawn_off_duty(tmp_path, state):
    every = state.pop("every_n_epochs", 1)
    callback = AttentionMapLogger(every_n_epochs=every, num_images=2)
    model, fake = two_stage(), fake_trainer(tmp_path, **state)
    callback.on_validation_epoch_start(fake, model)
    callback.on_validation_batch_end(fake, model, None, batch(), 0)
    callback.on_validation_epoch_end(fake, model)
    assert callback._images == [] and callback.saved_paths == []
    assert not (tmp_path / "attention_maps").exists()


def test_collects_only_num_images_across_batches(tmp_path):
    callback = AttentionMapLogger(num_images=4)
    model, fake = two_stage(), fake_trainer(tmp_path, current_epoch=4)
    callback.on_validation_epoch_start(fake, model)
    for index in range(3):
        callback.on_validation_batch_end(fake, model, None, batch(3), index)
    assert [len(images) for images in callback._images] == [3, 1]
    callback.on_validation_epoch_end(fake, model)
    assert callback.saved_paths == [tmp_path / "attention_maps" / "epoch_004.png"]
    assert callback._images == []


def test_arguments_are_checked():
    with pytest.raises(ValueError, match="every_n_epochs"):
        AttentionMapLogger(every_n_epochs=0)
    with pytest.raises(ValueError, match="num_images"):
        AttentionMapLogger(num_images=0)


def test_features_localiser_map_boxes_and_crops_are_drawn(tmp_path, monkeypatch):
    import mgff.callbacks.attention_maps as attention_maps

    drawn = {}
    real_panel = attention_maps.localization_panel

    def recording_panel(images, responses, boxes, crops, gt_boxes=None, **kwargs):
        drawn.update(images=images, responses=responses, boxes=boxes, crops=crops, gt_boxes=gt_boxes, **kwargs)
        return real_panel(images, responses, boxes, crops, gt_boxes, **kwargs)

    monkeypatch.setattr(attention_maps, "localization_panel", recording_panel)
    torch.manual_seed(0)
    model = TwoStageClassifier(num_classes=4, localization="features", crop_size=48, **TINY).eval()
    callback, fake = AttentionMapLogger(num_images=3), fake_trainer(tmp_path)
    data = batch(3)
    callback.on_validation_epoch_start(fake, model)
    callback.on_validation_batch_end(fake, model, None, data, 0)
    callback.on_validation_epoch_end(fake, model)
    with torch.no_grad():
        expected = model.localize(data["image"])
    # the features localiser's own response map and boxes, the ground truth, the crops at their real size
    torch.testing.assert_close(drawn["responses"], expected.response)
    torch.testing.assert_close(drawn["boxes"], expected.boxes)
    torch.testing.assert_close(drawn["gt_boxes"], data["box"], equal_nan=True)
    assert drawn["crops"].shape == (3, 3, 48, 48)
    x1, y1, x2, y2 = expected.boxes[1].tolist()
    assert drawn["crop_titles"][1] == f"{x2 - x1:.0f} x {y2 - y1:.0f} px of the view\n-> 48 px"
    assert "IoU" not in drawn["titles"][0] and "IoU" in drawn["titles"][1]  # image 0 has no ground-truth box
    assert callback.saved_paths == [tmp_path / "attention_maps" / "epoch_000.png"]


@pytest.mark.parametrize("crop_from", ["source", "auto"])
def test_crop_titles_give_the_box_in_the_source_frame(crop_from):
    model = SimpleNamespace(hparams=SimpleNamespace(crop_from=crop_from))
    model.crop_frame = lambda source: TwoStageClassifier.crop_frame(model, source)
    boxes = torch.tensor([[0.0, 0.0, 32.0, 16.0]])
    titles = AttentionMapLogger._crop_titles(model, boxes, torch.zeros(1, 3, 64, 64), torch.zeros(1, 3, 256, 256), 64)
    assert titles == ["128 x 64 px of the source\n-> 64 px"]
    view_titles = ["32 x 16 px of the view\n-> 64 px"]
    if crop_from == "auto":  # no source in the batch: the view
        assert AttentionMapLogger._crop_titles(model, boxes, torch.zeros(1, 3, 64, 64), None, 64) == view_titles
    model.hparams.crop_from = "view"  # a source in the batch, not used
    assert AttentionMapLogger._crop_titles(model, boxes, torch.zeros(1, 3, 64, 64), torch.zeros(1, 3, 256, 256), 64) == view_titles
