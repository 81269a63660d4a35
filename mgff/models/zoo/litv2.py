""" LiTv2 (LITv2)

A timm-registered implementation of:
* `Fast Vision Transformers with HiLo Attention` - https://arxiv.org/abs/2205.13213 (Pan et al., NeurIPS 2022)
  building on `Less is More: Pay Less Attention in Vision Transformers` - https://arxiv.org/abs/2105.14217 (LiT)

Official code and weights: https://github.com/ziplab/LITv2 (Apache-2.0)

A four-stage hierarchical transformer. The first two stages have no attention at all: their
blocks are only an FFN whose hidden layer goes through a depthwise 3x3 conv (the conv also stands
in for position embeddings). The last two stages add HiLo attention (``mgff.models.hilo.HiLo``).
Stages are joined by deformable token merging: a 2x2 stride-2 deformable conv that learns where to
sample, then BatchNorm and GELU.

Tokens flow channels-last, ``(B, H, W, C)``, which is what LayerNorm, the FFN's linear layers and
HiLo want. Parameter names follow the official code (``patch_embed``, ``layers.i.blocks.j``,
``layers.i.downsample`` at the end of stage i, ``norm``, ``head``) so its checkpoints load with no
missing or unexpected keys.
"""
import math
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from torchvision.ops import DeformConv2d, deform_conv2d

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, calculate_drop_path_rates, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models._manipulate import checkpoint_seq

from mgff.models.hilo import HiLo

__all__ = ['LiTv2']


class PatchEmbed(nn.Module):
    """Non-overlapping patch embedding: ``(B, C_in, H, W)`` -> ``(B, H/p, W/p, C)`` (channels-last)."""

    def __init__(self, in_chans: int = 3, embed_dim: int = 96, patch_size: int = 4):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class OffsetDeformConv2d(DeformConv2d):
    """Deformable conv that predicts its own sampling offsets: ``(B, C_in, H, W)`` -> ``(B, C_out, H', W')``.

    ``conv_offset`` (same kernel/stride/padding) gives a (dy, dx) pair per kernel tap and output
    position; it starts at zero so training begins from the plain convolution. Matches the official
    ``DeformConv2dPack`` parameters (``weight``, ``bias``, ``conv_offset``).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding)
        self.conv_offset = nn.Conv2d(
            in_channels, 2 * kernel_size * kernel_size, kernel_size, stride=stride, padding=padding)
        nn.init.zeros_(self.conv_offset.weight)
        nn.init.zeros_(self.conv_offset.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # torchvision's CPU kernel reads out of bounds (segfault) on non-finite offsets: a model that
        # diverged must end with a NaN loss, not a crashed process
        offset = torch.nan_to_num(self.conv_offset(x), nan=0.0, posinf=0.0, neginf=0.0)
        if x.dtype in (torch.float16, torch.bfloat16):
            # torchvision's deform_conv2d kernels have no bfloat16 path (nor CPU half): run this one op
            # in float32, also for a model cast to low precision, and hand the caller's dtype back
            with torch.autocast(device_type=x.device.type, enabled=False):
                out = deform_conv2d(
                    x.float(), offset.float(), self.weight.float(), self.bias.float(),
                    stride=self.stride, padding=self.padding, dilation=self.dilation)
            return out.to(x.dtype)
        return deform_conv2d(
            x, offset, self.weight, self.bias, stride=self.stride, padding=self.padding, dilation=self.dilation)


class DeformableTokenMerging(nn.Module):
    """Deformable token merging (DTM) between stages: ``(B, H, W, C)`` -> ``(B, H/2, W/2, 2C)``."""

    def __init__(self, dim: int):
        super().__init__()
        self.dconv = OffsetDeformConv2d(dim, dim * 2, kernel_size=2, stride=2)
        self.norm_layer = nn.BatchNorm2d(dim * 2)  # official name, kept for checkpoint compatibility
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dconv(x.permute(0, 3, 1, 2))
        return self.act(self.norm_layer(x)).permute(0, 2, 3, 1)


class DepthwiseConv(nn.Module):
    """Depthwise 3x3 conv on channels-last tokens: ``(B, H, W, C)`` -> ``(B, H, W, C)``."""

    def __init__(self, dim: int):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim)
        # official init: He normal over the fan-out of one depthwise filter
        nn.init.normal_(self.dwconv.weight, std=math.sqrt(2.0 / 9))
        nn.init.zeros_(self.dwconv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dwconv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class ConvFFN(nn.Module):
    """FFN with a depthwise 3x3 conv after the expansion (official ``DWMlp``): ``(B, H, W, C)`` -> same.

    The zero-padded conv gives the tokens their position information, so LiTv2 needs no position embedding.
    """

    def __init__(self, dim: int, hidden_dim: int, drop: float = 0.):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.dwconv = DepthwiseConv(hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop(self.act(self.dwconv(self.fc1(x))))
        return self.drop(self.fc2(x))


class ConvFFNBlock(nn.Module):
    """Attention-free block of stages 1-2: ``x + FFN(LN(x))`` on ``(B, H, W, C)``."""

    def __init__(self, dim: int, mlp_ratio: float = 4., proj_drop: float = 0., drop_path: float = 0.):
        super().__init__()
        # official name norm2: the block is the second half of a transformer block
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = ConvFFN(dim, int(dim * mlp_ratio), drop=proj_drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop_path(self.mlp(self.norm2(x)))


class HiLoBlock(nn.Module):
    """Transformer block of stages 3-4: ``x + HiLo(LN(x))``, then ``x + FFN(LN(x))`` on ``(B, H, W, C)``."""

    def __init__(
            self,
            dim: int,
            num_heads: int,
            window_size: int,
            alpha: float,
            mlp_ratio: float = 4.,
            qkv_bias: bool = True,
            proj_drop: float = 0.,
            attn_drop: float = 0.,
            drop_path: float = 0.,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = HiLo(
            dim, num_heads=num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop,
            window_size=window_size, alpha=alpha)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = ConvFFN(dim, int(dim * mlp_ratio), drop=proj_drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class LiTv2Stage(nn.Module):
    """One stage: its blocks, then (except in the last stage) token merging into the next stage.

    ``forward(x)`` with x ``(B, H, W, C)`` returns ``(features, merged)``: the stage's output
    ``(B, H, W, C)`` and the next stage's input ``(B, H/2, W/2, 2C)`` (``features`` itself when
    there is no merging). The merging sits at the end of the stage as in the official layout.
    """

    def __init__(
            self,
            dim: int,
            depth: int,
            num_heads: int,
            window_size: int,
            alpha: float,
            downsample: bool,
            mlp_ratio: float = 4.,
            qkv_bias: bool = True,
            proj_drop: float = 0.,
            attn_drop: float = 0.,
            drop_path: Optional[Sequence[float]] = None,
    ):
        super().__init__()
        drop_path = [0.] * depth if drop_path is None else list(drop_path)
        if len(drop_path) != depth:
            raise ValueError(f'need one drop-path rate per block: {len(drop_path)} for depth {depth}')
        if window_size > 0:
            blocks = [
                HiLoBlock(
                    dim, num_heads=num_heads, window_size=window_size, alpha=alpha, mlp_ratio=mlp_ratio,
                    qkv_bias=qkv_bias, proj_drop=proj_drop, attn_drop=attn_drop, drop_path=p)
                for p in drop_path]
        else:
            blocks = [ConvFFNBlock(dim, mlp_ratio=mlp_ratio, proj_drop=proj_drop, drop_path=p) for p in drop_path]
        self.blocks = nn.Sequential(*blocks)
        self.downsample = DeformableTokenMerging(dim) if downsample else nn.Identity()
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.blocks, x)
        else:
            x = self.blocks(x)
        return x, self.downsample(x)


class LiTv2(nn.Module):
    """LiTv2 for image classification.

    Input ``(B, in_chans, H, W)``; four stages at strides 4, 8, 16, 32 with widths
    ``embed_dim * (1, 2, 4, 8)``; ``forward_features`` gives channels-last ``(B, H/32, W/32, 8*embed_dim)``,
    ``forward`` gives ``(B, num_classes)``.

    Args:
        embed_dim: Width of the first stage; it doubles at every merging.
        depths: Number of blocks per stage.
        num_heads: Attention heads per stage (unused in attention-free stages).
        window_sizes: HiLo window per stage; 0 makes the stage attention-free (FFN-only blocks).
        alpha: Fraction of the heads that are Lo-Fi in every HiLo layer.
        mlp_ratio: FFN hidden width over block width.
        qkv_bias: Bias on the attention q/k/v projections.
        patch_size: Stride of the patch embedding.
        in_chans: Input image channels.
        num_classes: Classifier outputs; 0 for no classifier.
        global_pool: 'avg' or '' (no pooling in ``forward_head``).
        drop_rate: Dropout before the classifier.
        proj_drop_rate: Dropout inside the blocks (the official ``drop_rate``).
        attn_drop_rate: Dropout on the attention weights.
        drop_path_rate: Stochastic depth, increasing linearly over all blocks up to this value.
    """

    def __init__(
            self,
            embed_dim: int = 96,
            depths: Sequence[int] = (2, 2, 6, 2),
            num_heads: Sequence[int] = (3, 6, 12, 24),
            window_sizes: Sequence[int] = (0, 0, 2, 1),
            alpha: float = 0.9,
            mlp_ratio: float = 4.,
            qkv_bias: bool = True,
            patch_size: int = 4,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            drop_rate: float = 0.,
            proj_drop_rate: float = 0.,
            attn_drop_rate: float = 0.,
            drop_path_rate: float = 0.,
    ):
        super().__init__()
        num_stages = len(depths)
        if not len(num_heads) == len(window_sizes) == num_stages:
            raise ValueError('depths, num_heads and window_sizes need one entry per stage')
        if global_pool not in ('avg', ''):
            raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.output_fmt = 'NHWC'
        dims = [embed_dim * 2 ** i for i in range(num_stages)]
        self.num_features = self.head_hidden_size = dims[-1]

        self.patch_embed = PatchEmbed(in_chans, embed_dim, patch_size)
        # per-block rates rising linearly over the whole network, split by stage
        dpr = calculate_drop_path_rates(drop_path_rate, list(depths), stagewise=True)
        self.layers = nn.ModuleList()
        self.feature_info = []
        for i in range(num_stages):
            self.layers.append(LiTv2Stage(
                dims[i], depth=depths[i], num_heads=num_heads[i], window_size=window_sizes[i], alpha=alpha,
                downsample=i < num_stages - 1, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                proj_drop=proj_drop_rate, attn_drop=attn_drop_rate, drop_path=dpr[i]))
            self.feature_info.append(dict(
                num_chs=dims[i], reduction=patch_size * 2 ** i, module=f'layers.{i}.blocks'))
        self.norm = nn.LayerNorm(self.num_features)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        # as the official code: truncated normal for linear layers; convs keep their own init
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for stage in self.layers:
            stage.grad_checkpointing = enable

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
        """Forward that also returns the outputs of the selected stages (before token merging).

        Args:
            x: Images ``(B, C, H, W)``.
            indices: Take the last n stages if int, all if None, those listed if a sequence.
            norm: Apply the final norm to the last stage's output (the only one it is sized for).
            stop_early: Stop after the last stage that is taken.
            output_fmt: 'NCHW' or 'NHWC' for the intermediates.
            intermediates_only: Return only the intermediates.

        Returns:
            List of stage maps ``(B, C_i, H/s_i, W/s_i)`` (NCHW), or ``(final features NHWC, that list)``.
        """
        if output_fmt not in ('NCHW', 'NHWC'):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        num_stages = len(self.layers)
        take_indices, max_index = feature_take_indices(num_stages, indices)
        run_until = max_index if stop_early else num_stages - 1

        intermediates = []
        x = self.patch_embed(x)
        for i in range(run_until + 1):
            features, x = self.layers[i](x)
            if i in take_indices:
                x_inter = self.norm(features) if norm and i == num_stages - 1 else features
                if output_fmt == 'NCHW':
                    x_inter = x_inter.permute(0, 3, 1, 2)
                intermediates.append(x_inter)

        if intermediates_only:
            return intermediates
        if run_until == num_stages - 1:
            x = self.norm(x)
        return x, intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """Drop the stages (and norm/head) not needed for the given intermediates; returns the kept indices."""
        num_stages = len(self.layers)
        take_indices, max_index = feature_take_indices(num_stages, indices)
        prune_end = max_index < num_stages - 1
        self.layers = self.layers[:max_index + 1]
        # the merging at the end of the last kept stage would only feed a removed stage
        self.layers[-1].downsample = nn.Identity()
        if prune_norm or prune_end:
            self.norm = nn.Identity()  # sized for the last stage only
        if prune_end:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]['num_chs']
        if prune_head or prune_end:
            self.reset_classifier(0, '')
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` -> normalised last-stage tokens ``(B, H/32, W/32, num_features)``."""
        x = self.patch_embed(x)
        for stage in self.layers:
            _, x = stage(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """``(B, h, w, C)`` -> logits ``(B, num_classes)`` (or pooled features when ``pre_logits``)."""
        if self.global_pool == 'avg':
            x = x.mean(dim=(1, 2))
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def checkpoint_filter_fn(state_dict: Dict[str, Any], model: LiTv2) -> Dict[str, torch.Tensor]:
    """Official checkpoint -> this model's state dict.

    The module names are the official ones; the released files wrap the weights in
    ``{'model': ...}`` and DDP-saved ones prefix ``module.``.
    """
    state_dict = state_dict.get('model', state_dict)
    state_dict = state_dict.get('state_dict', state_dict)
    return {k[len('module.'):] if k.startswith('module.') else k: v for k, v in state_dict.items()}


def _create_litv2(variant: str, pretrained: bool = False, **kwargs) -> LiTv2:
    return build_model_with_cfg(
        LiTv2, variant, pretrained,
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
        'first_conv': 'patch_embed.proj', 'classifier': 'head',
        'license': 'apache-2.0', 'paper_ids': 'arXiv:2205.13213',
        'origin_url': 'https://github.com/ziplab/LITv2',
        **kwargs,
    }


_RELEASES = 'https://github.com/ziplab/LITv2/releases/download/v1.0/'

default_cfgs = generate_default_cfgs({
    'litv2_s.in1k': _cfg(url=_RELEASES + 'litv2_s.pth'),
    'litv2_m.in1k': _cfg(url=_RELEASES + 'litv2_m.pth'),
    'litv2_b.in1k': _cfg(url=_RELEASES + 'litv2_b.pth'),
    'litv2_b.in1k_384': _cfg(url=_RELEASES + 'litv2_b_384.pth', input_size=(3, 384, 384), pool_size=(12, 12),
                             crop_pct=1.0),
})


@register_model
def litv2_s(pretrained: bool = False, **kwargs) -> LiTv2:
    """LiTv2-S: 27.8M params, 3.7 GFLOPs at 224."""
    model_args = dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_sizes=(0, 0, 2, 1), alpha=0.9)
    return _create_litv2('litv2_s', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def litv2_m(pretrained: bool = False, **kwargs) -> LiTv2:
    """LiTv2-M: 48.8M params, 7.5 GFLOPs at 224."""
    model_args = dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), window_sizes=(0, 0, 2, 1), alpha=0.9)
    return _create_litv2('litv2_m', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def litv2_b(pretrained: bool = False, **kwargs) -> LiTv2:
    """LiTv2-B: 86.5M params, 13.2 GFLOPs at 224."""
    model_args = dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), window_sizes=(0, 0, 2, 1), alpha=0.9)
    return _create_litv2('litv2_b', pretrained=pretrained, **dict(model_args, **kwargs))
