"""HiLo attention from LiTv2.

Paper: Pan et al., "Fast Vision Transformers with HiLo Attention", NeurIPS 2022,
https://arxiv.org/abs/2205.13213 (official code: https://github.com/ziplab/LITv2).

The heads are split in two groups that read different frequencies of the same map:

* Lo-Fi (``int(alpha * num_heads)`` heads): every token queries keys/values taken from the map
  average-pooled over ``window_size x window_size`` windows, so it sees the whole image at low
  resolution (global, low frequencies).
* Hi-Fi (the other heads): ordinary self-attention inside each non-overlapping
  ``window_size x window_size`` window (local, high frequencies).

Each group projects the input to its own width and back; the two outputs are concatenated
(Hi-Fi channels first) to the input width. ``window_size == 1`` makes every head Lo-Fi with no
pooling, i.e. standard global multi-head self-attention. Parameter names (``h_qkv``, ``h_proj``,
``l_q``, ``l_kv``, ``l_proj``) follow the official code so LiTv2 checkpoints load unchanged.
"""
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ['HiLo']


class HiLo(nn.Module):
    """HiLo attention on a channels-last grid of tokens.

    Args:
        dim: Token width ``C``; must be divisible by ``num_heads``.
        num_heads: Total number of heads, shared between Hi-Fi and Lo-Fi.
        qkv_bias: Add a bias to the query/key/value projections.
        qk_scale: Attention logit scale; ``head_dim ** -0.5`` when None.
        attn_drop: Dropout on the attention weights (training only).
        proj_drop: Dropout after each output projection.
        window_size: Side ``s`` of the Hi-Fi windows and of the Lo-Fi pooling.
        alpha: Fraction of the heads given to Lo-Fi (rounded down, as in the official code).

    Shapes:
        ``forward(x)``: x ``(B, H, W, C)`` -> ``(B, H, W, C)``. Any ``H, W`` works: grids that
        ``window_size`` does not divide are padded for the Hi-Fi windows (padded keys are masked
        out) and pooled over the partial border windows for Lo-Fi; the output is cropped back.
    """

    def __init__(
            self,
            dim: int,
            num_heads: int = 8,
            qkv_bias: bool = False,
            qk_scale: Optional[float] = None,
            attn_drop: float = 0.,
            proj_drop: float = 0.,
            window_size: int = 2,
            alpha: float = 0.5,
    ):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f'dim {dim} must be divisible by num_heads {num_heads}')
        if not 0. <= alpha <= 1.:
            raise ValueError(f'alpha must lie in [0, 1], got {alpha}')
        if window_size < 1:
            raise ValueError(f'window_size must be >= 1, got {window_size}')
        self.dim = dim
        self.head_dim = dim // num_heads
        self.ws = window_size
        self.scale = qk_scale or self.head_dim ** -0.5
        self.attn_drop_p = attn_drop

        if window_size == 1:
            # a 1x1 window holds one token: Hi-Fi would be a no-op attention and Lo-Fi pools nothing,
            # so all heads become plain global attention (as in the official code)
            self.l_heads = num_heads
        else:
            self.l_heads = int(num_heads * alpha)
        self.h_heads = num_heads - self.l_heads
        self.l_dim = self.l_heads * self.head_dim
        self.h_dim = self.h_heads * self.head_dim

        if self.l_heads > 0:
            self.l_q = nn.Linear(dim, self.l_dim, bias=qkv_bias)
            self.l_kv = nn.Linear(dim, self.l_dim * 2, bias=qkv_bias)
            self.l_proj = nn.Linear(self.l_dim, self.l_dim)
        if self.h_heads > 0:
            self.h_qkv = nn.Linear(dim, self.h_dim * 3, bias=qkv_bias)
            self.h_proj = nn.Linear(self.h_dim, self.h_dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def _window_key_mask(self, H: int, W: int, Hp: int, Wp: int, device: torch.device) -> torch.Tensor:
        """Which keys of each padded window are real tokens: ``(nW, 1, 1, s*s)`` bool."""
        ws = self.ws
        valid = (torch.arange(Hp, device=device) < H)[:, None] & (torch.arange(Wp, device=device) < W)[None, :]
        valid = valid.reshape(Hp // ws, ws, Wp // ws, ws).transpose(1, 2)
        return valid.reshape(-1, 1, 1, ws * ws)

    def hifi(self, x: torch.Tensor) -> torch.Tensor:
        """Attention inside each ``s x s`` window: ``(B, H, W, C)`` -> ``(B, H, W, h_dim)``."""
        B, H, W, _ = x.shape
        ws, heads, hd = self.ws, self.h_heads, self.head_dim
        qkv = self.h_qkv(x)
        # project before padding: padded positions are never attended to (masked keys, cropped
        # queries), so what they hold does not matter and the projection of zeros is skipped
        pad_b, pad_r = (-H) % ws, (-W) % ws
        if pad_b or pad_r:
            qkv = F.pad(qkv, (0, 0, 0, pad_r, 0, pad_b))
        Hp, Wp = H + pad_b, W + pad_r
        hg, wg = Hp // ws, Wp // ws

        # (B, hg, s, wg, s, 3, heads, hd) -> (3, B*hg*wg, heads, s*s, hd)
        qkv = qkv.reshape(B, hg, ws, wg, ws, 3, heads, hd).permute(5, 0, 1, 3, 6, 2, 4, 7)
        q, k, v = qkv.reshape(3, B * hg * wg, heads, ws * ws, hd).unbind(0)

        mask = None
        if pad_b or pad_r:
            mask = self._window_key_mask(H, W, Hp, Wp, x.device)
            mask = mask.expand(B, -1, -1, -1, -1).reshape(B * hg * wg, 1, 1, ws * ws)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.attn_drop_p if self.training else 0., scale=self.scale)

        # (B*hg*wg, heads, s*s, hd) -> (B, Hp, Wp, h_dim), then drop the padding
        out = out.reshape(B, hg, wg, heads, ws, ws, hd).permute(0, 1, 4, 2, 5, 3, 6)
        out = out.reshape(B, Hp, Wp, self.h_dim)[:, :H, :W]
        return self.proj_drop(self.h_proj(out))

    def lofi(self, x: torch.Tensor) -> torch.Tensor:
        """Every token attends to the ``s x s`` average-pooled map: ``(B, H, W, C)`` -> ``(B, H, W, l_dim)``."""
        B, H, W, C = x.shape
        heads, hd = self.l_heads, self.head_dim
        q = self.l_q(x).reshape(B, H * W, heads, hd).transpose(1, 2)

        if self.ws > 1:
            # ceil_mode pools the partial border windows over their real tokens only (the divisor
            # counts in-bounds elements), so odd grids need no zero padding that would dilute them
            pooled = F.avg_pool2d(x.permute(0, 3, 1, 2), self.ws, self.ws, ceil_mode=True)
            kv_tokens = pooled.flatten(2).transpose(1, 2)
        else:
            kv_tokens = x.reshape(B, H * W, C)
        k, v = self.l_kv(kv_tokens).reshape(B, -1, 2, heads, hd).permute(2, 0, 3, 1, 4).unbind(0)

        out = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.attn_drop_p if self.training else 0., scale=self.scale)
        out = out.transpose(1, 2).reshape(B, H, W, self.l_dim)
        return self.proj_drop(self.l_proj(out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, H, W, C)`` -> ``(B, H, W, C)``: Hi-Fi channels, then Lo-Fi channels."""
        if self.h_heads == 0:
            return self.lofi(x)
        if self.l_heads == 0:
            return self.hifi(x)
        return torch.cat((self.hifi(x), self.lofi(x)), dim=-1)

    def extra_repr(self) -> str:
        return (f'dim={self.dim}, window_size={self.ws}, hifi_heads={self.h_heads}, lofi_heads={self.l_heads}, '
                f'head_dim={self.head_dim}')
