"""TimmBackbone: NCHW stage maps from Swin, ResNet, ConvNeXt, ViT and feature_info-only models."""

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
