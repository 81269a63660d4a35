"""FineGrainedClassifier and TwoStageClassifier as modules: outputs, losses, gradients, optimisation."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import save_file

from mgff.lit import FineGrainedClassifier, TwoStageClassifier
from mgff.lit.optim import warmup_cosine

TINY = dict(backbone="resnet10t", img_size=64, stages=[2, 3, 4], fusion_dim=32, num_heads=2, num_super_nodes=3)
TINY_CROPPER = dict(localization="rollout", cropper="vit_tiny_patch16_224", cropper_kwargs={"depth": 2, "embed_dim": 48, "num_heads": 2}, localize_size=64, crop_size=64)


def batch(n=4, classes=5, size=64):
    g = torch.Generator().manual_seed(0)
    boxes = torch.tensor([[4.0, 4.0, 40.0, 50.0]]).repeat(n, 1)
    boxes[0] = float("nan")  # an image without a ground-truth box
    return {"image": torch.randn(n, 3, size, size, generator=g), "label": torch.arange(n) % classes, "box": boxes, "index": torch.arange(n), "path": [f"img{i}.jpg" for i in range(n)]}


@pytest.mark.parametrize("head", ["linear", "mgff"])
def test_single_stage_outputs_and_loss(head):
    model = FineGrainedClassifier(num_classes=5, head=head, **TINY)
    logits, aux, extras = model.forward_outputs(batch()["image"])
    assert logits["main"].shape == (4, 5) and extras == {}
    terms = model.loss_terms(logits, aux, batch()["label"])
    assert set(terms) == {"ce", "aux"}
    assert all(torch.isfinite(v) for v in terms.values())
    if head == "linear":
        assert terms["aux"].item() == 0.0


def test_gradients_reach_backbone_and_head():
    model = FineGrainedClassifier(num_classes=5, head="mgff", **TINY)
    b = batch()
    logits, aux, _ = model.forward_outputs(b["image"])
    sum(model.loss_terms(logits, aux, b["label"]).values()).backward()
    assert model.backbone.model.conv1[0].weight.grad.abs().sum() > 0
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"no gradient reaches {missing}"
    assert model.head.classifier.weight.grad.abs().sum() > 0


def test_two_stage_outputs_merge_and_boxes():
    model = TwoStageClassifier(num_classes=5, **TINY, **TINY_CROPPER)
    model.eval()
    with torch.no_grad():
        logits, aux, extras = model.forward_outputs(batch()["image"])
    assert set(logits) == {"main", "stage1", "stage2"}
    p = (logits["stage1"].softmax(-1) + logits["stage2"].softmax(-1)) / 2
    torch.testing.assert_close(logits["main"].exp(), p, atol=1e-5, rtol=1e-5)
    box = extras["box"]
    assert box.shape == (4, 4) and (box[:, 2] > box[:, 0]).all() and (box[:, 3] > box[:, 1]).all()
    assert (box >= 0).all() and (box <= 64).all()


def test_two_stage_sum_logits_and_separate_classifier():
    model = TwoStageClassifier(num_classes=5, merge="sum_logits", shared_classifier=False, **TINY, **TINY_CROPPER)
    model.eval()
    with torch.no_grad():
        logits, _, _ = model.forward_outputs(batch()["image"])
    torch.testing.assert_close(logits["main"], logits["stage1"] + logits["stage2"])
    assert model.backbone2 is not None and model.backbone2 is not model.backbone


def test_two_stage_with_a_shared_backbone_and_a_head_of_its_own_for_stage_two():
    model = TwoStageClassifier(num_classes=5, head="mgff", shared_head=False, **TINY, **TINY_CROPPER)
    assert model.backbone2 is None and model.head2 is not None and model.head2 is not model.head
    b = batch()
    logits, aux, _ = model.forward_outputs(b["image"], b)
    sum(model.loss_terms(logits, aux, b["label"]).values()).backward()
    # stage 2's CE reaches head2 and the one backbone; stage 1's head gets its own gradient
    assert model.head2.classifier.weight.grad.abs().sum() > 0 and model.head.classifier.weight.grad.abs().sum() > 0
    in_groups = {id(p): g["role"] for g in model.optimizer_param_groups() for p in g["params"]}
    assert in_groups[id(model.head2.classifier.weight)] == "classifier" and in_groups[id(model.head2.fusion_classifier.weight)] == "fusion"
    assert all(id(p) in in_groups for p in model.parameters() if p.requires_grad)
    # stage 2 runs head2 on the shared backbone's maps of the crops
    crops = torch.randn(2, 3, 64, 64)
    model.eval()
    torch.testing.assert_close(model.classify_crops(crops).logits, model.head2(model.backbone(model.input_norm(crops))).logits)


def test_two_stage_loss_terms_and_trainable_cropper_gets_gradients():
    model = TwoStageClassifier(num_classes=5, cropper_trainable=True, **TINY, **TINY_CROPPER)
    b = batch()
    logits, aux, _ = model.forward_outputs(b["image"])
    terms = model.loss_terms(logits, aux, b["label"])
    assert {"ce1", "ce2", "ce_cropper", "aux"} <= set(terms)
    sum(terms.values()).backward()
    assert model.cropper.vit.patch_embed.proj.weight.grad.abs().sum() > 0
    assert model.output_names == ("main", "stage1", "stage2", "cropper")


def test_frozen_cropper_stays_frozen_and_out_of_the_optimizer():
    model = TwoStageClassifier(num_classes=5, **TINY, **TINY_CROPPER)
    model.train()
    assert not model.cropper.vit.training
    assert all(not p.requires_grad for p in model.cropper.parameters())
    in_groups = {id(p) for g in model.optimizer_param_groups() for p in g["params"]}
    assert not any(id(p) in in_groups for p in model.cropper.parameters())


def test_box_iou_logged_only_for_images_with_boxes():
    model = TwoStageClassifier(num_classes=5, **TINY, **TINY_CROPPER)
    b = batch()
    model.log_extras({"box": b["box"].nan_to_num(0.0)}, b, "val")  # predicted = GT for rows 1..3
    values = model.box_iou["val"].compute()
    assert values["miou"].item() == pytest.approx(1.0) and values["hit_rate"].item() == pytest.approx(1.0)


def test_bf16_autocast_on_cpu():
    model = TwoStageClassifier(num_classes=5, **TINY, **TINY_CROPPER)
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits, _, _ = model.forward_outputs(batch()["image"])
    assert torch.isfinite(logits["main"].float()).all()


def test_local_pretrained_file_loads_into_backbone(tmp_path):
    source = FineGrainedClassifier(num_classes=5, head="linear", **TINY)
    path = tmp_path / "resnet10t.safetensors"
    save_file({k: v.contiguous() for k, v in source.backbone.model.state_dict().items()}, str(path))
    model = FineGrainedClassifier(num_classes=5, head="linear", pretrained=str(path), **TINY)
    torch.testing.assert_close(model.backbone.model.conv1[0].weight, source.backbone.model.conv1[0].weight)


@pytest.mark.parametrize("kwargs, match", [({"num_classes": 1}, "num_classes"), ({"head": "mlp"}, "head"), ({"optimizer": "lion"}, "optimizer"), ({"class_names": ["a"]}, "class_names")])
def test_bad_arguments_are_named(kwargs, match):
    args = dict(num_classes=5, **TINY)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        FineGrainedClassifier(**args)


def test_warmup_cosine_schedule():
    f = warmup_cosine(total_steps=100, warmup_steps=10, min_lr_ratio=0.1)
    assert f(0) == pytest.approx(1 / 11) and f(9) == pytest.approx(10 / 11)
    assert f(10) == pytest.approx(1.0)
    assert f(55) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f(100) == pytest.approx(0.1)


def test_checkpoint_of_another_class_or_size_is_refused_by_name():
    from mgff.lit.classifier import check_compatible_hparams

    current = {"backbone": "resnet10t", "head": "mgff", "num_classes": 5}
    with pytest.raises(ValueError, match=r"saved by a TwoStageClassifier .* not by this FineGrainedClassifier"):
        check_compatible_hparams("FineGrainedClassifier", current, {**current, "_class_path": "mgff.lit.TwoStageClassifier"})
    with pytest.raises(ValueError, match=r"num_classes: checkpoint 200 vs this model 5"):
        check_compatible_hparams("FineGrainedClassifier", current, {**current, "num_classes": 200})
    check_compatible_hparams("FineGrainedClassifier", current, {**current, "_class_path": "mgff.lit.FineGrainedClassifier"})


def test_crop_size_that_a_swin_cannot_take_is_named_at_construction():
    swin = dict(backbone="swin_base_patch4_window12_384", img_size=96, backbone_kwargs={"window_size": 6, "embed_dim": 24, "depths": [1, 1, 2, 1], "num_heads": [1, 2, 3, 4]}, stages=[3], head="linear")
    with pytest.raises(ValueError, match=r"model.init_args.crop_size = 64 does not match the 96x96 input .*model.init_args.img_size = 96"):
        TwoStageClassifier(num_classes=5, **swin, **TINY_CROPPER)  # TINY_CROPPER's crop_size is 64
    TwoStageClassifier(num_classes=5, **swin, **{**TINY_CROPPER, "crop_size": 96})  # equal sizes build


def test_stages_out_of_range_are_named():
    with pytest.raises(ValueError, match=r"model.init_args.stages = \[2, 3, 9\] does not fit backbone 'resnet10t'"):
        FineGrainedClassifier(num_classes=5, **{**TINY, "stages": [2, 3, 9]})


# ----- fusion_training='detached_base': the residual head's base path trained as the linear head alone ------------


def test_detached_base_trains_the_base_path_exactly_as_the_linear_head_alone():
    torch.manual_seed(0)
    mgff = FineGrainedClassifier(num_classes=5, head="mgff", fusion_training="detached_base", dropout=0.0, **TINY)
    linear = FineGrainedClassifier(num_classes=5, head="linear", dropout=0.0, **TINY)
    linear.backbone.load_state_dict(mgff.backbone.state_dict())
    linear.head.norm.load_state_dict(mgff.head.norm.state_dict())
    linear.head.classifier.load_state_dict(mgff.head.classifier.state_dict())
    with torch.no_grad():  # a fused path that already says something, so that joint training would differ
        mgff.head.fusion_classifier.weight.normal_(0, 0.5)
    b = batch()
    mgff.train(), linear.train()
    logits, aux, _ = mgff.forward_outputs(b["image"], b)
    assert set(logits) == {"main", "base"} and mgff.output_names == ("main", "base")
    terms = mgff.loss_terms(logits, aux, b["label"])
    assert set(terms) == {"ce", "ce_base", "aux"}
    sum(terms.values()).backward()
    ref_logits, ref_aux, _ = linear.forward_outputs(b["image"], b)
    sum(linear.loss_terms(ref_logits, ref_aux, b["label"]).values()).backward()
    torch.testing.assert_close(mgff.head.classifier.weight.grad, linear.head.classifier.weight.grad)
    torch.testing.assert_close(mgff.head.norm.weight.grad, linear.head.norm.weight.grad)
    assert mgff.head.fusion_classifier.weight.grad.abs().sum() > 0  # the fused path learns from the combined logits
    # the values are those of joint training: only the gradients differ (train and eval mode alike)
    joint = FineGrainedClassifier(num_classes=5, head="mgff", dropout=0.0, **TINY)
    joint.load_state_dict(mgff.state_dict())
    for mode in (True, False):
        mgff.train(mode), joint.train(mode)
        with torch.no_grad():
            torch.testing.assert_close(mgff(b["image"]).logits, joint(b["image"]).logits)


def test_joint_training_lets_the_combined_loss_reach_the_base_path():
    torch.manual_seed(0)
    model = FineGrainedClassifier(num_classes=5, head="mgff", dropout=0.0, **TINY)
    assert model.output_names == ("main",)
    b = batch()
    logits, aux, _ = model.forward_outputs(b["image"], b)
    model.loss_terms(logits, aux, b["label"])["ce"].backward()
    assert model.head.classifier.weight.grad.abs().sum() > 0


def test_detached_base_in_two_stage_and_two_view_models():
    two_stage = TwoStageClassifier(num_classes=5, head="mgff", fusion_training="detached_base", **TINY, **TINY_CROPPER)
    b = batch()
    logits, aux, _ = two_stage.forward_outputs(b["image"], b)
    assert {"stage1_base", "stage2_base"} <= set(logits) and {"stage1_base", "stage2_base"} <= set(two_stage.output_names)
    assert {"ce1", "ce2", "ce1_base", "ce2_base"} <= set(two_stage.loss_terms(logits, aux, b["label"]))
    from mgff.lit import TwoViewClassifier

    two_view = TwoViewClassifier(num_classes=5, head="mgff", fusion_training="detached_base", crop_from="view", **TINY)
    logits, aux, _ = two_view.forward_outputs(b["image"], b)
    assert set(two_view.loss_terms(logits, aux, b["label"])) == {"ce", "ce_base", "ce_crop", "ce_crop_base", "aux"}
    two_view.eval()
    assert two_view.output_names == ("main", "base")


def test_detached_base_needs_the_residual_head():
    with pytest.raises(ValueError, match="fusion_training='detached_base'.*head='linear'"):
        FineGrainedClassifier(num_classes=5, head="linear", fusion_training="detached_base", **TINY)
    with pytest.raises(ValueError, match="fusion_residual=False"):
        FineGrainedClassifier(num_classes=5, head="mgff", fusion_residual=False, fusion_training="detached_base", **TINY)
    with pytest.raises(ValueError, match="fusion_training must be"):
        FineGrainedClassifier(num_classes=5, fusion_training="boosted", **TINY)
