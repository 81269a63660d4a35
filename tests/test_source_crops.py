"""Stage 2 cut from the source view (issue 13 §3): batches carry it, the model maps boxes and crops from it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from data_modules import CUB200DataModule
from mgff.lit import TwoStageClassifier

TINY = dict(backbone="resnet10t", img_size=64, stages=[2, 3, 4], head="linear")
TINY_CROPPER = dict(localization="rollout", cropper="vit_tiny_patch16_224", cropper_kwargs={"depth": 1, "embed_dim": 32, "num_heads": 2}, localize_size=64, crop_size=32)
MEAN, STD = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def views(seed: int = 0):
    """A ``(2, 3, 64, 64)`` normalised view and its source at 256 px: the view is the source area-downsampled."""
    source = (torch.rand(2, 3, 256, 256, generator=torch.Generator().manual_seed(seed)) * 255).round()
    source = F.interpolate(F.interpolate(source, size=32, mode="bilinear"), size=256, mode="bilinear").round().clamp(0, 255)  # smooth
    view = (F.interpolate(source / 255, size=64, mode="area") - MEAN) / STD
    return view, source.to(torch.uint8)


def test_crop_from_source_matches_crop_from_view_on_smooth_images():
    """Boxes in view pixels are scaled to the source frame: same region, same normalisation."""
    view, source = views()
    boxes = torch.tensor([[8.0, 4.0, 40.0, 36.0], [20.0, 16.0, 60.0, 64.0]])
    from_view = TwoStageClassifier(num_classes=3, crop_from="view", **TINY, **TINY_CROPPER).cut_crops(view, boxes)
    from_source = TwoStageClassifier(num_classes=3, crop_from="source", **TINY, **TINY_CROPPER).cut_crops(view, boxes, source)
    assert from_source.shape == from_view.shape == (2, 3, 32, 32) and from_source.dtype == view.dtype
    assert (from_source - from_view).abs().mean() < 0.05


def test_crop_from_source_holds_detail_the_view_lost():
    """A fine pattern at source resolution survives in the source crop and is averaged away in the view."""
    source = torch.zeros(1, 3, 256, 256, dtype=torch.uint8)
    source[..., (torch.arange(256) % 4) < 2, :] = 255  # two-pixel stripes: one period per view pixel
    view = (F.interpolate(source.float() / 255, size=64, mode="area") - MEAN) / STD
    boxes = torch.tensor([[16.0, 16.0, 32.0, 32.0]])  # 16 view px -> 64 source px -> 32 crop px: a stripe per 2 rows
    model = TwoStageClassifier(num_classes=3, crop_from="source", **TINY, **TINY_CROPPER)
    spatial_std = lambda crops: crops.std(dim=(-2, -1))  # noqa: E731  (per image and channel)
    assert spatial_std(model.cut_crops(view, boxes, source)).min() > 1.0
    model.hparams.crop_from = "view"
    assert spatial_std(model.cut_crops(view, boxes, source)).max() < 0.01


def test_source_needed_and_checked():
    view, source = views()
    model = TwoStageClassifier(num_classes=3, crop_from="source", **TINY, **TINY_CROPPER)
    boxes = torch.tensor([[0.0, 0.0, 32.0, 32.0]] * 2)
    with pytest.raises(ValueError, match="crop_from='source' needs batch\\['source'\\]: set data.source_size"):
        model.cut_crops(view, boxes)
    with pytest.raises(ValueError, match="does not match the images"):
        model.cut_crops(view, boxes, source[:1])
    with pytest.raises(ValueError, match=r"model.crop_from must be one of \('auto', 'view', 'source'\), got 'photo'"):
        TwoStageClassifier(num_classes=3, crop_from="photo", **TINY, **TINY_CROPPER)


def test_auto_crops_from_the_source_where_the_batch_has_one():
    """The default ``crop_from: auto`` is ``source`` with a source view in the batch and ``view`` without one."""
    view, source = views()
    boxes = torch.tensor([[8.0, 4.0, 40.0, 36.0], [20.0, 16.0, 60.0, 64.0]])
    auto = TwoStageClassifier(num_classes=3, **TINY, **TINY_CROPPER)
    assert auto.hparams.crop_from == "auto"
    assert auto.crop_frame(source) == "source" and auto.crop_frame(None) == "view"
    explicit = {c: TwoStageClassifier(num_classes=3, crop_from=c, **TINY, **TINY_CROPPER) for c in ("view", "source")}
    torch.testing.assert_close(auto.cut_crops(view, boxes, source), explicit["source"].cut_crops(view, boxes, source))
    torch.testing.assert_close(auto.cut_crops(view, boxes), explicit["view"].cut_crops(view, boxes))
    assert not torch.allclose(auto.cut_crops(view, boxes, 255 - source), auto.cut_crops(view, boxes))


def test_forward_uses_the_batch_source():
    view, source = views()
    model = TwoStageClassifier(num_classes=3, crop_from="source", **TINY, **TINY_CROPPER).eval()
    with torch.no_grad():
        logits, _, extras = model.forward_outputs(view, {"source": source})
        other, _, _ = model.forward_outputs(view, {"source": 255 - source})
    assert logits["stage2"].shape == (2, 3)
    torch.testing.assert_close(logits["stage1"], other["stage1"])
    assert not torch.allclose(logits["stage2"], other["stage2"])


def test_datamodule_yields_aligned_source_batches(cub_root):
    data = CUB200DataModule(root=cub_root, resize_size=72, crop_size=64, source_size=128, num_workers=0, batch_size=4)
    data.setup("fit")
    for loader in (data.train_dataloader(), data.val_dataloader()):
        batch = next(iter(loader))
        assert batch["source"].shape == (4, 3, 128, 128) and batch["source"].dtype == torch.uint8
        # the view is the source resized: same content at half the side
        restored = (F.interpolate(batch["source"].float() / 255, size=64, mode="area") - MEAN) / STD
        assert (restored - batch["image"]).abs().mean() < 0.02
    plain = CUB200DataModule(root=cub_root, resize_size=72, crop_size=64, num_workers=0, batch_size=4)
    plain.setup("fit")
    assert "source" not in next(iter(plain.val_dataloader()))
    with pytest.raises(ValueError, match="data.source_size \\(32\\) must be at least data.crop_size \\(64\\)"):
        CUB200DataModule(root=cub_root, resize_size=72, crop_size=64, source_size=32)
