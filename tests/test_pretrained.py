"""Local-file pretrained loading: the path a cluster without network takes for hub weights."""

import logging

import pytest
import timm
import torch
from safetensors.torch import save_file

from mgff.models.pretrained import create_timm_model, load_pretrained_file


def _assert_same_weights(model, state_dict, skip=()):
    own = model.state_dict()
    for key, value in state_dict.items():
        if not key.startswith(skip):
            assert torch.equal(own[key], value), key


def test_pth_in_lightning_container_with_ddp_prefix(tmp_path):
    source = timm.create_model("test_resnet", num_classes=10)
    path = tmp_path / "resnet.ckpt.pth"
    wrapped = {"module." + k: v for k, v in source.state_dict().items()}
    torch.save({"state_dict": wrapped, "epoch": 3}, path)
    model = create_timm_model("test_resnet", pretrained=str(path), num_classes=10)
    _assert_same_weights(model, source.state_dict())


def test_safetensors_roundtrip(tmp_path):
    kwargs = dict(img_size=96, window_size=6, embed_dim=24, depths=(1, 1, 2, 1), num_heads=(1, 2, 3, 4))
    source = timm.create_model("swin_base_patch4_window12_384", num_classes=7, **kwargs)
    path = tmp_path / "swin.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    model = create_timm_model("swin_base_patch4_window12_384", pretrained=path, num_classes=7, **kwargs)
    _assert_same_weights(model, source.state_dict())


def test_head_of_another_size_is_dropped_with_a_message(tmp_path, caplog):
    source = timm.create_model("test_resnet", num_classes=10)
    path = tmp_path / "resnet10.pth"
    torch.save(source.state_dict(), path)
    with caplog.at_level(logging.INFO, logger="mgff"):
        model = create_timm_model("test_resnet", pretrained=path, num_classes=5)
    assert "head of another size dropped" in caplog.text
    assert "fc.weight" in caplog.text and "fc.bias" in caplog.text
    assert model.fc.weight.shape == (5, source.fc.in_features)
    _assert_same_weights(model, source.state_dict(), skip=("fc.",))


def test_missing_and_unexpected_keys_are_logged_by_name(tmp_path, caplog):
    source = timm.create_model("test_resnet")
    state_dict = source.state_dict()
    del state_dict["layer1.0.conv1.weight"]
    state_dict["extra.projection.weight"] = torch.zeros(3)
    path = tmp_path / "partial.pth"
    torch.save(state_dict, path)
    model = timm.create_model("test_resnet")
    with caplog.at_level(logging.WARNING, logger="mgff"):
        load_pretrained_file(model, path)
    assert "layer1.0.conv1.weight" in caplog.text
    assert "extra.projection.weight" in caplog.text


def test_checkpoint_filter_adapts_vit_position_embedding_to_another_size(tmp_path):
    source = timm.create_model("test_vit")
    path = tmp_path / "vit.pth"
    torch.save(source.state_dict(), path)
    model = create_timm_model("test_vit", pretrained=path, img_size=64)
    # timm's vision_transformer.checkpoint_filter_fn resamples the 2-D position grid.
    from timm.models.vision_transformer import checkpoint_filter_fn

    resampled = checkpoint_filter_fn(source.state_dict(), model)["pos_embed"]
    assert model.pos_embed.shape == resampled.shape != source.pos_embed.shape
    assert torch.equal(model.pos_embed, resampled)
    _assert_same_weights(model, source.state_dict(), skip=("pos_embed",))


def test_checkpoint_of_another_architecture_is_refused(tmp_path):
    path = tmp_path / "convnext_weights.pth"
    torch.save(timm.create_model("test_convnext").state_dict(), path)
    model = timm.create_model("test_resnet")
    with pytest.raises(ValueError, match="convnext_weights.pth") as err:
        load_pretrained_file(model, path)
    assert "test_resnet" in str(err.value)


def test_missing_file_is_an_error(tmp_path):
    missing = tmp_path / "nowhere.safetensors"
    with pytest.raises(FileNotFoundError, match="nowhere.safetensors"):
        create_timm_model("test_resnet", pretrained=str(missing))


@pytest.mark.parametrize("content", [{"epoch": 3, "lr": 0.1}, [torch.zeros(2)]])
def test_file_without_state_dict_is_an_error(tmp_path, content):
    path = tmp_path / "not_weights.pt"
    torch.save(content, path)
    with pytest.raises(ValueError, match="not_weights.pt"):
        load_pretrained_file(timm.create_model("test_resnet"), path)
