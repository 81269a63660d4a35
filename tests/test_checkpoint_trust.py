"""Checkpoints as untrusted input and as self-contained files.

- A crafted checkpoint (it passes ``torch.load(weights_only=True)``) whose hyperparameters name a class
  to build -- ``subprocess.Popen`` writing a marker file -- is refused with an error naming the key, on
  ``load_from_checkpoint`` and on ``python -m mgff predict --ckpt_path``, and the marker never appears.
- A checkpoint loads without the initial pretrained weights: the local weights file deleted, the hub
  unreachable.
- A checkpoint tested on data whose classes come in another order is remapped; another set of classes
  is refused with the differences listed.
"""

from __future__ import annotations

import logging
import sys

import pytest
import torch
from safetensors.torch import save_file

from mgff.cli import main as cli_main
from mgff.lit import FineGrainedClassifier, TwoStageClassifier
from mgff.lit.checkpoint import UntrustedCheckpointError, class_order_map

TINY = dict(backbone="resnet10t", img_size=64, stages=[4], head="linear")
TINY_CROPPER = dict(localization="rollout", cropper="vit_tiny_patch16_224", cropper_kwargs={"depth": 1, "embed_dim": 48, "num_heads": 2}, localize_size=64, crop_size=64)
NAMES = ["a", "b", "c"]


def save_checkpoint(path, model, **hparams_update):
    """A checkpoint as the CLI writes one (``_class_path`` and ``_instantiator`` included), then edited."""
    hparams = {
        "_instantiator": "lightning.pytorch.cli.instantiate_module",
        "_class_path": f"mgff.lit.{type(model).__name__}",
        **dict(model.hparams),
        **hparams_update,
    }
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": hparams, "pytorch-lightning_version": "2.6.6"}, path)
    torch.load(path, weights_only=True)  # the crafted file is not stopped by weights_only
    return path


def popen(marker):
    return {"class_path": "subprocess.Popen", "init_args": {"args": f"echo pwned > {marker}", "shell": True}}


@pytest.fixture(scope="module")
def tiny_model():
    return FineGrainedClassifier(num_classes=3, class_names=NAMES, **TINY)


@pytest.fixture(scope="module")
def tiny_two_stage():
    return TwoStageClassifier(num_classes=3, class_names=NAMES, **TINY, **TINY_CROPPER)


@pytest.mark.parametrize("where", ["backbone_kwargs", "cropper_kwargs", "extra_key", "nested_list"])
def test_checkpoint_naming_a_class_is_refused_and_runs_nothing(where, tiny_two_stage, tmp_path):
    marker = tmp_path / "marker"
    evil = {
        "backbone_kwargs": {"backbone_kwargs": {"x": popen(marker)}},
        "cropper_kwargs": {"cropper_kwargs": {**TINY_CROPPER["cropper_kwargs"], "x": popen(marker)}},
        "extra_key": {"x": popen(marker)},  # an unknown key goes to the two-stage model's **kwargs
        "nested_list": {"backbone_kwargs": {"x": [1, {"y": popen(marker)}]}},
    }[where]
    path = save_checkpoint(tmp_path / "evil.ckpt", tiny_two_stage, **evil)
    with pytest.raises(UntrustedCheckpointError, match=r"class_path = 'subprocess.Popen' asks to build an object"):
        TwoStageClassifier.load_from_checkpoint(path)
    assert not marker.exists()


def test_predict_from_a_crafted_checkpoint_runs_nothing(tiny_model, tmp_path, cub_root):
    marker = tmp_path / "marker"
    path = save_checkpoint(tmp_path / "evil.ckpt", tiny_model, backbone_kwargs={"x": popen(marker)})
    args = ["predict", "--ckpt_path", str(path), "--model", "mgff.lit.FineGrainedClassifier", "--data", "data_modules.CUB200DataModule", "--data.root", str(cub_root),
            "--data.num_workers", "0", "--trainer.default_root_dir", str(tmp_path), "--trainer.logger", "false"]
    with pytest.raises(UntrustedCheckpointError, match=r"hyper_parameters.backbone_kwargs.x.class_path"):
        cli_main(args)
    assert not marker.exists()


def test_checkpoint_naming_a_module_to_import_is_refused(tiny_model, tmp_path):
    assert "antigravity" not in sys.modules
    path = save_checkpoint(tmp_path / "evil.ckpt", tiny_model, _class_path="antigravity.Anything")
    with pytest.raises(UntrustedCheckpointError, match=r"_class_path 'antigravity.Anything' is not an imported subclass"):
        FineGrainedClassifier.load_from_checkpoint(path)
    assert "antigravity" not in sys.modules  # naming a module did not import it


def test_checkpoint_choosing_its_instantiator_is_not_used(tiny_model, tmp_path):
    path = save_checkpoint(tmp_path / "ckpt.ckpt", tiny_model, _instantiator="builtins.exec")
    model = FineGrainedClassifier.load_from_checkpoint(path)  # the instantiator is ignored, not called
    torch.testing.assert_close(model.state_dict(), tiny_model.state_dict())


def test_loading_reads_no_pretrained_weights_file(tmp_path):
    source = FineGrainedClassifier(num_classes=3, **TINY)
    weights = tmp_path / "resnet10t.safetensors"
    save_file({k: v.contiguous() for k, v in source.backbone.model.state_dict().items()}, str(weights))
    trained = FineGrainedClassifier(num_classes=3, pretrained=str(weights), **TINY)
    with torch.no_grad():
        trained.head.classifier.weight.add_(1.0)  # "training" moved the weights away from the file's
    path = save_checkpoint(tmp_path / "trained.ckpt", trained)
    weights.unlink()
    model = FineGrainedClassifier.load_from_checkpoint(path)
    assert model.hparams.pretrained == str(weights)  # the record of how it started is kept
    torch.testing.assert_close(model.state_dict(), trained.state_dict())


def test_loading_does_not_touch_the_hub(tiny_two_stage, tmp_path, monkeypatch):
    import timm.models._builder as builder

    def no_network(*args, **kwargs):
        raise AssertionError("the hub was contacted")

    path = save_checkpoint(tmp_path / "hub.ckpt", tiny_two_stage, pretrained=True, cropper_pretrained=True)
    monkeypatch.setattr(builder, "load_pretrained", no_network)
    monkeypatch.setattr(builder, "load_custom_pretrained", no_network)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = TwoStageClassifier.load_from_checkpoint(path)
    torch.testing.assert_close(model.state_dict(), tiny_two_stage.state_dict())


def test_same_classes_in_another_order_are_remapped(tiny_model, tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(logging.getLogger("mgff"), "propagate", True)  # the CLI's setup_logging turns it off
    path = save_checkpoint(tmp_path / "ckpt.ckpt", tiny_model)
    data_names = ["b", "c", "a"]  # the data's label 0 is the checkpoint's class 1
    model = FineGrainedClassifier(num_classes=3, class_names=data_names, **TINY)  # as the CLI builds it from the data
    model._match_data_classes(data_names)  # what setup() does with the DataModule's names
    model.on_load_checkpoint(torch.load(path, weights_only=True))
    assert model.hparams.class_names == NAMES  # predictions are named in the checkpoint's order
    batch = {"label": torch.tensor([0, 1, 2, -1])}
    model.on_test_batch_start(batch, 0)
    assert batch["label"].tolist() == [1, 2, 0, -1]  # b, c, a in the checkpoint's order; -1 (no label) kept
    assert "another order than the data's" in caplog.text


def test_other_classes_are_refused_with_the_differences(tiny_model, tmp_path):
    path = save_checkpoint(tmp_path / "ckpt.ckpt", tiny_model)
    model = FineGrainedClassifier(num_classes=3, class_names=["a", "b", "zebra"], **TINY)
    with pytest.raises(ValueError, match=r"only in the checkpoint: \['c'\] \(1\); only in the data: \['zebra'\] \(1\)"):
        model.on_load_checkpoint(torch.load(path, weights_only=True))
    assert class_order_map(NAMES, NAMES) is None


def test_loaded_model_on_data_with_other_classes_is_refused_at_setup(tiny_model):
    # load_from_checkpoint, then trainer.test(model, datamodule): setup() compares the DataModule's names
    model = FineGrainedClassifier(num_classes=3, class_names=NAMES, **TINY)
    with pytest.raises(ValueError, match=r"the model was trained on other classes .* only in the model: \['c'\] \(1\); only in the data: \['d'\]"):
        model._match_data_classes(["a", "b", "d"], "the model")
    model._match_data_classes(["c", "a", "b"], "the model")
    batch = {"label": torch.tensor([0, 1, 2])}
    model.on_validation_batch_start(batch, 0)
    assert batch["label"].tolist() == [2, 0, 1]


def test_a_fusion_checkpoint_from_before_the_residual_head_loads_as_the_plain_head(tmp_path):
    # checkpoints saved before ``fusion_residual`` existed hold the plain MGFF head; the new default is residual
    plain = FineGrainedClassifier(num_classes=3, class_names=NAMES, **{**TINY, "head": "mgff", "stages": [2, 3, 4]},
                                  fusion_dim=16, num_heads=2, num_super_nodes=2, fusion_residual=False).eval()
    path = save_checkpoint(tmp_path / "old.ckpt", plain)
    checkpoint = torch.load(path, weights_only=True)
    del checkpoint["hyper_parameters"]["fusion_residual"]
    torch.save(checkpoint, path)
    loaded = FineGrainedClassifier.load_from_checkpoint(path).eval()  # strict: every weight in its place
    assert loaded.hparams.fusion_residual is False and not loaded.head.residual
    images = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(loaded(images).logits, plain(images).logits)
    two_stage = TwoStageClassifier.from_stage1_checkpoint(path)
    assert not two_stage.head.residual
    # a model built with today's default (residual) refuses it, naming the key, instead of a strict-load error
    residual = FineGrainedClassifier(num_classes=3, class_names=NAMES, **{**TINY, "head": "mgff", "stages": [2, 3, 4]},
                                     fusion_dim=16, num_heads=2, num_super_nodes=2)
    with pytest.raises(ValueError, match="fusion_residual: checkpoint False vs this model True"):
        residual.on_load_checkpoint(checkpoint)
    # a linear-head checkpoint without the key is not affected
    linear_ckpt = torch.load(save_checkpoint(tmp_path / "linear.ckpt", FineGrainedClassifier(num_classes=3, class_names=NAMES, **TINY)), weights_only=True)
    del linear_ckpt["hyper_parameters"]["fusion_residual"]
    FineGrainedClassifier(num_classes=3, class_names=NAMES, **TINY).on_load_checkpoint(linear_ckpt)


def test_a_stage1_checkpoint_whose_weights_do_not_fit_its_hyperparameters_is_named(tmp_path):
    model = FineGrainedClassifier(num_classes=3, class_names=NAMES, **TINY)
    path = save_checkpoint(tmp_path / "odd.ckpt", model)
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["state_dict"]["head.classifier.weight"] = torch.zeros(7, 3)
    torch.save(checkpoint, path)
    with pytest.raises(ValueError, match=r"odd\.ckpt: its weights do not fit"):
        TwoStageClassifier.from_stage1_checkpoint(path)
