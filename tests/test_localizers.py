"""The localisers without a second network: ``features`` (the stage-1 network's own maps) and
``ground_truth`` (the oracle), as functions and inside TwoStageClassifier; and the ViT cropper's
``layer_fusion`` reached from the model."""

import pytest
import torch

from mgff.lit import FineGrainedClassifier, TwoStageClassifier
from mgff.models.cropper.crops import crop_and_resize
from mgff.models.cropper.feature_localizer import (
    FeatureLocalizer, activation_energy, attention_received_map, class_activation_map, refined_energy,
)
from mgff.models.cropper.ground_truth import box_masks, ground_truth_localization
from mgff.models.heads import LinearHead

torch.set_num_threads(1)

TINY = dict(backbone="resnet10t", img_size=64, stages=[2, 3, 4], fusion_dim=32, num_heads=2, num_super_nodes=3, num_classes=3)
TINY_VIT = dict(cropper="vit_tiny_patch16_224", cropper_kwargs={"depth": 2}, localize_size=64, crop_size=64)


def hot_block_map(batch=2, channels=4, size=8, block=(2, 5, 1, 4)):
    """``(B, C, size, size)`` zeros with ones on rows ``block[0]:block[1]``, columns ``block[2]:block[3]``."""
    maps = torch.zeros(batch, channels, size, size)
    y1, y2, x1, x2 = block
    maps[:, :, y1:y2, x1:x2] = 1.0
    return maps


# ----- response maps ------------------------------------------------------------------------------
def test_activation_energy_is_the_channel_sum():
    maps = torch.rand(2, 5, 3, 4)
    energy = activation_energy(maps)
    assert energy.shape == (2, 3, 4)
    torch.testing.assert_close(energy, maps.sum(dim=1))
    changed = maps.clone()
    changed[1, 2, 0, 0] += 1.0
    assert activation_energy(changed)[1, 0, 0] == pytest.approx(float(energy[1, 0, 0]) + 1.0)
    with pytest.raises(ValueError, match=r"\(B, C, h, w\)"):
        activation_energy(torch.rand(5, 3, 4))


def naive_refined_energy(last_map, finer_map, iterations, seed_fraction=0.5):
    """One image at a time, position by position: the reference for :func:`refined_energy`."""
    out = []
    for last, finer in zip(last_map, finer_map):
        energy = last.sum(dim=0)
        energy = (energy - energy.min()) / (energy.max() - energy.min())
        seed = torch.nn.functional.interpolate(energy[None, None], size=finer.shape[-2:], mode="bilinear", align_corners=False)[0, 0]
        seed = (seed - seed.min()) / (seed.max() - seed.min())
        vectors = [[finer[:, y, x] / finer[:, y, x].norm() for x in range(finer.shape[2])] for y in range(finer.shape[1])]
        inside = [[bool(seed[y, x] >= seed_fraction * seed.max()) for x in range(finer.shape[2])] for y in range(finer.shape[1])]
        for _ in range(iterations):
            obj = sum(v for row, flags in zip(vectors, inside) for v, f in zip(row, flags) if f)
            bg = sum((v for row, flags in zip(vectors, inside) for v, f in zip(row, flags) if not f), torch.zeros(finer.shape[0]))
            obj, bg = obj / obj.norm(), bg / bg.norm().clamp_min(1e-12)
            contrast = torch.tensor([[float(v @ obj - v @ bg) for v in row] for row in vectors])
            inside = (contrast > 0).tolist()
        out.append((contrast - contrast.min()) / (contrast.max() - contrast.min()) * seed)
    return torch.stack(out)


@pytest.mark.parametrize("iterations, seed_fraction", [(1, 0.5), (3, 0.5), (3, 0.2)])
def test_refined_energy_matches_a_loop_over_images_and_positions(iterations, seed_fraction):
    torch.manual_seed(0)
    last, finer = torch.rand(3, 6, 4, 4), torch.randn(3, 5, 8, 8)
    refined = refined_energy(last, finer, iterations, seed_fraction)
    assert refined.shape == (3, 8, 8) and refined.dtype == torch.float32
    torch.testing.assert_close(refined, naive_refined_energy(last, finer, iterations, seed_fraction), atol=1e-5, rtol=1e-5)


def test_refined_energy_starts_from_the_seed_peak_not_its_mean():
    # a bird (direction 0) on a perch (direction 2) in the sky (direction 1); the late map fires on the bird and,
    # half as strongly, on the perch: the perch sits above the seed's mean but below its half-maximum
    last = torch.zeros(1, 1, 4, 4)
    last[0, 0, 1, 1] = 1.0   # bird
    last[0, 0, 2, 1] = 0.45  # perch
    finer = torch.zeros(1, 3, 4, 4)
    finer[0, 1] = 1.0
    finer[0, :, 1, 1] = torch.tensor([1.0, 0.0, 0.0])
    finer[0, :, 2, 1] = torch.tensor([0.0, 0.0, 1.0])
    half_max, low = refined_energy(last, finer, 1), refined_energy(last, finer, 1, seed_fraction=0.1)
    # a start as low as the mean takes the perch into the object prototype: it looks as much like the object
    # as the bird does (contrast 1 after min-max), so it keeps all of its seed, 0.45
    assert float(low[0, 1, 1]) == pytest.approx(1.0) and float(low[0, 2, 1]) == pytest.approx(0.45, abs=1e-5)
    # from the half-maximum the object prototype is the bird's alone; the perch is nearer the background
    assert float(half_max[0, 1, 1]) == pytest.approx(1.0) and float(half_max[0, 2, 1]) < 0.25


def test_refined_energy_takes_the_object_shape_from_the_finer_map():
    # the late 2x2 map fires on its top-left cell; on the finer 4x4 grid the object's features (direction
    # 0) fill only the left column of that cell, the rest is background (direction 1)
    last = torch.zeros(1, 3, 2, 2)
    last[:, :, 0, 0] = 1.0
    finer = torch.zeros(1, 2, 4, 4)
    finer[:, 1] = 1.0
    finer[:, :, 0:2, 0] = torch.tensor([1.0, 0.0])[:, None]
    refined = refined_energy(last, finer)
    assert (refined[0, 0:2, 0] > 0.5).all()
    assert float(refined[0].flatten().topk(3).values[-1]) == 0.0  # only those two positions respond
    # the finer map matters: the object one column over moves the response with it
    moved = torch.zeros(1, 2, 4, 4)
    moved[:, 1] = 1.0
    moved[:, :, 0:2, 1] = torch.tensor([1.0, 0.0])[:, None]
    assert (refined_energy(last, moved)[0, 0:2, 1] > 0.5).all() and float(refined_energy(last, moved)[0, 0:2, 0].max()) == 0.0
    # and the boxes: energy boxes the whole hot cell, refined only the object's column
    localizer = dict(padding=0.0, min_size=0.0)
    _, energy_box = FeatureLocalizer("energy", **localizer)([finer, last], (64, 64))
    _, refined_box = FeatureLocalizer("refined", **localizer)([finer, last], (64, 64))
    assert float(energy_box[0, 2]) >= 30 and float(refined_box[0, 2]) <= 24  # the column ends at 16 px; bilinear spreads it


def test_refined_energy_without_background_and_bad_input():
    # a flat seed marks every position as the object: no background prototype, still finite
    refined = refined_energy(torch.ones(2, 3, 2, 2), torch.randn(2, 4, 4, 4))
    assert torch.isfinite(refined).all()
    with pytest.raises(ValueError, match="iterations"):
        refined_energy(torch.rand(1, 3, 2, 2), torch.rand(1, 3, 4, 4), iterations=0)
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match=r"seed_fraction must lie in \(0, 1\], got " + str(bad)):
            refined_energy(torch.rand(1, 3, 2, 2), torch.rand(1, 3, 4, 4), seed_fraction=bad)
    with pytest.raises(ValueError, match=r"\(B, C, h, w\)"):
        refined_energy(torch.rand(3, 2, 2), torch.rand(1, 3, 4, 4))
    with pytest.raises(ValueError, match="model.stages"):
        FeatureLocalizer("refined")([torch.rand(1, 3, 2, 2)], (64, 64))


def test_class_activation_map_averages_to_the_logit_minus_bias():
    torch.manual_seed(0)
    head = LinearHead([6], [32], num_classes=4).eval()
    torch.nn.init.normal_(head.classifier.bias)
    maps = torch.randn(3, 6, 5, 5)
    logits = head([maps]).logits
    classes = torch.tensor([0, 3, 1])
    cam = class_activation_map(maps, head, classes)
    assert cam.shape == (3, 5, 5)
    expected = logits.gather(1, classes[:, None]).squeeze(1) - head.classifier.bias[classes]
    torch.testing.assert_close(cam.mean(dim=(1, 2)), expected, atol=1e-5, rtol=1e-5)
    # the class matters: another class's weights give another map
    assert not torch.allclose(cam, class_activation_map(maps, head, torch.tensor([1, 0, 2])))


def test_class_activation_map_refuses_a_head_without_a_linear_classifier():
    with pytest.raises(ValueError, match="head='linear'"):
        class_activation_map(torch.randn(1, 6, 2, 2), torch.nn.Identity(), torch.tensor([0]))


def test_attention_received_map_known_answer():
    # 2 positions on a 1x2 grid; every query attends only to position 1 in scale 0, evenly in scale 1
    first = torch.tensor([[0.0, 1.0], [0.0, 1.0]]).expand(1, 2, 2, 2)
    second = torch.full((1, 2, 2, 2), 0.5)
    received = attention_received_map([first, None, second], (1, 2))
    torch.testing.assert_close(received, torch.tensor([[[0.25, 0.75]]]))
    with pytest.raises(ValueError, match="attention='mhsa'"):
        attention_received_map([None], (1, 2))


# ----- FeatureLocalizer ---------------------------------------------------------------------------
def test_feature_localizer_boxes_the_hot_region_in_image_pixels():
    localizer = FeatureLocalizer("energy", padding=0.0, min_size=0.0)
    response, boxes = localizer([hot_block_map(block=(2, 5, 1, 4))], (64, 64))
    assert response.shape == (2, 64, 64) and 0.0 <= float(response.min()) and float(response.max()) == 1.0
    # the block spans grid cells 1..3 (x) and 2..4 (y) of an 8x8 grid on a 64 px image: 8 px per cell;
    # bilinear upsampling spreads the edge by less than a cell
    for box in boxes:
        x1, y1, x2, y2 = box.tolist()
        assert 4 <= x1 <= 12 and 28 <= x2 <= 36 and 12 <= y1 <= 20 and 36 <= y2 <= 44
    # the map matters: a block elsewhere moves the box
    _, moved = localizer([hot_block_map(block=(5, 8, 5, 8))], (64, 64))
    assert (moved[:, 0] > boxes[:, 2]).all()


def test_feature_localizer_rejects_bad_options_and_missing_inputs():
    with pytest.raises(ValueError, match="feature_response"):
        FeatureLocalizer("saliency")
    with pytest.raises(ValueError, match="threshold"):
        FeatureLocalizer("energy", threshold=2.0)
    with pytest.raises(ValueError, match="needs the classification head"):
        FeatureLocalizer("cam")([hot_block_map()], (64, 64))
    with pytest.raises(ValueError, match="logits"):
        FeatureLocalizer("cam")([hot_block_map()], (64, 64), head=LinearHead([4], [32], 3))
    with pytest.raises(ValueError, match="head='mgff'"):
        FeatureLocalizer("attention")([hot_block_map()], (64, 64), head=LinearHead([4], [32], 3))


# ----- ground truth -------------------------------------------------------------------------------
def test_ground_truth_localization_clips_and_masks():
    boxes = torch.tensor([[-4.0, 2.0, 10.0, 70.0], [1.0, 1.0, 3.0, 2.0]])
    response, clipped = ground_truth_localization(boxes, (64, 48))
    torch.testing.assert_close(clipped, torch.tensor([[0.0, 2.0, 10.0, 64.0], [1.0, 1.0, 3.0, 2.0]]))
    assert response.shape == (2, 64, 48)
    assert response[1].sum() == 2 and response[1, 1, 1:3].tolist() == [1.0, 1.0]
    torch.testing.assert_close(response, box_masks(clipped, (64, 48)))


@pytest.mark.parametrize(
    "boxes, message",
    [(None, "needs batch\\['box'\\]"), (torch.tensor([[0.0, 0.0, 5.0, 5.0], [float("nan")] * 4]), "no ground-truth box"),
     (torch.tensor([[70.0, 0.0, 80.0, 5.0]]), "is empty"), (torch.zeros(2, 3), "must be \\(B, 4\\)")],
)
def test_ground_truth_localization_refuses_missing_boxes(boxes, message):
    with pytest.raises(ValueError, match=message):
        ground_truth_localization(boxes, (64, 64))


# ----- inside the two-stage model -----------------------------------------------------------------
def count_backbone_calls(model):
    calls = []
    model.backbone.register_forward_hook(lambda *_: calls.append(1))
    return calls


def test_features_localization_stores_no_second_network_and_runs_the_backbone_twice():
    torch.manual_seed(0)
    model = TwoStageClassifier(localization="features", **TINY).eval()
    single = FineGrainedClassifier(**TINY)
    assert model.cropper is None
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in single.parameters())
    calls = count_backbone_calls(model)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        logits, _, extras = model.forward_outputs(images)
    assert len(calls) == 2  # stage 1 (whose maps the localiser reads) and stage 2: no third pass
    assert set(logits) == {"main", "stage1", "stage2"} and extras["box"].shape == (2, 4)
    with torch.no_grad():
        torch.testing.assert_close(model.localize(images).boxes, extras["box"])


def test_features_localization_reads_stage_one_maps():
    torch.manual_seed(0)
    model = TwoStageClassifier(localization="features", feature_response="energy", box_padding=0.0, min_box_size=0.0, **TINY).eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        output, maps = model.stage1_with_maps(images)
        torch.testing.assert_close(output.logits, model(images).logits)
        hot = [m.clone() for m in maps]
        hot[-1] = hot_block_map(2, maps[-1].shape[1], maps[-1].shape[-1], block=(0, 1, 0, 1))
        found = model.localize(images, stage1=(output, hot))
    # the box comes from the maps it is given: a hot top-left cell gives a top-left box
    assert (found.boxes[:, :2] == 0).all() and (found.boxes[:, 2:] <= 32).all()  # a 2x2 grid on 64 px
    torch.testing.assert_close(found.crops, crop_and_resize(images, found.boxes, 64))


@pytest.mark.parametrize("head, response", [("linear", "cam"), ("mgff", "attention")])
def test_features_localization_head_responses(head, response):
    torch.manual_seed(0)
    model = TwoStageClassifier(localization="features", feature_response=response, head=head, **TINY).eval()
    with torch.no_grad():
        found = model.localize(torch.randn(2, 3, 64, 64))
    assert found.response.shape == (2, 64, 64) and found.boxes.shape == (2, 4)
    other = "attention" if response == "cam" else "cam"
    with pytest.raises(ValueError, match=f"feature_response='{other}'"):
        TwoStageClassifier(localization="features", feature_response=other, head=head, **TINY)


def test_features_localize_size_runs_one_more_pass_on_the_source_view():
    torch.manual_seed(0)
    model = TwoStageClassifier(localization="features", localize_size=128, **TINY).eval()
    calls = count_backbone_calls(model)
    images = torch.randn(2, 3, 64, 64)
    source = torch.randint(0, 256, (2, 3, 128, 128), dtype=torch.uint8)
    seen = []
    model.backbone.register_forward_pre_hook(lambda m, inp: seen.append(tuple(inp[0].shape[-2:])))
    with torch.no_grad():
        model.forward_outputs(images)
        assert len(calls) == 3 and seen == [(64, 64), (128, 128), (64, 64)]
        from_images = model.localize(images).boxes
        from_source = model.localize(images, source=source).boxes
    assert from_source.shape == (2, 4) and not torch.equal(from_images, from_source)  # the source is what it reads


def test_ground_truth_localization_crops_the_batch_box():
    torch.manual_seed(0)
    model = TwoStageClassifier(localization="ground_truth", **TINY).eval()
    images = torch.randn(2, 3, 64, 64)
    boxes = torch.tensor([[4.0, 8.0, 40.0, 50.0], [0.0, 0.0, 64.0, 30.0]])
    with torch.no_grad():
        found = model.localize(images, boxes=boxes)
        _, _, extras = model.forward_outputs(images, {"box": boxes})
    torch.testing.assert_close(found.boxes, boxes)
    torch.testing.assert_close(extras["box"], boxes)
    torch.testing.assert_close(found.crops, crop_and_resize(images, boxes, 64))
    with pytest.raises(ValueError, match="ground_truth"):
        model.forward_outputs(images, {})


def test_localization_options_are_checked():
    with pytest.raises(ValueError, match="model.localization"):
        TwoStageClassifier(localization="saliency", **TINY)
    with pytest.raises(ValueError, match="cropper_trainable"):
        TwoStageClassifier(localization="features", cropper_trainable=True, **TINY)
    with pytest.raises(ValueError, match="attention='mhsa'"):
        TwoStageClassifier(localization="features", feature_response="attention", attention="hilo", **TINY)


def test_layer_fusion_reaches_the_vit_cropper():
    images = torch.randn(2, 3, 64, 64)
    responses = {}
    for fusion in ("product", "mean"):
        torch.manual_seed(0)
        model = TwoStageClassifier(localization="column_sum", layer_fusion=fusion, **TINY, **TINY_VIT).eval()
        assert model.cropper.layer_fusion == fusion
        with torch.no_grad():
            responses[fusion] = model.localize(images).response
    assert not torch.allclose(responses["product"], responses["mean"])
    with pytest.raises(ValueError, match="layer_fusion"):
        TwoStageClassifier(localization="column_sum", layer_fusion="max", **TINY, **TINY_VIT)


def test_two_stage_from_a_stage_one_checkpoint(tmp_path):
    torch.manual_seed(0)
    single = FineGrainedClassifier(**TINY, head="linear").eval()
    path = tmp_path / "single.ckpt"
    torch.save({"hyper_parameters": dict(single.hparams), "state_dict": single.state_dict()}, path)
    model = TwoStageClassifier.from_stage1_checkpoint(path, feature_response="cam").eval()
    assert model.hparams.localization == "features" and model.feature_localizer.response == "cam"
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(images).logits, single(images).logits)  # the checkpoint's weights
    torch.save({"hyper_parameters": dict(single.hparams), "state_dict": {}}, path)
    with pytest.raises(ValueError, match="lacks"):
        TwoStageClassifier.from_stage1_checkpoint(path)


@pytest.mark.parametrize("head, response", [("linear", "refined"), ("mgff", "energy"), ("linear", "cam"), ("mgff", "attention")])
def test_features_localization_under_bf16_autocast_trains(head, response):
    torch.manual_seed(0)
    model = TwoStageClassifier(localization="features", feature_response=response, head=head, **TINY)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, _, extras = model.forward_outputs(torch.randn(2, 3, 64, 64))
    assert extras["box"].dtype == torch.float32 and torch.isfinite(extras["box"]).all()
    logits["main"].float().logsumexp(-1).mean().backward()
    assert model.backbone.model.conv1[0].weight.grad is not None


def test_box_metric_is_computed_on_a_rank_that_saw_no_box_when_another_rank_did(monkeypatch):
    """Under DDP ``BoxIoU.compute`` is collective: a rank whose whole epoch was skipped images (no
    update) must still call it once any rank saw a box, else the other ranks wait for it forever."""
    from types import SimpleNamespace

    model = TwoStageClassifier(localization="features", **TINY)
    decisions = []

    def any_rank(decision, all=True):
        decisions.append((decision, all))
        return True  # another rank saw boxes

    strategy = SimpleNamespace(reduce_boolean_decision=any_rank)
    monkeypatch.setattr(TwoStageClassifier, "trainer", property(lambda self: SimpleNamespace(strategy=strategy)))
    computed = []
    metric = model.box_iou["val"]
    monkeypatch.setattr(metric, "compute", lambda: computed.append(1) or {"miou": torch.tensor(float("nan")), "hit_rate": torch.tensor(float("nan"))})
    model._log_box_iou("val")
    assert decisions == [(False, False)]  # this rank had no update and asked whether any rank had one
    assert computed == [1]
