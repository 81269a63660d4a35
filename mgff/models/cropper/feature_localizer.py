"""The ``features`` localiser: find the object in the stage-1 network's own maps (beyond the paper).

The MGFF paper finds the object with a second network:
"使用Vision-Transformer作为辅助模型,以非常小的成本定位图像中物体的位置" ("a Vision Transformer is
used as an auxiliary model to locate the object in the image at a very small cost"). With ViT-B that
is a second large network's FLOPs and its frozen parameters in every checkpoint (BENCHMARKS.md, "CPU: 2-core Intel
Xeon (shared), torch 2.15, 1 intra-op thread"). Departure from the
paper: no auxiliary model. This localiser reads a response map out of the maps the stage-1
classifier has already computed and sends it through the same map -> box -> crop code
(:func:`~mgff.models.cropper.boxes.boxes_from_response_map`). With it the two-stage model costs
about 2x one stage and stores no second network. Four response maps, each one function:

``energy``     :func:`activation_energy`: the channel sum of the last map, as MMAL-Net's AOLM
               (Zhang et al., 2021) does. Meant for a post-activation (non-negative) map such as
               EfficientNet's head conv (``conv_head``/``bn2``), which ``TimmBackbone`` returns as its
               last map; on real CUB photos that map localises best (``BENCHMARKS.md`` "Real photos:
               localisation").
``refined``    :func:`refined_energy`: the ``energy`` map as the seed of a two-prototype clustering of the
               finer map before it (stride 16 where the last is stride 32), times the seed: the
               object's shape on the finer grid. Beyond AOLM, which intersects the two maps' masks.
               The default: the best on the validation photos at 224 and 448 px, frozen and
               fine-tuned (``BENCHMARKS.md`` "Real photos: localisation").
``cam``        :func:`class_activation_map`: the linear head's weights of the predicted class applied
               at every position (Zhou et al., 2016); needs ``head='linear'``.
``attention``  :func:`attention_received_map`: the attention every grid position of the MGFF head
               receives, averaged over heads, queries and scales; needs ``head='mgff'`` with
               ``attention='mhsa'``.

Shapes: ``B`` images; maps ``(B, C, h, w)``; a response is ``(B, h, w)`` on the map's grid before
:func:`~mgff.models.cropper.response.response_map` brings it to ``(B, H, W)`` in [0, 1].
"""
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from mgff.models.cropper.boxes import boxes_from_response_map, check_box_options
from mgff.models.cropper.choices import check_choice
from mgff.models.cropper.response import min_max, response_map

__all__ = ['FEATURE_RESPONSES', 'activation_energy', 'refined_energy', 'class_activation_map', 'attention_received_map',
           'FeatureLocalizer']

FEATURE_RESPONSES = ('refined', 'energy', 'cam', 'attention')


def activation_energy(feature_map: Tensor) -> Tensor:
    """AOLM's activation map: ``(B, C, h, w)`` -> ``(B, h, w)``, the sum over channels (float32)."""
    if feature_map.ndim != 4:
        raise ValueError(f'feature_map must be (B, C, h, w), got {tuple(feature_map.shape)}')
    return feature_map.float().sum(dim=1)


def refined_energy(last_map: Tensor, finer_map: Tensor, iterations: int = 3, seed_fraction: float = 0.5) -> Tensor:
    r"""The energy of ``last_map`` refined on the grid of ``finer_map``: ``-> (B, h', w')`` float32 in [0, 1].

    1. Seed: :math:`s` = the min-max normalised channel sum of ``last_map`` (:func:`activation_energy`),
       bilinearly upsampled to the finer grid ``(h', w')`` and normalised again.
    2. Two prototypes on the L2-normalised finer features :math:`\hat f(x)`: the object's is the
       direction of the sum of :math:`\hat f` where :math:`s \ge` ``seed_fraction`` :math:`\cdot \max s`
       (the seed's half-maximum region by default), the background's that of the sum elsewhere. The contrast
       :math:`c(x) = \cos(\hat f(x), p_{obj}) - \cos(\hat f(x), p_{bg})` relabels the object as :math:`c > 0`;
       ``iterations`` rounds (2-means seeded by the energy). Starting from the half-maximum rather than the
       seed's mean keeps the perch, water or rock around a small bird out of the first object prototype
       (a peaked seed has a low mean); on the validation photos it raised hit@0.5 at 224 and 448 px
       (``BENCHMARKS.md`` "Real photos: localisation").
    3. Response: :math:`\mathrm{minmax}(c) \cdot s`: high where the finer features look like the object
       *and* the late map fires; the product keeps the energy's peak and takes the finer map's edges.

    A background with no position (the seed covers everything) has a zero prototype: the contrast is then
    the similarity to the object alone. No parameters; batched, a fixed number of rounds.

    Args:
        last_map: ``(B, C, h, w)``, the post-activation late map (the ``energy`` map).
        finer_map: ``(B, C', h', w')``, an earlier map of the same image (finer or equal grid).
        iterations: ``>= 1`` rounds of prototype updates.
        seed_fraction: in ``(0, 1]``, where the first object prototype is taken (fraction of the seed's peak).
    """
    if last_map.ndim != 4 or finer_map.ndim != 4:
        raise ValueError(f'last_map and finer_map must be (B, C, h, w), got {tuple(last_map.shape)} and {tuple(finer_map.shape)}')
    if iterations < 1:
        raise ValueError(f'iterations must be >= 1, got {iterations}')
    if not 0.0 < seed_fraction <= 1.0:
        raise ValueError(f'seed_fraction must lie in (0, 1], got {seed_fraction}')
    grid = tuple(finer_map.shape[-2:])
    seed = min_max(activation_energy(last_map)).unsqueeze(1)
    seed = min_max(F.interpolate(seed, size=grid, mode='bilinear', align_corners=False)).squeeze(1)  # (B, h', w')
    features = F.normalize(finer_map.float(), dim=1)
    obj = (seed >= seed_fraction * seed.amax(dim=(1, 2), keepdim=True)).to(features.dtype)  # a flat seed: everywhere
    for _ in range(iterations):
        mask = obj.unsqueeze(1)
        obj_proto = F.normalize((features * mask).sum(dim=(2, 3)), dim=1)  # (B, C')
        bg_proto = F.normalize((features * (1 - mask)).sum(dim=(2, 3)), dim=1)  # zero where no background
        contrast = torch.einsum('bchw,bc->bhw', features, obj_proto - bg_proto)
        obj = (contrast > 0).to(features.dtype)
    return min_max(contrast) * seed


def class_activation_map(feature_map: Tensor, head: nn.Module, classes: Tensor) -> Tensor:
    r"""Class activation map of a :class:`~mgff.models.heads.LinearHead` for one class per image.

    The head computes :math:`z_c = w_c^\top \mathrm{mean}_{x}\,\mathrm{LN}(F)(x) + b_c`; the map is the
    same sum before the pooling, :math:`M_c(x) = w_c^\top \mathrm{LN}(F)(x)` (its mean over positions
    is the logit minus the bias).

    Args:
        feature_map: ``(B, C, h, w)``, the map the head reads (the backbone's last).
        head: a ``LinearHead`` (``norm``, ``classifier``).
        classes: ``(B,)`` the class of each image (the predicted one at inference).

    Returns:
        ``(B, h, w)`` float32.
    """
    norm, classifier = getattr(head, 'norm', None), getattr(head, 'classifier', None)
    if not isinstance(classifier, nn.Linear) or norm is None:
        raise ValueError(f"feature_response='cam' needs the linear head (head='linear'), got {type(head).__name__}")
    weights = classifier.weight[classes].float()  # (B, C)
    return torch.einsum('bchw,bc->bhw', norm(feature_map.float()).float(), weights)


def attention_received_map(attention: Sequence[Tensor | None], grid: tuple[int, int]) -> Tensor:
    """Attention each grid position receives in the MGFF head's spatial attention.

    Args:
        attention: per scale ``(B, heads, N, N)`` row-softmax weights (``None`` for a scale without a
            global map), ``N = h * w``: the head's ``forward_details()['attention']``.
        grid: ``(h, w)``.

    Returns:
        ``(B, h, w)``: the mean over scales, heads and queries (each scale's map sums to 1).
    """
    maps = [a for a in attention if a is not None]
    if not maps:
        raise ValueError("feature_response='attention' needs the MGFF head with a global spatial attention "
                         "(head='mgff', use_attention=True, attention='mhsa')")
    batch = maps[0].shape[0]
    return torch.stack([a.float().mean(dim=(1, 2)) for a in maps]).mean(dim=0).reshape(batch, *grid)


class FeatureLocalizer(nn.Module):
    """Response map and box from the stage-1 network's maps: ``maps -> (response (B, H, W), boxes (B, 4))``.

    No parameters: it reads the classifier's maps (and, for ``cam``/``attention``, its head). The map
    on the backbone's grid is upsampled to the image (:func:`response_map`) and boxed as the ViT
    cropper's is; regions are labelled on the backbone's grid.

    Args:
        response: ``'refined' | 'energy' | 'cam' | 'attention'`` (module docstring).
        threshold, box_mode, padding, min_size: see :func:`boxes_from_response_map`.
    """

    def __init__(
            self,
            response: str = 'refined',
            threshold: str | float = 'mean',
            box_mode: str = 'largest',
            padding: float = 0.05,
            min_size: float = 0.2,
    ):
        super().__init__()
        check_choice('feature_response', response, FEATURE_RESPONSES)
        check_box_options(box_mode, threshold, padding, min_size)
        self.response = response
        self.threshold = threshold
        self.box_mode = box_mode
        self.padding = padding
        self.min_size = min_size

    def grid_response(self, maps: Sequence[Tensor], head: nn.Module | None = None, logits: Tensor | None = None) -> Tensor:
        """The chosen response on the backbone's grid: ``(B, h, w)`` float32.

        Args:
            maps: the backbone's maps ``[(B, C_i, h_i, w_i), ...]``; the last one is read (``refined``: the
                last two).
            head: the classification head (``cam``, ``attention``).
            logits: ``(B, num_classes)`` stage-1 logits; ``cam`` maps their argmax.
        """
        if self.response == 'energy':
            return activation_energy(maps[-1])
        if self.response == 'refined':
            if len(maps) < 2:
                raise ValueError("feature_response='refined' reads the last two maps of the backbone: tap at least "
                                 f"two stages (model.stages), got {len(maps)} map")
            return refined_energy(maps[-1], maps[-2])
        if head is None:
            raise ValueError(f"feature_response={self.response!r} needs the classification head")
        if self.response == 'cam':
            if logits is None:
                raise ValueError("feature_response='cam' needs the stage-1 logits (the predicted class)")
            return class_activation_map(maps[-1], head, logits.argmax(dim=-1))
        details = getattr(head, 'forward_details', None)
        if details is None:
            raise ValueError(f"feature_response='attention' needs the MGFF head (head='mgff'), got {type(head).__name__}")
        record = details(maps)
        return attention_received_map(record['attention'], record['grid'])

    def forward(
            self,
            maps: Sequence[Tensor],
            image_size: tuple[int, int],
            head: nn.Module | None = None,
            logits: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """``maps`` of images of ``image_size = (H, W)`` -> ``response (B, H, W)`` in [0, 1] and
        ``boxes (B, 4)`` float32 xyxy in image pixels. Not differentiable (thresholds)."""
        with torch.no_grad(), torch.autocast(device_type=maps[-1].device.type, enabled=False):
            grid = self.grid_response([m.detach().float() for m in maps], head, logits)  # the head too runs in float32 here
            batch, h, w = grid.shape
            response = response_map(grid.reshape(batch, h * w), (h, w), tuple(image_size))
            boxes = boxes_from_response_map(response, self.threshold, self.box_mode, self.padding,
                                            self.min_size, label_size=(h, w))
        return response, boxes

    def extra_repr(self) -> str:
        return (f'response={self.response!r}, threshold={self.threshold!r}, box_mode={self.box_mode!r}, '
                f'padding={self.padding}, min_size={self.min_size}')
