"""Spatial self-attention over the grid tokens of a feature map, the fusion head's step 2.

The paper enhances every map with multi-head self-attention whose scores carry a relative position
embedding: ``A = softmax(Q K^T / sqrt(d_k) + E_pos)``, ``I = A V``. ``RelPosSelfAttention2d`` is that
module; ``build_spatial_attention`` also offers HiLo (LiTv2) and ACmix in its place. All of them map
a channels-last map ``(B, H, W, C)`` to ``(B, H, W, C)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch import Tensor, nn

from mgff.models.acmix import ACmix

__all__ = [
    "ChannelsLast",
    "RelPosSelfAttention2d",
    "SPATIAL_ATTENTION_KINDS",
    "build_spatial_attention",
    "relative_position_index",
]

SPATIAL_ATTENTION_KINDS = ("mhsa", "hilo", "acmix")


def relative_position_index(
    h: int, w: int, max_grid: int, device: torch.device | None = None
) -> Tensor:
    """Index of every token pair's offset in a table over all offsets of a ``max_grid`` grid.

    Token ``i`` at ``(y_i, x_i)`` (row-major over the ``h x w`` grid) and token ``j`` have offset
    ``(y_i - y_j, x_i - x_j)`` in ``[-(max_grid - 1), max_grid - 1]^2``; its index is
    ``(dy + max_grid - 1) * (2 * max_grid - 1) + (dx + max_grid - 1)``. The same offset gets the same
    index on every grid size, so one table serves all input sizes up to ``max_grid``.

    Returns:
        LongTensor ``(h * w, h * w)`` with values in ``[0, (2 * max_grid - 1) ** 2)``.
    """
    if h > max_grid or w > max_grid:
        raise ValueError(f"grid {h}x{w} is larger than max_grid={max_grid}")
    ys, xs = torch.meshgrid(
        torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij"
    )
    ys, xs = ys.flatten(), xs.flatten()
    dy = ys[:, None] - ys[None, :] + (max_grid - 1)
    dx = xs[:, None] - xs[None, :] + (max_grid - 1)
    return dy * (2 * max_grid - 1) + dx


class RelPosSelfAttention2d(nn.Module):
    """Multi-head self-attention over all tokens of a map, with a learned relative position bias.

    ``scores_h = Q_h K_h^T / sqrt(d_k) + B_h[offset(i, j)]`` per head ``h``, where ``B_h`` is a learned
    table over all 2-D offsets up to ``max_grid - 1`` (as in Swin, but over the whole map instead of a
    window). The index into the table is computed from the input's grid, so the module works on any
    ``H, W <= max_grid`` without resizing the table.

    Args:
        dim: channels ``C``; divisible by ``num_heads``.
        num_heads: attention heads.
        max_grid: largest grid side the bias table covers.
        qkv_bias: bias in the Q, K, V projections.
        attn_drop: dropout on the attention weights (training only).
        proj_drop: dropout after the output projection.

    Shapes:
        ``forward(x: (B, H, W, C)) -> (B, H, W, C)``;
        ``attention_map(x: (B, H, W, C)) -> (B, num_heads, H*W, H*W)`` (softmax weights, rows sum to 1).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        max_grid: int = 32,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} must be divisible by num_heads {num_heads}")
        self.dim, self.num_heads, self.max_grid = dim, num_heads, max_grid
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.attn_drop = attn_drop
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * max_grid - 1) ** 2, num_heads)
        )
        trunc_normal_(self.relative_position_bias_table, std=0.02)

    def position_bias(self, h: int, w: int, device: torch.device) -> Tensor:
        """``(num_heads, h*w, h*w)`` bias for an ``h x w`` grid."""
        index = relative_position_index(h, w, self.max_grid, device=device)
        return self.relative_position_bias_table[index].permute(2, 0, 1)

    def _qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        b, h, w, c = x.shape
        qkv = self.qkv(x).reshape(b, h * w, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, N, head_dim)
        return q, k, v

    def forward(self, x: Tensor) -> Tensor:
        b, h, w, c = x.shape
        q, k, v = self._qkv(x)
        # SDPA wants the additive mask in the query's dtype (bf16 under autocast).
        bias = self.position_bias(h, w, x.device).to(q.dtype).unsqueeze(0)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias, dropout_p=self.attn_drop if self.training else 0.0
        )
        out = out.transpose(1, 2).reshape(b, h, w, c)
        return self.proj_drop(self.proj(out))

    def attention_map(self, x: Tensor) -> Tensor:
        """Explicit attention weights (for visualisation; ``forward`` never builds them)."""
        b, h, w, c = x.shape
        q, k, _ = self._qkv(x)
        scores = (q * self.scale) @ k.transpose(-2, -1)
        scores = scores + self.position_bias(h, w, x.device).to(scores.dtype)
        return scores.softmax(dim=-1)


class ChannelsLast(nn.Module):
    """Runs an NCHW module on a channels-last map: ``(B, H, W, C) -> (B, H, W, C')``."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: Tensor) -> Tensor:
        return self.module(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


def build_spatial_attention(kind: str, dim: int, num_heads: int, **kwargs) -> nn.Module:
    """Spatial attention of the given kind, mapping ``(B, H, W, C) -> (B, H, W, C)``.

    Args:
        kind: ``mhsa`` (:class:`RelPosSelfAttention2d`, the paper's), ``hilo`` (LiTv2's HiLo:
            windowed Hi-Fi heads plus pooled Lo-Fi heads) or ``acmix`` (:class:`ACmix`: local
            attention and shift convolution on shared projections).
        dim: channels ``C``.
        num_heads: heads (divides ``dim``).
        kwargs: passed to the chosen module (e.g. ``max_grid`` for mhsa, ``window_size`` / ``alpha``
            for hilo, ``kernel_att`` / ``kernel_conv`` for acmix).
    """
    if kind == "mhsa":
        return RelPosSelfAttention2d(dim, num_heads=num_heads, **kwargs)
    if kind == "hilo":
        # Imported here so the other kinds work without the LiTv2 module.
        from mgff.models.hilo import HiLo

        return HiLo(dim, num_heads=num_heads, **kwargs)
    if kind == "acmix":
        return ChannelsLast(ACmix(dim, dim, num_heads=num_heads, **kwargs))
    raise ValueError(f"unknown spatial attention {kind!r}; choose one of {SPATIAL_ATTENTION_KINDS}")
