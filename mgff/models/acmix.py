"""ACmix: self-attention and convolution sharing their 1x1 projections.

Paper: Pan et al., "On the Integration of Self-Attention and Convolution", CVPR 2022,
https://arxiv.org/abs/2111.14556 (official code: https://github.com/LeapLabTHU/ACmix).

Both operators start with 1x1 projections: a k x k convolution is k^2 1x1 convolutions whose outputs
are shifted and summed, and self-attention starts from the 1x1 query/key/value projections. ACmix
computes the projections once and feeds two second stages:

- attention path: per head, every query attends to the ``kernel_att x kernel_att`` window of keys
  around it, ``softmax_j(q_i . (k_j + p_i - p_j))`` with a positional encoding ``p`` (a 1x1 conv of
  the pixel coordinates), weights applied to the window's values;
- convolution path: a 1x1 "fully connected" layer turns the ``3 * num_heads`` projections of each
  head channel into ``kernel_conv^2`` features, and a group convolution initialised to shift kernels
  moves each of them to its kernel position and sums them (a learnable shift-and-add);

mixed as ``rate_att * attention + rate_conv * convolution`` with two learned scalars.

Differences from the official code: the positional encoding is built on the input's device and
dtype (no ``.cuda()``); out-of-image window positions are masked out of the softmax instead of
reflection-padded, so the module runs on grids smaller than the window (the fusion head's 3x3..12x12
maps) and each border query attends only to real pixels; outputs of odd-sized maps at stride 2 are
``ceil(H / 2)`` on both paths.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ACmix"]


def pixel_coordinates(h: int, w: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """``(1, 2, h, w)`` map of (x, y) coordinates in ``[-1, 1]``."""
    ys = torch.linspace(-1.0, 1.0, h, device=device, dtype=dtype)
    xs = torch.linspace(-1.0, 1.0, w, device=device, dtype=dtype)
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([grid_x, grid_y]).unsqueeze(0)


class ACmix(nn.Module):
    """Mixed local self-attention and shift convolution on shared 1x1 projections.

    Args:
        in_channels: input channels ``C_in``.
        out_channels: output channels ``C_out``; divisible by ``num_heads``.
        num_heads: attention heads; each has ``C_out / num_heads`` channels.
        kernel_att: side of the local attention window (odd).
        kernel_conv: kernel size of the convolution path (odd).
        stride: 1 or 2 (queries and convolution taken every ``stride`` pixels).

    Shapes:
        ``forward(x: (B, C_in, H, W)) -> (B, C_out, ceil(H / stride), ceil(W / stride))``
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        num_heads: int = 4,
        kernel_att: int = 7,
        kernel_conv: int = 3,
        stride: int = 1,
    ) -> None:
        super().__init__()
        if out_channels % num_heads:
            raise ValueError(f"out_channels {out_channels} must be divisible by num_heads {num_heads}")
        if kernel_att % 2 == 0 or kernel_conv % 2 == 0:
            raise ValueError(f"kernel sizes must be odd, got {kernel_att} and {kernel_conv}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.num_heads, self.head_dim = num_heads, out_channels // num_heads
        self.kernel_att, self.kernel_conv, self.stride = kernel_att, kernel_conv, stride

        # Stage 1, shared: the 1x1 projections.
        self.proj_q = nn.Conv2d(in_channels, out_channels, 1)
        self.proj_k = nn.Conv2d(in_channels, out_channels, 1)
        self.proj_v = nn.Conv2d(in_channels, out_channels, 1)
        # Attention path: positional encoding of the pixel coordinates, one per head channel.
        self.proj_pos = nn.Conv2d(2, self.head_dim, 1)
        # Convolution path: 3 * heads projections -> kernel_conv^2 features per head channel, then a
        # group conv (one group per head channel) that shifts each feature to its kernel position.
        self.fc = nn.Conv2d(3 * num_heads, kernel_conv**2, 1, bias=False)
        self.shift_conv = nn.Conv2d(
            kernel_conv**2 * self.head_dim,
            out_channels,
            kernel_conv,
            stride=stride,
            padding=kernel_conv // 2,
            groups=self.head_dim,
        )
        self.rate_att = nn.Parameter(torch.empty(()))
        self.rate_conv = nn.Parameter(torch.empty(()))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.constant_(self.rate_att, 0.5)
        nn.init.constant_(self.rate_conv, 0.5)
        # Shift kernels: input channel i of each group is a one-hot at kernel position i, so the
        # group conv starts as "shift feature i by its offset and sum", i.e. a k x k convolution.
        k2 = self.kernel_conv**2
        shifts = torch.eye(k2).reshape(k2, self.kernel_conv, self.kernel_conv)
        with torch.no_grad():
            self.shift_conv.weight.copy_(shifts.expand(self.out_channels, -1, -1, -1))
            nn.init.zeros_(self.shift_conv.bias)

    def _unfold(self, x: Tensor) -> Tensor:
        """``(N, C, H, W) -> (N, C, kernel_att^2, H_out, W_out)``: the window around each query."""
        n, c, h, w = x.shape
        k, s = self.kernel_att, self.stride
        h_out, w_out = (h - 1) // s + 1, (w - 1) // s + 1
        cols = F.unfold(x, k, padding=k // 2, stride=s)
        return cols.reshape(n, c, k * k, h_out, w_out)

    def attention(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Local window attention: projections ``(B, C_out, H, W)`` -> ``(B, C_out, H_out, W_out)``."""
        b, c, h, w = q.shape
        heads, hd, s = self.num_heads, self.head_dim, self.stride
        pos = self.proj_pos(pixel_coordinates(h, w, q.device, q.dtype))  # (1, hd, H, W)

        q = q.reshape(b * heads, hd, h, w)[:, :, ::s, ::s] * hd**-0.5
        pos_q = pos[:, :, ::s, ::s]
        k_win = self._unfold(k.reshape(b * heads, hd, h, w))  # (B*heads, hd, k^2, Ho, Wo)
        v_win = self._unfold(v.reshape(b * heads, hd, h, w))
        pos_win = self._unfold(pos)  # (1, hd, k^2, Ho, Wo)
        # Zero padding would let border queries attend to made-up keys: mask those out.
        inside = self._unfold(torch.ones(1, 1, h, w, device=q.device, dtype=q.dtype))

        # q . (k_j + p_i - p_j): content term plus a relative positional term.
        scores = (q.unsqueeze(2) * (k_win + pos_q.unsqueeze(2) - pos_win)).sum(dim=1)
        scores = scores.masked_fill(inside[:, 0] == 0, float("-inf"))
        weights = scores.softmax(dim=1)  # over the k^2 window positions: (B*heads, k^2, Ho, Wo)
        out = (weights.unsqueeze(1) * v_win).sum(dim=2)  # (B*heads, hd, Ho, Wo)
        return out.reshape(b, c, out.shape[-2], out.shape[-1])

    def convolution(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Shift-convolution path: projections ``(B, C_out, H, W)`` -> ``(B, C_out, H_out, W_out)``."""
        b, c, h, w = q.shape
        heads, hd = self.num_heads, self.head_dim
        # Per head channel, the 3 * heads values (q, k, v of every head) are the fc's input channels.
        qkv = torch.cat([t.reshape(b, heads, hd, h * w) for t in (q, k, v)], dim=1)
        features = self.fc(qkv)  # (B, k^2, hd, H*W)
        features = features.transpose(1, 2).reshape(b, hd * self.kernel_conv**2, h, w)
        return self.shift_conv(features)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self.proj_q(x), self.proj_k(x), self.proj_v(x)
        return self.rate_att * self.attention(q, k, v) + self.rate_conv * self.convolution(q, k, v)
