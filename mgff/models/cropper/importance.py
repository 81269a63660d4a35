"""Attention -> patch-token importance: attention rollout and the MGFF paper's column sums.

Both take ``(L, B, heads, T, T)`` attention probabilities (rows = queries, timm's layout) and
return ``(B, N)`` importance of the ``N`` patch tokens.
"""
import torch
from torch import Tensor

from mgff.models.cropper.choices import check_choice

__all__ = ['HEAD_FUSIONS', 'IMPORTANCE_METHODS', 'LAYER_FUSIONS', 'fuse_heads', 'attention_rollout', 'column_sum_importance']

HEAD_FUSIONS = ('mean', 'max', 'min')
IMPORTANCE_METHODS = ('rollout', 'column_sum')
LAYER_FUSIONS = ('product', 'mean')


def fuse_heads(attn: Tensor, head_fusion: str = 'mean', dim: int = 2) -> Tensor:
    """Fuse the heads of ``attn`` (heads on ``dim``, kept as a size-1 dim) by mean, max or min.

    ``(L, B, heads, T, T)`` -> ``(L, B, 1, T, T)`` with the default ``dim=2``."""
    check_choice('head_fusion', head_fusion, HEAD_FUSIONS)
    if head_fusion == 'mean':
        return attn.mean(dim=dim, keepdim=True)
    if head_fusion == 'max':
        return attn.amax(dim=dim, keepdim=True)
    return attn.amin(dim=dim, keepdim=True)


def _discard_lowest(attn: Tensor, discard_ratio: float, num_prefix_tokens: int) -> Tensor:
    """Zero the lowest ``discard_ratio`` of the patch-to-patch entries of each ``(T, T)`` matrix
    of ``attn (..., T, T)``; rows and columns of prefix tokens are never discarded."""
    patch = attn[..., num_prefix_tokens:, num_prefix_tokens:]
    flat = patch.reshape(*patch.shape[:-2], -1)
    k = int(flat.shape[-1] * discard_ratio)
    if k == 0:
        return attn
    lowest = flat.topk(k, dim=-1, largest=False).indices
    flat = flat.scatter(-1, lowest, 0.0)
    attn = attn.clone()
    attn[..., num_prefix_tokens:, num_prefix_tokens:] = flat.reshape(patch.shape)
    return attn


def attention_rollout(
        attn: Tensor,
        head_fusion: str = 'mean',
        discard_ratio: float = 0.0,
        num_prefix_tokens: int = 1,
        class_token: bool = True,
) -> Tensor:
    r"""Attention rollout (Abnar & Zuidema, 2020): importance of each patch token to the output.

    Per layer the heads are fused, :math:`\bar A_l = \mathrm{fuse}_h(A_{l,h})`, optionally the
    lowest ``discard_ratio`` of its patch-to-patch entries are zeroed, the residual path is added
    and rows renormalised, :math:`\hat A_l = (\bar A_l + I) / \mathrm{rowsum}(\bar A_l + I)`;
    the layers are multiplied, :math:`R = \hat A_L \cdots \hat A_2 \hat A_1` (``R[i, j]``: how
    much output token ``i`` draws from input token ``j``).

    Args:
        attn: ``(L, B, heads, T, T)`` attention probabilities, rows = queries.
        head_fusion: ``'mean' | 'max' | 'min'`` over heads.
        discard_ratio: Fraction in ``[0, 1)`` of patch-to-patch entries dropped per layer and
            image (prefix-token rows and columns are kept) — removes diffuse low attention.
        num_prefix_tokens: ``P``, class / register tokens in front of the patch tokens.
        class_token: Whether token 0 is a class token (timm: ``vit.cls_token is not None``).

    Returns:
        ``(B, N)`` importance: the class-token row of ``R`` over the patch tokens,
        ``R[:, 0, P:]``; without a class token (or ``P = 0``) the mean of the patch rows,
        ``R[:, P:, P:].mean(1)``, as a mean-pooling head sees it. Rows of ``R`` sum to 1.
    """
    check_choice('head_fusion', head_fusion, HEAD_FUSIONS)
    if not 0.0 <= discard_ratio < 1.0:
        raise ValueError(f'discard_ratio must lie in [0, 1), got {discard_ratio}')
    if attn.ndim != 5 or attn.shape[-1] != attn.shape[-2]:
        raise ValueError(f'attn must be (L, B, heads, T, T), got {tuple(attn.shape)}')
    fused = fuse_heads(attn, head_fusion).squeeze(2)  # (L, B, T, T)
    if discard_ratio > 0:
        fused = _discard_lowest(fused, discard_ratio, num_prefix_tokens)
    eye = torch.eye(fused.shape[-1], dtype=fused.dtype, device=fused.device)
    fused = fused + eye
    fused = fused / fused.sum(dim=-1, keepdim=True)  # keepdim: divide each row by its own sum
    rollout = fused[0]
    for layer in fused[1:]:
        rollout = layer @ rollout  # later layers act on the mixture the earlier ones produced
    if class_token and num_prefix_tokens > 0:
        return rollout[:, 0, num_prefix_tokens:]
    return rollout[:, num_prefix_tokens:, num_prefix_tokens:].mean(dim=1)


def column_sum_importance(
        attn: Tensor,
        num_prefix_tokens: int = 1,
        head_fusion: str = 'mean',
        layer_fusion: str = 'product',
) -> Tensor:
    r"""The MGFF paper's importance: attention each token receives, combined over the layers.

    The paper writes the attention with one softmax-normalised *column* per query (the transpose
    of timm's layout, whose rows are queries) and sums :math:`A'` over its rows: each key token's
    importance is the total attention all queries give it. In timm's layout that is a sum over the
    query dimension,

    .. math::
        s_l[j] = \sum_{i=1}^{T} \bar A_l[i, j], \qquad \bar A_l = \mathrm{fuse}_h(A_{l,h}),

    (``sum_j s_l[j] = T``: a token with :math:`s_l[j] > 1` receives more than its share). The L
    layers are combined by their **product** :math:`W = \prod_l s_l` (default; a token must
    matter in every layer, like the product in rollout), computed as a sum of logarithms and
    rescaled to a maximum of 1 per image so 24 layers neither overflow nor underflow — the
    response map is min-max normalised anyway; or by their **mean** (``layer_fusion='mean'``).

    Args:
        attn: ``(L, B, heads, T, T)`` attention probabilities, rows = queries.
        num_prefix_tokens: ``P``; their columns are dropped from the result (their rows count:
            the class token's attention is attention like any other).
        head_fusion: ``'mean' | 'max' | 'min'`` over heads before the column sums.
        layer_fusion: ``'product' | 'mean'`` over layers.

    Returns:
        ``(B, N)`` non-negative importance of the patch tokens.
    """
    check_choice('head_fusion', head_fusion, HEAD_FUSIONS)
    check_choice('layer_fusion', layer_fusion, LAYER_FUSIONS)
    if attn.ndim != 5 or attn.shape[-1] != attn.shape[-2]:
        raise ValueError(f'attn must be (L, B, heads, T, T), got {tuple(attn.shape)}')
    received = fuse_heads(attn, head_fusion).squeeze(2).sum(dim=-2)[..., num_prefix_tokens:]  # (L, B, N)
    if layer_fusion == 'mean':
        return received.mean(dim=0)
    log_importance = received.clamp_min(torch.finfo(received.dtype).tiny).log().sum(dim=0)
    return (log_importance - log_importance.amax(dim=-1, keepdim=True)).exp()
