"""Stop training at the first non-finite loss, so that a diverged run cannot look like a result.

A run that diverges (``lr`` far too high, an overflow under reduced precision) otherwise trains on NaN
to the end: the monitored ``val/acc`` stays finite (NaN logits argmax to class 0), the NaN weights are
saved as the "best" checkpoint and ``metrics.json`` reports chance-level accuracy as if it were one.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
from torch import Tensor

__all__ = ["NonFiniteLossError", "StopOnNonFiniteLoss"]


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss; raised on every rank at the same step."""


class StopOnNonFiniteLoss(L.Callback):
    """Raise :class:`NonFiniteLossError` after the first training step whose loss is not finite.

    The message names the global step, the epoch, the batch and the loss terms (the module's
    ``last_loss_terms``: ``ce``, ``aux``, ...). Under DDP the ranks agree on every step (one boolean
    all-reduce) and all raise together, so none waits on the others. Put it before the checkpoint
    callbacks (the CLI puts it first): the exception ends the run before any of them saves again, so
    no checkpoint holds weights updated from a non-finite loss, and ``mgff.fit`` writes no
    ``metrics.json`` and exits non-zero.
    """

    def __init__(self) -> None:
        self._step = 0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        self._step = trainer.global_step  # the step this batch's loss belongs to

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        bad_here = isinstance(loss, Tensor) and not bool(torch.isfinite(loss.detach()).all())
        if not trainer.strategy.reduce_boolean_decision(bad_here, all=False):
            return
        terms = getattr(pl_module, "last_loss_terms", None) or {}
        described = ", ".join(f"{name}={float(value):.4g}" for name, value in terms.items()) or "not recorded"
        if bad_here:
            what = f"non-finite training loss {_value(loss)} on rank {trainer.global_rank}"
        else:
            what = f"non-finite training loss on another rank (rank {trainer.global_rank} had {_value(loss)})"
        raise NonFiniteLossError(
            f"{what} at global step {self._step} (epoch {trainer.current_epoch}, batch {batch_idx} of the epoch); "
            f"loss terms: {described}. Training stopped; no checkpoint was written after this step. "
            "Lower model.init_args.lr (or warm up longer), or check the data for broken images."
        )


def _value(loss: Any) -> str:
    return f"{float(loss.detach().float().mean()):.4g}" if isinstance(loss, Tensor) else "(none)"
