"""Spatial attention: relative position indexing, MHSA against an explicit softmax, the factory."""

import pytest
import torch

from mgff.models.attention import (
    RelPosSelfAttention2d,
    build_spatial_attention,
    relative_position_index,
)


@pytest.mark.parametrize("h, w, max_grid", [(3, 4, 4), (5, 2, 8), (1, 1, 1)])
def test_relative_position_index_matches_a_double_loop(h, w, max_grid):
    side = 2 * max_grid - 1
    expected = torch.empty(h * w, h * w, dtype=torch.long)
    for i in range(h * w):
        for j in range(h * w):
            dy = i // w - j // w
            dx = i % w - j % w
            expected[i, j] = (dy + max_grid - 1) * side + (dx + max_grid - 1)
    index = relative_position_index(h, w, max_grid)
    assert index.dtype == torch.long
    assert torch.equal(index, expected)
    assert 0 <= index.min() and index.max() < side**2


def test_same_offset_same_bias_on_every_grid_size():
    attention = RelPosSelfAttention2d(16, num_heads=2, max_grid=6)
    small, large = attention.position_bias(3, 3, "cpu"), attention.position_bias(6, 5, "cpu")
    # token (0, 0) -> token (1, 2): index 0 -> 5 on the 3x3 grid, 0 -> 7 on the 6x5 grid
    assert torch.equal(small[:, 0, 5], large[:, 0, 7])


def test_grid_larger_than_the_table_is_an_error():
    with pytest.raises(ValueError, match="max_grid"):
        RelPosSelfAttention2d(16, num_heads=2, max_grid=4)(torch.randn(1, 5, 5, 16))


@pytest.mark.parametrize("size", [(3, 3), (4, 6)])
def test_mhsa_equals_explicit_softmax_with_position_bias(size):
    torch.manual_seed(0)
    h, w = size
    attention = RelPosSelfAttention2d(16, num_heads=4, max_grid=8).eval()
    torch.nn.init.normal_(attention.relative_position_bias_table, std=1.0)  # make the bias matter
    x = torch.randn(2, h, w, 16)
    weights = attention.attention_map(x)
    assert weights.shape == (2, 4, h * w, h * w)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 4, h * w))
    v = attention.qkv(x).reshape(2, h * w, 3, 4, 4)[:, :, 2].transpose(1, 2)  # (B, heads, N, d)
    expected = attention.proj((weights @ v).transpose(1, 2).reshape(2, h, w, 16))
    torch.testing.assert_close(attention(x), expected, atol=1e-5, rtol=1e-5)
    # the bias is really applied: without it the output changes
    out = attention(x)
    with torch.no_grad():
        attention.relative_position_bias_table.zero_()
    assert not torch.allclose(attention(x), out, atol=1e-3)


def test_mhsa_gradients_reach_the_bias_table():
    attention = RelPosSelfAttention2d(16, num_heads=2, max_grid=4)
    attention(torch.randn(2, 3, 3, 16)).sum().backward()
    assert attention.relative_position_bias_table.grad.abs().sum() > 0


@pytest.mark.parametrize("kind", ["mhsa", "hilo", "acmix"])
@pytest.mark.parametrize("size", [(3, 3), (5, 7)])
def test_factory_kinds_keep_channels_last_shape(kind, size):
    module = build_spatial_attention(kind, 32, 4)
    x = torch.randn(2, *size, 32, requires_grad=True)
    out = module(x)
    assert out.shape == x.shape
    out.sum().backward()
    assert x.grad.abs().sum() > 0


def test_factory_rejects_unknown_kind():
    with pytest.raises(ValueError, match="unknown spatial attention"):
        build_spatial_attention("performer", 32, 4)
