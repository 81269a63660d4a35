""" UniFormer (image classification)

A timm-registered implementation of:
* `UniFormer: Unifying Convolution and Self-attention for Visual Recognition` - https://arxiv.org/abs/2201.09450
  (Li et al., TPAMI 2023; the image models of the ICLR 2022 UniFormer paper)

Official code and weights: https://github.com/Sense-X/UniFormer/tree/main/image_classification

A UniFormer block is ``x + DPE(x)`` (dynamic position embedding, a depthwise 3x3 conv), then
``x + MHRA(norm(x))`` (multi-head relation aggregation), then ``x + FFN(norm(x))``. Stages 1-2 use
*local* MHRA, whose token affinity is a learnable depthwise 5x5 conv (a convolution), stages 3-4
use *global* MHRA, i.e. self-attention over all tokens.

Parameter names follow the official code (``patch_embed1..4``, ``blocks1..4``, ``gamma_1/2``,
``norm``, ``head``) so its checkpoints load with no missing or unexpected keys.
"""
from functools import partial
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import Attention, DropPath, LayerNorm2d, Mlp, calculate_drop_path_rates, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models._manipulate import checkpoint_seq

__all__ = ['UniFormer']


class PatchEmbed(nn.Module):
    """Non-overlapping patch embedding: ``(B, C_in, H, W)`` -> ``(B, C_out, H/p, W/p)``.

    A ``p x p`` stride-``p`` conv followed by LayerNorm over channels.
    """

    def __init__(self, in_chans: int, embed_dim: int, patch_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = LayerNorm2d(embed_dim, eps=1e-5)  # the official nn.LayerNorm default eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x))


class ConvStem(nn.Module):
    """Overlapping stem of the ``small_plus`` variants: ``(B, C_in, H, W)`` -> ``(B, C_out, H/4, W/4)``.

    Two 3x3 stride-2 convs (conv-BN-GELU-conv-BN). ``proj`` keeps the official Sequential indices.
    """

    def __init__(self, in_chans: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Sequential(
            nn.Conv2d(in_chans, embed_dim // 2, kernel_size=3, stride=2, padding=1),
            nn.BatchNorm2d(embed_dim // 2),
            nn.GELU(),
            nn.Conv2d(embed_dim // 2, embed_dim, kernel_size=3, stride=2, padding=1),
            nn.BatchNorm2d(embed_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class ConvDownsample(nn.Module):
    """Overlapping 2x downsampling of the ``small_plus`` variants: ``(B, C_in, H, W)`` -> ``(B, C_out, H/2, W/2)``."""

    def __init__(self, in_chans: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Sequential(
            nn.Conv2d(in_chans, embed_dim, kernel_size=3, stride=2, padding=1),
            nn.BatchNorm2d(embed_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class LocalMHRABlock(nn.Module):
    """UniFormer block with local MHRA (the official ``CBlock``): ``(B, C, H, W)`` -> ``(B, C, H, W)``.

    Local MHRA is ``conv2(attn(conv1(BN(x))))``: 1x1 value projection, a depthwise 5x5 conv as the
    learnable local token affinity, 1x1 output projection. The FFN uses 1x1 convs, so the block
    stays in NCHW throughout.
    """

    def __init__(
            self,
            dim: int,
            mlp_ratio: float = 4.,
            proj_drop: float = 0.,
            drop_path: float = 0.,
    ):
        super().__init__()
        self.pos_embed = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim)
        self.norm1 = nn.BatchNorm2d(dim)
        self.conv1 = nn.Conv2d(dim, dim, kernel_size=1)
        self.attn = nn.Conv2d(dim, dim, kernel_size=5, padding=2, groups=dim)
        self.conv2 = nn.Conv2d(dim, dim, kernel_size=1)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = nn.BatchNorm2d(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=proj_drop, use_conv=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.pos_embed(x)
        x = x + self.drop_path(self.conv2(self.attn(self.conv1(self.norm1(x)))))
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x


class GlobalMHRABlock(nn.Module):
    """UniFormer block with global MHRA (the official ``SABlock``): ``(B, C, H, W)`` -> ``(B, C, H, W)``.

    Global MHRA is multi-head self-attention over all ``H*W`` tokens. With ``layer_scale_init_value``
    the attention and FFN branches are scaled per channel by learnable ``gamma_1``/``gamma_2``
    (CaiT layer scale, the ``_ls`` variants).
    """

    def __init__(
            self,
            dim: int,
            num_heads: int,
            mlp_ratio: float = 4.,
            qkv_bias: bool = True,
            proj_drop: float = 0.,
            attn_drop: float = 0.,
            drop_path: float = 0.,
            layer_scale_init_value: Optional[float] = None,
    ):
        super().__init__()
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        self.pos_embed = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim)
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=proj_drop)
        if layer_scale_init_value is not None:
            self.gamma_1 = nn.Parameter(torch.full((dim,), layer_scale_init_value))
            self.gamma_2 = nn.Parameter(torch.full((dim,), layer_scale_init_value))
        else:
            self.gamma_1 = self.gamma_2 = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.pos_embed(x)
        B, C, H, W = x.shape
        x = x.flatten(2).transpose(1, 2)  # (B, H*W, C)
        attn = self.attn(self.norm1(x))
        x = x + self.drop_path(attn if self.gamma_1 is None else self.gamma_1 * attn)
        mlp = self.mlp(self.norm2(x))
        x = x + self.drop_path(mlp if self.gamma_2 is None else self.gamma_2 * mlp)
        return x.transpose(1, 2).reshape(B, C, H, W)


class UniFormer(nn.Module):
    """UniFormer for image classification.

    Four stages at strides 4, 8, 16, 32; local MHRA blocks in stages 1-2, global MHRA in 3-4.
    Input ``(B, in_chans, H, W)``; ``forward_features`` gives ``(B, embed_dims[-1], H/32, W/32)``,
    ``forward`` gives ``(B, num_classes)``.

    Args:
        depths: Number of blocks per stage.
        embed_dims: Channels per stage.
        head_dim: Channels per attention head in the global stages (heads = dim // head_dim).
        mlp_ratio: FFN hidden width over block width.
        qkv_bias: Bias on the attention qkv projection.
        conv_stem: Overlapping 3x3 conv stem/downsampling (``small_plus``) instead of patch embedding.
        layer_scale_init_value: Initial layer-scale value for the global blocks; None disables it.
        in_chans: Input image channels.
        num_classes: Classifier outputs; 0 for no classifier.
        global_pool: 'avg' or '' (no pooling in ``forward_head``).
        drop_rate: Dropout before the classifier.
        proj_drop_rate: Dropout after the stem and inside the blocks (the official ``drop_rate``).
        attn_drop_rate: Dropout on the attention weights.
        drop_path_rate: Stochastic depth, increasing linearly over all blocks up to this value.
    """

    def __init__(
            self,
            depths: Sequence[int] = (3, 4, 8, 3),
            embed_dims: Sequence[int] = (64, 128, 320, 512),
            head_dim: int = 64,
            mlp_ratio: float = 4.,
            qkv_bias: bool = True,
            conv_stem: bool = False,
            layer_scale_init_value: Optional[float] = None,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            drop_rate: float = 0.,
            proj_drop_rate: float = 0.,
            attn_drop_rate: float = 0.,
            drop_path_rate: float = 0.,
    ):
        super().__init__()
        if len(depths) != 4 or len(embed_dims) != 4:
            raise ValueError('UniFormer has four stages: depths and embed_dims need four entries')
        if global_pool not in ('avg', ''):
            raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.embed_dims = tuple(embed_dims)
        self.num_features = self.head_hidden_size = embed_dims[-1]
        self.output_fmt = 'NCHW'
        self.grad_checkpointing = False
        self.num_stages = 4

        in_dims = (in_chans,) + tuple(embed_dims[:-1])
        # per-block rates rising linearly over the whole network, split by stage
        dpr = calculate_drop_path_rates(drop_path_rate, list(depths), stagewise=True)
        self.feature_info = []
        for i in range(4):
            if conv_stem:
                embed = ConvStem(in_dims[i], embed_dims[i]) if i == 0 else ConvDownsample(in_dims[i], embed_dims[i])
            else:
                embed = PatchEmbed(in_dims[i], embed_dims[i], patch_size=4 if i == 0 else 2)
            if i < 2:
                blocks = [
                    LocalMHRABlock(embed_dims[i], mlp_ratio=mlp_ratio, proj_drop=proj_drop_rate, drop_path=p)
                    for p in dpr[i]]
            else:
                blocks = [
                    GlobalMHRABlock(
                        embed_dims[i], num_heads=embed_dims[i] // head_dim, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                        proj_drop=proj_drop_rate, attn_drop=attn_drop_rate, drop_path=p,
                        layer_scale_init_value=layer_scale_init_value)
                    for p in dpr[i]]
            # official flat names: patch_embed{n} feeds blocks{n}
            self.add_module(f'patch_embed{i + 1}', embed)
            self.add_module(f'blocks{i + 1}', nn.Sequential(*blocks))
            self.feature_info.append(dict(num_chs=embed_dims[i], reduction=4 * 2 ** i, module=f'blocks{i + 1}'))
        self.pos_drop = nn.Dropout(proj_drop_rate)
        self.norm = nn.BatchNorm2d(embed_dims[-1])
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        # as the official code: truncated normal for linear layers, PyTorch defaults for convs
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def _stage(self, i: int) -> Tuple[nn.Module, nn.Sequential]:
        """The (downsampling, blocks) pair of stage ``i`` (0-based)."""
        return getattr(self, f'patch_embed{i + 1}'), getattr(self, f'blocks{i + 1}')

    def _run_stage(self, i: int, x: torch.Tensor) -> torch.Tensor:
        embed, blocks = self._stage(i)
        x = embed(x)
        if i == 0:
            x = self.pos_drop(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(blocks, x)
        return blocks(x)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            if global_pool not in ('avg', ''):
                raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
            self.global_pool = global_pool
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Forward that also returns the outputs of the selected stages.

        Args:
            x: Images ``(B, C, H, W)``.
            indices: Take the last n stages if int, all if None, those listed if a sequence.
            norm: Apply the final norm to the last stage's output (the only one it is sized for).
            stop_early: Stop after the last stage that is taken.
            output_fmt: 'NCHW' or 'NHWC' for the intermediates.
            intermediates_only: Return only the intermediates.

        Returns:
            List of stage maps ``(B, C_i, H/s_i, W/s_i)``, or ``(final features, that list)``.
        """
        if output_fmt not in ('NCHW', 'NHWC'):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(self.num_stages, indices)
        last_stage = self.num_stages - 1
        run_until = max_index if stop_early else last_stage

        intermediates = []
        for i in range(run_until + 1):
            x = self._run_stage(i, x)
            if i in take_indices:
                x_inter = self.norm(x) if norm and i == last_stage else x
                if output_fmt == 'NHWC':
                    x_inter = x_inter.permute(0, 2, 3, 1)
                intermediates.append(x_inter)

        if intermediates_only:
            return intermediates
        if run_until == last_stage:
            x = self.norm(x)
        return x, intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """Drop the stages (and norm/head) not needed for the given intermediates; returns the kept indices."""
        take_indices, max_index = feature_take_indices(self.num_stages, indices)
        prune_end = max_index < self.num_stages - 1
        for i in range(max_index + 1, self.num_stages):
            delattr(self, f'patch_embed{i + 1}')
            delattr(self, f'blocks{i + 1}')
        self.num_stages = max_index + 1
        if prune_norm or prune_end:
            self.norm = nn.Identity()  # sized for the last stage only
        if prune_end:
            self.num_features = self.head_hidden_size = self.embed_dims[max_index]
        if prune_head or prune_end:
            self.reset_classifier(0, '')
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` -> normalised last-stage map ``(B, embed_dims[-1], H/32, W/32)``."""
        for i in range(self.num_stages):
            x = self._run_stage(i, x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """``(B, C, h, w)`` -> logits ``(B, num_classes)`` (or pooled features when ``pre_logits``)."""
        if self.global_pool == 'avg':
            x = x.mean(dim=(2, 3))
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def checkpoint_filter_fn(state_dict: Dict[str, Any], model: UniFormer) -> Dict[str, torch.Tensor]:
    """Official checkpoint -> this model's state dict.

    The module names are the official ones; the official files differ only in packaging: training
    checkpoints wrap the weights in ``{'model': ...}`` and DDP-saved ones prefix ``module.``.
    """
    state_dict = state_dict.get('model', state_dict)
    state_dict = state_dict.get('state_dict', state_dict)
    return {k[len('module.'):] if k.startswith('module.') else k: v for k, v in state_dict.items()}


def _create_uniformer(variant: str, pretrained: bool = False, **kwargs) -> UniFormer:
    return build_model_with_cfg(
        UniFormer, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=(0, 1, 2, 3), feature_cls='getter'),
        **kwargs,
    )


def _cfg(url: str = '', **kwargs) -> Dict[str, Any]:
    return {
        'url': url,
        'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (7, 7),
        'crop_pct': 0.875, 'interpolation': 'bicubic',
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'patch_embed1.proj', 'classifier': 'head',
        'license': 'mit', 'paper_ids': 'arXiv:2201.09450',
        'origin_url': 'https://github.com/Sense-X/UniFormer',
        **kwargs,
    }


# ImageNet-1k weights of the official README. Only uniformer_small is on the Hugging Face hub under a
# known file name; the others are Google Drive links (README), load them with
# pretrained_cfg_overlay=dict(file=path).
default_cfgs = generate_default_cfgs({
    'uniformer_small.in1k': _cfg(hf_hub_id='Sense-X/uniformer_image', hf_hub_filename='uniformer_small_in1k.pth'),
    'uniformer_small_plus.in1k': _cfg(first_conv='patch_embed1.proj.0'),
    'uniformer_small_plus_dim64.in1k': _cfg(first_conv='patch_embed1.proj.0'),
    'uniformer_base.in1k': _cfg(),
    'uniformer_base_ls.in1k': _cfg(),
})


@register_model
def uniformer_small(pretrained: bool = False, **kwargs) -> UniFormer:
    """UniFormer-S: 21.5M params, 3.6 GFLOPs at 224."""
    model_args = dict(depths=(3, 4, 8, 3), embed_dims=(64, 128, 320, 512), head_dim=64)
    return _create_uniformer('uniformer_small', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def uniformer_small_plus(pretrained: bool = False, **kwargs) -> UniFormer:
    """UniFormer-S+ (S-dagger): conv stem, deeper, head_dim 32; 24.0M params, 4.2 GFLOPs at 224."""
    model_args = dict(depths=(3, 5, 9, 3), embed_dims=(64, 128, 320, 512), head_dim=32, conv_stem=True)
    return _create_uniformer('uniformer_small_plus', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def uniformer_small_plus_dim64(pretrained: bool = False, **kwargs) -> UniFormer:
    """UniFormer-S+ retrained with head_dim 64 (same parameters as S+, fewer heads)."""
    model_args = dict(depths=(3, 5, 9, 3), embed_dims=(64, 128, 320, 512), head_dim=64, conv_stem=True)
    return _create_uniformer('uniformer_small_plus_dim64', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def uniformer_base(pretrained: bool = False, **kwargs) -> UniFormer:
    """UniFormer-B: 49.8M params, 8.3 GFLOPs at 224."""
    model_args = dict(depths=(5, 8, 20, 7), embed_dims=(64, 128, 320, 512), head_dim=64)
    return _create_uniformer('uniformer_base', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def uniformer_base_ls(pretrained: bool = False, **kwargs) -> UniFormer:
    """UniFormer-B with layer scale (init 1e-6) in the global blocks."""
    model_args = dict(depths=(5, 8, 20, 7), embed_dims=(64, 128, 320, 512), head_dim=64, layer_scale_init_value=1e-6)
    return _create_uniformer('uniformer_base_ls', pretrained=pretrained, **dict(model_args, **kwargs))
