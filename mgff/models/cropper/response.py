"""Token importance -> response map: a ``(B, N)`` grid of scores as a ``(B, H, W)`` map in [0, 1]."""
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ['response_map', 'min_max']


def response_map(importance: Tensor, grid: tuple[int, int], size: tuple[int, int]) -> Tensor:
    """Token importance on the image: reshape to the grid, upsample, min-max normalise.

    Args:
        importance: ``(B, N)`` with ``N = h * w`` in row-major grid order.
        grid: ``(h, w)`` token grid.
        size: ``(H, W)`` output size; bilinear (``align_corners=False``, so token centres land
            on patch centres).

    Returns:
        ``(B, H, W)`` in ``[0, 1]`` per image; a constant importance gives an all-zero map.
    """
    batch, num_tokens = importance.shape
    h, w = grid
    if num_tokens != h * w:
        raise ValueError(f'importance has {num_tokens} tokens, the grid {tuple(grid)} has {h * w}')
    # normalise the tokens first: a constant importance is then exactly 0, which interpolation
    # keeps at 0, whereas interpolating 7.0 gives 7.0 +- rounding that a min-max blows up to [0, 1]
    tokens = min_max(importance.reshape(batch, 1, h, w))
    maps = F.interpolate(tokens, size=tuple(size), mode='bilinear', align_corners=False)
    # again after upsampling: the token peaks need not fall on a pixel centre
    return min_max(maps).squeeze(1)


def min_max(x: Tensor) -> Tensor:
    """``(B, ...)`` scaled to [0, 1] per image; a constant image becomes 0 (0 / tiny, not NaN)."""
    dims = tuple(range(1, x.ndim))
    low = x.amin(dim=dims, keepdim=True)
    span = x.amax(dim=dims, keepdim=True) - low
    return (x - low) / span.clamp_min(torch.finfo(x.dtype).tiny)
