"""UniFormer in the timm registry: sizes, shapes, checkpoint loading, feature extraction.

Shape, parameter and FLOP checks of the full-size variants run on the ``meta`` device (shapes and
counts without arithmetic); numerics run on small configs on the CPU.
"""
import pytest
import torch
import timm
from torch.utils.flop_counter import FlopCounterMode

import mgff.models.zoo  # noqa: F401  (registers the models with timm)
from mgff.models.zoo.uniformer import UniFormer, checkpoint_filter_fn

VARIANTS = ['uniformer_small', 'uniformer_small_plus', 'uniformer_small_plus_dim64', 'uniformer_base',
            'uniformer_base_ls']
STAGE_CHANNELS = (64, 128, 320, 512)
TINY = dict(depths=(1, 1, 2, 1), embed_dims=(16, 32, 64, 128), head_dim=32)

# Published ImageNet-1k sizes (224, 1000-class head). The official README
# (github.com/Sense-X/UniFormer/tree/main/image_classification, both ImageNet-1K tables) and the paper
# (arXiv:2201.09450) give 22M / 24M / 50M and 3.6G / 4.2G / 8.3G FLOPs (multiply-accumulates, fvcore) for
# S / S-dagger (head_dim 32, and its head_dim 64 retrain) / B (with and without layer scale); the unrounded
# counts 21.5M / 24.0M / 49.8M are the ones quoted in issue 7. Layer scale adds only 2 x (320 x 20 + 512 x 7).
PUBLISHED_PARAMS_M = {
    'uniformer_small': (21.5, 22),
    'uniformer_small_plus': (24.0, 24),
    'uniformer_small_plus_dim64': (24.0, 24),
    'uniformer_base': (49.8, 50),
    'uniformer_base_ls': (49.8, 50),
}
PUBLISHED_GMACS = {
    'uniformer_small': 3.6,
    'uniformer_small_plus': 4.2,
    'uniformer_small_plus_dim64': 4.2,
    'uniformer_base': 8.3,
    'uniformer_base_ls': 8.3,
}


@pytest.fixture(autouse=True, scope='module')
def _single_thread():
    """One intra-op thread: on a shared 2-core machine OpenMP workers of tiny ops mostly wait for each
    other (10x slower than one thread here); restored afterwards for the rest of the session."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _meta_model(name, **kwargs):
    with torch.device('meta'):
        return timm.create_model(name, **kwargs)


@pytest.fixture(scope='module')
def meta_models():
    """Full-size variants on the meta device, each built once for all tests of this module."""
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = _meta_model(name).eval()
        return cache[name]
    return get


def _num_params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize('name', VARIANTS)
def test_parameter_count_matches_published(name, meta_models):
    precise_m, readme_m = PUBLISHED_PARAMS_M[name]
    count = _num_params(meta_models(name))
    assert abs(count / 1e6 - precise_m) / precise_m < 0.01, count
    assert round(count / 1e6) == readme_m


@pytest.mark.parametrize('name', VARIANTS)
def test_classifier_output_and_flops_at_224(name, meta_models):
    with FlopCounterMode(display=False) as counter:
        logits = meta_models(name)(torch.empty(1, 3, 224, 224, device='meta'))
    assert logits.shape == (1, 1000)
    gmacs = counter.get_total_flops() / 2e9  # the counter reports 2 FLOPs per multiply-accumulate
    # published figures have one decimal: allow for that rounding
    assert abs(gmacs - PUBLISHED_GMACS[name]) / PUBLISHED_GMACS[name] < 0.02, gmacs


@pytest.mark.parametrize('name', VARIANTS)
def test_feature_shapes_at_224_and_384(name):
    features = _meta_model(name, features_only=True)
    assert features.feature_info.channels() == list(STAGE_CHANNELS)
    assert features.feature_info.reduction() == [4, 8, 16, 32]
    for size in (224, 384):
        shapes = [tuple(f.shape) for f in features(torch.empty(1, 3, size, size, device='meta'))]
        assert shapes == [(1, c, size // r, size // r) for c, r in zip(STAGE_CHANNELS, (4, 8, 16, 32))]


def test_layer_scale_variant_does_not_change_later_builds():
    # the official code flips a module-level flag inside uniformer_base_ls(), so every later model had layer scale
    with_ls = _meta_model('uniformer_base_ls', **TINY)
    without = _meta_model('uniformer_base', **TINY)
    again = _meta_model('uniformer_base_ls', **TINY)
    assert any(n.endswith('gamma_1') for n, _ in with_ls.named_parameters())
    assert not any('gamma' in n for n, _ in without.named_parameters())
    assert [n for n, _ in again.named_parameters()] == [n for n, _ in with_ls.named_parameters()]


@pytest.mark.parametrize('name', ['uniformer_small_plus', 'uniformer_base_ls'])
def test_official_checkpoint_loads_through_timm_pretrained(tmp_path, name):
    """An official training checkpoint ({'model': ...}, DDP 'module.' prefix) loads strictly."""
    torch.manual_seed(0)
    source = timm.create_model(name, **TINY)
    official = {'model': {f'module.{k}': v for k, v in source.state_dict().items()}}
    path = tmp_path / f'{name}.pth'
    torch.save(official, path)

    loaded = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **TINY)
    for k, v in source.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v, msg=k)

    # a new class count drops the classifier and keeps everything else
    finetune = timm.create_model(
        name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), num_classes=7, **TINY)
    assert finetune.get_classifier().out_features == 7
    torch.testing.assert_close(finetune.norm.running_var, source.norm.running_var)

    backbone = timm.create_model(
        name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), features_only=True, **TINY)
    x = torch.randn(1, 3, 64, 64)
    source.eval(), backbone.eval()
    torch.testing.assert_close(backbone(x)[-1], source.forward_intermediates(x, intermediates_only=True)[-1])


def test_checkpoint_filter_unwraps_official_packaging():
    model = UniFormer(**TINY)
    sd = model.state_dict()
    for packed in ({'model': sd}, {'state_dict': sd}, {f'module.{k}': v for k, v in sd.items()}, sd):
        assert set(checkpoint_filter_fn(packed, model)) == set(sd)


def test_forward_intermediates_agree_with_forward_features():
    torch.manual_seed(1)
    model = UniFormer(**TINY, num_classes=5).eval()
    x = torch.randn(2, 3, 64, 64)
    final, inters = model.forward_intermediates(x, norm=True)
    torch.testing.assert_close(final, model.forward_features(x))
    torch.testing.assert_close(inters[-1], final, msg='norm=True normalises the last stage only')
    assert [t.shape[1] for t in inters] == [16, 32, 64, 128]

    nhwc = model.forward_intermediates(x, indices=[1, 2], output_fmt='NHWC', intermediates_only=True)
    torch.testing.assert_close(nhwc[0], inters[1].permute(0, 2, 3, 1))
    early = model.forward_intermediates(x, indices=2, stop_early=True, intermediates_only=True)
    assert len(early) == 2 and early[0].shape == inters[2].shape


def test_prune_keeps_requested_stages_only():
    torch.manual_seed(2)
    model = UniFormer(**TINY).eval()
    x = torch.randn(1, 3, 64, 64)
    reference = model.forward_intermediates(x, intermediates_only=True)
    kept = model.prune_intermediate_layers([0, 1])
    assert kept == [0, 1]
    assert not hasattr(model, 'blocks3') and not hasattr(model, 'patch_embed4')
    assert isinstance(model.get_classifier(), torch.nn.Identity) and model.num_features == 32
    pruned = model.forward_intermediates(x, indices=[0, 1], intermediates_only=True)
    for a, b in zip(pruned, reference[:2]):
        torch.testing.assert_close(a, b)


def test_features_only_respects_out_indices():
    features = timm.create_model('uniformer_small', features_only=True, out_indices=(1, 3), **TINY)
    assert features.feature_info.channels() == [32, 128]
    out = features(torch.randn(1, 3, 64, 64))
    assert [tuple(t.shape) for t in out] == [(1, 32, 8, 8), (1, 128, 2, 2)]


def test_reset_classifier_and_pre_logits():
    model = UniFormer(**TINY, num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    assert model(x).shape == (2, 10)
    model.reset_classifier(3)
    assert model(x).shape == (2, 3)
    assert model.forward_head(model.forward_features(x), pre_logits=True).shape == (2, 128)
    model.reset_classifier(0, global_pool='')
    assert model(x).shape == (2, 128, 2, 2)


@pytest.mark.parametrize('conv_stem', [False, True])
def test_gradients_reach_every_parameter(conv_stem):
    torch.manual_seed(3)
    model = UniFormer(**TINY, conv_stem=conv_stem, layer_scale_init_value=0.1, num_classes=4, drop_path_rate=0.1)
    model.train()
    loss = torch.nn.functional.cross_entropy(model(torch.randn(2, 3, 64, 64)), torch.tensor([0, 3]))
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_bf16_autocast_forward_on_cpu():
    torch.manual_seed(4)
    model = UniFormer(**TINY, conv_stem=True, num_classes=6).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        reference = model(x)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            out = model(x)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    torch.testing.assert_close(out.float(), reference, atol=0.1, rtol=0.1)


def test_grad_checkpointing_gives_the_same_output():
    torch.manual_seed(5)
    model = UniFormer(**TINY).eval()
    x = torch.randn(1, 3, 64, 64)
    plain = model(x)
    model.set_grad_checkpointing(True)
    torch.testing.assert_close(model(x), plain)
