"""Input normalisation per network: data -> network conversion, defaults, config, checkpoints, bad settings."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from timm.data import create_transform, resolve_data_config

from data_modules.transforms import IMAGENET_MEAN, IMAGENET_STD, apply_transform, build_eval_transform
from mgff.lit import FineGrainedClassifier, TwoStageClassifier
from mgff.models.normalization import InputNormalization

TINY = dict(backbone="resnet10t", img_size=64, stages=[2, 3, 4], head="linear")
# vit_base_patch16_224's pretrained_cfg (AugReg) says mean = std = 0.5; a tiny one of the same name
TINY_CROPPER = dict(localization="rollout", cropper="vit_base_patch16_224", cropper_kwargs={"depth": 1, "embed_dim": 32, "num_heads": 2}, localize_size=64, crop_size=64)
HALF = [0.5, 0.5, 0.5]


def smooth_photo(height: int = 96, width: int = 128) -> np.ndarray:
    """A non-square uint8 image of smooth colour gradients (resizers of any kind agree on it closely)."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    rgb = np.stack([x / width, y / height, 0.5 + 0.4 * np.sin(x / 17.0) * np.cos(y / 13.0)], axis=-1)
    return (rgb * 255).round().clip(0, 255).astype(np.uint8)


def capture_input(module: torch.nn.Module) -> list[torch.Tensor]:
    seen: list[torch.Tensor] = []
    module.register_forward_pre_hook(lambda _, args: seen.append(args[0].detach().clone()))
    return seen


def test_cropper_input_equals_timm_transform():
    """The cropper's ViT sees what timm's own eval transform for that ViT gives (whole image resized)."""
    model = TwoStageClassifier(num_classes=3, **TINY, **TINY_CROPPER).eval()
    photo = smooth_photo()
    # the DataModule's eval view of the whole photo (resize = crop: nothing cut), ImageNet-normalised
    view, _ = apply_transform(build_eval_transform(64, 64, IMAGENET_MEAN, IMAGENET_STD), photo, None)
    seen = capture_input(model.cropper.vit.patch_embed)
    with torch.no_grad():
        model.localize(view[None])
    cfg = resolve_data_config({"crop_pct": 1.0, "crop_mode": "squash", "input_size": (3, 64, 64)}, model=model.cropper.vit)
    assert cfg["mean"] == (0.5, 0.5, 0.5)
    expected = create_transform(**cfg)(Image.fromarray(photo))
    # cv2 bilinear vs PIL bicubic resize: a few hundredths on smooth colours
    assert (seen[0][0] - expected).abs().max() < 0.06
    # without the conversion the ViT would see ImageNet-normalised values: far off
    assert (view - expected).abs().max() > 0.5


def test_backbone_default_is_pretrained_cfg_and_config_overrides_it():
    photo = torch.rand(2, 3, 64, 64)
    data = (photo - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    default = FineGrainedClassifier(num_classes=3, **TINY)  # resnet10t's cfg: ImageNet, as the data
    assert default.input_norm.is_identity()
    configured = FineGrainedClassifier(num_classes=3, backbone_mean=HALF, backbone_std=HALF, **TINY)
    configured.load_state_dict({k: v for k, v in default.state_dict().items() if not k.startswith("input_norm.")}, strict=False)
    seen = capture_input(configured.backbone)
    configured.classify(data)
    torch.testing.assert_close(seen[0], (photo - 0.5) / 0.5, atol=1e-5, rtol=1e-5)
    # same weights, another normalisation: another prediction
    assert not torch.allclose(default.classify(data).logits, configured.classify(data).logits)


def test_data_normalisation_is_converted_from():
    photo = torch.rand(1, 3, 64, 64)
    model = FineGrainedClassifier(num_classes=3, data_mean=HALF, data_std=HALF, backbone_mean=[0.2, 0.3, 0.4], backbone_std=[0.1, 0.2, 0.3], **TINY)
    seen = capture_input(model.backbone)
    model.classify((photo - 0.5) / 0.5)
    expected = (photo - torch.tensor([0.2, 0.3, 0.4]).view(1, 3, 1, 1)) / torch.tensor([0.1, 0.2, 0.3]).view(1, 3, 1, 1)
    torch.testing.assert_close(seen[0], expected, atol=1e-5, rtol=1e-5)


def test_conversion_is_logged_once_with_its_source(caplog):
    with caplog.at_level(logging.INFO, logger="mgff"):
        TwoStageClassifier(num_classes=3, **TINY, **TINY_CROPPER)
    lines = [r.getMessage() for r in caplog.records if "input:" in r.getMessage()]
    assert len(lines) == 2
    assert any("model.backbone input" in m and "no conversion" in m for m in lines)
    assert any("model.cropper input: converting" in m and "-> network mean=(0.5, 0.5, 0.5)" in m and "timm pretrained_cfg" in m for m in lines)


def test_local_weights_without_normalisation_warn(tmp_path, caplog):
    from safetensors.torch import save_file

    net = timm.create_model("resnet10t", num_classes=0)
    path = tmp_path / "w.safetensors"
    save_file(net.state_dict(), str(path))
    with caplog.at_level(logging.WARNING, logger="mgff"):
        FineGrainedClassifier(num_classes=3, pretrained=str(path), **TINY)
    assert any("local weights" in r.getMessage() and "model.backbone_mean" in r.getMessage() for r in caplog.records)


def test_normalisation_is_saved_and_a_different_one_refused(caplog):
    trained = FineGrainedClassifier(num_classes=3, backbone_mean=HALF, backbone_std=HALF, **TINY)
    state = trained.state_dict()
    assert torch.equal(state["input_norm.mean"].flatten(), torch.tensor(HALF))
    assert "input_norm.data_mean" not in state  # the data's normalisation belongs to the DataModule in use
    FineGrainedClassifier(num_classes=3, backbone_mean=HALF, backbone_std=HALF, data_mean=HALF, data_std=HALF, **TINY).load_state_dict(state)
    with pytest.raises(ValueError, match=r"model.backbone: checkpoint's input mean \(0.5, 0.5, 0.5\) differs"):
        FineGrainedClassifier(num_classes=3, **TINY).load_state_dict(state)
    old = {k: v for k, v in state.items() if not k.startswith("input_norm.")}  # saved before this existed
    with caplog.at_level(logging.WARNING, logger="mgff"):
        FineGrainedClassifier(num_classes=3, **TINY).load_state_dict(old)
    assert any("checkpoint has no input_norm.mean" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(backbone_mean=HALF), "model.backbone_mean and model.backbone_std must be set together"),
        (dict(backbone_mean=[0.5, 0.5], backbone_std=[0.5, 0.5]), "need 3 values"),
        (dict(backbone_mean=HALF, backbone_std=[0.5, 0.0, 0.5]), "std must be positive"),
        (dict(data_mean=HALF, data_std=[float("nan")] * 3), r"data normalisation \(data.mean / data.std\): mean and std must be finite"),
    ],
)
def test_inconsistent_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FineGrainedClassifier(num_classes=3, **TINY, **kwargs)


def test_network_without_cfg_normalisation_is_named():
    net = torch.nn.Conv2d(3, 3, 1)
    with pytest.raises(ValueError, match="model.x: .*set them in the config"):
        InputNormalization(net, "model.x")


def test_cli_links_data_normalisation(cub_root, tmp_path):
    from mgff.cli import MGFFCLI

    demo = str(Path(__file__).resolve().parents[1] / "experiments" / "demo.yaml")
    args = ["--config", demo, "--data.class_path", "data_modules.CUB200DataModule", "--data.init_args.root", str(cub_root),
            "--data.init_args.mean", "[0.5, 0.5, 0.5]", "--data.init_args.std", "[0.25, 0.25, 0.25]",
            "--trainer.default_root_dir", str(tmp_path), "--trainer.logger.init_args.save_dir", str(tmp_path)]
    cli = MGFFCLI(args=args, run=False)
    torch.testing.assert_close(cli.model.input_norm.data_std.flatten(), torch.full((3,), 0.25))
    torch.testing.assert_close(cli.model.cropper_norm.data_mean.flatten(), torch.full((3,), 0.5))


SHARED = Path(__file__).resolve().parents[2] / "shared"
ALBATROSS = SHARED / "realdata" / "CUB_200_2011_first25" / "images" / "001.Black_footed_Albatross" / "Black_Footed_Albatross_0001_796111.jpg"
LITE0 = SHARED / "weights" / "efficientnet_lite0_imagenet.safetensors"


@pytest.mark.skipif(not (ALBATROSS.is_file() and LITE0.is_file()), reason="needs ../shared (real CUB photo and EfficientNet-Lite0 weights)")
def test_real_weights_see_the_bird_only_with_their_own_normalisation():
    """The shared TF-Lite weights expect 0.5/0.5: fed the DataModule's ImageNet-normalised view as it is,
    they are less sure of the albatross (ImageNet class 146) than through the conversion."""
    net = timm.create_model("efficientnet_lite0", pretrained=True, pretrained_cfg_overlay=dict(file=str(LITE0))).eval()
    photo = np.asarray(Image.open(ALBATROSS).convert("RGB"))
    view, _ = apply_transform(build_eval_transform(224, 224, IMAGENET_MEAN, IMAGENET_STD), photo, None)
    norm = InputNormalization(net, "model.backbone", IMAGENET_MEAN, IMAGENET_STD, HALF, HALF, pretrained=str(LITE0))
    with torch.no_grad():
        converted = net(norm(view[None])).softmax(-1)[0]
        as_is = net(view[None]).softmax(-1)[0]
    assert converted.argmax() == 146 and converted[146] > 0.9
    assert as_is[146] < converted[146] - 0.1
