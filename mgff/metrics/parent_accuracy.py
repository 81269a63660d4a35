"""Accuracy at the parent level of a class hierarchy (e.g. NA-Birds species -> their parent node)."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor
from torchmetrics import Metric


class ParentAccuracy(Metric):
    """Share of images whose predicted class has the same parent as the true class.

    Args:
        parents: ``parents[c]`` is the parent id of class ``c`` (any integers; only equality matters).

    ``update(preds, target)``: ``preds`` ``(B, C)`` scores or ``(B,)`` class indices, ``target`` ``(B,)``.
    States are sums, reduced over ranks.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, parents: Sequence[int], **kwargs) -> None:
        super().__init__(**kwargs)
        if len(parents) == 0:
            raise ValueError("parents must list one parent per class")
        self.register_buffer("parent_of", torch.as_tensor(list(parents), dtype=torch.long), persistent=False)
        self.add_state("correct", default=torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor) -> None:
        pred = preds.argmax(dim=-1) if preds.ndim == 2 else preds
        parent_of = self.parent_of.to(pred.device)
        self.correct += (parent_of[pred] == parent_of[target]).sum()
        self.total += target.numel()

    def compute(self) -> Tensor:
        return self.correct.float() / self.total.clamp_min(1)
