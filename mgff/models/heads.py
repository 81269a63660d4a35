"""What every classification head returns, and the plain linear baseline head.

Heads take the backbone's list of maps ``[(B, C_i, H_i, W_i), ...]`` with the channels and reductions
the backbone reports, so a LightningModule can swap heads without knowing their insides.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from timm.layers import LayerNorm2d, trunc_normal_
from torch import Tensor, nn

__all__ = ["HeadOutput", "LinearHead"]


class HeadOutput(NamedTuple):
    """Output of a classification head.

    Attributes:
        logits: ``(B, num_classes)``.
        aux_loss: scalar, unweighted sum of the head's auxiliary losses (e.g. graph pooling); a zero
            tensor on the logits' device when the head has none. The training step adds it with its
            own weight.
        assignment: ``(B, N, K)`` soft assignment of the N graph nodes to K super-nodes, for
            visualisation; ``None`` for heads without pooling.
        base_logits: ``(B, num_classes)`` of the residual MGFF head's base path alone (the linear head inside
            it), for the LightningModule's ``ce_base`` term and ``<split>/base_acc``; ``None`` for other heads.
    """

    logits: Tensor
    aux_loss: Tensor
    assignment: Tensor | None = None
    base_logits: Tensor | None = None


class LinearHead(nn.Module):
    """Baseline head on the coarsest map: LayerNorm2d -> global average pool -> dropout -> Linear.

    Args:
        in_channels: channels of each backbone map; only the last (coarsest) is used.
        reductions: reductions of each map (kept for the common head signature).
        num_classes: number of classes.
        dropout: dropout before the classifier.

    Shapes:
        ``forward([..., (B, C, H, W)]) -> HeadOutput(logits (B, num_classes), aux_loss 0, None)``
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        reductions: Sequence[int],
        num_classes: int,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if len(in_channels) != len(reductions) or not in_channels:
            raise ValueError(f"need one reduction per map, got {in_channels} and {reductions}")
        channels = int(in_channels[-1])
        self.norm = LayerNorm2d(channels)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(channels, num_classes)
        trunc_normal_(self.classifier.weight, std=0.02)
        nn.init.zeros_(self.classifier.bias)

    def classifier_modules(self) -> list[nn.Module]:
        """All of it: the optimiser's ``classifier`` role (:mod:`mgff.lit.optim`)."""
        return [self.norm, self.classifier]

    def forward(self, features: Sequence[Tensor]) -> HeadOutput:
        x = self.norm(features[-1]).mean(dim=(2, 3))
        logits = self.classifier(self.dropout(x))
        return HeadOutput(logits, logits.new_zeros(()), None)
