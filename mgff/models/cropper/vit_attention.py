"""Attention out of a timm ViT: one forward that also returns every block's attention probabilities.

``forward_with_attention`` / ``collect_attention``: image ``(B, 3, H, W)`` -> ``(L, B, heads, T, T)``
attention, with ``T = P + N`` tokens (``P`` prefix tokens, ``N = h * w`` patch tokens on the grid
:func:`token_grid` gives).
"""
import torch
import torch.nn as nn
from torch import Tensor

from timm.layers import Attention
from timm.models.vision_transformer import Block, VisionTransformer

from mgff.models.cropper.choices import check_choice
from mgff.models.cropper.importance import HEAD_FUSIONS, fuse_heads

__all__ = ['check_supported_vit', 'attention_with_probabilities', 'token_grid', 'forward_with_attention', 'collect_attention']


def check_supported_vit(vit: nn.Module) -> None:
    """Raise ``TypeError`` unless ``vit`` is a timm ``VisionTransformer`` of pre-norm ``Block`` s
    with standard ``Attention`` — the layout ``forward_with_attention`` replays step by step."""
    if not isinstance(vit, VisionTransformer):
        raise TypeError(f'expected a timm VisionTransformer, got {type(vit).__name__}')
    for i, block in enumerate(vit.blocks):
        if type(block) is not Block or not isinstance(block.attn, Attention):
            raise TypeError(
                f'vit.blocks[{i}] is {type(block).__name__} with {type(block.attn).__name__}; only '
                'timm Block with timm.layers.Attention is supported (pre-norm ViT/DeiT/AugReg)')


def attention_with_probabilities(attn: Attention, x: Tensor) -> tuple[Tensor, Tensor]:
    r"""timm ``Attention.forward`` computed explicitly, also returning its probabilities.

    .. math::
        A = \mathrm{softmax}\big(s \cdot \mathrm{norm}_q(Q)\,\mathrm{norm}_k(K)^\top\big),
        \qquad \mathrm{out} = \mathrm{proj}\big(\mathrm{norm}(A V) \odot g\big)

    with ``Q, K, V`` from the module's own ``qkv`` linear, its ``q_norm`` / ``k_norm`` and
    ``scale``, and the optional output norm and sigmoid gate ``g``. The module's ``fused_attn``
    flag is ignored: the fused kernel never materialises ``A``.

    Args:
        attn: The block's attention module (its weights are used, nothing is copied).
        x: ``(B, T, C)`` normalised tokens, the module's input.

    Returns:
        ``out (B, T, C_out)`` equal to ``attn(x)``, and ``A (B, heads, T, T)`` (rows: queries,
        softmax over keys), taken before attention dropout.
    """
    batch, tokens, _ = x.shape
    qkv = attn.qkv(x).reshape(batch, tokens, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    probs = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
    out = attn.attn_drop(probs) @ v
    out = out.transpose(1, 2).reshape(batch, tokens, attn.num_heads * attn.head_dim)
    out = attn.norm(out)
    gate = getattr(attn, 'gate', None)  # only in recent timm
    if gate is not None:
        out = out * gate(x).sigmoid()
    out = attn.proj_drop(attn.proj(out))
    return out, probs


def token_grid(vit: VisionTransformer, image_size: tuple[int, int]) -> tuple[int, int]:
    """The ``(h, w)`` patch-token grid ``vit`` produces for an ``image_size = (H, W)`` input."""
    if getattr(vit, 'dynamic_img_size', False):
        return tuple(vit.patch_embed.dynamic_feat_size(tuple(image_size)))
    return tuple(vit.patch_embed.grid_size)


def forward_with_attention(
        vit: VisionTransformer,
        x: Tensor,
        head_fusion: str | None = None,
) -> tuple[Tensor, Tensor]:
    """One forward through ``vit`` that also collects every block's attention probabilities.

    The blocks are replayed from the model's own modules (patch embedding, position embedding
    with prefix tokens and dynamic image size, ``norm1 -> attention -> ls1 -> drop_path1``,
    ``norm2 -> mlp -> ls2 -> drop_path2``, final norm), with each attention computed by
    :func:`attention_with_probabilities`; so the features equal ``vit.forward_features(x)``
    whatever ``fused_attn`` is, without hooks or a second model.

    Args:
        vit: A timm ``VisionTransformer`` (see :func:`check_supported_vit`).
        x: ``(B, 3, H, W)`` images at a size the model accepts.
        head_fusion: ``None`` keeps every head; ``'mean' | 'max' | 'min'`` fuses the heads of
            each layer as it is computed (see :func:`fuse_heads`), which keeps a ``heads``-times
            smaller stack alive (ViT-B/16 at 384: 16 MB instead of 192 MB per image).

    Returns:
        ``features (B, T, C)`` (= ``vit.forward_features(x)``) and attention
        ``(L, B, heads, T, T)`` — ``heads`` is 1 when fused.
    """
    check_supported_vit(vit)
    if head_fusion is not None:
        check_choice('head_fusion', head_fusion, HEAD_FUSIONS)
    tokens = vit.patch_embed(x)
    tokens = vit._pos_embed(tokens)  # prefix tokens + (resampled, if dynamic) position embedding
    tokens = vit.patch_drop(tokens)
    tokens = vit.norm_pre(tokens)
    grid = token_grid(vit, x.shape[-2:])
    if tokens.shape[1] != vit.num_prefix_tokens + grid[0] * grid[1]:
        # patch dropout (training) removes tokens, and the map could no longer be put on the grid
        raise ValueError(
            f'{tokens.shape[1]} tokens do not fill the {grid} grid plus {vit.num_prefix_tokens} prefix '
            'tokens; disable patch dropout (patch_drop_rate=0) for attention maps')
    attention = []
    for block in vit.blocks:
        out, probs = attention_with_probabilities(block.attn, block.norm1(tokens))
        tokens = tokens + block.drop_path1(block.ls1(out))
        tokens = tokens + block.drop_path2(block.ls2(block.mlp(block.norm2(tokens))))
        attention.append(probs if head_fusion is None else fuse_heads(probs, head_fusion, dim=1))
    return vit.norm(tokens), torch.stack(attention)


def collect_attention(vit: VisionTransformer, x: Tensor, head_fusion: str | None = None) -> Tensor:
    """Every block's attention probabilities from one forward: ``(B, 3, H, W)`` ->
    ``(L, B, heads, T, T)`` (``heads = 1`` with ``head_fusion``). See
    :func:`forward_with_attention`, which also returns the features."""
    return forward_with_attention(vit, x, head_fusion=head_fusion)[1]
