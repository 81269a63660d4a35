"""HiLo attention against naive references written out loop by loop."""
import pytest
import torch

from mgff.models.hilo import HiLo


@pytest.fixture(autouse=True, scope='module')
def _single_thread():
    """One intra-op thread: on a shared 2-core machine OpenMP workers of tiny ops mostly wait for each
    other (10x slower than one thread here); restored afterwards for the rest of the session."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _heads_attention(q, k, v, num_heads, scale):
    """Plain softmax attention per head. q: (Nq, D), k/v: (Nk, D) -> (Nq, D)."""
    nq, d = q.shape
    hd = d // num_heads
    q = q.reshape(nq, num_heads, hd).transpose(0, 1)
    k = k.reshape(-1, num_heads, hd).transpose(0, 1)
    v = v.reshape(-1, num_heads, hd).transpose(0, 1)
    attn = torch.softmax(q @ k.transpose(-2, -1) * scale, dim=-1)
    return (attn @ v).transpose(0, 1).reshape(nq, d)


def naive_window_attention(m: HiLo, x: torch.Tensor) -> torch.Tensor:
    """Hi-Fi reference: attention within each s x s window; border windows are just smaller."""
    B, H, W, _ = x.shape
    ws = m.ws
    out = torch.zeros(B, H, W, m.h_dim, dtype=x.dtype)
    for b in range(B):
        for i in range(0, H, ws):
            for j in range(0, W, ws):
                win = x[b, i:i + ws, j:j + ws]
                h, w = win.shape[:2]
                q, k, v = m.h_qkv(win.reshape(h * w, -1)).chunk(3, dim=-1)
                o = _heads_attention(q, k, v, m.h_heads, m.scale)
                out[b, i:i + ws, j:j + ws] = m.h_proj(o).reshape(h, w, -1)
    return out


def naive_pooled_attention(m: HiLo, x: torch.Tensor) -> torch.Tensor:
    """Lo-Fi reference: every token attends to the means of the s x s windows (real tokens only)."""
    B, H, W, C = x.shape
    ws = m.ws
    out = []
    for b in range(B):
        means = [x[b, i:i + ws, j:j + ws].reshape(-1, C).mean(0)
                 for i in range(0, H, ws) for j in range(0, W, ws)]
        pooled = torch.stack(means)
        q = m.l_q(x[b].reshape(H * W, C))
        k, v = m.l_kv(pooled).chunk(2, dim=-1)
        o = _heads_attention(q, k, v, m.l_heads, m.scale)
        out.append(m.l_proj(o).reshape(H, W, -1))
    return torch.stack(out)


@pytest.mark.parametrize('hw', [(8, 8), (7, 5)])
def test_alpha_zero_is_windowed_attention(hw):
    torch.manual_seed(0)
    m = HiLo(32, num_heads=4, qkv_bias=True, window_size=2, alpha=0.)
    assert m.l_heads == 0 and m.h_heads == 4
    x = torch.randn(2, *hw, 32)
    torch.testing.assert_close(m(x), naive_window_attention(m, x), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize('hw', [(8, 8), (7, 5)])
def test_alpha_one_is_attention_to_pooled_map(hw):
    torch.manual_seed(1)
    m = HiLo(32, num_heads=4, qkv_bias=True, window_size=3, alpha=1.)
    assert m.h_heads == 0 and m.l_heads == 4
    x = torch.randn(2, *hw, 32)
    torch.testing.assert_close(m(x), naive_pooled_attention(m, x), atol=1e-5, rtol=1e-4)


def test_window_size_one_is_global_mhsa():
    torch.manual_seed(2)
    m = HiLo(32, num_heads=4, qkv_bias=True, window_size=1, alpha=0.25)
    assert m.l_heads == 4 and m.h_heads == 0, 'a 1x1 window makes every head global'
    x = torch.randn(2, 5, 6, 32)
    tokens = x.reshape(2, 30, 32)
    mha = torch.nn.MultiheadAttention(32, 4, bias=True, batch_first=True)
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.cat([m.l_q.weight, m.l_kv.weight]))
        mha.in_proj_bias.copy_(torch.cat([m.l_q.bias, m.l_kv.bias]))
        mha.out_proj.weight.copy_(m.l_proj.weight)
        mha.out_proj.bias.copy_(m.l_proj.bias)
    ref, _ = mha(tokens, tokens, tokens, need_weights=False)
    torch.testing.assert_close(m(x), ref.reshape(2, 5, 6, 32), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize('hw', [(8, 6), (7, 5)])
def test_mixed_heads_concatenate_hifi_then_lofi(hw):
    torch.manual_seed(3)
    m = HiLo(48, num_heads=6, window_size=2, alpha=0.5)
    assert (m.h_heads, m.l_heads) == (3, 3)
    x = torch.randn(1, *hw, 48)
    ref = torch.cat([naive_window_attention(m, x), naive_pooled_attention(m, x)], dim=-1)
    torch.testing.assert_close(m(x), ref, atol=1e-5, rtol=1e-4)


def test_official_head_split_and_parameter_names():
    m = HiLo(384, num_heads=12, qkv_bias=True, window_size=2, alpha=0.9)
    # official: int(12 * 0.9) = 10 Lo-Fi heads, 2 Hi-Fi heads
    assert (m.l_heads, m.h_heads) == (10, 2)
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert shapes == {
        'l_q.weight': (320, 384), 'l_q.bias': (320,),
        'l_kv.weight': (640, 384), 'l_kv.bias': (640,),
        'l_proj.weight': (320, 320), 'l_proj.bias': (320,),
        'h_qkv.weight': (192, 384), 'h_qkv.bias': (192,),
        'h_proj.weight': (64, 64), 'h_proj.bias': (64,),
    }


def test_gradients_reach_every_parameter_and_input():
    torch.manual_seed(5)
    m = HiLo(32, num_heads=4, qkv_bias=True, window_size=2, alpha=0.5)
    x = torch.randn(2, 7, 5, 32, requires_grad=True)
    m(x).square().mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_bf16_autocast_on_cpu():
    torch.manual_seed(6)
    m = HiLo(32, num_heads=4, window_size=2, alpha=0.5)
    x = torch.randn(2, 7, 5, 32)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        y = m(x)
    assert y.shape == x.shape and y.dtype == torch.bfloat16
    assert torch.isfinite(y.float()).all()
    torch.testing.assert_close(y.float(), m(x), atol=5e-2, rtol=5e-2)


def test_traces_without_graph_breaks():
    """fullgraph=True fails on any graph break; the eager backend keeps the test fast on CPU."""
    torch._dynamo.reset()
    m = HiLo(32, num_heads=4, window_size=2, alpha=0.5)
    compiled = torch.compile(m, backend='eager', fullgraph=True)
    x = torch.randn(2, 7, 5, 32)
    torch.testing.assert_close(compiled(x), m(x))


def test_rejects_bad_arguments():
    with pytest.raises(ValueError):
        HiLo(30, num_heads=4)
    with pytest.raises(ValueError):
        HiLo(32, num_heads=4, alpha=1.5)
