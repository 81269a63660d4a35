"""How well predicted object boxes (e.g. the attention cropper's) match ground-truth boxes."""
import torch
from torch import Tensor
from torchmetrics import Metric

__all__ = ['BoxIoU', 'paired_box_iou']


def paired_box_iou(pred: Tensor, target: Tensor) -> Tensor:
    """IoU of each box with its partner: ``(B, 4), (B, 4)`` xyxy -> ``(B,)``.

    The diagonal of ``torchvision.ops.box_iou(pred, target)`` without building the ``B x B``
    matrix; two empty boxes (zero union) have IoU 0.
    """
    top_left = torch.maximum(pred[:, :2], target[:, :2])
    bottom_right = torch.minimum(pred[:, 2:], target[:, 2:])
    intersection = (bottom_right - top_left).clamp(min=0).prod(dim=1)
    area_pred = (pred[:, 2:] - pred[:, :2]).clamp(min=0).prod(dim=1)
    area_target = (target[:, 2:] - target[:, :2]).clamp(min=0).prod(dim=1)
    union = area_pred + area_target - intersection
    return torch.where(union > 0, intersection / union.clamp(min=torch.finfo(union.dtype).tiny),
                       torch.zeros_like(union))


class BoxIoU(Metric):
    """Mean IoU and hit rate (share of boxes with IoU > ``hit_threshold``) of paired boxes.

    ``update(pred_boxes, target_boxes)`` takes ``(B, 4)`` xyxy boxes in the same pixel frame,
    one prediction per target. Target rows holding a NaN are skipped: images without ground
    truth (datasets with boxes for only some images) count neither way.

    ``compute()`` returns ``{'miou': ..., 'hit_rate': ...}`` over every counted box since the
    last reset, on all ranks (the sums are reduced with ``sum``); both are NaN before any box
    was counted, rather than a 0 that would read as "all boxes missed".
    """
    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    iou_sum: Tensor
    hits: Tensor
    count: Tensor

    def __init__(self, hit_threshold: float = 0.5, **kwargs):
        super().__init__(**kwargs)
        if not 0.0 <= hit_threshold < 1.0:
            raise ValueError(f'hit_threshold must lie in [0, 1), got {hit_threshold}')
        self.hit_threshold = hit_threshold
        # integer counts stay exact however long the epoch
        self.add_state('iou_sum', torch.tensor(0.0), dist_reduce_fx='sum')
        self.add_state('hits', torch.tensor(0), dist_reduce_fx='sum')
        self.add_state('count', torch.tensor(0), dist_reduce_fx='sum')

    def update(self, pred_boxes: Tensor, target_boxes: Tensor) -> None:
        """Add a batch: ``pred_boxes (B, 4)``, ``target_boxes (B, 4)`` xyxy, NaN rows skipped."""
        if pred_boxes.shape != target_boxes.shape or pred_boxes.ndim != 2 or pred_boxes.shape[1] != 4:
            raise ValueError('pred_boxes and target_boxes must both be (B, 4), got '
                             f'{tuple(pred_boxes.shape)} and {tuple(target_boxes.shape)}')
        valid = ~target_boxes.isnan().any(dim=1)
        iou = paired_box_iou(pred_boxes[valid].float(), target_boxes[valid].float())
        self.iou_sum += iou.sum()
        self.hits += (iou > self.hit_threshold).sum()
        self.count += valid.sum()

    def compute(self) -> dict[str, Tensor]:
        count = self.count.to(self.iou_sum.dtype)  # 0 / 0 gives NaN in float, not an error
        return {'miou': self.iou_sum / count, 'hit_rate': self.hits.to(count.dtype) / count}
