"""ACmix: shapes, both paths against naive references, gradients, device/dtype, bf16 autocast."""

import pytest
import torch
import torch.nn.functional as F

from mgff.models.acmix import ACmix, pixel_coordinates


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("size", [(8, 8), (7, 5), (3, 3)])
def test_output_shape(stride, size):
    h, w = size
    module = ACmix(12, 16, num_heads=4, kernel_att=5, stride=stride)
    out = module(torch.randn(2, 12, h, w))
    assert out.shape == (2, 16, -(-h // stride), -(-w // stride))


def test_attention_path_matches_a_per_pixel_window_loop():
    torch.manual_seed(0)
    module = ACmix(6, 8, num_heads=2, kernel_att=3, stride=1)
    x = torch.randn(1, 6, 5, 4)
    q, k, v = module.proj_q(x), module.proj_k(x), module.proj_v(x)
    out = module.attention(q, k, v)
    pos = module.proj_pos(pixel_coordinates(5, 4, x.device, x.dtype))[0]  # (head_dim, H, W)
    hd = module.head_dim
    for head in range(2):
        ch = slice(head * hd, (head + 1) * hd)
        for y, xx in [(0, 0), (2, 1), (4, 3), (1, 3)]:  # corners, inside, border
            query = q[0, ch, y, xx] * hd**-0.5
            keys, values = [], []
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    yy, xj = y + dy, xx + dx
                    if 0 <= yy < 5 and 0 <= xj < 4:  # only real pixels take part
                        keys.append(k[0, ch, yy, xj] + pos[:, y, xx] - pos[:, yy, xj])
                        values.append(v[0, ch, yy, xj])
            weights = torch.stack([query @ key for key in keys]).softmax(0)
            expected = (weights[:, None] * torch.stack(values)).sum(0)
            torch.testing.assert_close(out[0, ch, y, xx], expected, atol=1e-5, rtol=1e-5)


def test_convolution_path_starts_as_shift_and_sum():
    torch.manual_seed(0)
    module = ACmix(6, 8, num_heads=2, kernel_conv=3)
    x = torch.randn(2, 6, 5, 5)
    q, k, v = module.proj_q(x), module.proj_k(x), module.proj_v(x)
    out = module.convolution(q, k, v)
    b, heads, hd = 2, 2, module.head_dim
    qkv = torch.cat([t.reshape(b, heads, hd, 5, 5) for t in (q, k, v)], dim=1)  # (B, 3*heads, hd, H, W)
    features = torch.einsum("oc,bcdhw->bodhw", module.fc.weight[:, :, 0, 0], qkv)  # (B, 9, hd, H, W)
    padded = F.pad(features, (1, 1, 1, 1))
    # Kernel position i = (a, b) reads the feature i at offset (a - 1, b - 1).
    shifted = sum(padded[:, i, :, i // 3: i // 3 + 5, i % 3: i % 3 + 5] for i in range(9))  # (B, hd, H, W)
    # Every group (head channel) writes num_heads identical output channels at init.
    expected = shifted.repeat_interleave(heads, dim=1)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_both_paths_and_both_rates_receive_gradients():
    module = ACmix(8, 8, num_heads=2)
    module(torch.randn(2, 8, 6, 6)).square().mean().backward()
    for name in ["proj_q", "proj_k", "proj_v", "proj_pos", "fc", "shift_conv"]:
        grad = getattr(module, name).weight.grad
        assert grad is not None and grad.abs().sum() > 0, name
    assert module.rate_att.grad.abs() > 0 and module.rate_conv.grad.abs() > 0


def test_follows_the_input_dtype():
    module = ACmix(8, 8, num_heads=2, stride=2).double()
    out = module(torch.randn(1, 8, 6, 6, dtype=torch.float64))
    assert out.dtype == torch.float64


def test_bf16_autocast_on_cpu():
    module = ACmix(8, 16, num_heads=4)
    x = torch.randn(2, 8, 6, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = module(x)
    assert out.shape == (2, 16, 6, 6) and torch.isfinite(out.float()).all()
    torch.testing.assert_close(out.float(), module(x), atol=0.1, rtol=0.1)
