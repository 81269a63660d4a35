import numpy as np
import pytest
import scipy.ndimage
import timm
import torch
import torch.nn.functional as F

from mgff.models.cropper.attention_cropper import AttentionCropper
from mgff.models.cropper.boxes import boxes_from_response_map, connected_components
from mgff.models.cropper.crops import CropOutput, crop_and_resize
from mgff.models.cropper.importance import attention_rollout, column_sum_importance, fuse_heads
from mgff.models.cropper.response import response_map
from mgff.models.cropper.vit_attention import collect_attention, forward_with_attention

TINY = dict(img_size=64, depth=2, embed_dim=32, num_heads=2)
VIT = 'vit_tiny_patch16_224'


def random_attention(layers=3, batch=2, heads=3, tokens=6, seed=0):
    """A stack of row-stochastic matrices, like softmax attention: (L, B, heads, T, T)."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(layers, batch, heads, tokens, tokens, generator=generator, dtype=torch.float64)
    return logits.mul(2).softmax(dim=-1)


def tiny_vit(**kwargs):
    torch.manual_seed(0)
    return timm.create_model(VIT, **{**TINY, **kwargs}).eval()


# ------------------------------------------------------------------ rollout and column sums


def naive_rollout(attn, head_fusion, discard_ratio, prefix, class_token=True):
    layers, batch, _, tokens, _ = attn.shape
    out = []
    for b in range(batch):
        result = torch.eye(tokens, dtype=attn.dtype)
        for layer in range(layers):
            heads = attn[layer, b]
            a = {'mean': heads.mean(0), 'max': heads.max(0).values, 'min': heads.min(0).values}[head_fusion].clone()
            patch = a[prefix:, prefix:].flatten()
            drop = int(patch.numel() * discard_ratio)
            if drop:
                patch[patch.argsort()[:drop]] = 0
                a[prefix:, prefix:] = patch.view(tokens - prefix, tokens - prefix)
            a = a + torch.eye(tokens, dtype=a.dtype)
            for i in range(tokens):
                a[i] = a[i] / a[i].sum()
            result = a @ result
        out.append(result[0, prefix:] if class_token and prefix else result[prefix:, prefix:].mean(0))
    return torch.stack(out)


@pytest.mark.parametrize('head_fusion', ['mean', 'max', 'min'])
@pytest.mark.parametrize('discard_ratio', [0.0, 0.3])
@pytest.mark.parametrize('prefix', [1, 3])
def test_rollout_matches_naive_loop(head_fusion, discard_ratio, prefix):
    attn = random_attention(layers=4, tokens=7)
    got = attention_rollout(attn, head_fusion, discard_ratio, num_prefix_tokens=prefix)
    torch.testing.assert_close(got, naive_rollout(attn, head_fusion, discard_ratio, prefix))


def test_rollout_without_class_token_averages_patch_rows():
    attn = random_attention(tokens=6)
    for prefix in (0, 2):
        got = attention_rollout(attn, num_prefix_tokens=prefix, class_token=False)
        torch.testing.assert_close(got, naive_rollout(attn, 'mean', 0.0, prefix, class_token=False))


def test_rollout_two_layers_by_hand():
    # tokens: cls, p1, p2; one head; layer 1 then layer 2
    layer1 = torch.tensor([[.5, .25, .25], [0., 1., 0.], [0., 0., 1.]])
    layer2 = torch.tensor([[0., 1., 0.], [0., 1., 0.], [0., 0., 1.]])
    attn = torch.stack([layer1, layer2]).view(2, 1, 1, 3, 3)
    # (A1 + I) rows / sums: [.75 .125 .125], [0 1 0], [0 0 1];  (A2 + I): [.5 .5 0], [0 1 0], [0 0 1]
    # rollout row of cls = .5 * [.75 .125 .125] + .5 * [0 1 0] = [.375 .5625 .0625]
    torch.testing.assert_close(attention_rollout(attn), torch.tensor([[.5625, .0625]]))
    torch.testing.assert_close(attention_rollout(attn, class_token=False), torch.tensor([[.5, .5]]))


def test_rollout_discard_never_touches_prefix_tokens():
    # every attention to the cls token is the smallest entry; discarding 90% keeps it anyway
    attn = torch.full((1, 1, 1, 3, 3), 0.4)
    attn[..., 0] = 0.2
    kept = attention_rollout(attn, discard_ratio=0.9)
    assert torch.isfinite(kept).all() and kept.sum() > 0


def naive_column_sum(attn, prefix, layer_fusion):
    layers, batch, heads, tokens, _ = attn.shape
    out = torch.ones(batch, tokens - prefix, dtype=attn.dtype) if layer_fusion == 'product' else \
        torch.zeros(batch, tokens - prefix, dtype=attn.dtype)
    for layer in range(layers):
        for b in range(batch):
            for j in range(prefix, tokens):
                received = sum(attn[layer, b, h, i, j] for h in range(heads) for i in range(tokens)) / heads
                if layer_fusion == 'product':
                    out[b, j - prefix] *= received
                else:
                    out[b, j - prefix] += received / layers
    return out / out.amax(1, keepdim=True) if layer_fusion == 'product' else out


@pytest.mark.parametrize('layer_fusion', ['product', 'mean'])
def test_column_sum_matches_naive_loop(layer_fusion):
    attn = random_attention(layers=3, tokens=5)
    got = column_sum_importance(attn, num_prefix_tokens=1, layer_fusion=layer_fusion)
    torch.testing.assert_close(got, naive_column_sum(attn, 1, layer_fusion))


def test_column_sum_is_the_received_attention():
    # all queries attend to p2 only -> p2 takes everything in every layer
    attn = torch.zeros(2, 1, 1, 3, 3)
    attn[..., 2] = 1.0
    torch.testing.assert_close(column_sum_importance(attn, layer_fusion='mean'), torch.tensor([[0., 3.]]))


# ------------------------------------------------------------------ attention out of the ViT


def hooked_unfused_attention(vit, x):
    """Reference: the model's own non-fused path, probabilities caught at attention dropout."""
    captured = []
    handles = []
    for block in vit.blocks:
        block.attn.fused_attn = False
        handles.append(block.attn.attn_drop.register_forward_hook(lambda m, inp, out: captured.append(inp[0])))
    try:
        vit.forward_features(x)
    finally:
        for handle in handles:
            handle.remove()
        for block in vit.blocks:
            block.attn.fused_attn = True
    return torch.stack(captured)


@pytest.mark.parametrize('variant, size', [
    (dict(), 64),
    (dict(reg_tokens=2, qk_norm=True, init_values=0.1), 64),
    (dict(class_token=False, global_pool='avg', reg_tokens=1), 64),
    (dict(dynamic_img_size=True), 48),
])
def test_collected_attention_equals_unfused_forward(variant, size):
    vit = tiny_vit(**variant)
    assert all(block.attn.fused_attn for block in vit.blocks)  # our path must not need it off
    x = torch.randn(2, 3, size, size)
    features, attention = forward_with_attention(vit, x)
    tokens = vit.num_prefix_tokens + (size // 16) ** 2
    assert attention.shape == (2, 2, 2, tokens, tokens)
    torch.testing.assert_close(features, vit.forward_features(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(attention, hooked_unfused_attention(vit, x), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(attention.sum(-1), torch.ones(attention.shape[:-1]))
    fused = collect_attention(vit, x, head_fusion='max')
    torch.testing.assert_close(fused, fuse_heads(attention, 'max'))


def test_unsupported_model_is_refused():
    swin = timm.create_model('swin_tiny_patch4_window7_224', img_size=64, window_size=2, embed_dim=24,
                             depths=(1, 1), num_heads=(1, 2))
    with pytest.raises(TypeError, match='VisionTransformer'):
        collect_attention(swin, torch.randn(1, 3, 64, 64))


# ------------------------------------------------------------------ maps and boxes


def test_response_map_normalises_and_places_tokens():
    importance = torch.zeros(2, 6)
    importance[0, 5] = 3.0   # grid (2, 3): bottom-right token
    importance[1] = 7.0      # flat
    maps = response_map(importance, (2, 3), (20, 30))
    assert maps.shape == (2, 20, 30)
    assert maps[0].max() == 1.0 and maps[0].min() == 0.0
    assert maps[0, 15, 25].item() == pytest.approx(1.0)  # beside the token centre (15, 25)
    assert maps[0, :10, :10].max() == 0.0  # the top-left token, two cells away
    assert torch.equal(maps[1], torch.zeros(20, 30))  # flat stays flat, no NaN
    with pytest.raises(ValueError, match='grid'):
        response_map(importance, (2, 2), (20, 30))


def blob_maps(height=64, width=64, blobs=(), batch=1):
    maps = torch.zeros(batch, height, width)
    for b, (y1, y2, x1, x2, value) in blobs:
        maps[b, y1:y2, x1:x2] = value
    return maps


def test_blob_gives_box_around_it():
    maps = blob_maps(blobs=[(0, (10, 20, 30, 45, 1.0))])
    torch.testing.assert_close(boxes_from_response_map(maps), torch.tensor([[30., 10., 45., 20.]]))


@pytest.mark.parametrize('label_size', [32, (8, 6), 1000])
def test_box_is_pixel_exact_when_labelled_at_lower_resolution(label_size):
    maps = blob_maps(200, 150, blobs=[(0, (41, 90, 17, 60, 1.0)), (0, (150, 160, 100, 110, 0.8))])
    boxes = boxes_from_response_map(maps, label_size=label_size)
    torch.testing.assert_close(boxes, torch.tensor([[17., 41., 60., 90.]]))


def test_largest_picks_bigger_blob_and_all_boxes_both_in_one_batch():
    maps = blob_maps(blobs=[
        (0, (5, 10, 5, 10, 1.0)),             # image 0: small bright blob ...
        (0, (30, 50, 20, 44, 0.9)),           # ... and a bigger one
        (1, (40, 60, 2, 12, 1.0)),            # image 1: one blob
        # image 2: flat (all zero)
    ], batch=3)
    largest = boxes_from_response_map(maps, box_mode='largest')
    every = boxes_from_response_map(maps, box_mode='all')
    torch.testing.assert_close(largest, torch.tensor([[20., 30., 44., 50.], [2., 40., 12., 60.], [0., 0., 64., 64.]]))
    torch.testing.assert_close(every, torch.tensor([[5., 5., 44., 50.], [2., 40., 12., 60.], [0., 0., 64., 64.]]))


def test_constant_nonzero_map_gives_whole_image():
    maps = torch.full((2, 30, 40), 0.7)
    torch.testing.assert_close(boxes_from_response_map(maps, threshold=0.5),
                               torch.tensor([[0., 0., 40., 30.]] * 2))


def test_quantile_threshold():
    maps = torch.linspace(0, 1, 100).expand(1, 50, 100).clone()  # brighter to the right
    box = boxes_from_response_map(maps, threshold=0.75, box_mode='all')
    assert box[0, 0].item() == pytest.approx(74.0, abs=1.0)
    assert box[0, 1:].tolist() == [0.0, 100.0, 50.0]


def test_diagonal_neighbours_join_only_with_8_connectivity():
    maps = blob_maps(blobs=[(0, (10, 20, 10, 20, 1.0)), (0, (20, 25, 20, 25, 1.0))])
    eight = boxes_from_response_map(maps, connectivity=8)
    four = boxes_from_response_map(maps, connectivity=4)
    torch.testing.assert_close(eight, torch.tensor([[10., 10., 25., 25.]]))
    torch.testing.assert_close(four, torch.tensor([[10., 10., 20., 20.]]))


def test_padding_and_clipping():
    maps = blob_maps(blobs=[(0, (10, 20, 30, 50, 1.0)), (1, (0, 10, 0, 20, 1.0))], batch=2)
    boxes = boxes_from_response_map(maps, padding=0.1)
    # 20 x 10 box grows 2 px left/right and 1 px up/down; the corner box is clipped at 0
    torch.testing.assert_close(boxes, torch.tensor([[28., 9., 52., 21.], [0., 0., 22., 11.]]))


def test_min_size_grows_around_centre_and_stays_inside():
    maps = blob_maps(blobs=[(0, (30, 34, 30, 34, 1.0)), (1, (0, 4, 60, 64, 1.0))], batch=2)
    boxes = boxes_from_response_map(maps, min_size=0.5)
    torch.testing.assert_close(boxes, torch.tensor([[16., 16., 48., 48.], [32., 0., 64., 32.]]))


@pytest.mark.parametrize('connectivity', [4, 8])
def test_connected_components_partition_equals_scipy(connectivity):
    generator = torch.Generator().manual_seed(connectivity)
    mask = torch.rand(3, 23, 31, generator=generator) > 0.45
    labels = connected_components(mask, connectivity)
    structure = scipy.ndimage.generate_binary_structure(2, 1 if connectivity == 4 else 2)
    for b in range(mask.shape[0]):
        expected, count = scipy.ndimage.label(mask[b].numpy(), structure=structure)
        got = labels[b].numpy()
        assert ((got > 0) == mask[b].numpy()).all()
        # same partition: a one-to-one map between our labels and scipy's
        pairs = set(zip(got[mask[b].numpy()].tolist(), expected[mask[b].numpy()].tolist()))
        assert len(pairs) == count == len(np.unique(got[got > 0]))


def test_connected_components_follows_a_long_snake():
    mask = torch.zeros(1, 15, 15, dtype=torch.bool)
    for row in range(0, 15, 2):
        mask[0, row] = True
        mask[0, row + 1 if row + 1 < 15 else row, 14 if row % 4 == 0 else 0] = True
    labels = connected_components(mask, connectivity=4)
    assert labels[mask].unique().numel() == 1


# ------------------------------------------------------------------ crops


def test_crops_equal_slice_and_bilinear_resize():
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(3, 2, 24, 30, generator=generator)
    boxes = torch.tensor([[0., 0., 30., 24.],      # the whole image
                          [5., 4., 21., 20.],      # inside, enlarged 16 -> 32
                          [10., 6., 30., 24.]])    # touching the right and bottom edges, not square
    crops = crop_and_resize(images, boxes, 32)
    assert crops.shape == (3, 2, 32, 32)
    for b, (x1, y1, x2, y2) in enumerate(boxes.long().tolist()):
        manual = F.interpolate(images[b:b + 1, :, y1:y2, x1:x2], size=(32, 32), mode='bilinear',
                               align_corners=False)[0]
        # roi_align reads the real neighbours just outside the box where the slice repeats its
        # border, so the outermost output pixels differ unless the box touches the image edge
        inner = slice(None) if b == 0 else slice(2, -2)
        torch.testing.assert_close(crops[b][:, inner, inner], manual[:, inner, inner], atol=1e-5, rtol=1e-5)


def test_shrinking_crop_averages_instead_of_aliasing():
    images = torch.rand(1, 1, 32, 32)
    crops = crop_and_resize(images, torch.tensor([[0., 0., 32., 32.]]), 16)
    torch.testing.assert_close(crops, F.avg_pool2d(images, 2))


def test_crop_keeps_half_precision_dtype():
    images = torch.rand(2, 3, 16, 16).to(torch.bfloat16)
    crops = crop_and_resize(images, torch.tensor([[0., 0., 8., 8.], [4., 4., 16., 16.]]), (6, 10))
    assert crops.dtype == torch.bfloat16 and crops.shape == (2, 3, 6, 10)


def test_map_box_crop_functions_compile():
    def localise(importance, images):
        maps = response_map(importance, (4, 4), images.shape[-2:])
        boxes = boxes_from_response_map(maps, padding=0.05, min_size=0.2)
        return crop_and_resize(images, boxes, 16), boxes

    torch.manual_seed(0)
    importance, images = torch.rand(2, 16), torch.rand(2, 3, 64, 64)
    torch._dynamo.reset()
    crops, boxes = torch.compile(localise, backend='eager')(importance, images)
    expected_crops, expected_boxes = localise(importance, images)
    torch.testing.assert_close(boxes, expected_boxes)
    torch.testing.assert_close(crops, expected_crops)


# ------------------------------------------------------------------ the module


def test_cropper_output_and_frozen_after_train():
    cropper = AttentionCropper(VIT, out_size=32, **TINY)
    cropper.train()
    assert cropper.training and not cropper.vit.training
    assert not any(p.requires_grad for p in cropper.parameters())
    images = torch.randn(3, 3, 64, 64)
    out = cropper(images)
    assert isinstance(out, CropOutput) and out.logits is None
    assert out.crops.shape == (3, 3, 32, 32) and out.boxes.shape == (3, 4) and out.response.shape == (3, 64, 64)
    assert out.response.min() >= 0 and out.response.max() <= 1
    assert (out.boxes[:, 2:] > out.boxes[:, :2]).all()
    assert (out.boxes[:, 2:] - out.boxes[:, :2] >= 0.2 * 64 - 1e-4).all()  # min_size default
    assert not out.crops.requires_grad and not out.response.requires_grad


def test_cropper_localises_at_another_size_and_maps_boxes_back():
    class FixedImportance(AttentionCropper):
        def importance(self, attention):
            one_hot = torch.zeros(attention.shape[1], 16)
            one_hot[:, 1 * 4 + 2] = 1.0  # token row 1, column 2 of the 4 x 4 grid
            return one_hot

    seen = []
    cropper = FixedImportance(VIT, localize_size=64, out_size=96, padding=0.0, min_size=0.0,
                              depth=2, embed_dim=32, num_heads=2)
    cropper.vit.patch_embed.register_forward_pre_hook(lambda m, inp: seen.append(inp[0].shape[-2:]))
    images = torch.randn(2, 3, 128, 96)  # H = 128, W = 96: the ViT sees a squeezed 64 x 64 copy
    out = cropper(images)
    assert seen == [(64, 64)]
    assert out.response.shape == (2, 128, 96) and out.crops.shape == (2, 3, 96, 96)
    # the token covers y in [32, 64), x in [48, 72) of the input: the box centres there
    centre = (out.boxes[:, :2] + out.boxes[:, 2:]) / 2
    torch.testing.assert_close(centre, torch.tensor([[60., 48.]] * 2), atol=1.0, rtol=0)
    torch.testing.assert_close(out.boxes, boxes_from_response_map(out.response, padding=0.0, min_size=0.0,
                                                                  label_size=(4, 4)))
    x1, y1, x2, y2 = out.boxes[0].round().long().tolist()
    assert x2 - x1 < 96 and y2 - y1 < 96  # enlarged: one bilinear sample per output pixel
    manual = F.interpolate(images[:1, :, y1:y2, x1:x2], size=(96, 96), mode='bilinear', align_corners=False)
    torch.testing.assert_close(out.crops[:1, :, 2:-2, 2:-2], manual[..., 2:-2, 2:-2], atol=1e-4, rtol=1e-4)


def test_trainable_cropper_gets_gradients():
    cropper = AttentionCropper(VIT, num_classes=5, freeze=False, method='column_sum', **TINY)
    cropper.eval().train()
    assert cropper.vit.training
    out = cropper(torch.randn(2, 3, 64, 64))
    assert out.logits.shape == (2, 5)
    out.logits.logsumexp(1).sum().backward()
    for name in ('blocks.0.attn.qkv.weight', 'blocks.1.mlp.fc1.weight', 'head.weight', 'patch_embed.proj.weight'):
        grad = cropper.vit.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_cropper_under_bf16_autocast():
    cropper = AttentionCropper(VIT, out_size=32, method='column_sum', **TINY)
    images = torch.randn(2, 3, 64, 64)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = cropper(images)
    assert out.response.dtype == torch.float32 and out.boxes.dtype == torch.float32
    assert torch.isfinite(out.crops).all() and torch.isfinite(out.response).all()
    assert out.response.min() >= 0 and out.response.max() <= 1
    assert ((out.boxes >= 0) & (out.boxes <= 64)).all()


@pytest.mark.parametrize('suffix', ['safetensors', 'pth'])
def test_cropper_loads_local_pretrained_file(tmp_path, suffix):
    source = tiny_vit()
    path = tmp_path / f'vit.{suffix}'
    if suffix == 'safetensors':
        from safetensors.torch import save_file
        save_file(source.state_dict(), str(path))
    else:
        torch.save(source.state_dict(), path)
    cropper = AttentionCropper(VIT, pretrained=str(path), **TINY)  # num_classes=0: no head
    loaded = cropper.vit.state_dict()
    assert set(source.state_dict()) - set(loaded) == {'head.weight', 'head.bias'}
    for name, tensor in loaded.items():
        torch.testing.assert_close(tensor, source.state_dict()[name], msg=name)


@pytest.mark.parametrize('kwargs, argument', [
    (dict(method='gradcam'), 'method'),
    (dict(head_fusion='avg'), 'head_fusion'),
    (dict(threshold='median'), 'threshold'),
    (dict(threshold=1.5), 'threshold'),
    (dict(box_mode='biggest'), 'box_mode'),
    (dict(padding=-0.1), 'padding'),
    (dict(min_size=2.0), 'min_size'),
    (dict(discard_ratio=1.0), 'discard_ratio'),
    (dict(freeze=False), 'num_classes'),
    (dict(localize_size=32), 'localize_size'),  # conflicts with img_size=64 in TINY
    (dict(img_size=72), 'localize_size'),       # not a multiple of the 16-pixel patches
])
def test_bad_arguments_name_themselves(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        AttentionCropper(VIT, **{**TINY, **kwargs})
