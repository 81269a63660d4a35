"""Attention cropper: the second stage's "where is the object" from a ViT's own attention.

The MGFF paper (design.md §1) runs a ViT on the image, turns its attention matrices into an
importance per patch token, reshapes the ``N = H/16 x W/16`` weights to the token grid, upsamples
them bilinearly to a response map the size of the image, boxes the object on that map and cuts the
box out, enlarged, for a second classification. This file is that pipeline as functions, each
usable on its own, in the order the data flows, then one module composing them:

``forward_with_attention`` / ``collect_attention``  image -> ``(L, B, heads, T, T)`` attention
``attention_rollout`` / ``column_sum_importance``   attention -> ``(B, N)`` patch importance
``response_map``                                     importance -> ``(B, H, W)`` map in [0, 1]
``boxes_from_response_map``                          map -> ``(B, 4)`` xyxy boxes
``crop_and_resize``                                  images, boxes -> ``(B, C, S, S)`` crops
``AttentionCropper``                                 all of the above behind one ``forward``

Shapes: ``B`` images, ``L`` attention layers, ``T = P + N`` tokens of which the first ``P`` are
prefix tokens (class / register tokens, ``vit.num_prefix_tokens``) and ``N = h * w`` patch tokens
on an ``h x w`` grid. Boxes are ``(x1, y1, x2, y2)`` in continuous pixel coordinates: pixel ``i``
spans ``[i, i + 1)``, so the whole ``H x W`` image is ``(0, 0, W, H)``.
"""
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import roi_align

from timm.layers import Attention
from timm.models.vision_transformer import Block, VisionTransformer

from mgff.models.pretrained import create_timm_model

__all__ = [
    'HEAD_FUSIONS', 'IMPORTANCE_METHODS', 'BOX_MODES', 'LAYER_FUSIONS',
    'check_supported_vit', 'attention_with_probabilities', 'forward_with_attention', 'collect_attention', 'token_grid',
    'fuse_heads', 'attention_rollout', 'column_sum_importance', 'response_map',
    'connected_components', 'boxes_from_response_map', 'crop_and_resize',
    'CropOutput', 'AttentionCropper',
]

HEAD_FUSIONS = ('mean', 'max', 'min')
IMPORTANCE_METHODS = ('rollout', 'column_sum')
BOX_MODES = ('largest', 'all')
LAYER_FUSIONS = ('product', 'mean')


def _check_choice(name: str, value, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f'{name} must be one of {allowed}, got {value!r}')


# ---------------------------------------------------------------------------------------------
# 1. Attention out of a timm ViT


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
        _check_choice('head_fusion', head_fusion, HEAD_FUSIONS)
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


# ---------------------------------------------------------------------------------------------
# 2. Attention -> patch-token importance


def fuse_heads(attn: Tensor, head_fusion: str = 'mean', dim: int = 2) -> Tensor:
    """Fuse the heads of ``attn`` (heads on ``dim``, kept as a size-1 dim) by mean, max or min.

    ``(L, B, heads, T, T)`` -> ``(L, B, 1, T, T)`` with the default ``dim=2``."""
    _check_choice('head_fusion', head_fusion, HEAD_FUSIONS)
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
    _check_choice('head_fusion', head_fusion, HEAD_FUSIONS)
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
    _check_choice('head_fusion', head_fusion, HEAD_FUSIONS)
    _check_choice('layer_fusion', layer_fusion, LAYER_FUSIONS)
    if attn.ndim != 5 or attn.shape[-1] != attn.shape[-2]:
        raise ValueError(f'attn must be (L, B, heads, T, T), got {tuple(attn.shape)}')
    received = fuse_heads(attn, head_fusion).squeeze(2).sum(dim=-2)[..., num_prefix_tokens:]  # (L, B, N)
    if layer_fusion == 'mean':
        return received.mean(dim=0)
    log_importance = received.clamp_min(torch.finfo(received.dtype).tiny).log().sum(dim=0)
    return (log_importance - log_importance.amax(dim=-1, keepdim=True)).exp()


# ---------------------------------------------------------------------------------------------
# 3. Importance -> response map -> boxes -> crops


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
    tokens = _min_max(importance.reshape(batch, 1, h, w))
    maps = F.interpolate(tokens, size=tuple(size), mode='bilinear', align_corners=False)
    # again after upsampling: the token peaks need not fall on a pixel centre
    return _min_max(maps).squeeze(1)


def _min_max(x: Tensor) -> Tensor:
    """``(B, ...)`` scaled to [0, 1] per image; a constant image becomes 0 (0 / tiny, not NaN)."""
    dims = tuple(range(1, x.ndim))
    low = x.amin(dim=dims, keepdim=True)
    span = x.amax(dim=dims, keepdim=True) - low
    return (x - low) / span.clamp_min(torch.finfo(x.dtype).tiny)


def connected_components(mask: Tensor, connectivity: int = 8) -> Tensor:
    """Label the connected foreground regions of a batch of binary masks, all images at once.

    Every foreground pixel starts with its own label (1 + its flat index) and repeatedly takes
    the largest label among its neighbours (a 3x3 max-pool for 8-connectivity, a plus-shaped one
    for 4), then jumps to the label its label's pixel already holds (pointer jumping: labels only
    grow and stay inside the component, and long regions converge in far fewer steps than their
    length). It stops once no label changes; each region ends labelled by its largest flat index
    + 1.

    Args:
        mask: ``(B, h, w)`` bool foreground.
        connectivity: 4 or 8.

    Returns:
        ``(B, h, w)`` int64 labels, 0 on the background.
    """
    if connectivity not in (4, 8):
        raise ValueError(f'connectivity must be 4 or 8, got {connectivity}')
    batch, h, w = mask.shape
    # float labels because max_pool2d has no integer kernel on CPU; exact up to 2**24 pixels
    foreground = mask.to(torch.float32).unsqueeze(1)
    labels = torch.arange(1, h * w + 1, dtype=torch.float32, device=mask.device).view(1, 1, h, w) * foreground
    background = torch.zeros(batch, 1, dtype=torch.float32, device=mask.device)
    for _ in range(h * w):  # the longest possible path: a bound, never reached in practice
        if connectivity == 8:
            grown = F.max_pool2d(labels, 3, stride=1, padding=1)
        else:
            grown = torch.maximum(F.max_pool2d(labels, (3, 1), stride=1, padding=(1, 0)),
                                  F.max_pool2d(labels, (1, 3), stride=1, padding=(0, 1)))
        grown = (grown * foreground).view(batch, h * w)
        # label L names pixel L - 1; index 0 of the lookup is the background's label 0
        jumped = torch.cat([background, grown], dim=1).gather(1, grown.long()).view_as(labels)
        if torch.equal(jumped, labels):
            break
        labels = jumped
    return labels.squeeze(1).long()


def _mask_boxes(mask: Tensor) -> tuple[Tensor, Tensor]:
    """Tight xyxy pixel box around the ``True`` pixels of each ``(B, H, W)`` mask -> ``(B, 4)``
    float, and ``(B,)`` whether the mask had any pixel (the box is meaningless where not)."""
    _, height, width = mask.shape
    rows, cols = mask.any(dim=2), mask.any(dim=1)
    ys = torch.arange(height, device=mask.device)
    xs = torch.arange(width, device=mask.device)
    y1 = torch.where(rows, ys, height).amin(dim=1)
    y2 = torch.where(rows, ys + 1, 0).amax(dim=1)
    x1 = torch.where(cols, xs, width).amin(dim=1)
    x2 = torch.where(cols, xs + 1, 0).amax(dim=1)
    return torch.stack([x1, y1, x2, y2], dim=1).to(torch.float32), rows.any(dim=1)


def boxes_from_response_map(
        maps: Tensor,
        threshold: str | float = 'mean',
        box_mode: str = 'largest',
        padding: float = 0.0,
        min_size: float = 0.0,
        connectivity: int = 8,
        label_size: int | tuple[int, int] = 32,
) -> Tensor:
    """One object box per response map, all images at once.

    1. Threshold: a pixel is foreground where ``map >= t``, with ``t`` the image's mean
       (``'mean'``) or its ``threshold``-quantile (a float in ``(0, 1)``, nearest rank).
    2. Box: ``'all'`` boxes every foreground pixel; ``'largest'`` boxes the largest connected
       region (:func:`connected_components`). Regions are labelled on the map average-pooled
       down to ``label_size`` (labelling costs area times region length, and a response map is
       an upsampled token grid, so its grid loses little); the chosen region is brought back to
       full resolution and intersected with the full-resolution foreground before boxing, so
       the box edges stay pixel-accurate.
    3. Padding: each side grows by ``padding`` times the box's width (left/right) or height
       (top/bottom); the box is then clipped to the image.
    4. Minimum size: width and height grow to at least ``min_size`` times the image's, around
       the box centre, shifted back inside the image where needed.

    A flat map (no structure to threshold) gives the whole image.

    Args:
        maps: ``(B, H, W)`` response maps.
        threshold: ``'mean'`` or a quantile in ``(0, 1)``.
        box_mode: ``'largest' | 'all'``.
        padding: ``>= 0``, fraction of the box size added on each side.
        min_size: in ``[0, 1]``, fraction of the image side.
        connectivity: 4 or 8, for ``'largest'``.
        label_size: ``(h, w)`` grid the regions are labelled on (e.g. the token grid), or an
            int: the longest side, keeping the aspect ratio. Never upsampled.

    Returns:
        ``(B, 4)`` float32 ``(x1, y1, x2, y2)`` in pixels of the maps, ``0 <= x1 < x2 <= W``.
    """
    if not (threshold == 'mean' or (isinstance(threshold, float) and 0.0 < threshold < 1.0)):
        raise ValueError(f"threshold must be 'mean' or a float quantile in (0, 1), got {threshold!r}")
    _check_choice('box_mode', box_mode, BOX_MODES)
    if padding < 0:
        raise ValueError(f'padding must be >= 0, got {padding}')
    if not 0.0 <= min_size <= 1.0:
        raise ValueError(f'min_size must lie in [0, 1], got {min_size}')
    if min(label_size if isinstance(label_size, tuple) else (label_size,)) < 1:
        raise ValueError(f'label_size must be >= 1, got {label_size}')
    maps = maps.to(torch.float32)  # pixel coordinates and quantiles want float32, not bf16
    batch, height, width = maps.shape
    flat_maps = maps.reshape(batch, -1)

    if threshold == 'mean':
        cut = flat_maps.mean(dim=1)
    else:
        # kthvalue rather than torch.quantile, which refuses inputs over 16M elements
        rank = min(max(round(threshold * (flat_maps.shape[1] - 1)) + 1, 1), flat_maps.shape[1])
        cut = flat_maps.kthvalue(rank, dim=1).values
    cut = cut.view(batch, 1, 1)
    foreground = maps >= cut

    if box_mode == 'largest':
        if isinstance(label_size, int):
            scale = min(1.0, label_size / max(height, width))
            label_size = (max(1, round(height * scale)), max(1, round(width * scale)))
        label_size = (min(label_size[0], height), min(label_size[1], width))
        if label_size != (height, width):
            small = F.adaptive_avg_pool2d(maps.unsqueeze(1), label_size).squeeze(1) >= cut
        else:
            small = foreground
        labels = connected_components(small, connectivity)
        sizes = torch.zeros(batch, labels[0].numel() + 1, dtype=torch.float32, device=maps.device)
        sizes = sizes.scatter_add(1, labels.view(batch, -1), torch.ones_like(labels.view(batch, -1), dtype=torch.float32))
        sizes[:, 0] = 0  # the background is not a region
        largest = labels == sizes.argmax(dim=1).view(batch, 1, 1)
        largest = largest & small
        if largest.shape[-2:] != (height, width):
            largest = F.interpolate(largest.unsqueeze(1).to(torch.float32), size=(height, width),
                                    mode='nearest').squeeze(1).bool()
        refined = largest & foreground
        # an averaged cell above the cut always has a full-resolution pixel above it, but that
        # pixel can sit on a cell border that nearest upsampling gives to the neighbour
        region = torch.where(refined.flatten(1).any(dim=1).view(batch, 1, 1), refined, largest)
    else:
        region = foreground

    boxes, found = _mask_boxes(region)
    flat = (flat_maps.amax(dim=1) - flat_maps.amin(dim=1)) <= 1e-6
    whole = torch.tensor([0.0, 0.0, width, height], dtype=torch.float32, device=maps.device)
    boxes = torch.where((found & ~flat).unsqueeze(1), boxes, whole)

    x1, y1, x2, y2 = boxes.unbind(dim=1)
    pad_x, pad_y = padding * (x2 - x1), padding * (y2 - y1)
    x1, x2 = (x1 - pad_x).clamp(min=0), (x2 + pad_x).clamp(max=width)
    y1, y2 = (y1 - pad_y).clamp(min=0), (y2 + pad_y).clamp(max=height)
    box_w = (x2 - x1).clamp(min=min_size * width)
    box_h = (y2 - y1).clamp(min=min_size * height)
    cx = torch.clamp((x1 + x2) / 2, min=box_w / 2, max=width - box_w / 2)
    cy = torch.clamp((y1 + y2) / 2, min=box_h / 2, max=height - box_h / 2)
    return torch.stack([cx - box_w / 2, cy - box_h / 2, cx + box_w / 2, cy + box_h / 2], dim=1)


def crop_and_resize(images: Tensor, boxes: Tensor, out_size: int | tuple[int, int]) -> Tensor:
    """Cut one box out of each image and resize it, in one ``roi_align`` call.

    ``aligned=True`` puts pixel centres at half-integers, so a box reads exactly what a slice
    plus ``F.interpolate(mode='bilinear', align_corners=False)`` reads, including its edges
    (where roi_align reads the neighbouring pixels outside the box instead of repeating the
    border). ``sampling_ratio=0`` lets each box average ``ceil(box side / out side)`` samples per
    output pixel: one bilinear sample when enlarging, an anti-aliasing average when shrinking.

    Args:
        images: ``(B, C, H, W)``.
        boxes: ``(B, 4)`` xyxy in pixels of ``images``, one per image.
        out_size: ``S`` or ``(S_h, S_w)``.

    Returns:
        ``(B, C, S_h, S_w)`` crops in ``images.dtype`` (computed in float32 for half types,
        which roi_align lacks on CPU).
    """
    if boxes.ndim != 2 or boxes.shape != (images.shape[0], 4):
        raise ValueError(f'boxes must be (B, 4) = ({images.shape[0]}, 4), got {tuple(boxes.shape)}')
    size = (out_size, out_size) if isinstance(out_size, int) else tuple(out_size)
    compute_dtype = images.dtype if images.dtype in (torch.float32, torch.float64) else torch.float32
    index = torch.arange(images.shape[0], device=images.device, dtype=compute_dtype).unsqueeze(1)
    rois = torch.cat([index, boxes.to(compute_dtype)], dim=1)  # (B, 5): image index, x1, y1, x2, y2
    crops = roi_align(images.to(compute_dtype), rois, output_size=size, spatial_scale=1.0,
                      sampling_ratio=0, aligned=True)
    return crops.to(images.dtype)


# ---------------------------------------------------------------------------------------------
# 4. The module


class CropOutput(NamedTuple):
    """What :class:`AttentionCropper` returns.

    Attributes:
        crops: ``(B, 3, S, S)`` object crops from the full-resolution input, in its dtype.
        boxes: ``(B, 4)`` float32 xyxy boxes in input-image pixels.
        response: ``(B, H, W)`` float32 response maps in ``[0, 1]`` at the input size.
        logits: ``(B, num_classes)`` from the ViT's head, or ``None`` without one.
    """
    crops: Tensor
    boxes: Tensor
    response: Tensor
    logits: Tensor | None


class AttentionCropper(nn.Module):
    """Find the object with a ViT's attention and cut it out: images -> :class:`CropOutput`.

    The images are resized to ``localize_size`` for the ViT (the ViT is built at that size;
    timm resamples pretrained position embeddings to it); the token importance (``method``:
    ``'rollout'`` or the paper's ``'column_sum'``) is upsampled straight to the *input* size, so
    the response map and boxes are in input pixels and the crops come from the full-resolution
    input at ``out_size``.

    Frozen by default: the ViT stays in eval mode and runs without autograd, whatever
    ``train()`` a parent calls. With ``freeze=False`` and ``num_classes > 0`` the ViT trains
    through its own classification head (``logits``); boxes and crops never carry gradients
    into the ViT (thresholding is not differentiable).

    Args:
        model_name: timm ViT name (pre-norm ``Block`` + ``Attention``: ViT, DeiT, AugReg...).
        pretrained: ``False``, ``True`` (timm hub) or a local ``.safetensors`` / ``.pth`` path.
        num_classes: Size of the ViT's head; 0 for none.
        localize_size: Side the ViT sees; ``None``: the model's native ``img_size``.
        out_size: Side ``S`` of the crops.
        method: ``'rollout' | 'column_sum'`` (see :func:`attention_rollout`,
            :func:`column_sum_importance`).
        head_fusion: ``'mean' | 'max' | 'min'``.
        discard_ratio: ``[0, 1)``, rollout only.
        threshold, box_mode, padding, min_size: see :func:`boxes_from_response_map`.
        freeze: Keep the ViT frozen (needs no head); ``False`` requires ``num_classes > 0``.
        **vit_kwargs: Passed to timm (``embed_dim``, ``depth``, ``num_heads``, ``img_size``...).
    """

    def __init__(
            self,
            model_name: str = 'vit_base_patch16_384',
            pretrained: bool | str = False,
            num_classes: int = 0,
            localize_size: int | None = None,
            out_size: int = 384,
            method: str = 'rollout',
            head_fusion: str = 'mean',
            discard_ratio: float = 0.0,
            threshold: str | float = 'mean',
            box_mode: str = 'largest',
            padding: float = 0.05,
            min_size: float = 0.2,
            freeze: bool = True,
            **vit_kwargs,
    ):
        super().__init__()
        _check_choice('method', method, IMPORTANCE_METHODS)
        _check_choice('head_fusion', head_fusion, HEAD_FUSIONS)
        _check_choice('box_mode', box_mode, BOX_MODES)
        if not 0.0 <= discard_ratio < 1.0:
            raise ValueError(f'discard_ratio must lie in [0, 1), got {discard_ratio}')
        if not (threshold == 'mean' or (isinstance(threshold, float) and 0.0 < threshold < 1.0)):
            raise ValueError(f"threshold must be 'mean' or a float quantile in (0, 1), got {threshold!r}")
        if padding < 0:
            raise ValueError(f'padding must be >= 0, got {padding}')
        if not 0.0 <= min_size <= 1.0:
            raise ValueError(f'min_size must lie in [0, 1], got {min_size}')
        if out_size < 1:
            raise ValueError(f'out_size must be a positive int, got {out_size}')
        if num_classes < 0:
            raise ValueError(f'num_classes must be >= 0, got {num_classes}')
        if not freeze and num_classes == 0:
            raise ValueError('freeze=False trains the ViT through its classification head: '
                             'set num_classes > 0 (or keep freeze=True)')
        if localize_size is not None:
            if localize_size < 1:
                raise ValueError(f'localize_size must be a positive int or None, got {localize_size}')
            if vit_kwargs.get('img_size', localize_size) != localize_size:
                raise ValueError(f"localize_size={localize_size} conflicts with img_size="
                                 f"{vit_kwargs['img_size']}: the ViT is built at localize_size")
            vit_kwargs['img_size'] = localize_size

        self.vit = create_timm_model(model_name, pretrained=pretrained, num_classes=num_classes, **vit_kwargs)
        try:
            check_supported_vit(self.vit)
        except TypeError as error:
            raise ValueError(f'model_name={model_name!r} is not a supported ViT: {error}') from None
        self.localize_size = tuple(self.vit.patch_embed.img_size)
        patch_size = tuple(self.vit.patch_embed.patch_size)
        if any(side % patch for side, patch in zip(self.localize_size, patch_size)):
            # the patch embedding would silently drop the remainder, shifting the map
            raise ValueError(f'localize_size (the ViT img_size) {self.localize_size} must be a '
                             f'multiple of the patch size {patch_size}')
        self.grid = token_grid(self.vit, self.localize_size)
        self.num_classes = num_classes
        self.out_size = out_size
        self.method = method
        self.head_fusion = head_fusion
        self.discard_ratio = discard_ratio
        self.threshold = threshold
        self.box_mode = box_mode
        self.padding = padding
        self.min_size = min_size
        self.freeze = freeze
        if freeze:
            self.vit.requires_grad_(False)
            self.vit.eval()

    def train(self, mode: bool = True) -> 'AttentionCropper':
        """Set train/eval mode; a frozen ViT stays in eval mode (no dropout, fixed maps)."""
        super().train(mode)
        if self.freeze:
            self.vit.eval()
        return self

    def importance(self, attention: Tensor) -> Tensor:
        """``(L, B, heads, T, T)`` -> ``(B, N)`` patch importance by the configured method."""
        prefix = self.vit.num_prefix_tokens
        if self.method == 'rollout':
            return attention_rollout(attention, self.head_fusion, self.discard_ratio, prefix,
                                     class_token=self.vit.cls_token is not None)
        return column_sum_importance(attention, prefix, self.head_fusion)

    def forward(self, images: Tensor) -> CropOutput:
        """``(B, 3, H, W)`` images (normalised as the ViT expects) -> :class:`CropOutput`."""
        if images.ndim != 4:
            raise ValueError(f'images must be (B, C, H, W), got {tuple(images.shape)}')
        height, width = images.shape[-2:]
        vit_input = images
        if (height, width) != self.localize_size:
            vit_input = F.interpolate(images, size=self.localize_size, mode='bilinear',
                                      align_corners=False, antialias=True)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze):
            # heads fused inside the forward: a heads-times smaller attention stack stays alive
            features, attention = forward_with_attention(self.vit, vit_input, self.head_fusion)
            logits = self.vit.forward_head(features) if self.num_classes > 0 else None
        # the map -> box path is not differentiable, and 12+ chained products want float32
        with torch.no_grad(), torch.autocast(device_type=images.device.type, enabled=False):
            importance = self.importance(attention.detach().float())
            response = response_map(importance, self.grid, (height, width))
            # regions are labelled on the token grid: the map holds no finer structure, and the
            # labelling's cost grows with the area times the regions' length
            boxes = boxes_from_response_map(response, self.threshold, self.box_mode, self.padding,
                                            self.min_size, label_size=self.grid)
        crops = crop_and_resize(images, boxes, self.out_size)
        return CropOutput(crops, boxes, response, logits)

    def extra_repr(self) -> str:
        return (f'localize_size={self.localize_size}, out_size={self.out_size}, method={self.method!r}, '
                f'head_fusion={self.head_fusion!r}, threshold={self.threshold!r}, '
                f'box_mode={self.box_mode!r}, freeze={self.freeze}')
