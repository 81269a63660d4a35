import math

import pytest
import torch
from torchvision.ops import box_iou

from mgff.metrics.box_iou import BoxIoU, paired_box_iou

NAN = float('nan')


def test_known_values_and_nan_targets_ignored():
    pred = torch.tensor([[0., 0., 10., 10.],     # identical -> 1
                         [0., 0., 10., 10.],     # half overlap: 50 / 150 -> 1/3
                         [0., 0., 10., 10.],     # disjoint -> 0
                         [3., 3., 4., 4.]])      # no ground truth -> skipped
    target = torch.tensor([[0., 0., 10., 10.],
                           [5., 0., 15., 10.],
                           [20., 20., 30., 30.],
                           [NAN, NAN, NAN, NAN]])
    metric = BoxIoU()
    metric.update(pred, target)
    result = metric.compute()
    assert result['miou'].item() == pytest.approx((1 + 1 / 3 + 0) / 3)
    assert result['hit_rate'].item() == pytest.approx(1 / 3)


def test_hit_needs_iou_strictly_above_threshold():
    pred = torch.tensor([[0., 0., 10., 10.]])
    target = torch.tensor([[0., 0., 20., 10.]])  # IoU exactly 0.5
    metric = BoxIoU()
    metric.update(pred, target)
    assert metric.compute()['hit_rate'].item() == 0.0


def test_paired_iou_is_the_diagonal_of_torchvision_box_iou():
    generator = torch.Generator().manual_seed(0)
    corners = torch.rand(64, 2, 2, generator=generator) * 50
    pred = torch.cat([torch.minimum(corners[:, 0], corners[:, 1]), torch.maximum(corners[:, 0], corners[:, 1])], 1)
    shift = torch.rand(64, 4, generator=generator) * 10
    target = torch.cat([pred[:, :2] + shift[:, :2], pred[:, 2:] + shift[:, 2:]], 1)
    torch.testing.assert_close(paired_box_iou(pred, target), box_iou(pred, target).diagonal())


def test_updates_accumulate_like_one_batch():
    generator = torch.Generator().manual_seed(1)
    xy = torch.rand(10, 2, generator=generator) * 40
    pred = torch.cat([xy, xy + 10], 1)
    target = torch.cat([xy + 3, xy + 14], 1)
    target[4] = NAN
    whole, parts = BoxIoU(), BoxIoU()
    whole.update(pred, target)
    parts.update(pred[:6], target[:6])
    parts.update(pred[6:], target[6:])
    for key, value in whole.compute().items():
        torch.testing.assert_close(parts.compute()[key], value)


def test_states_reduce_by_sum_across_ranks():
    # merge_state applies each state's dist_reduce_fx, as the all-gather across ranks does
    pred = torch.tensor([[0., 0., 10., 10.], [0., 0., 10., 10.]])
    target = torch.tensor([[0., 0., 10., 10.], [20., 20., 30., 30.]])
    rank0, rank1 = BoxIoU(), BoxIoU()
    rank0.update(pred[:1], target[:1])
    rank1.update(pred[1:], target[1:])
    rank0.merge_state(rank1)
    result = rank0.compute()
    assert result['miou'].item() == pytest.approx(0.5)
    assert result['hit_rate'].item() == pytest.approx(0.5)


def test_no_ground_truth_gives_nan_and_reset_clears():
    metric = BoxIoU()
    metric.update(torch.tensor([[0., 0., 1., 1.]]), torch.full((1, 4), NAN))
    assert math.isnan(metric.compute()['miou'].item())
    metric.reset()
    metric.update(torch.tensor([[0., 0., 1., 1.]]), torch.tensor([[0., 0., 1., 1.]]))
    assert metric.compute()['miou'].item() == 1.0


def test_bad_shapes_and_threshold_raise():
    with pytest.raises(ValueError, match='pred_boxes'):
        BoxIoU().update(torch.zeros(2, 4), torch.zeros(3, 4))
    with pytest.raises(ValueError, match='hit_threshold'):
        BoxIoU(hit_threshold=1.5)
