"""The ViT localiser: find the object with a ViT's attention and cut it out (the MGFF paper's
second-stage input)."""
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from mgff.models.cropper.boxes import boxes_from_response_map, check_box_options
from mgff.models.cropper.choices import check_choice
from mgff.models.cropper.crops import CropOutput, crop_and_resize
from mgff.models.cropper.importance import (
    HEAD_FUSIONS, IMPORTANCE_METHODS, LAYER_FUSIONS, attention_rollout, column_sum_importance,
)
from mgff.models.cropper.response import response_map
from mgff.models.cropper.vit_attention import check_supported_vit, forward_with_attention, token_grid
from mgff.models.pretrained import create_timm_model

__all__ = ['AttentionCropper']


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
        layer_fusion: ``'product' | 'mean'``, how ``column_sum`` combines the layers (see
            :func:`column_sum_importance`); rollout always multiplies.
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
            layer_fusion: str = 'product',
            threshold: str | float = 'mean',
            box_mode: str = 'largest',
            padding: float = 0.05,
            min_size: float = 0.2,
            freeze: bool = True,
            **vit_kwargs,
    ):
        super().__init__()
        check_choice('method', method, IMPORTANCE_METHODS)
        check_choice('head_fusion', head_fusion, HEAD_FUSIONS)
        check_choice('layer_fusion', layer_fusion, LAYER_FUSIONS)
        if not 0.0 <= discard_ratio < 1.0:
            raise ValueError(f'discard_ratio must lie in [0, 1), got {discard_ratio}')
        check_box_options(box_mode, threshold, padding, min_size)
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
        self.layer_fusion = layer_fusion
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
        return column_sum_importance(attention, prefix, self.head_fusion, self.layer_fusion)

    def forward(self, images: Tensor) -> CropOutput:
        """``(B, 3, H, W)`` images (normalised as the ViT expects) -> :class:`CropOutput`."""
        found = self.locate(images)
        return found._replace(crops=crop_and_resize(images, found.boxes, self.out_size))

    def locate(self, images: Tensor) -> CropOutput:
        """:meth:`forward` without cutting the crops (``crops`` is ``None``): for a caller that cuts them
        from another image (the two-stage model cuts from the data-normalised view or the source view)."""
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
        return CropOutput(None, boxes, response, logits)

    def extra_repr(self) -> str:
        return (f'localize_size={self.localize_size}, out_size={self.out_size}, method={self.method!r}, '
                f'head_fusion={self.head_fusion!r}, layer_fusion={self.layer_fusion!r}, threshold={self.threshold!r}, '
                f'box_mode={self.box_mode!r}, freeze={self.freeze}')
