"""The two-view control (TwoViewClassifier) and its random boxes: boxes of the areas asked for, crops cut from the
source view, the crop's loss in training only, and a fit on generated data that learns."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch

from data_modules import SyntheticCUBDataModule
from mgff.lit import TwoViewClassifier
from mgff.models.cropper.random_boxes import random_boxes

TINY = dict(backbone="resnet10t", img_size=64, stages=[2, 3, 4], head="linear")


def test_random_boxes_have_the_areas_and_ratios_asked_for_and_stay_inside():
    boxes = random_boxes(4000, 60, 80, area=(0.3, 0.6), ratio=(0.5, 2.0), generator=torch.Generator().manual_seed(0))
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert boxes.shape == (4000, 4) and boxes.dtype == torch.float32
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= 80 + 1e-4).all() and (boxes[:, 3] <= 60 + 1e-4).all()
    fraction = w * h / (60 * 80)
    unclipped = (w < 80 - 1e-3) & (h < 60 - 1e-3)
    assert fraction.max() <= 0.6 + 1e-5 and fraction[unclipped].min() >= 0.3 - 1e-5
    assert abs(fraction[unclipped].mean().item() - 0.45) < 0.02  # uniform in the range
    ratio = (w / h)[unclipped]
    assert ratio.min() >= 0.5 - 1e-4 and ratio.max() <= 2.0 + 1e-4
    square = random_boxes(4000, 80, 80, area=(0.3, 0.6), ratio=(0.5, 2.0), generator=torch.Generator().manual_seed(1))
    log_ratio = ((square[:, 2] - square[:, 0]) / (square[:, 3] - square[:, 1])).log()
    assert abs(log_ratio.mean().item()) < 0.03  # log-uniform around 1 (clipping is symmetric in a square view)
    # every position is used: the centres spread over the view
    assert (boxes[:, 0] + boxes[:, 2]).std() > 10


def test_the_whole_view_is_the_box_of_area_one_and_ratio_of_the_view():
    boxes = random_boxes(3, 60, 80, area=(1.0, 1.0), ratio=(80 / 60, 80 / 60))
    torch.testing.assert_close(boxes, torch.tensor([[0.0, 0.0, 80.0, 60.0]]).repeat(3, 1))


@pytest.mark.parametrize("kwargs, message", [(dict(area=(0.0, 0.5)), "area must satisfy"), (dict(area=(0.6, 0.5)), "area must satisfy"),
                                             (dict(ratio=(2.0, 1.0)), "ratio must satisfy")])
def test_bad_ranges_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        random_boxes(2, 10, 10, **kwargs)
    with pytest.raises(ValueError, match=message):
        TwoViewClassifier(num_classes=3, **TINY, **{f"crop_{k}": v for k, v in kwargs.items()})


def test_the_crop_loss_is_in_training_only_and_crops_come_from_the_source():
    torch.manual_seed(0)
    model = TwoViewClassifier(num_classes=3, crop_from="source", **TINY)
    images = torch.randn(2, 3, 64, 64)
    source = torch.zeros(2, 3, 128, 128, dtype=torch.uint8)
    source[1] = 255  # image 1's source is white: its crop must be white, whatever the view holds
    crops = model.random_crops(images, source)
    assert crops.shape == (2, 3, 64, 64)
    unit = model.input_norm.data_from_unit(torch.ones(1, 3, 1, 1))
    torch.testing.assert_close(crops[1], unit[0].expand(3, 64, 64))
    model.train()
    logits, aux, _ = model.forward_outputs(images, {"source": source})
    assert set(logits) == {"main", "crop"} and model.output_names == ("main", "crop")
    terms = model.loss_terms(logits, aux, torch.tensor([0, 1]))
    assert set(terms) == {"ce", "ce_crop", "aux"} and all(torch.isfinite(v) for v in terms.values())
    sum(terms.values()).backward()
    model.eval()
    logits, _, _ = model.forward_outputs(images, {"source": source})
    assert set(logits) == {"main"} and model.output_names == ("main",)
    torch.testing.assert_close(logits["main"], model(images).logits)  # evaluation is the single-stage model
    with pytest.raises(ValueError, match="needs batch\\['source'\\]"):
        model.train()
        model.forward_outputs(images, {})


@pytest.mark.slow
def test_two_view_fit_learns_well_above_chance(tmp_path):
    L.seed_everything(0, workers=True)
    data = SyntheticCUBDataModule(
        root=tmp_path / "CUB_200_2011", num_classes=4, images_per_class=40, min_side=96, max_side=128, resize_size=80,
        crop_size=64, source_size=128, batch_size=16, num_workers=0, val_fraction=0.1,
    )
    model = TwoViewClassifier(num_classes=data.num_classes, optimizer="adamw", lr=3e-3, weight_decay=0.05, **TINY)
    trainer = L.Trainer(max_epochs=6, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(model, datamodule=data)
    assert math.isfinite(trainer.callback_metrics["train/loss_ce_crop"].item())  # the crop's loss was logged in training
    result = trainer.test(model, datamodule=data, verbose=False)[0]
    assert result["test/acc"] > 2 / data.num_classes, result
    assert "test/crop_acc" not in result  # the test sees the full view only
