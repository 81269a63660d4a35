"""Parent-level accuracy: known values, index and score inputs."""

import pytest
import torch

from mgff.metrics.parent_accuracy import ParentAccuracy


def test_known_values():
    metric = ParentAccuracy([10, 10, 20, 20, 30])
    # preds 1 (parent 10) for target 0 (parent 10): right; 2 (20) for 4 (30): wrong; 3 (20) for 2 (20): right
    metric.update(torch.tensor([1, 2, 3]), torch.tensor([0, 4, 2]))
    assert metric.compute().item() == pytest.approx(2 / 3)


def test_scores_are_argmaxed_and_states_accumulate():
    metric = ParentAccuracy([0, 0, 1])
    scores = torch.tensor([[0.1, 0.8, 0.1], [0.9, 0.05, 0.05]])
    metric.update(scores, torch.tensor([0, 2]))
    metric.update(torch.tensor([2]), torch.tensor([2]))
    assert metric.compute().item() == pytest.approx(2 / 3)


def test_empty_parents_refused():
    with pytest.raises(ValueError):
        ParentAccuracy([])
