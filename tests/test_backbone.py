"""TimmBackbone: NCHW stage maps from Swin, ResNet, ConvNeXt, ViT and feature_info-only models."""

from pathlib import Path

import pytest
import timm
import torch
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

from mgff.models.backbone import TimmBackbone

TINY_SWIN = dict(window_size=6, embed_dim=24, depths=(1, 1, 2, 1), num_heads=(1, 2, 3, 4))
SWIN = "swin_base_patch4_window12_384"


def _check_maps(backbone, image_size, batch=2):
    maps = backbone(torch.randn(batch, 3, image_size, image_size))
    expected = [
        (batch, c, image_size // r, image_size // r)
        for c, r in zip(backbone.feature_channels, backbone.feature_reductions)
    ]
    assert [tuple(m.shape) for m in maps] == expected


@pytest.mark.parametrize("image_size", [96, 192])
def test_tiny_swin_last_three_stages(image_size):
    backbone = TimmBackbone(SWIN, img_size=image_size, **TINY_SWIN)
    assert backbone.feature_channels == [48, 96, 192]
    assert backbone.feature_reductions == [8, 16, 32]
    _check_maps(backbone, image_size)


@pytest.mark.parametrize("image_size", [64, 96])
def test_resnet18_last_three_stages(image_size):
    # ResNet lists its stem as feature 0, so its last three stages are (-3, -2, -1).
    backbone = TimmBackbone("resnet18", out_indices=(-3, -2, -1))
    assert backbone.feature_channels == [128, 256, 512]
    assert backbone.out_indices == [2, 3, 4]
    _check_maps(backbone, image_size)


@pytest.mark.parametrize("image_size", [64, 96])
def test_convnext_atto_default_stages(image_size):
    backbone = TimmBackbone("convnext_atto", img_size=image_size)  # img_size is ignored by CNNs
    assert backbone.feature_channels == [80, 160, 320]
    assert backbone.feature_reductions == [8, 16, 32]
    _check_maps(backbone, image_size)


def test_vit_last_blocks_are_single_scale():
    backbone = TimmBackbone("test_vit", out_indices=(-2, -1), img_size=64)
    assert backbone.feature_reductions == [16, 16]
    assert backbone.feature_channels == [64, 64]
    _check_maps(backbone, 64)


def test_unused_stages_norm_and_head_are_pruned():
    backbone = TimmBackbone(SWIN, out_indices=(0, 1), img_size=96, **TINY_SWIN)
    assert len(backbone.model.layers) == 2
    assert not any(name.startswith(("head.fc", "norm.")) for name, _ in backbone.named_parameters())
    _check_maps(backbone, 96)


def test_local_weights_load_with_their_normal_key_names(tmp_path):
    source = timm.create_model(SWIN, img_size=96, **TINY_SWIN)  # full model with a 1000-class head
    path = tmp_path / "swin.pth"
    torch.save(source.state_dict(), path)
    backbone = TimmBackbone(SWIN, pretrained=str(path), img_size=96, **TINY_SWIN)
    loaded = backbone.model.state_dict()
    assert loaded.keys() and all(torch.equal(v, source.state_dict()[k]) for k, v in loaded.items())


SHARED_WEIGHTS = Path(__file__).resolve().parents[2] / "shared" / "weights" / "efficientnet_lite0_imagenet.safetensors"


def _hooked_outputs(model, names, x):
    """Outputs of the named modules of a plain timm model on ``x``, by forward hooks (NCHW)."""
    captured = {}
    handles = [
        model.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: captured.__setitem__(n, o)) for n in names
    ]
    model.forward_features(x)
    for h in handles:
        h.remove()
    return captured


def test_swin_paper_taps_are_timms_patch_merging_outputs_and_the_final_norm():
    # the paper's maps (mgff/models/fusion.py): layers.{1,2,3}.downsample and norm(layers.3)
    torch.manual_seed(0)
    reference = timm.create_model(SWIN, img_size=96, num_classes=0, **TINY_SWIN).eval()
    path_state = reference.state_dict()
    backbone = TimmBackbone(SWIN, out_indices=(3,), stage_inputs=(1, 2, 3), img_size=96, **TINY_SWIN).eval()
    backbone.model.load_state_dict(path_state)
    assert backbone.feature_modules == ["layers.1.downsample", "layers.2.downsample", "layers.3.downsample", "layers.3 + norm"]
    assert backbone.feature_channels == [48, 96, 192, 192] and backbone.feature_reductions == [8, 16, 32, 32]
    x = torch.randn(2, 3, 96, 96)
    names = ["layers.1.downsample", "layers.2.downsample", "layers.3.downsample", "norm"]
    expected = _hooked_outputs(reference, names, x)
    maps = backbone(x)
    for got, name in zip(maps, names):
        torch.testing.assert_close(got, expected[name].permute(0, 3, 1, 2))  # timm's Swin is NHWC
    # the final norm matters: without it the last map is the raw stage output
    assert not torch.allclose(maps[-1], _hooked_outputs(reference, ["layers.3"], x)["layers.3"].permute(0, 3, 1, 2))


def test_swin_keeps_its_pretrained_final_norm(tmp_path):
    source = timm.create_model(SWIN, img_size=96, **TINY_SWIN)
    with torch.no_grad():
        source.norm.weight.uniform_(0.5, 1.5)
    path = tmp_path / "swin.pth"
    torch.save(source.state_dict(), path)
    backbone = TimmBackbone(SWIN, pretrained=str(path), img_size=96, **TINY_SWIN)
    assert backbone.feature_modules[-1] == "layers.3 + norm"
    torch.testing.assert_close(backbone.model.norm.weight, source.norm.weight)


def test_efficientnet_last_map_is_after_conv_head_and_bn2(tmp_path):
    torch.manual_seed(0)
    source = timm.create_model("efficientnet_lite0")
    with torch.no_grad():  # weights that a fresh model would not have
        source.conv_head.weight.normal_()
        source.bn2.running_mean.uniform_(-1, 1)
    path = tmp_path / "effnet.pth"
    torch.save(source.state_dict(), path)
    backbone = TimmBackbone("efficientnet_lite0", out_indices=(2, 3, 4), pretrained=str(path)).eval()
    assert backbone.feature_channels == [40, 112, 1280] and backbone.feature_reductions == [8, 16, 32]
    assert backbone.feature_modules[-1] == "blocks.6 + conv_head/bn2"
    torch.testing.assert_close(backbone.model.conv_head.weight, source.conv_head.weight)
    torch.testing.assert_close(backbone.model.bn2.running_mean, source.bn2.running_mean)
    source.eval()
    x = torch.randn(1, 3, 64, 64)
    maps = backbone(x)
    expected = _hooked_outputs(source, ["blocks.2", "blocks.4", "bn2"], x)
    for got, name in zip(maps, ["blocks.2", "blocks.4", "bn2"]):
        torch.testing.assert_close(got, expected[name])
    assert (maps[-1] >= 0).all()  # post-activation (ReLU6 in the Lite variants)


def test_efficientnet_head_conv_goes_when_the_last_stage_is_not_taken():
    backbone = TimmBackbone("efficientnet_lite0", out_indices=(2, 3))
    assert isinstance(backbone.model.conv_head, nn.Identity)
    assert backbone.feature_channels == [40, 112]


@pytest.mark.skipif(not SHARED_WEIGHTS.is_file(), reason=f"shared weights not found at {SHARED_WEIGHTS} (../shared absent)")
def test_shared_efficientnet_weights_keep_conv_head():
    from safetensors.torch import load_file

    state = load_file(str(SHARED_WEIGHTS))
    backbone = TimmBackbone("efficientnet_lite0", out_indices=(-1,), pretrained=str(SHARED_WEIGHTS)).eval()
    torch.testing.assert_close(backbone.model.conv_head.weight, state["conv_head.weight"])
    torch.testing.assert_close(backbone.model.bn2.weight, state["bn2.weight"])
    (last,) = backbone(torch.zeros(1, 3, 64, 64))
    assert last.shape == (1, 1280, 2, 2) and torch.isfinite(last).all()


def test_stage_inputs_need_a_downsample_module():
    with pytest.raises(ValueError, match="no downsample"):
        TimmBackbone(SWIN, out_indices=(3,), stage_inputs=(0,), img_size=96, **TINY_SWIN)


def test_unknown_model_name_is_an_error():
    with pytest.raises(ValueError, match="not_a_model"):
        TimmBackbone("not_a_model")


class _DownConv(nn.Module):
    """A stride-s patchify conv; channels-last variants read and/or write (B, H, W, C) like Swin."""

    def __init__(self, in_chs, out_chs, stride, nhwc_in=False, nhwc_out=False):
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, stride, stride)
        self.nhwc_in, self.nhwc_out = nhwc_in, nhwc_out

    def forward(self, x):
        x = self.conv(x.permute(0, 3, 1, 2) if self.nhwc_in else x)
        return x.permute(0, 2, 3, 1) if self.nhwc_out else x


class _TinyStagesNet(nn.Module):
    """Four stages that declare feature_info but have no forward_intermediates (a zoo-style model)."""

    def __init__(self, channels_last=False, num_classes=0, **kwargs):
        super().__init__()
        self.output_fmt = "NHWC" if channels_last else "NCHW"
        self.stem = _DownConv(3, 8, 4, nhwc_out=channels_last)
        self.stages = nn.Sequential(
            *[_DownConv(8 * 2**i, 16 * 2**i, 2, channels_last, channels_last) for i in range(3)]
        )
        self.feature_info = [dict(num_chs=8, reduction=4, module="stem")] + [
            dict(num_chs=16 * 2**i, reduction=8 * 2**i, module=f"stages.{i}") for i in range(3)
        ]
        self.head = nn.Linear(64, num_classes) if num_classes else nn.Identity()

    def forward(self, x):
        x = self.stages(self.stem(x))
        return self.head(x.mean((1, 2)) if self.output_fmt == "NHWC" else x.mean((2, 3)))


default_cfgs = generate_default_cfgs(
    {"mgff_test_stages_nchw": dict(num_classes=0), "mgff_test_stages_nhwc": dict(num_classes=0)}
)


@register_model
def mgff_test_stages_nchw(pretrained=False, **kwargs):
    return build_model_with_cfg(
        _TinyStagesNet,
        "mgff_test_stages_nchw",
        pretrained,
        feature_cfg=dict(flatten_sequential=True),
        **kwargs,
    )


@register_model
def mgff_test_stages_nhwc(pretrained=False, **kwargs):
    return build_model_with_cfg(
        _TinyStagesNet,
        "mgff_test_stages_nhwc",
        pretrained,
        channels_last=True,
        feature_cfg=dict(flatten_sequential=True),
        **kwargs,
    )


@pytest.mark.parametrize("name", ["mgff_test_stages_nchw", "mgff_test_stages_nhwc"])
def test_models_without_forward_intermediates_fall_back_to_features_only(name, tmp_path):
    source = timm.create_model(name)
    path = tmp_path / "tiny.pth"
    torch.save(source.state_dict(), path)
    backbone = TimmBackbone(name, pretrained=str(path))
    assert not backbone.uses_intermediates
    assert backbone.out_indices == [1, 2, 3]
    assert backbone.feature_channels == [16, 32, 64]
    _check_maps(backbone, 64)
    # features_only renamed stages.2 to stages_2; the file still loaded through timm.
    loaded = dict(backbone.model.named_parameters())
    assert torch.equal(loaded["stages_2.conv.weight"], source.stages[2].conv.weight)


def test_features_only_backbone_builds_from_a_checkpoint_without_its_initial_weights_file(tmp_path):
    """Loading a checkpoint never reads the initial weights: a features_only backbone (no
    forward_intermediates) whose ``pretrained`` file is gone still builds inside skip_pretrained_weights."""
    from mgff.models.pretrained import skip_pretrained_weights

    missing = tmp_path / "moved_away.pth"
    with pytest.raises(FileNotFoundError, match="moved_away"):
        TimmBackbone("mgff_test_stages_nchw", pretrained=str(missing))
    with skip_pretrained_weights():
        backbone = TimmBackbone("mgff_test_stages_nchw", pretrained=str(missing))
    assert not backbone.uses_intermediates
    _check_maps(backbone, 64)
